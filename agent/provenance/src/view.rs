//! The API's view of a record ([`RecordView`], a `weft-api` type): times as RFC 3339,
//! values as JSON.

use std::time::{Duration, UNIX_EPOCH};

use weft_api::provenance::RecordView;

use crate::log::Record;

/// RFC 3339 with microseconds, or `@<µs>` for an instant outside years 1970-9999 (a
/// guest's clock is whatever the guest says).
pub fn format_us(us: i64) -> String {
    const MAX: i64 = 253_402_300_799_999_999; // 9999-12-31T23:59:59.999999Z
    match u64::try_from(us) {
        Ok(u) if us <= MAX => {
            humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(u)).to_string()
        }
        _ => format!("@{us}"),
    }
}

fn json_value(text: &Option<String>) -> Option<serde_json::Value> {
    text.as_ref()
        .map(|t| serde_json::from_str(t).unwrap_or_else(|_| serde_json::Value::String(t.clone())))
}

impl From<&Record> for RecordView {
    fn from(r: &Record) -> Self {
        let e = &r.entry;
        RecordView {
            vm: r.vm.clone(),
            seq: e.seq,
            guest_time: format_us(e.guest_time_us),
            guest_time_us: e.guest_time_us,
            host_time: format_us(r.host_time_us),
            host_time_us: r.host_time_us,
            data_type: api_data_type(e.data_type),
            op: api_operation(e.op),
            source: e.source.clone(),
            collection: e.collection.clone(),
            key: e.key.clone(),
            old: json_value(&e.old),
            new: json_value(&e.new),
            tx: e.tx,
        }
    }
}

/// The API's name for a kind of data the DPA sent.
fn api_data_type(t: weft_dpa::DataType) -> weft_api::provenance::DataType {
    use weft_api::provenance::DataType as Api;
    match t {
        weft_dpa::DataType::Sqlite => Api::Sqlite,
        weft_dpa::DataType::Json => Api::Json,
        weft_dpa::DataType::Kv => Api::Kv,
    }
}

/// The API's name for an operation the DPA sent.
fn api_operation(op: weft_dpa::Operation) -> weft_api::provenance::Operation {
    use weft_api::provenance::Operation as Api;
    match op {
        weft_dpa::Operation::Insert => Api::Insert,
        weft_dpa::Operation::Update => Api::Update,
        weft_dpa::Operation::Delete => Api::Delete,
        weft_dpa::Operation::Schema => Api::Schema,
    }
}

#[cfg(test)]
mod tests {
    use weft_api::provenance::parse_time;

    use super::*;

    #[test]
    fn times_format_and_parse() {
        let us = parse_time("from", "2026-11-22T10:00:00.000123Z").unwrap();
        assert_eq!(format_us(us), "2026-11-22T10:00:00.000123Z");
        assert_eq!(format_us(-5), "@-5");
        assert_eq!(format_us(i64::MAX), format!("@{}", i64::MAX));
        assert!(parse_time("to", "yesterday").unwrap_err().contains("--to"));
    }

    #[test]
    fn values_show_as_json_and_bad_json_as_text() {
        assert_eq!(
            json_value(&Some("{\"a\":1}".into())),
            Some(serde_json::json!({"a": 1}))
        );
        assert_eq!(
            json_value(&Some("not json".into())),
            Some(serde_json::json!("not json"))
        );
        assert_eq!(json_value(&None), None);
    }
}
