//! Replay streams the log: rebuilding a small state from a large log holds the state
//! and one decoded block, never the log. The test binary counts every heap byte it
//! allocates (a counting global allocator) and compares the peak during a replay with
//! the size of the log; it is alone in its binary so that no other test allocates
//! meanwhile.

use weft_dpa::{DataType, Entry, Operation};
use weft_provenance::log::{LogOptions, ProvenanceLog};

#[path = "common/counting.rs"]
mod counting;

const T0: i64 = 1_790_000_000_000_000;
/// Keys the log keeps updating: the state stays small while the log grows.
const KEYS: u64 = 16;

/// Update `seq` of one of [`KEYS`] keys, in turn a key-value key, a SQLite row and a
/// JSON pointer, with a value of about 1 KiB.
fn entry(seq: u64) -> Entry {
    let k = seq % KEYS;
    let filler = format!("{seq:08}").repeat(128);
    let (data_type, source, collection, key, new) = match seq % 3 {
        0 => (
            DataType::Kv,
            "/etc/app.env",
            "",
            format!("KEY_{k}"),
            format!("\"{filler}\""),
        ),
        1 => (
            DataType::Sqlite,
            "/data/app.db",
            "t",
            format!("[{k}]"),
            format!(r#"{{"id":{k},"v":"{filler}"}}"#),
        ),
        _ => (
            DataType::Json,
            "/etc/app/settings.json",
            "",
            format!("/k{k}"),
            format!("\"{filler}\""),
        ),
    };
    Entry {
        seq,
        guest_time_us: T0 + seq as i64,
        data_type,
        op: if seq <= 3 * KEYS {
            Operation::Insert
        } else {
            Operation::Update
        },
        source: source.into(),
        collection: collection.into(),
        key,
        old: None,
        new: Some(new),
        tx: None,
    }
}

#[test]
fn replay_holds_the_state_not_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = ProvenanceLog::open(dir.path().to_path_buf(), LogOptions::default()).unwrap();
    // The table's definition first (SQLite rows need one), then 48 MiB of updates.
    let schema = Entry {
        seq: 1,
        guest_time_us: T0,
        data_type: DataType::Sqlite,
        op: Operation::Schema,
        source: "/data/app.db".into(),
        collection: "t".into(),
        key: String::new(),
        old: None,
        new: Some("\"CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)\"".into()),
        tx: None,
    };
    log.append("vm", T0, &[schema]).unwrap();
    let total: u64 = 48 * 1024;
    let mut logged = 0usize;
    let mut next = 2;
    while next <= total {
        let batch: Vec<Entry> = (next..(next + 2048).min(total + 1)).map(entry).collect();
        logged += batch
            .iter()
            .map(|e| e.new.as_ref().map_or(0, String::len))
            .sum::<usize>();
        next += batch.len() as u64;
        log.append("vm", T0, &batch).unwrap();
    }
    assert!(logged > 45 << 20, "{logged} bytes of values");

    let before = counting::start();
    let (state, summary) = weft_provenance::state::rebuild(&log, "vm", None, i64::MAX).unwrap();
    let peak = counting::peak_since(before);

    assert_eq!(summary.applied, total, "every entry applied");
    assert_eq!(summary.skipped, 0);
    assert_eq!(state.kv["/etc/app.env"].len() as u64, KEYS);
    assert_eq!(state.sqlite["/data/app.db"].rows["t"].len() as u64, KEYS);
    let last = state.kv["/etc/app.env"][&format!("KEY_{}", (total - total % 3) % KEYS)].clone();
    assert!(
        last.contains(&format!("{:08}", total - total % 3)),
        "the newest value won"
    );
    // The state is about 48 values of 1 KiB; a decoded block is about 1 MiB raw. The
    // log is 48 MiB: holding it (as `log.query` into a Vec did) peaks far above.
    assert!(
        peak < 16 << 20,
        "replaying {} MiB of log peaked at {} MiB of heap",
        logged >> 20,
        peak >> 20
    );
    eprintln!(
        "replayed {} MiB of values; heap peak {:.1} MiB",
        logged >> 20,
        peak as f64 / f64::from(1 << 20)
    );
}
