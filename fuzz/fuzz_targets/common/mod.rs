//! Shared fixture and reference models for the sentinel and router targets: a device registry
//! with a few devices, one sentinel per locator kind, and independent models of what the
//! sentinel and the router must decide, so every outcome (not just "no panic") is checked.
//!
//! `crates/pipeline/tests/properties.rs` includes this file too (`#[path]`), so the fuzz targets
//! and the proptest properties check one and the same model. It may only use crates both have:
//! iotgate-core, iotgate-pipeline, iotgate-store, serde_json, base64, bytes, time, uuid.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use iotgate_core::credentials::{parse_basic, KeyHasher};
use iotgate_core::envelope::ConnectionMetadata;
use iotgate_core::{ContentType, Envelope, Payload, RouteDefinition, SentinelDefinition};
use iotgate_pipeline::{
    ConnectTimeValues, ConnectionCredentials, DeviceBinding, DeviceRegistry, Metrics, Rejection,
    RejectionCode, Router, Sentinel,
};
use iotgate_store::DeviceRecord;
use serde_json::{json, Value};

pub const SECRET: &[u8] = b"fuzz-server-secret";

/// One device as the model sees it.
#[derive(Debug, Clone)]
pub struct ModelDevice {
    pub id: String,
    pub device_type: String,
    pub enabled: bool,
    pub keys: [String; 2],
}

/// The registered devices: two enabled, one disabled, one with a numeric id and key (so JSON
/// numbers as credentials are exercised).
pub fn model_devices() -> Vec<ModelDevice> {
    [
        ("dev-1", "thermo", true, ["key-1a", "key-1b"]),
        ("dev-2", "meter", true, ["key-2a", "key-2b"]),
        ("off-3", "thermo", false, ["key-3a", "key-3b"]),
        ("7", "meter", true, ["42", "key-7b"]),
    ]
    .into_iter()
    .map(|(id, device_type, enabled, [a, b])| ModelDevice {
        id: id.into(),
        device_type: device_type.into(),
        enabled,
        keys: [a.into(), b.into()],
    })
    .collect()
}

/// Ids the inputs pick from: every registered one plus one that is not registered.
pub const IDS: [&str; 5] = ["dev-1", "dev-2", "off-3", "7", "ghost"];
/// Keys the inputs pick from: every valid key, plus wrong ones.
pub const KEYS: [&str; 10] = [
    "key-1a", "key-1b", "key-2a", "key-2b", "key-3a", "key-3b", "42", "key-7b", "wrong", "",
];

pub fn record(device: &ModelDevice, hasher: &KeyHasher) -> DeviceRecord {
    DeviceRecord {
        device_id: device.id.clone(),
        name: device.id.clone(),
        device_type: device.device_type.clone(),
        enabled: device.enabled,
        properties: json!({}),
        primary_key_digest: hasher.digest(&device.keys[0]),
        secondary_key_digest: hasher.digest(&device.keys[1]),
        primary_key_sealed: None,
        secondary_key_sealed: None,
        created_at: "2026-01-01T00:00:00.000000Z".into(),
        last_contact: None,
        message_count: 0,
    }
}

pub fn registry(devices: &[ModelDevice]) -> DeviceRegistry {
    let hasher = KeyHasher::new(SECRET);
    let registry = DeviceRegistry::new(
        hasher.clone(),
        iotgate_core::credentials::KeySealer::new(b"fuzz sealing secret"),
    );
    let records: Vec<DeviceRecord> = devices.iter().map(|d| record(d, &hasher)).collect();
    registry.load(&records);
    registry
}

/// Where the model looks for a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Body(&'static str),
    Query(&'static str),
    Header(&'static str),
}

impl Place {
    fn locator(self) -> Value {
        match self {
            Place::Body(p) => json!({"from": "body", "pointer": p}),
            Place::Query(n) => json!({"from": "query", "name": n}),
            Place::Header(n) => json!({"from": "header", "name": n}),
        }
    }
    pub fn is_body(self) -> bool {
        matches!(self, Place::Body(_))
    }
}

/// One sentinel configuration and where its credentials are.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub key: &'static str,
    pub basic: bool,
    /// accessKey: where the device id is; basic: unused (the credential carries it).
    pub id: Place,
    /// accessKey: where the key is; basic: where the credential is.
    pub secret: Place,
    /// Whether the definition names the locators (false: rely on the defaults).
    pub explicit: bool,
}

