//! A tally of device authentication failures, for the audit log.
//!
//! A device with a wrong key, or someone trying keys, fails many times a second; one audit row per
//! failure would let them fill the disk and bury the admin changes. Failures are counted in memory
//! per (listener, device id, source address) and per reason, and the binary drains the tally once
//! a minute into one summary row per key. Counting is a mutex-guarded map update, cheap next to the
//! dead letter a rejection already costs, and it never waits.
//!
//! Anything that refuses a device for its credentials calls [`AuthFailureTally::note`]: the
//! pipeline for rejected messages, the listeners for refused upgrades.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::rejection::RejectionCode;

/// Distinct keys remembered per minute; past this, failures are counted under one overflow key
/// (no device, no address), so a spray of made-up ids cannot grow memory without bound.
const MAX_KEYS: usize = 10_000;

/// Who failed, and where.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuthFailureKey {
    pub listener: Arc<str>,
    /// The device id the attempt claimed, when one was found.
    pub device_id: Option<String>,
    pub address: Option<IpAddr>,
}

/// The failures of one key since the last drain, by reason code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthFailureCounts {
    pub total: u64,
    pub by_reason: BTreeMap<&'static str, u64>,
}

/// The rejections that say a device's credentials failed (not a malformed or unroutable message).
pub fn is_authentication_failure(code: RejectionCode) -> bool {
    matches!(
        code,
        RejectionCode::MissingCredentials
            | RejectionCode::UnknownDevice
            | RejectionCode::DeviceDisabled
            | RejectionCode::InvalidKey
            | RejectionCode::InvalidToken
            | RejectionCode::TokenExpired
            | RejectionCode::TokenNotYetValid
            | RejectionCode::TokenAudience
            | RejectionCode::TokenSignature
            | RejectionCode::TokenAlgorithm
            | RejectionCode::MissingToken
    )
}

#[derive(Debug, Default)]
pub struct AuthFailureTally {
    counts: Mutex<HashMap<AuthFailureKey, AuthFailureCounts>>,
}

impl AuthFailureTally {
    pub fn note(
        &self,
        listener: &Arc<str>,
        device_id: Option<&str>,
        address: Option<IpAddr>,
        reason: &'static str,
    ) {
        let mut key = AuthFailureKey {
            listener: listener.clone(),
            device_id: device_id.map(|d| d.chars().take(128).collect()),
            address,
        };
        let mut counts = self.counts.lock().expect("auth failure tally lock");
        if counts.len() >= MAX_KEYS && !counts.contains_key(&key) {
            key.device_id = None;
            key.address = None;
        }
        let entry = counts.entry(key).or_default();
        entry.total += 1;
        *entry.by_reason.entry(reason).or_insert(0) += 1;
    }

    /// Everything counted since the last drain, and a fresh start.
    pub fn drain(&self) -> Vec<(AuthFailureKey, AuthFailureCounts)> {
        let taken = std::mem::take(&mut *self.counts.lock().expect("auth failure tally lock"));
        let mut items: Vec<_> = taken.into_iter().collect();
        items.sort_by_key(|item| std::cmp::Reverse(item.1.total));
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_key_and_reason_and_starts_over_after_a_drain() {
        let tally = AuthFailureTally::default();
        let listener: Arc<str> = Arc::from("devices");
        let address: IpAddr = "203.0.113.7".parse().unwrap();
        for _ in 0..3 {
            tally.note(&listener, Some("dev-1"), Some(address), "invalid_key");
        }
        tally.note(&listener, Some("dev-1"), Some(address), "device_disabled");
        tally.note(&listener, None, Some(address), "missing_credentials");
        let drained = tally.drain();
        assert_eq!(drained.len(), 2);
        assert_eq!(drained[0].0.device_id.as_deref(), Some("dev-1"));
        assert_eq!(drained[0].1.total, 4);
        assert_eq!(drained[0].1.by_reason["invalid_key"], 3);
        assert!(tally.drain().is_empty());
    }

    #[test]
    fn a_spray_of_ids_is_bounded() {
        let tally = AuthFailureTally::default();
        let listener: Arc<str> = Arc::from("devices");
        for i in 0..(MAX_KEYS + 500) {
            tally.note(
                &listener,
                Some(&format!("made-up-{i}")),
                None,
                "unknown_device",
            );
        }
        let drained = tally.drain();
        assert_eq!(drained.len(), MAX_KEYS + 1);
        let overflow = drained.iter().find(|(k, _)| k.device_id.is_none()).unwrap();
        assert_eq!(overflow.1.total, 500);
    }
}
