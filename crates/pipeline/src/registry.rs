//! The device registry cache: every registered device's enabled flag, type and key digests, in
//! memory. Every registry write in the admin API updates it at once, so the sentinel never reads
//! the database. Contact times and message counts accumulate in atomics and are flushed to the
//! database in batches by [`DeviceRegistry::run_contact_flusher`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use iotgate_core::credentials::{KeyDigest, KeyHasher};
use iotgate_store::{DeviceContact, DeviceRecord, Store};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::rejection::{Rejection, RejectionCode};

/// What the sentinel needs to know about one device.
#[derive(Debug)]
pub struct RegisteredDevice {
    pub device_id: Arc<str>,
    pub device_type: Arc<str>,
    pub enabled: bool,
    pub primary_key_digest: KeyDigest,
    pub secondary_key_digest: KeyDigest,
    /// Messages since the last flush.
    pending_messages: AtomicI64,
    /// Last contact as unix microseconds (0 = none since the last flush).
    last_contact_micros: AtomicI64,
    /// Rate limiting (GCRA): the theoretical arrival time of the next message, in nanoseconds
    /// since [`rate_epoch`]. One atomic per device; no lock on the hot path.
    rate_next_nanos: AtomicU64,
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
            pending_messages: AtomicI64::new(0),
            last_contact_micros: AtomicI64::new(0),
            rate_next_nanos: AtomicU64::new(0),
        }
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
}

#[derive(Debug)]
pub struct DeviceRegistry {
    hasher: KeyHasher,
    devices: RwLock<HashMap<Arc<str>, Arc<RegisteredDevice>>>,
}

impl DeviceRegistry {
    pub fn new(hasher: KeyHasher) -> Self {
        Self {
            hasher,
            devices: RwLock::new(HashMap::new()),
        }
    }

    pub fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    pub fn load(&self, records: &[DeviceRecord]) {
        let mut devices = self.devices.write().expect("registry lock");
        devices.clear();
        for record in records {
            let device = RegisteredDevice::from_record(record);
            devices.insert(device.device_id.clone(), Arc::new(device));
        }
    }

    /// Inserts or replaces one device; pending contact counts of the old entry carry over.
    pub fn upsert(&self, record: &DeviceRecord) {
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
        }
        devices.insert(device.device_id.clone(), Arc::new(device));
    }

    pub fn remove(&self, device_id: &str) {
        self.devices
            .write()
            .expect("registry lock")
            .remove(device_id);
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

    /// Takes the accumulated contacts since the last call.
    pub fn drain_contacts(&self) -> Vec<DeviceContact> {
        let devices = self.devices.read().expect("registry lock");
        let mut contacts = Vec::new();
        for device in devices.values() {
            let messages = device.pending_messages.swap(0, Ordering::Relaxed);
            if messages == 0 {
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
}