/// One sentinel per locator kind (and the defaults).
pub const SPECS: [Spec; 8] = [
    Spec {
        key: "body-default",
        basic: false,
        id: Place::Body("/deviceId"),
        secret: Place::Body("/accessKey"),
        explicit: false,
    },
    Spec {
        key: "body-nested",
        basic: false,
        id: Place::Body("/device/id"),
        secret: Place::Body("/auth/key"),
        explicit: true,
    },
    Spec {
        key: "body-escaped",
        basic: false,
        id: Place::Body("/meta~1id"),
        secret: Place::Body("/a~0k/secret"),
        explicit: true,
    },
    Spec {
        key: "query-id-body-key",
        basic: false,
        id: Place::Query("id"),
        secret: Place::Body("/accessKey"),
        explicit: true,
    },
    Spec {
        key: "basic-body",
        basic: true,
        id: Place::Body("/credential"),
        secret: Place::Body("/credential"),
        explicit: true,
    },
    Spec {
        key: "basic-header",
        basic: true,
        id: Place::Header("authorization"),
        secret: Place::Header("authorization"),
        explicit: false,
    },
    Spec {
        key: "query-id-header-key",
        basic: false,
        id: Place::Query("device"),
        secret: Place::Header("x-access-key"),
        explicit: true,
    },
    Spec {
        key: "basic-query",
        basic: true,
        id: Place::Query("auth"),
        secret: Place::Query("auth"),
        explicit: true,
    },
];

impl Spec {
    pub fn definition(&self) -> SentinelDefinition {
        let mut doc = json!({"key": self.key, "name": self.key,
            "method": if self.basic { "basic" } else { "accessKey" }});
        if self.explicit {
            if self.basic {
                doc["credential"] = self.secret.locator();
            } else {
                doc["deviceId"] = self.id.locator();
                doc["accessKey"] = self.secret.locator();
            }
        }
        serde_json::from_value(doc).expect("fixture sentinel definitions are well-formed")
    }

    pub fn sentinel(&self, metrics: &Arc<Metrics>) -> Sentinel {
        Sentinel::new(self.definition(), metrics.clone())
    }

    pub fn fully_connect_time(&self) -> bool {
        !self.id.is_body() && !self.secret.is_body()
    }
}

/// The model's outcome: the accepted device id, or the rejection code and claimed id.
pub type Outcome = Result<String, (RejectionCode, Option<String>)>;

pub fn outcome_of<T>(result: &Result<T, Rejection>, id: impl Fn(&T) -> String) -> Outcome {
    match result {
        Ok(v) => Ok(id(v)),
        Err(r) => Err((r.code, r.claimed_device_id.clone())),
    }
}

pub fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub fn lookup(place: Place, request: &ConnectionCredentials) -> Option<String> {
    match place {
        Place::Query(name) => request
            .query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone()),
        Place::Header(name) => request
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone()),
        Place::Body(_) => None,
    }
}

/// The model's registry check, in the registry's order: unknown, disabled, wrong key.
pub fn model_check(devices: &[ModelDevice], id: &str, key: &str) -> Outcome {
    let Some(device) = devices.iter().find(|d| d.id == id) else {
        return Err((RejectionCode::UnknownDevice, Some(id.into())));
    };
    if !device.enabled {
        return Err((RejectionCode::DeviceDisabled, Some(id.into())));
    }
    if !device.keys.iter().any(|k| k == key) {
        return Err((RejectionCode::InvalidKey, Some(id.into())));
    }
    Ok(id.into())
}

/// What the model knows after the connect-time step.
#[derive(Debug, Clone, Default)]
pub struct ModelConnection {
    /// Bound device id and the key presented at connect time.
    pub bound: Option<(String, String)>,
    pub id: Option<String>,
    pub secret: Option<String>,
}

pub fn missing() -> Outcome {
    Err((RejectionCode::MissingCredentials, None))
}

/// The model of `Sentinel::authenticate_connection`.
pub fn model_connect(
    spec: &Spec,
    devices: &[ModelDevice],
    request: &ConnectionCredentials,
) -> Result<ModelConnection, (RejectionCode, Option<String>)> {
    let mut conn = ModelConnection::default();
    if spec.basic {
        if !spec.secret.is_body() {
            if let Some(raw) = lookup(spec.secret, request) {
                let (id, key) =
                    parse_basic(&raw).ok_or((RejectionCode::MissingCredentials, None))?;
                conn.id = Some(id);
                conn.secret = Some(key);
            }
        }
    } else {
        conn.id = lookup(spec.id, request);
        conn.secret = lookup(spec.secret, request);
    }
    if !spec.fully_connect_time() {
        return Ok(conn);
    }
    let (Some(id), Some(key)) = (conn.id.clone(), conn.secret.clone()) else {
        return Err((RejectionCode::MissingCredentials, None));
    };
    model_check(devices, &id, &key)?;
    Ok(ModelConnection {
        bound: Some((id, key)),
        id: None,
        secret: None,
    })
}

