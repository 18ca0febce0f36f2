//! Feeds arbitrary bytes to the parser of lines a QMP peer sends (greeting, replies,
//! events). It must never panic, and whatever it accepts must be self-consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_qmp::{parse_message, Message};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = parse_message(data) {
        match msg {
            Message::Event(e) => {
                // A missing or null `data` becomes an empty object.
                assert!(!e.data.is_null());
                // Typed decoding of unknown data must fail cleanly, not panic.
                let _ = e.parse::<serde_json::Value>();
                let _ = e.typed::<weft_qmp::qapi::qmp::JOB_STATUS_CHANGE>();
                let _ = e.typed::<weft_qmp::qapi::qmp::BLOCK_JOB_COMPLETED>();
            }
            Message::Reply(r) => {
                let _ = r.result.map_err(weft_qmp::Error::from);
            }
            Message::Greeting(g) => {
                let _ = g.capabilities.len();
            }
        }
    }
});
