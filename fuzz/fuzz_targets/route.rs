//! Route matching: `Router::new` + `select` on arbitrary route definitions and envelopes. Never
//! panics; the targets are distinct; they are exactly the downstreams of the enabled routes a
//! reference model says match, in route order; an envelope always gets the downstreams of every
//! enabled route without selectors; disabled routes contribute nothing of their own.
#![no_main]

mod common;

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use bytes::Bytes;
use common::{check_router, envelope};
use iotgate_core::{Envelope, MessageTypeSelector, Payload, RouteDefinition};
use iotgate_pipeline::{Metrics, Router};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

const WORDS: [&str; 8] = [
    "plant-a", "plant-b", "thermo", "meter", "dev-1", "dev-2", "store", "",
];
const POINTERS: [&str; 6] = ["/type", "/kind/sub", "/list/0", "", "/a~1b", "type"];

#[derive(Debug, Arbitrary)]
enum Word {
    Known(u8),
    Raw(String),
}

impl Word {
    fn get(&self) -> String {
        match self {
            Word::Known(i) => WORDS[*i as usize % WORDS.len()].to_owned(),
            Word::Raw(s) => s.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Scalar {
    Word(Word),
    Int(i8),
    Float(f32),
    Bool(bool),
    Null,
}

impl Scalar {
    fn get(&self) -> Value {
        match self {
            Scalar::Word(w) => Value::String(w.get()),
            Scalar::Int(n) => json!(n),
            Scalar::Float(f) => json!(f),
            Scalar::Bool(b) => json!(b),
            Scalar::Null => Value::Null,
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Route {
    key: u8,
    enabled: bool,
    listeners: Option<Vec<Word>>,
    device_types: Option<Vec<Word>>,
    device_ids: Option<Vec<Word>>,
    message_type: Option<(u8, Vec<Scalar>)>,
    downstreams: Vec<Word>,
}

#[derive(Debug, Arbitrary)]
enum Body {
    Json {
        kind: Scalar,
        sub: Option<Scalar>,
        first: Option<Scalar>,
        slash: Option<Scalar>,
    },
    Text(String),
    Binary(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct Input {
    routes: Vec<Route>,
    envelopes: Vec<(Word, Option<Word>, Option<Word>, Body)>,
}

fn words(list: &Option<Vec<Word>>) -> Option<Vec<String>> {
    list.as_ref().map(|l| l.iter().map(Word::get).collect())
}

fn definition(r: &Route) -> RouteDefinition {
    RouteDefinition {
        // A handful of keys: the metrics keep one counter per route key.
        key: format!("route-{}", r.key % 8),
        name: "r".into(),
        description: None,
        listeners: words(&r.listeners),
        device_types: words(&r.device_types),
        device_ids: words(&r.device_ids),
        message_type: r
            .message_type
            .as_ref()
            .map(|(p, values)| MessageTypeSelector {
                pointer: Some(POINTERS[*p as usize % POINTERS.len()].to_owned()),
                values: values.iter().map(Scalar::get).collect(),
            }),
        device_identity: None,
        downstreams: r.downstreams.iter().map(Word::get).collect(),
        enabled: r.enabled,
    }
}

fn build_envelope(
    listener: &Word,
    id: &Option<Word>,
    device_type: &Option<Word>,
    body: &Body,
) -> Envelope {
    let payload = match body {
        Body::Json {
            kind,
            sub,
            first,
            slash,
        } => {
            let mut v = json!({"type": kind.get()});
            if let Some(s) = sub {
                v["kind"] = json!({"sub": s.get()});
            }
            if let Some(s) = first {
                v["list"] = json!([s.get()]);
            }
            if let Some(s) = slash {
                v["a/b"] = s.get();
            }
            Payload::Json(v)
        }
        Body::Text(s) => Payload::Text(s.clone()),
        Body::Binary(b) => Payload::Binary(Bytes::from(b.clone())),
    };
    envelope(
        &listener.get(),
        id.as_ref().map(Word::get).as_deref(),
        device_type.as_ref().map(Word::get).as_deref(),
        payload,
    )
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

fuzz_target!(|input: Input| {
    let definitions: Vec<RouteDefinition> = input.routes.iter().map(definition).collect();
    let router = Router::new(&definitions, metrics());
    for (listener, id, device_type, body) in &input.envelopes {
        check_router(
            &router,
            &definitions,
            &build_envelope(listener, id, device_type, body),
        );
    }
});