/// The model of `Sentinel::authenticate_message` on a JSON payload (as received, before the
/// sentinel touched it).
pub fn model_message(
    spec: &Spec,
    devices: &[ModelDevice],
    conn: &ModelConnection,
    payload: &Value,
) -> Outcome {
    if let Some((id, key)) = &conn.bound {
        return model_check(devices, id, key);
    }
    let text_at = |place: Place| match place {
        Place::Body(pointer) => payload.pointer(pointer).and_then(as_text),
        _ => None,
    };
    let body_secret = text_at(spec.secret);
    let (id, key) = if spec.basic {
        match body_secret {
            Some(raw) => match parse_basic(&raw) {
                Some((id, key)) => (Some(id), Some(key)),
                None => return missing(),
            },
            None => (conn.id.clone(), conn.secret.clone()),
        }
    } else {
        let id = if spec.id.is_body() {
            text_at(spec.id)
        } else {
            conn.id.clone()
        };
        (id, body_secret.or_else(|| conn.secret.clone()))
    };
    let (Some(id), Some(key)) = (id, key) else {
        return missing();
    };
    model_check(devices, &id, &key)
}

/// Runs one message through `sentinel` and checks it against the model and the invariants:
/// an accepted message names a registered, enabled device holding the presented key, and a
/// body credential is gone from the payload afterwards, accepted or not.
#[allow(clippy::too_many_arguments)]
pub fn check_message(
    spec: &Spec,
    sentinel: &Sentinel,
    registry: &DeviceRegistry,
    devices: &[ModelDevice],
    binding: Option<&DeviceBinding>,
    values: &ConnectTimeValues,
    conn: &ModelConnection,
    original: &Value,
) -> Outcome {
    let mut payload = Payload::Json(original.clone());
    let result = sentinel.authenticate_message(registry, binding, values, &mut payload);
    let expected = model_message(spec, devices, conn, original);
    let actual = outcome_of(&result, |(d, _)| d.device_id.to_string());
    assert_eq!(
        actual, expected,
        "sentinel {} on {original} (connection {conn:?})",
        spec.key
    );
    if let Ok((device, digest)) = &result {
        let digest = digest.expect("key methods return the digest of the key used");
        assert!(
            device.holds_digest(&digest),
            "the digest returned is one of the device's keys"
        );
        let registered = registry
            .get(&device.device_id)
            .expect("an accepted device is registered");
        assert!(Arc::ptr_eq(&registered, device));
        assert!(device.enabled, "accepted a disabled device");
        let model = devices.iter().find(|d| *d.id == *device.device_id).unwrap();
        assert!(model.enabled);
    }
    let Payload::Json(after) = &payload else {
        panic!("the sentinel changed the payload's kind");
    };
    match (binding, spec.secret) {
        (None, Place::Body(pointer)) => {
            assert!(
                after.pointer(pointer).is_none(),
                "sentinel {}: credential at {pointer} still in {after} (from {original})",
                spec.key
            );
        }
        _ => assert_eq!(after, original, "sentinel {} changed the payload", spec.key),
    }
    actual
}

/// A registry and one sentinel per [`SPECS`] entry, each with the connect-time state of one
/// upgrade request that satisfies every connect-time locator.
pub struct Fixture {
    pub devices: Vec<ModelDevice>,
    pub registry: DeviceRegistry,
    pub sentinels: Vec<(
        Spec,
        Sentinel,
        Option<DeviceBinding>,
        ConnectTimeValues,
        ModelConnection,
    )>,
}

impl Fixture {
    pub fn new(metrics: &Arc<Metrics>) -> Self {
        let devices = model_devices();
        let registry = registry(&devices);
        let request = ConnectionCredentials {
            query: vec![
                ("id".into(), "dev-2".into()),
                ("device".into(), "dev-1".into()),
                ("auth".into(), basic_value("7", "key-7b", "")),
            ],
            headers: vec![
                (
                    "authorization".into(),
                    basic_value("dev-2", "key-2a", "Basic "),
                ),
                ("x-access-key".into(), "key-1a".into()),
            ],
        };
        let sentinels = SPECS
            .iter()
            .map(|spec| {
                let sentinel = spec.sentinel(metrics);
                let (binding, values) = sentinel
                    .authenticate_connection(&registry, &request)
                    .expect("the fixture request is valid");
                let conn = model_connect(spec, &devices, &request).unwrap();
                assert_eq!(binding.is_some(), conn.bound.is_some());
                (*spec, sentinel, binding, values, conn)
            })
            .collect();
        Self {
            devices,
            registry,
            sentinels,
        }
    }

