//! A replay written out (`--out`) holds neither the log nor the state: rows and keys
//! spill to a scratch database on disk as the log streams in, and the output is written
//! from there page by page. The test binary counts every heap byte Rust allocates (a
//! counting global allocator) and reads SQLite's own high-water mark (SQLite allocates
//! with `malloc`, not through Rust), and compares their peaks during the replay with
//! the size of the state; it is alone in its binary so that no other test allocates
//! meanwhile. The output must be the in-memory replay's, row for row.

use std::path::Path;

use weft::provenance::output::{write_spilled, write_to, Output};
use weft_dpa::{DataType, Entry, Operation};
use weft_provenance::log::{LogOptions, ProvenanceLog};
use weft_provenance::spill::Spilled;

#[path = "common/counting.rs"]
mod counting;

const T0: i64 = 1_790_000_000_000_000;
/// New rows (and as many new keys) in the state, 1 KiB each.
const ROWS: u64 = 32 * 1024;
/// What the replay may hold, Rust's heap and SQLite's together: the state is about
/// 78 MiB.
const BUDGET: usize = 24 << 20;

/// Entry `seq`: in turn a new row of a SQLite table and a new key of a key-value
/// file, each with a value of about 1 KiB; every tenth row is then updated.
fn entry(seq: u64) -> Entry {
    let i = seq / 2;
    let filler = format!("{seq:08}").repeat(128);
    let (data_type, source, collection, key, new) = if seq.is_multiple_of(2) {
        (
            DataType::Sqlite,
            "/data/app.db",
            "t",
            format!("[{}]", i % ROWS),
            format!(r#"{{"id":{},"v":"{filler}"}}"#, i % ROWS),
        )
    } else {
        (
            DataType::Kv,
            "/etc/app.env",
            "",
            format!("KEY_{i:06}"),
            format!("\"{filler}\""),
        )
    };
    Entry {
        seq,
        guest_time_us: T0 + seq as i64,
        data_type,
        op: if i < ROWS {
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

/// SQLite's bytes in use at their highest since the last reset.
fn sqlite_highwater(reset: bool) -> usize {
    // SAFETY: sqlite3_memory_highwater only reads (and with 1, resets) a counter.
    let n = unsafe { libsqlite3_sys::sqlite3_memory_highwater(i32::from(reset)) };
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// A database's tables and rows as text.
fn dump(db: &Path) -> String {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut text: String = conn
        .query_row(
            "SELECT group_concat(sql, ';') FROM sqlite_master",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let mut st = conn.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
    let mut rows = st.query([]).unwrap();
    while let Some(r) = rows.next().unwrap() {
        let (id, v): (i64, String) = (r.get(0).unwrap(), r.get(1).unwrap());
        text += &format!("\n{id} {v}");
    }
    text
}

#[test]
fn a_replay_written_out_holds_neither_the_log_nor_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let log = ProvenanceLog::open(dir.path().join("log"), LogOptions::default()).unwrap();
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
    // 2 × ROWS new rows and keys, then a tenth of the rows updated.
    let total = 2 * ROWS + ROWS / 5 + 1;
    let mut next = 2;
    while next <= total {
        let batch: Vec<Entry> = (next..(next + 2048).min(total + 1)).map(entry).collect();
        next += batch.len() as u64;
        log.append("vm", T0, &batch).unwrap();
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let disk = dir.path().join("disk");
    let before = counting::start();
    sqlite_highwater(true);
    let started = std::time::Instant::now();
    let (summary, written) = rt.block_on(async {
        let output = Output::unconfined(&disk).unwrap();
        let mut spilled = Spilled::create(output.work()).unwrap();
        let summary = spilled.rebuild(&log, "vm", None, i64::MAX).unwrap();
        let written = write_spilled(&mut spilled, &output).await.unwrap();
        (summary, written)
    });
    let heap = counting::peak_since(before);
    let sqlite = sqlite_highwater(false);
    let secs = started.elapsed().as_secs_f64();

    assert_eq!(summary.applied, total, "every entry applied");
    assert_eq!((summary.skipped, written.rows_skipped), (0, 0));
    let state = std::fs::metadata(disk.join("etc/app.env")).unwrap().len()
        + std::fs::metadata(disk.join("data/app.db")).unwrap().len();
    assert!(
        state > 3 * BUDGET as u64,
        "the state is {} MiB",
        state >> 20
    );
    eprintln!(
        "replayed a state of {} MiB in {secs:.1} s: Rust heap peak {:.1} MiB, SQLite's {:.1} MiB",
        state >> 20,
        heap as f64 / f64::from(1 << 20),
        sqlite as f64 / f64::from(1 << 20)
    );
    assert!(
        heap + sqlite < BUDGET,
        "replaying a state of {} MiB held {} MiB of heap and {} MiB in SQLite",
        state >> 20,
        heap >> 20,
        sqlite >> 20
    );
    let left: Vec<_> = std::fs::read_dir(&disk)
        .unwrap()
        .map(|f| f.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "no scratch file is left: {left:?}");

    // The in-memory replay writes the same files.
    let mem = dir.path().join("mem");
    let (state, mem_summary) = weft_provenance::state::rebuild(&log, "vm", None, i64::MAX).unwrap();
    rt.block_on(write_to(&state, &mem)).unwrap();
    assert_eq!(summary, mem_summary);
    assert!(
        std::fs::read(disk.join("etc/app.env")).unwrap()
            == std::fs::read(mem.join("etc/app.env")).unwrap(),
        "the key-value files are the same"
    );
    let (a, b) = (
        dump(&disk.join("data/app.db")),
        dump(&mem.join("data/app.db")),
    );
    assert_eq!(a.lines().count() as u64, ROWS + 1);
    assert!(a == b, "the databases hold the same rows");
}
