//! Helpers for tests of the provenance log and of what reads it (replay, spill, writing
//! states out), here and in the daemon's tests (feature `test-util`).
//!
//! They panic on any failure: they build fixtures, and a fixture that cannot be built is a
//! broken test.

use std::path::Path;

use weft_dpa::{DataType, Entry, Operation};

use crate::log::{LogOptions, ProvenanceLog};
use crate::state::State;

/// The guest time of the first entry [`entry`] makes, in microseconds.
pub const T0: i64 = 1_790_000_000_000_000;

/// Entry `seq` of a log (guest time `T0` + `seq` ms), with no old value.
pub fn entry(
    seq: u64,
    dt: DataType,
    op: Operation,
    source: &str,
    coll: &str,
    key: &str,
    new: Option<&str>,
) -> Entry {
    Entry {
        seq,
        guest_time_us: T0 + seq as i64 * 1000,
        data_type: dt,
        op,
        source: source.into(),
        collection: coll.into(),
        key: key.into(),
        old: None,
        new: new.map(str::to_string),
        tx: None,
    }
}

/// A log touching every kind of source, with updates, deletes, refused entries
/// and rows SQLite refuses.
pub fn log_of_every_kind(dir: &Path) -> ProvenanceLog {
    use DataType::{Json, Kv, Sqlite};
    use Operation::{Delete, Insert, Schema, Update};
    let log = ProvenanceLog::open(dir.to_path_buf(), LogOptions::default()).unwrap();
    let mut es = Vec::new();
    let mut push = |dt, op, source: &str, coll: &str, key: &str, new: Option<&str>| {
        let seq = es.len() as u64 + 1;
        es.push(entry(seq, dt, op, source, coll, key, new));
    };
    let db = "/data/app.db";
    push(
        Sqlite,
        Schema,
        db,
        "t",
        "",
        Some(r#""CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, n INTEGER) STRICT""#),
    );
    push(
        Sqlite,
        Schema,
        db,
        "u",
        "",
        Some(r#""CREATE TABLE u(k TEXT PRIMARY KEY, b BLOB)""#),
    );
    push(
        Sqlite,
        Schema,
        db,
        "bad",
        "",
        Some(r#""CREATE TABLE bad(x); DROP TABLE t""#),
    );
    for i in 0..600 {
        let row = format!(r#"{{"id":{i},"v":"row {i}","n":{i}}}"#);
        push(Sqlite, Insert, db, "t", &format!("[{i}]"), Some(&row));
        push(
            Kv,
            Insert,
            "/etc/app.env",
            "",
            &format!("K{i:04}"),
            Some(&format!(r#""v{i}""#)),
        );
    }
    push(
        Sqlite,
        Insert,
        db,
        "u",
        r#"["a"]"#,
        Some(r#"{"k":"a","b":{"$blob":"00ff"}}"#),
    );
    push(
        Sqlite,
        Insert,
        db,
        "t",
        "[9000]",
        Some(r#"{"id":9000,"nope":1}"#),
    );
    push(
        Sqlite,
        Insert,
        db,
        "t",
        "[9001]",
        Some(r#"{"id":9001,"n":"text"}"#),
    );
    push(Sqlite, Insert, db, "missing", "[1]", Some(r#"{"id":1}"#));
    push(Sqlite, Insert, db, "t", "[1]", Some("[1]"));
    push(Kv, Insert, "/etc/keys/", "", "token", Some(r#""abc""#));
    push(Kv, Insert, "/etc/keys/", "", "other", Some(r#""def""#));
    push(
        Json,
        Insert,
        "/etc/app.json",
        "",
        "",
        Some(r#"{"a":{"b":1},"l":[1,2]}"#),
    );
    push(Json, Update, "/etc/app.json", "", "/a/b", Some("2"));
    push(Json, Insert, "/etc/app.json", "", "/no/such", Some("1"));
    // The window: from here on.
    for i in (0..600).step_by(7) {
        let row = format!(r#"{{"id":{i},"v":"new {i}","n":{}}}"#, i * 2);
        push(Sqlite, Update, db, "t", &format!("[ {i} ]"), Some(&row));
    }
    for i in (0..600).step_by(5) {
        push(Sqlite, Delete, db, "t", &format!("[{i}]"), None);
        push(Kv, Delete, "/etc/app.env", "", &format!("K{i:04}"), None);
    }
    push(
        Kv,
        Update,
        "/etc/app.env",
        "",
        "K0001",
        Some(r#""changed""#),
    );
    push(Kv, Update, "/etc/keys/", "", "token", Some(r#""xyz""#));
    push(Kv, Insert, "/etc/other.env", "", "A", Some(r#""1""#));
    push(Json, Insert, "/etc/second.json", "", "", Some(r#"[1]"#));
    push(Kv, Schema, "/etc/app.env", "", "", Some(r#""x""#));
    for chunk in es.chunks(500) {
        log.append("vm", T0, chunk).unwrap();
    }
    log
}

/// One change, as a DPA reports it, at sequence 1 and guest time 0.
pub fn change(
    dt: DataType,
    op: Operation,
    source: &str,
    coll: &str,
    key: &str,
    old: Option<&str>,
    new: Option<&str>,
) -> Entry {
    Entry {
        seq: 1,
        guest_time_us: 0,
        data_type: dt,
        op,
        source: source.into(),
        collection: coll.into(),
        key: key.into(),
        old: old.map(str::to_string),
        new: new.map(str::to_string),
        tx: None,
    }
}

/// Applies to `state` what a base read from a disk snapshot holds of SQLite source
/// `/data/app.db`: table `t`'s definition and its row `[5000]`.
pub fn apply_sqlite_base(state: &mut State) {
    state
        .apply(&entry(
            1,
            DataType::Sqlite,
            Operation::Schema,
            "/data/app.db",
            "t",
            "",
            Some(r#""CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, n INTEGER) STRICT""#),
        ))
        .expect("the table's definition");
    state
        .apply(&entry(
            1,
            DataType::Sqlite,
            Operation::Insert,
            "/data/app.db",
            "t",
            "[5000]",
            Some(r#"{"id":5000,"v":"from the base","n":1}"#),
        ))
        .expect("the base's row");
}