    /// One message through every sentinel, on its fixture connection and, where that
    /// connection is not bound, also on a connection that presented nothing. Returns how many
    /// of those passes accepted the message.
    pub fn check(&self, message: &Value) -> usize {
        let mut accepted = 0;
        for (spec, sentinel, binding, values, conn) in &self.sentinels {
            let registry = &self.registry;
            let outcome = check_message(
                spec,
                sentinel,
                registry,
                &self.devices,
                binding.as_ref(),
                values,
                conn,
                message,
            );
            if binding.is_none() {
                accepted += usize::from(outcome.is_ok());
                let outcome = check_message(
                    spec,
                    sentinel,
                    registry,
                    &self.devices,
                    None,
                    &ConnectTimeValues::default(),
                    &ModelConnection::default(),
                    message,
                );
                accepted += usize::from(outcome.is_ok());
            }
        }
        accepted
    }
}

pub fn basic_value(id: &str, key: &str, prefix: &str) -> String {
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{key}"))
    )
}

/// `parse_basic` on any text: an answer names a non-empty user without a colon and is exactly
/// what the text encodes; and any user without a colon and any secret survive every accepted
/// spelling of the prefix.
pub fn check_parse_basic(value: &str) {
    if let Some((user, secret)) = parse_basic(value) {
        assert!(!user.is_empty(), "{value:?}");
        assert!(!user.contains(':'), "{value:?}");
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
        assert!(
            value.trim().ends_with(&encoded),
            "{value:?} -> {user:?}:{secret:?}"
        );
    }
    let user: String = value.chars().filter(|c| *c != ':').collect();
    if !user.is_empty() {
        for prefix in ["", "Basic ", "basic ", " BASIC  "] {
            let header = basic_value(&user, value, prefix);
            assert_eq!(
                parse_basic(&header),
                Some((user.clone(), value.to_owned())),
                "{header:?}"
            );
        }
    }
}

/// A registry change made while a connection is open.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    None,
    RotatePrimary(usize),
    RotateSecondary(usize),
    Disable(usize),
    Enable(usize),
    Remove(usize),
}

/// Connect-time authentication of `request` through every sentinel kind, compared with the
/// model; then one message with `body` on the connection, a registry `change`, and the same
/// message again (a rotated key, a disabled or removed device must take effect at once).
pub fn check_connection_flow(
    metrics: &Arc<Metrics>,
    request: &ConnectionCredentials,
    body: &Value,
    change: Change,
) -> usize {
    let mut accepted = 0;
    for spec in &SPECS {
        let mut devices = model_devices();
        let registry = registry(&devices);
        let sentinel = spec.sentinel(metrics);

        let result = sentinel.authenticate_connection(&registry, request);
        let expected = model_connect(spec, &devices, request);
        let (binding, values, conn) = match (result, expected) {
            (Ok((binding, values)), Ok(conn)) => {
                assert_eq!(
                    binding.as_ref().map(|b| b.device_id.to_string()),
                    conn.bound.as_ref().map(|(id, _)| id.clone()),
                    "{}: {request:?}",
                    spec.key
                );
                if let (Some(binding), Some((_, key))) = (&binding, &conn.bound) {
                    let device = registry
                        .get(&binding.device_id)
                        .expect("bound device exists");
                    assert!(device.enabled);
                    let digest = binding.key_digest.expect("a key binding has a digest");
                    assert!(device.holds_digest(&digest));
                    assert_eq!(digest, KeyHasher::new(SECRET).digest(key));
                }
                (binding, values, conn)
            }
            (Err(rejection), Err(code)) => {
                assert_eq!(
                    (rejection.code, rejection.claimed_device_id),
                    code,
                    "{}: {request:?}",
                    spec.key
                );
                continue;
            }
            (actual, expected) => {
                panic!(
                    "{}: {request:?}: {actual:?} vs model {expected:?}",
                    spec.key
                )
            }
        };

        let outcome = check_message(
            spec,
            &sentinel,
            &registry,
            &devices,
            binding.as_ref(),
            &values,
            &conn,
            body,
        );
        accepted += usize::from(outcome.is_ok());

        let hasher = KeyHasher::new(SECRET);
        let n = devices.len();
        match change {
            Change::None => {}
            Change::RotatePrimary(i) | Change::RotateSecondary(i) => {
                let slot = usize::from(matches!(change, Change::RotateSecondary(_)));
                let d = &mut devices[i % n];
                d.keys[slot] = format!("{}-rotated", d.keys[slot]);
                registry.upsert(&record(d, &hasher));
            }
            Change::Disable(i) | Change::Enable(i) => {
                let d = &mut devices[i % n];
                d.enabled = matches!(change, Change::Enable(_));
                registry.upsert(&record(d, &hasher));
            }
            Change::Remove(i) => {
                let d = devices.remove(i % n);
                registry.remove(&d.id);
            }
        }
        let outcome = check_message(
            spec,
            &sentinel,
            &registry,
            &devices,
            binding.as_ref(),
            &values,
            &conn,
            body,
        );
        accepted += usize::from(outcome.is_ok());
    }
    accepted
}

