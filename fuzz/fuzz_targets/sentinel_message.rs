//! A whole sentinel pass: arbitrary bytes decoded as a JSON message go through every kind of
//! sentinel (body, query, header and basic locators, and the defaults). Nothing may panic; each
//! outcome must equal the reference model's; an accepted message names a registered, enabled
//! device whose key matched; a body credential is gone from the payload afterwards.
#![no_main]

mod common;

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use common::*;
use iotgate_core::{ContentType, Payload};
use iotgate_pipeline::{Metrics, Pipeline};
use libfuzzer_sys::fuzz_target;

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| Fixture::new(&Arc::new(Metrics::new())))
}

fuzz_target!(|data: &[u8]| {
    let Ok(Payload::Json(message)) =
        Pipeline::decode(ContentType::Json, true, Bytes::copy_from_slice(data))
    else {
        return;
    };
    fixture().check(&message);
});
