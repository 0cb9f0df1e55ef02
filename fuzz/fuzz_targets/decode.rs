//! Content decoding (`Pipeline::decode`) for json, text and binary listeners. Never panics;
//! json accepts exactly what serde_json accepts, text exactly valid UTF-8, binary everything,
//! unchanged; every refusal is `malformed_json`.
#![no_main]

use base64::Engine as _;
use bytes::Bytes;
use iotgate_core::{ContentType, Payload};
use iotgate_pipeline::{Pipeline, RejectionCode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);

    let reference = serde_json::from_slice::<serde_json::Value>(data).ok();
    match (
        Pipeline::decode(ContentType::Json, true, bytes.clone()),
        reference,
    ) {
        (Ok(Payload::Json(v)), Some(r)) => {
            assert_eq!(v, r);
            // The envelope form of a json payload is the value itself.
            assert_eq!(Payload::Json(v.clone()).to_json(), v);
        }
        (Err(rejection), None) => {
            assert_eq!(rejection.code, RejectionCode::MalformedJson);
            // The error frame sent to the device is itself valid JSON.
            let frame: serde_json::Value = serde_json::from_str(&rejection.to_frame(None)).unwrap();
            assert_eq!(frame["error"]["code"], "malformed_json");
        }
        (other, reference) => panic!("json decode {other:?} vs serde_json {reference:?}"),
    }

    match (
        Pipeline::decode(ContentType::Text, true, bytes.clone()),
        std::str::from_utf8(data),
    ) {
        (Ok(Payload::Text(text)), Ok(reference)) => {
            assert_eq!(text, reference);
            assert_eq!(
                Payload::Text(text.clone()).to_json(),
                serde_json::Value::String(text)
            );
        }
        (Err(rejection), Err(_)) => assert_eq!(rejection.code, RejectionCode::MalformedJson),
        (other, reference) => panic!("text decode {other:?} vs from_utf8 {reference:?}"),
    }

    match Pipeline::decode(ContentType::Binary, false, bytes.clone()) {
        Ok(Payload::Binary(b)) => {
            assert_eq!(&b[..], data);
            let json = Payload::Binary(b).to_json();
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(json.as_str().unwrap())
                .unwrap();
            assert_eq!(decoded, data);
        }
        other => panic!("binary decode {other:?}"),
    }

    // MessagePack: a value or a refusal with its code, never a panic.
    if let Err(rejection) = Pipeline::decode(ContentType::Msgpack, false, bytes) {
        assert_eq!(rejection.code, RejectionCode::MalformedMsgpack);
    }
});
