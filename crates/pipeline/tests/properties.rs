//! Property tests for the message path, run with a fixed seed so every run checks the same
//! cases (the fuzz targets in `fuzz/` explore further). Properties:
//! - `Pipeline::decode`: json accepts exactly what serde_json accepts, text exactly valid UTF-8,
//!   binary everything unchanged; refusals are `malformed_json`;
//! - a whole sentinel pass, for every locator kind: each outcome equals the reference model's;
//!   an accepted message names a registered, enabled device whose key matched; a body
//!   credential is gone from the payload afterwards, accepted or not;
//! - connect-time credentials (query, case-insensitive headers, Basic) bind only registered,
//!   enabled devices whose key matched, and key rotation, disabling and removal take effect on
//!   the next message;
//! - `Router::select`: targets distinct, exactly the model's, and always including the
//!   downstreams of an enabled route without selectors.
//!
//! The reference models are shared with the fuzz targets (one file, included below).

#[path = "../../../fuzz/fuzz_targets/common/mod.rs"]
mod model;

use std::cell::Cell;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use iotgate_core::{ContentType, MessageTypeSelector, Payload, RouteDefinition};
use iotgate_pipeline::{ConnectionCredentials, Metrics, Pipeline, RejectionCode, Router};
use model::*;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{
    Config, RngAlgorithm, RngSeed, TestCaseError, TestError, TestRng, TestRunner,
};
use serde_json::{json, Map, Value};

const SEED: [u8; 32] = *b"iotgate-pipeline-properties-seed";

/// A runner independent of `PROPTEST_*` variables and of earlier failures: fixed ChaCha seed,
/// no persistence, bounded shrinking.
fn runner(cases: u32) -> TestRunner {
    let config = Config {
        cases,
        max_local_rejects: 65_536,
        max_global_rejects: 1024,
        max_flat_map_regens: 1_000_000,
        max_shrink_time: 0,
        max_shrink_iters: 2048,
        max_default_size_range: 100,
        failure_persistence: None,
        source_file: None,
        test_name: None,
        verbose: 0,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(u64::from_le_bytes(SEED[..8].try_into().unwrap())),
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &SEED))
}

