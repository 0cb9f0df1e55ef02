//! The device registry cache: every registered device's enabled flag, type and key digests, in
//! memory. Every registry write in the admin API updates it at once, so the sentinel never reads
//! the database. Contact times and message counts accumulate in atomics and are flushed to the
//! database in batches by [`DeviceRegistry::run_contact_flusher`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use iotgate_core::credentials::{
    constant_time_eq, sas_signature, KeyDigest, KeyHasher, KeySealer, SharedAccessSignature,
};
use iotgate_store::{DeviceContact, DeviceRecord, Store};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::ack::AckStatus;
use crate::rejection::{Rejection, RejectionCode};
use crate::sessions::{CloseCause, SessionCloser};

/// Message ids a device had acknowledged most recently. A device retries what it sent but did not
/// hear acknowledged when its connection drops; the acknowledgements lost that way are the last
/// few sent, so a short memory answers those retries without delivering them again. Older
/// retries are caught by the telemetry store's message-id index.
const RECENT_ACKS: usize = 32;

#[derive(Debug, Default)]
struct RecentAcks {
    entries: VecDeque<(Box<str>, Instant, AckStatus)>,
}

/// What the sentinel needs to know about one device.
#[derive(Debug)]
pub struct RegisteredDevice {
    pub device_id: Arc<str>,
    pub device_type: Arc<str>,
    pub enabled: bool,
    pub primary_key_digest: KeyDigest,
    pub secondary_key_digest: KeyDigest,
    /// The keys sealed under the server secret, for shared-access signatures (absent for keys
    /// issued before they were sealed).
    sealed_keys: [Option<String>; 2],
    /// Messages since the last flush.
    pending_messages: AtomicI64,
    /// Last contact as unix microseconds (0 = none since the last flush).
    last_contact_micros: AtomicI64,
    /// A ping or pong moved the last contact since the last flush (no message counted).
    activity_unflushed: AtomicBool,
    /// Rate limiting (GCRA): the theoretical arrival time of the next message, in nanoseconds
    /// since [`rate_epoch`]. One atomic per device; no lock on the hot path.
    rate_next_nanos: AtomicU64,
    /// Allocated on the first acknowledgement, so devices that never use them pay one pointer.
    recent_acks: Mutex<Option<Box<RecentAcks>>>,
}

fn rate_epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl RegisteredDevice {
    fn from_record(record: &DeviceRecord) -> Self {
        Self {
            device_id: Arc::from(record.device_id.as_str()),
            device_type: Arc::from(record.device_type.as_str()),
            enabled: record.enabled,
            primary_key_digest: record.primary_key_digest,
            secondary_key_digest: record.secondary_key_digest,
            sealed_keys: [
                record.primary_key_sealed.clone(),
                record.secondary_key_sealed.clone(),
            ],
            pending_messages: AtomicI64::new(0),
            activity_unflushed: AtomicBool::new(false),
            last_contact_micros: AtomicI64::new(0),
            rate_next_nanos: AtomicU64::new(0),
            recent_acks: Mutex::new(None),
        }
    }

    /// True when `record` says what this entry holds (type, enabled, keys): applying it would
    /// change nothing.
    pub fn matches(&self, record: &DeviceRecord) -> bool {
        *self.device_type == *record.device_type
            && self.enabled == record.enabled
            && self.primary_key_digest == record.primary_key_digest
            && self.secondary_key_digest == record.secondary_key_digest
            && self.sealed_keys[0] == record.primary_key_sealed
            && self.sealed_keys[1] == record.secondary_key_sealed
    }

    /// The status of an acknowledgement of `message_id` sent within `window`, if any.
    pub fn recently_acked(&self, message_id: &str, window: Duration) -> Option<AckStatus> {
        let recent = self.recent_acks.lock().expect("recent acks lock");
        recent
            .as_ref()?
            .entries
            .iter()
            .rev()
            .find(|(id, at, _)| &**id == message_id && at.elapsed() < window)
            .map(|(_, _, status)| *status)
    }

    /// Notes an acknowledgement just sent for `message_id`.
    pub fn remember_ack(&self, message_id: &str, status: AckStatus) {
        let mut recent = self.recent_acks.lock().expect("recent acks lock");
        let recent = recent.get_or_insert_with(Default::default);
        if recent.entries.len() == RECENT_ACKS {
            recent.entries.pop_front();
        }
        recent
            .entries
            .push_back((message_id.into(), Instant::now(), status));
    }

    /// Reserves the right to send one message at `per_second`, allowing bursts of one second's
    /// worth. Returns how long the caller must wait first, or `None` when that would be more
    /// than `max_wait` (nothing is reserved then).
    pub fn reserve(&self, per_second: u32, max_wait: Duration) -> Option<Duration> {
        let per_second = u64::from(per_second.max(1));
        let interval = 1_000_000_000 / per_second;
        let burst = interval * per_second;
        let now = rate_epoch().elapsed().as_nanos() as u64;
        let mut current = self.rate_next_nanos.load(Ordering::Relaxed);
        loop {
            let tat = current.max(now);
            let allowed_at = (tat + interval).saturating_sub(burst);
            let wait = allowed_at.saturating_sub(now);
            if wait > max_wait.as_nanos() as u64 {
                return None;
            }
            match self.rate_next_nanos.compare_exchange_weak(
                current,
                tat + interval,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Duration::from_nanos(wait)),
                Err(actual) => current = actual,
            }
        }
    }

    /// True when `digest` is one of the device's current key digests.
    pub fn holds_digest(&self, digest: &KeyDigest) -> bool {
        iotgate_core::credentials::constant_time_eq(digest, &self.primary_key_digest)
            | iotgate_core::credentials::constant_time_eq(digest, &self.secondary_key_digest)
    }

    /// Records one message from the device (two relaxed atomic writes).
    pub fn note_contact(&self, at_micros: i64) {
        self.pending_messages.fetch_add(1, Ordering::Relaxed);
        self.last_contact_micros
            .fetch_max(at_micros, Ordering::Relaxed);
    }

    /// Records activity that is not a message (a WebSocket ping or pong): the last contact
    /// moves, the message count does not. Two relaxed atomic writes, like a message.
    pub fn note_activity(&self, at_micros: i64) {
        self.last_contact_micros
            .fetch_max(at_micros, Ordering::Relaxed);
        self.activity_unflushed.store(true, Ordering::Relaxed);
    }
}