/// An authenticated envelope as the router sees it.
pub fn envelope(
    listener: &str,
    device_id: Option<&str>,
    device_type: Option<&str>,
    payload: Payload,
) -> Envelope {
    let content_type = match &payload {
        Payload::Json(_) => ContentType::Json,
        Payload::Text(_) => ContentType::Text,
        Payload::Binary(_) => ContentType::Binary,
    };
    Envelope {
        id: uuid::Uuid::nil(),
        listener_key: Arc::from(listener),
        connection_id: 1,
        source_address: None,
        received_at: time::OffsetDateTime::UNIX_EPOCH,
        received_instant: Instant::now(),
        content_type,
        size: 0,
        payload,
        device_id: device_id.map(Arc::from),
        device_type: device_type.map(Arc::from),
        authenticated: true,
        claimed_device_id: None,
        metadata: Arc::new(ConnectionMetadata::default()),
        message_id: None,
        dedup_window: None,
        attributes: None,
        message_type: None,
    }
}

/// The reference model of one route's selectors: an omitted selector matches everything, a
/// present one (even an empty list) only the values it lists.
pub fn model_route_matches(d: &RouteDefinition, e: &Envelope) -> bool {
    let within = |list: &Option<Vec<String>>, value: Option<&str>| match list {
        None => true,
        Some(list) => value.is_some_and(|v| list.iter().any(|x| x == v)),
    };
    d.enabled
        && within(&d.listeners, Some(&e.listener_key))
        && within(&d.device_types, e.device_type.as_deref())
        && within(&d.device_ids, e.device_id.as_deref())
        && d.message_type.as_ref().is_none_or(|m| match &m.pointer {
            Some(pointer) => {
                let found = match &e.payload {
                    Payload::Json(v) => v.pointer(pointer),
                    _ => None,
                };
                found.is_some_and(|f| m.values.contains(f))
            }
            None => e
                .message_type
                .as_deref()
                .is_some_and(|t| m.values.iter().any(|v| v.as_str() == Some(t))),
        })
}

/// `Router::select` on `router` (built from `definitions`): the targets are distinct, exactly
/// the model's (downstreams of matching enabled routes, first occurrence order), include every
/// downstream of an enabled route without selectors, and each names some enabled route's
/// downstream.
pub fn check_router(router: &Router, definitions: &[RouteDefinition], e: &Envelope) {
    let mut targets = Vec::new();
    router.select(e, &mut targets);
    let targets: Vec<String> = targets.iter().map(|t| t.to_string()).collect();

    let mut distinct = targets.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        targets.len(),
        "duplicate targets {targets:?}"
    );

    let mut expected: Vec<String> = Vec::new();
    for d in definitions.iter().filter(|d| model_route_matches(d, e)) {
        for t in &d.downstreams {
            if !expected.contains(t) {
                expected.push(t.clone());
            }
        }
    }
    assert_eq!(targets, expected, "routes {definitions:?}, envelope {e:?}");

    for d in definitions {
        let unselective = d.enabled
            && d.listeners.is_none()
            && d.device_types.is_none()
            && d.device_ids.is_none()
            && d.message_type.is_none();
        if unselective {
            for t in &d.downstreams {
                assert!(
                    targets.contains(t),
                    "{t} of route {} (no selectors) missing",
                    d.key
                );
            }
        }
    }
    for t in &targets {
        assert!(
            definitions
                .iter()
                .any(|d| d.enabled && d.downstreams.contains(t)),
            "{t} comes from no enabled route"
        );
    }
}