/// Runs `test` on `cases` inputs; the model checks panic, and proptest shrinks those too.
fn check<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value))
where
    S::Value: std::fmt::Debug,
{
    let result = runner(cases).run(&strategy, |input| {
        test(input);
        Ok::<(), TestCaseError>(())
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, minimal)) => {
            panic!("property failed: {reason}\nminimal failing input: {minimal:#?}")
        }
        Err(e) => panic!("{e}"),
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map("[a-zA-Z/~]{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// Pipeline::decode

#[test]
fn decode_accepts_exactly_what_each_content_type_allows() {
    let bytes = prop_oneof![
        vec(any::<u8>(), 0..48),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        "\\PC{0,24}".prop_map(String::into_bytes),
        // Valid JSON with trailing garbage or a truncated end.
        (json_value(), vec(any::<u8>(), 1..4)).prop_map(|(v, tail)| {
            let mut b = v.to_string().into_bytes();
            b.extend(tail);
            b
        }),
    ];
    check(768, bytes, |data| {
        let bytes = Bytes::from(data.clone());
        match (
            Pipeline::decode(ContentType::Json, true, bytes.clone()),
            serde_json::from_slice::<Value>(&data),
        ) {
            (Ok(Payload::Json(v)), Ok(r)) => assert_eq!(v, r),
            (Err(rejection), Err(_)) => {
                assert_eq!(rejection.code, RejectionCode::MalformedJson);
                let frame: Value = serde_json::from_str(&rejection.to_frame(None)).unwrap();
                assert_eq!(frame["error"]["code"], "malformed_json");
            }
            (actual, reference) => panic!("json {actual:?} vs serde_json {reference:?}"),
        }
        match (
            Pipeline::decode(ContentType::Text, true, bytes.clone()),
            std::str::from_utf8(&data),
        ) {
            (Ok(Payload::Text(text)), Ok(reference)) => assert_eq!(text, reference),
            (Err(rejection), Err(_)) => assert_eq!(rejection.code, RejectionCode::MalformedJson),
            (actual, reference) => panic!("text {actual:?} vs from_utf8 {reference:?}"),
        }
        match Pipeline::decode(ContentType::Binary, false, bytes.clone()) {
            Ok(Payload::Binary(b)) => {
                assert_eq!(&b[..], &data[..]);
                let json = Payload::Binary(b).to_json();
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(json.as_str().unwrap())
                    .unwrap();
                assert_eq!(decoded, data);
            }
            other => panic!("binary {other:?}"),
        }
        // Arbitrary bytes on a msgpack listener: a value or a refusal, never a panic; a text
        // frame is always refused.
        match Pipeline::decode(ContentType::Msgpack, false, bytes.clone()) {
            Ok(Payload::Json(_)) => {}
            Err(rejection) => assert_eq!(rejection.code, RejectionCode::MalformedMsgpack),
            other => panic!("msgpack {other:?}"),
        }
        assert!(Pipeline::decode(ContentType::Msgpack, true, bytes).is_err());
    });
}

/// Every JSON value encoded as MessagePack decodes back to itself on a msgpack listener.
#[test]
fn msgpack_carries_the_json_value_model() {
    check(512, json_value(), |value| {
        let packed = rmp_serde::to_vec(&value).unwrap();
        match Pipeline::decode(ContentType::Msgpack, false, Bytes::from(packed)) {
            Ok(Payload::Json(decoded)) => assert_eq!(decoded, value),
            other => panic!("{value} came back as {other:?}"),
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The sentinel

/// A credential-ish value: a registered or unknown id, a valid or wrong key, a Basic credential
/// (valid or not, under any prefix), a number, or anything.
fn credential_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => (0..IDS.len()).prop_map(|i| json!(IDS[i])),
        3 => (0..KEYS.len()).prop_map(|i| json!(KEYS[i])),
        3 => (0..IDS.len(), 0..KEYS.len(), 0..4usize).prop_map(|(i, k, p)| {
            json!(basic_value(IDS[i], KEYS[k], ["", "Basic ", "basic ", "Bearer "][p]))
        }),
        1 => prop_oneof![Just(json!(42)), Just(json!(7)), Just(json!(42.0))],
        1 => json_value(),
    ]
}

/// Where the fixture sentinels look, as object paths.
const BODY_PATHS: [&[&str]; 9] = [
    &["deviceId"],
    &["accessKey"],
    &["device", "id"],
    &["auth", "key"],
    &["meta/id"],
    &["a~k", "secret"],
    &["credential"],
    &["auth"],
    &["type"],
];

fn insert(target: &mut Map<String, Value>, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            target.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = target
                .entry((*first).to_owned())
                .or_insert_with(|| json!({}));
            if !entry.is_object() {
                *entry = json!({});
            }
            insert(entry.as_object_mut().unwrap(), rest, value);
        }
    }
}

/// A device id and a key that mostly belong together (so the accepting side is reached).
fn id_and_key() -> impl Strategy<Value = (String, String)> {
    (
        0..IDS.len(),
        0..2usize,
        proptest::bool::weighted(0.8),
        0..KEYS.len(),
    )
        .prop_map(|(i, slot, matching, other)| {
            let devices = model_devices();
            let key = match devices.get(i) {
                Some(d) if matching => d.keys[slot].clone(),
                _ => KEYS[other].to_owned(),
            };
            (IDS[i].to_owned(), key)
        })
}

/// A message laid out for one of the fixture sentinels, with the id and key where it looks.
fn coherent_message() -> impl Strategy<Value = Value> {
    (id_and_key(), 0..5usize, any::<bool>()).prop_map(|((id, key), layout, numeric)| {
        // A numeric id or key travels as a JSON number when it can.
        let value = |text: &str| match text.parse::<u64>() {
            Ok(n) if numeric => json!(n),
            _ => json!(text),
        };
        let mut map = Map::new();
        match layout {
            0 => {
                insert(&mut map, &["deviceId"], value(&id));
                insert(&mut map, &["accessKey"], value(&key));
            }
            1 => {
                insert(&mut map, &["device", "id"], value(&id));
                insert(&mut map, &["auth", "key"], value(&key));
            }
            2 => {
                insert(&mut map, &["meta/id"], value(&id));
                insert(&mut map, &["a~k", "secret"], value(&key));
            }
            3 => insert(&mut map, &["accessKey"], value(&key)),
            _ => insert(
                &mut map,
                &["credential"],
                json!(basic_value(&id, &key, "Basic ")),
            ),
        }
        map.insert("type".into(), json!("telemetry"));
        Value::Object(map)
    })
}

fn message() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => coherent_message(),
        8 => vec((0..BODY_PATHS.len(), credential_value()), 0..5).prop_map(|fields| {
            let mut map = Map::new();
            for (path, value) in fields {
                insert(&mut map, BODY_PATHS[path], value);
            }
            Value::Object(map)
        }),
        1 => json_value(),
    ]
}

