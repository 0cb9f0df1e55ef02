//! The sentinel's credential parsing: `parse_basic` on arbitrary text, and the connect-time
//! locator lookup (query parameters, case-insensitive headers, Basic credentials) through
//! `Sentinel::authenticate_connection`, followed by messages on the bound connection before and
//! after the registry changes (key rotation, disabling, removal). Every outcome must equal the
//! reference model's; a binding only ever names a registered, enabled device whose key matched.
#![no_main]

mod common;

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use common::*;
use iotgate_pipeline::{ConnectionCredentials, Metrics};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

/// Names the locators use (and near misses), with a mask that flips the case of letters.
const NAMES: [&str; 9] = [
    "id",
    "device",
    "auth",
    "authorization",
    "x-access-key",
    "deviceId",
    "accessKey",
    "credential",
    "Id",
];
const PREFIXES: [&str; 6] = ["", "Basic ", "basic ", "BASIC   ", "  Basic ", "Bearer "];

#[derive(Debug, Arbitrary)]
enum Name {
    Known(u8, u16),
    Raw(String),
}

impl Name {
    fn build(&self) -> String {
        match self {
            Name::Known(i, mask) => NAMES[*i as usize % NAMES.len()]
                .chars()
                .enumerate()
                .map(|(n, c)| {
                    if mask >> (n % 16) & 1 == 1 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect(),
            Name::Raw(s) => s.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Val {
    Id(u8),
    Key(u8),
    Basic(u8, u8, u8),
    Number(u16),
    Raw(String),
}

impl Val {
    fn text(&self) -> String {
        match self {
            Val::Id(i) => IDS[*i as usize % IDS.len()].into(),
            Val::Key(i) => KEYS[*i as usize % KEYS.len()].into(),
            Val::Basic(i, k, p) => basic_value(
                IDS[*i as usize % IDS.len()],
                KEYS[*k as usize % KEYS.len()],
                PREFIXES[*p as usize % PREFIXES.len()],
            ),
            Val::Number(n) => n.to_string(),
            Val::Raw(s) => s.clone(),
        }
    }
    fn json(&self) -> Value {
        match self {
            Val::Number(n) => Value::from(*n),
            other => Value::String(other.text()),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum FuzzChange {
    None,
    RotatePrimary(u8),
    RotateSecondary(u8),
    Disable(u8),
    Enable(u8),
    Remove(u8),
}

#[derive(Debug, Arbitrary)]
struct Input {
    basic: String,
    query: Vec<(Name, Val)>,
    headers: Vec<(Name, Val)>,
    body: Vec<(Name, Val)>,
    change: FuzzChange,
}

fn metrics() -> &'static Arc<Metrics> {
    static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
    METRICS.get_or_init(|| Arc::new(Metrics::new()))
}

fuzz_target!(|input: Input| {
    check_parse_basic(&input.basic);

    let pairs = |list: &[(Name, Val)]| -> Vec<(String, String)> {
        list.iter().map(|(n, v)| (n.build(), v.text())).collect()
    };
    let request = ConnectionCredentials {
        query: pairs(&input.query),
        // The listener lower-cases header names; the lookup must not depend on it.
        headers: pairs(&input.headers),
    };
    let body = Value::Object(
        input
            .body
            .iter()
            .map(|(n, v)| (n.build(), v.json()))
            .collect::<Map<String, Value>>(),
    );

    let change = match input.change {
        FuzzChange::None => Change::None,
        FuzzChange::RotatePrimary(i) => Change::RotatePrimary(i.into()),
        FuzzChange::RotateSecondary(i) => Change::RotateSecondary(i.into()),
        FuzzChange::Disable(i) => Change::Disable(i.into()),
        FuzzChange::Enable(i) => Change::Enable(i.into()),
        FuzzChange::Remove(i) => Change::Remove(i.into()),
    };
    let _ = check_connection_flow(metrics(), &request, &body, change);
});
