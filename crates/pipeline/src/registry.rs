//! The device registry cache: every registered device's enabled flag, type and key digests, in
//! memory. Every registry write in the admin API updates it at once, so the sentinel never reads
//! the database. Contact times and message counts accumulate in atomics and are flushed to the
//! database in batches by [`DeviceRegistry::run_contact_flusher`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

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