#[test]
fn every_sentinel_pass_matches_the_model_and_strips_the_credential() {
    let fixture = Fixture::new(&Arc::new(Metrics::new()));
    let accepted = Cell::new(0usize);
    check(768, message(), |message| {
        accepted.set(accepted.get() + fixture.check(&message));
    });
    // The accepting side is exercised, not only refusals.
    assert!(accepted.get() >= 150, "only {} accepted", accepted.get());
}

#[test]
fn connect_time_credentials_bind_only_valid_devices_and_follow_registry_changes() {
    let name = || {
        prop_oneof![
            (0..6usize, any::<u16>()).prop_map(|(i, mask)| {
                [
                    "id",
                    "device",
                    "auth",
                    "authorization",
                    "x-access-key",
                    "deviceId",
                ][i]
                    .chars()
                    .enumerate()
                    .map(|(n, c)| {
                        if mask >> (n % 16) & 1 == 1 {
                            c.to_ascii_uppercase()
                        } else {
                            c
                        }
                    })
                    .collect::<String>()
            }),
            "[a-zA-Z-]{0,6}",
        ]
    };
    let text = || credential_value().prop_map(|v| as_text(&v).unwrap_or_else(|| v.to_string()));
    let pairs = || vec((name(), text()), 0..4);
    // Requests that carry one device's credentials the way one of the fixture sentinels wants.
    let coherent = (id_and_key(), 0..3usize, pairs(), pairs()).prop_map(
        |((id, key), layout, mut query, mut headers)| {
            match layout {
                0 => {
                    query.insert(0, ("device".into(), id));
                    headers.insert(0, ("X-Access-Key".into(), key));
                }
                1 => headers.insert(
                    0,
                    ("Authorization".into(), basic_value(&id, &key, "Basic ")),
                ),
                _ => query.insert(0, ("auth".into(), basic_value(&id, &key, ""))),
            }
            (query, headers)
        },
    );
    let request = prop_oneof![2 => coherent, 1 => (pairs(), pairs())];
    let change = prop_oneof![
        Just(Change::None),
        any::<usize>().prop_map(Change::RotatePrimary),
        any::<usize>().prop_map(Change::RotateSecondary),
        any::<usize>().prop_map(Change::Disable),
        any::<usize>().prop_map(Change::Enable),
        any::<usize>().prop_map(Change::Remove),
    ];
    let metrics = Arc::new(Metrics::new());
    let accepted = Cell::new(0usize);
    check(
        384,
        (request, message(), change),
        |((query, headers), body, change)| {
            let request = ConnectionCredentials { query, headers };
            accepted.set(accepted.get() + check_connection_flow(&metrics, &request, &body, change));
        },
    );
    assert!(accepted.get() >= 150, "only {} accepted", accepted.get());
}

#[test]
fn parse_basic_properties_hold_for_header_values() {
    check(
        512,
        prop_oneof![
            any::<String>(),
            (0..IDS.len(), 0..KEYS.len(), "\\PC{0,3}")
                .prop_map(|(i, k, p)| basic_value(IDS[i], KEYS[k], &p)),
        ],
        |value| check_parse_basic(&value),
    );
}