/// A live connection that authenticated as a device with one of its keys.
#[derive(Debug)]
struct LiveSession {
    /// `None` for a connection opened with a token: no device key stands behind it.
    key_digest: Option<KeyDigest>,
    closer: std::sync::Weak<SessionCloser>,
}

#[derive(Debug)]
pub struct DeviceRegistry {
    hasher: KeyHasher,
    sealer: KeySealer,
    devices: RwLock<HashMap<Arc<str>, Arc<RegisteredDevice>>>,
    /// Open connections per device, so a change to the device closes them at once.
    sessions: Mutex<HashMap<Arc<str>, Vec<LiveSession>>>,
}

impl DeviceRegistry {
    pub fn new(hasher: KeyHasher, sealer: KeySealer) -> Self {
        Self {
            hasher,
            sealer,
            devices: RwLock::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Notes that a connection speaks for `device_id` with the key whose digest is given (none
    /// for a connection token); a later disable, delete or rotation of that key closes it.
    pub fn attach_session(
        &self,
        device_id: &Arc<str>,
        key_digest: Option<KeyDigest>,
        closer: &Arc<SessionCloser>,
    ) {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let list = sessions.entry(device_id.clone()).or_default();
        list.retain(|s| s.closer.strong_count() > 0);
        list.push(LiveSession {
            key_digest,
            closer: Arc::downgrade(closer),
        });
    }

    /// Closes the device's connections that `still_valid` rejects, with `cause`.
    fn close_sessions(
        &self,
        device_id: &str,
        cause: CloseCause,
        still_valid: impl Fn(Option<&KeyDigest>) -> bool,
    ) {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let Some(list) = sessions.get_mut(device_id) else {
            return;
        };
        list.retain(|session| {
            let Some(closer) = session.closer.upgrade() else {
                return false;
            };
            if still_valid(session.key_digest.as_ref()) {
                return true;
            }
            tracing::info!(device = %device_id, reason = cause.as_str(), "closing a live connection of the device");
            closer.close(cause);
            false
        });
        if list.is_empty() {
            sessions.remove(device_id);
        }
    }

    pub fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    /// Seals a freshly issued access key for storage beside its digest.
    pub fn seal_key(&self, access_key: &str) -> String {
        self.sealer.seal(access_key)
    }

    /// Checks a shared-access signature made with one of the device's keys. The caller has
    /// already checked the expiry and matched the resource to `device_id`.
    pub fn authenticate_sas(
        &self,
        device_id: &str,
        token: &SharedAccessSignature,
    ) -> Result<(Arc<RegisteredDevice>, KeyDigest), Rejection> {
        let Some(device) = self.get(device_id) else {
            return Err(Rejection::new(
                RejectionCode::UnknownDevice,
                "no device is registered with this id",
            ));
        };
        let mut matched = None;
        let mut any_sealed = false;
        for (sealed, digest) in device
            .sealed_keys
            .iter()
            .zip([device.primary_key_digest, device.secondary_key_digest])
        {
            let Some(key) = sealed.as_deref().and_then(|s| self.sealer.unseal(s)) else {
                continue;
            };
            any_sealed = true;
            let expected = sas_signature(&key, &token.signed_resource, token.expiry);
            if expected.is_some_and(|e| constant_time_eq(&e, &token.signature)) {
                matched = Some(digest);
            }
        }
        if !device.enabled {
            return Err(Rejection::new(
                RejectionCode::DeviceDisabled,
                "the device is disabled",
            ));
        }
        match matched {
            Some(digest) => Ok((device, digest)),
            None if !any_sealed => Err(Rejection::new(
                RejectionCode::InvalidKey,
                "the device's keys were issued before shared-access signatures; rotate a key to use them",
            )),
            None => Err(Rejection::new(
                RejectionCode::InvalidKey,
                "the signature was not made with one of the device's keys",
            )),
        }
    }

    pub fn load(&self, records: &[DeviceRecord]) {
        let mut devices = self.devices.write().expect("registry lock");
        devices.clear();
        for record in records {
            let device = RegisteredDevice::from_record(record);
            devices.insert(device.device_id.clone(), Arc::new(device));
        }
    }

    /// Inserts or replaces one device; pending contact counts of the old entry carry over. Live
    /// connections that the new record no longer allows (device disabled, their key rotated) are
    /// closed at once.
    pub fn upsert(&self, record: &DeviceRecord) {
        self.replace(record);
        let device_id = record.device_id.as_str();
        if !record.enabled {
            self.close_sessions(device_id, CloseCause::DeviceDisabled, |_| false);
        } else {
            let current = [record.primary_key_digest, record.secondary_key_digest];
            // A token connection has no key to rotate and stays open.
            self.close_sessions(device_id, CloseCause::KeyRotated, |digest| {
                digest.is_none_or(|digest| {
                    current
                        .iter()
                        .any(|d| iotgate_core::credentials::constant_time_eq(d, digest))
                })
            });
        }
    }

    fn replace(&self, record: &DeviceRecord) {
        let device = RegisteredDevice::from_record(record);
        let mut devices = self.devices.write().expect("registry lock");
        if let Some(old) = devices.get(record.device_id.as_str()) {
            device.pending_messages.store(
                old.pending_messages.swap(0, Ordering::Relaxed),
                Ordering::Relaxed,
            );
            device.last_contact_micros.store(
                old.last_contact_micros.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            device.activity_unflushed.store(
                old.activity_unflushed.swap(false, Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
        devices.insert(device.device_id.clone(), Arc::new(device));
    }

    /// Forgets a device and closes its live connections.
    pub fn remove(&self, device_id: &str) {
        self.devices
            .write()
            .expect("registry lock")
            .remove(device_id);
        self.close_sessions(device_id, CloseCause::DeviceDeleted, |_| false);
    }

    /// Every registered device id.
    pub fn device_ids(&self) -> Vec<Arc<str>> {
        self.devices
            .read()
            .expect("registry lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Brings the registry in line with the database's rows (another node's changes): changed
    /// devices are replaced (closing connections a disable or re-key ends), missing ones removed.
    /// Returns how many entries changed.
    pub fn reconcile(&self, records: &[DeviceRecord]) -> usize {
        let mut changed = 0;
        let mut stale: std::collections::HashSet<Arc<str>> =
            self.device_ids().into_iter().collect();
        for record in records {
            stale.remove(record.device_id.as_str());
            if !self
                .get(&record.device_id)
                .is_some_and(|d| d.matches(record))
            {
                self.upsert(record);
                changed += 1;
            }
        }
        for device_id in stale {
            self.remove(&device_id);
            changed += 1;
        }
        changed
    }

    pub fn get(&self, device_id: &str) -> Option<Arc<RegisteredDevice>> {
        self.devices
            .read()
            .expect("registry lock")
            .get(device_id)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.devices.read().expect("registry lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks a device id and access key: unknown, disabled and wrong keys are rejected with
    /// distinct codes (the operator needs to tell them apart in dead letters).
    pub fn authenticate(
        &self,
        device_id: &str,
        key: &str,
    ) -> Result<(Arc<RegisteredDevice>, KeyDigest), Rejection> {
        let Some(device) = self.get(device_id) else {
            return Err(Rejection::new(
                RejectionCode::UnknownDevice,
                "no device is registered with this id",
            ));
        };
        // The digest is computed before the enabled check so both paths cost the same.
        let digest = self.hasher.digest(key);
        let key_ok = device.holds_digest(&digest);
        if !device.enabled {
            return Err(Rejection::new(
                RejectionCode::DeviceDisabled,
                "the device is disabled",
            ));
        }
        if !key_ok {
            return Err(Rejection::new(
                RejectionCode::InvalidKey,
                "the access key does not match the device",
            ));
        }
        Ok((device, digest))
    }

    /// Adds the contacts not yet flushed to the database to a record read from it, so the API
    /// shows counts that are never behind the traffic.
    pub fn add_unflushed_contacts(&self, record: &mut DeviceRecord) {
        let Some(device) = self.get(&record.device_id) else {
            return;
        };
        let pending = device.pending_messages.load(Ordering::Relaxed);
        if pending == 0 && !device.activity_unflushed.load(Ordering::Relaxed) {
            return;
        }
        record.message_count += pending;
        let micros = device.last_contact_micros.load(Ordering::Relaxed);
        if let Ok(at) = OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000) {
            let at = iotgate_core::envelope::format_timestamp(at);
            if record
                .last_contact
                .as_ref()
                .is_none_or(|stored| *stored < at)
            {
                record.last_contact = Some(at);
            }
        }
    }

    /// Takes the accumulated contacts since the last call.
    pub fn drain_contacts(&self) -> Vec<DeviceContact> {
        let devices = self.devices.read().expect("registry lock");
        let mut contacts = Vec::new();
        for device in devices.values() {
            let messages = device.pending_messages.swap(0, Ordering::Relaxed);
            let active = device.activity_unflushed.swap(false, Ordering::Relaxed);
            if messages == 0 && !active {
                continue;
            }
            let micros = device.last_contact_micros.load(Ordering::Relaxed);
            let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
                .unwrap_or_else(|_| OffsetDateTime::now_utc());
            contacts.push(DeviceContact {
                device_id: device.device_id.to_string(),
                last_contact: iotgate_core::envelope::format_timestamp(at),
                messages,
            });
        }
        contacts
    }

    /// Flushes contacts every `interval` until cancelled, then once more.
    pub async fn run_contact_flusher(
        self: Arc<Self>,
        store: Store,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            let stop = tokio::select! {
                _ = tokio::time::sleep(interval) => false,
                _ = shutdown.cancelled() => true,
            };
            let contacts = self.drain_contacts();
            if let Err(error) = store.record_device_contacts(&contacts).await {
                tracing::warn!(error = %error, devices = contacts.len(), "could not record device contacts");
            }
            if stop {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> RegisteredDevice {
        RegisteredDevice::from_record(&DeviceRecord {
            device_id: "d".into(),
            name: "d".into(),
            device_type: "t".into(),
            enabled: true,
            properties: serde_json::json!({}),
            primary_key_digest: [0; 32],
            secondary_key_digest: [1; 32],
            primary_key_sealed: None,
            secondary_key_sealed: None,
            created_at: String::new(),
            last_contact: None,
            message_count: 0,
        })
    }

    #[test]
    fn rate_limit_allows_a_second_of_burst_then_spaces_messages() {
        let d = device();
        let max = Duration::from_secs(1);
        for _ in 0..10 {
            assert_eq!(d.reserve(10, max), Some(Duration::ZERO));
        }
        let wait = d.reserve(10, max).unwrap();
        assert!(
            wait > Duration::from_millis(50) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Far ahead of the rate: refused, and nothing is reserved by the refusal.
        for _ in 0..9 {
            d.reserve(10, max).unwrap();
        }
        assert_eq!(d.reserve(10, max), None);
    }

    #[test]
    fn recent_acks_are_remembered_within_the_window_and_bounded() {
        let d = device();
        let window = Duration::from_secs(60);
        assert_eq!(d.recently_acked("m-1", window), None);
        d.remember_ack("m-1", AckStatus::Stored);
        assert_eq!(d.recently_acked("m-1", window), Some(AckStatus::Stored));
        assert_eq!(d.recently_acked("m-1", Duration::ZERO), None);
        for i in 0..RECENT_ACKS {
            d.remember_ack(&format!("n-{i}"), AckStatus::Accepted);
        }
        assert_eq!(
            d.recently_acked("m-1", window),
            None,
            "the oldest was forgotten"
        );
        assert_eq!(d.recently_acked("n-0", window), Some(AckStatus::Accepted));
    }
}