/// Known gap (reported, not fixed here): a body locator whose last token indexes an array
/// (`/creds/0`, allowed by the schema's pointer pattern) finds the key, but
/// `remove_at_pointer` only removes object members, so the accepted message is routed with its
/// access key still in the payload. Run with `--ignored` to see it.
#[test]
fn a_body_credential_inside_an_array_is_stripped() {
    let devices = model_devices();
    let registry = registry(&devices);
    let definition = serde_json::from_value(json!({"key": "array-keys", "name": "a",
        "method": "accessKey", "accessKey": {"from": "body", "pointer": "/creds/0"}}))
    .unwrap();
    let sentinel = iotgate_pipeline::Sentinel::new(definition, Arc::new(Metrics::new()));
    let mut payload = Payload::Json(json!({"deviceId": "dev-1", "creds": ["key-1a"]}));
    let (device, _) = sentinel
        .authenticate_message(&registry, None, &Default::default(), &mut payload)
        .expect("valid key");
    assert_eq!(&*device.device_id, "dev-1");
    assert_eq!(
        payload.as_json().unwrap().pointer("/creds/0"),
        None,
        "{payload:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The router

const WORDS: [&str; 7] = [
    "plant-a", "plant-b", "thermo", "meter", "dev-1", "dev-2", "",
];
const POINTERS: [&str; 5] = ["/type", "/kind/sub", "/list/0", "", "type"];

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (0..WORDS.len()).prop_map(|i| WORDS[i].to_owned()),
        1 => "\\PC{0,6}",
    ]
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => word().prop_map(Value::from),
        1 => (-2i64..3).prop_map(Value::from),
        1 => prop_oneof![Just(json!(1.0)), Just(json!(true)), Just(Value::Null)],
    ]
}

fn route() -> impl Strategy<Value = RouteDefinition> {
    let list = || proptest::option::weighted(0.4, vec(word(), 0..3));
    (
        0..8u8,
        proptest::bool::weighted(0.85),
        (list(), list(), list()),
        proptest::option::weighted(
            0.3,
            (0..POINTERS.len(), vec(scalar(), 0..3)).prop_map(|(p, values)| MessageTypeSelector {
                pointer: Some(POINTERS[p].to_owned()),
                values,
            }),
        ),
        vec(
            prop_oneof![(0..6u8).prop_map(|i| format!("down-{i}")), word()],
            0..4,
        ),
    )
        .prop_map(
            |(key, enabled, (listeners, device_types, device_ids), message_type, downstreams)| {
                RouteDefinition {
                    key: format!("route-{key}"),
                    name: "r".into(),
                    description: None,
                    listeners,
                    device_types,
                    device_ids,
                    message_type,
                    device_identity: None,
                    downstreams,
                    enabled,
                }
            },
        )
}

fn routed_envelope() -> impl Strategy<Value = iotgate_core::Envelope> {
    let payload = prop_oneof![
        6 => (scalar(), proptest::option::of(scalar()), proptest::option::of(scalar())).prop_map(
            |(kind, sub, first)| {
                let mut v = json!({"type": kind});
                if let Some(s) = sub {
                    v["kind"] = json!({"sub": s});
                }
                if let Some(s) = first {
                    v["list"] = json!([s]);
                }
                Payload::Json(v)
            }
        ),
        1 => json_value().prop_map(Payload::Json),
        1 => "\\PC{0,8}".prop_map(Payload::Text),
        1 => vec(any::<u8>(), 0..8).prop_map(|b| Payload::Binary(Bytes::from(b))),
    ];
    (
        word(),
        proptest::option::weighted(0.9, word()),
        proptest::option::weighted(0.9, word()),
        payload,
    )
        .prop_map(|(listener, id, device_type, payload)| {
            envelope(&listener, id.as_deref(), device_type.as_deref(), payload)
        })
}

#[test]
fn router_selects_exactly_the_matching_routes_downstreams() {
    let metrics = Metrics::new();
    let routed = Cell::new(0usize);
    check(
        768,
        (vec(route(), 0..6), vec(routed_envelope(), 1..4)),
        |(definitions, envelopes)| {
            let router = Router::new(&definitions, &metrics);
            for e in &envelopes {
                check_router(&router, &definitions, e);
                let mut targets = Vec::new();
                router.select(e, &mut targets);
                routed.set(routed.get() + usize::from(!targets.is_empty()));
            }
        },
    );
    assert!(
        routed.get() >= 100,
        "only {} envelopes routed",
        routed.get()
    );
}
