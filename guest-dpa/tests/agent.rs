//! The real `weft-dpa` binary against real SQLite databases and files, streaming to a
//! small in-test host over a unix socket.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{of_source, write_config, Setup};
use rusqlite::Connection;
use serde_json::{json, Value};
use wait_until::wait_until;
use weft_dpa::proto::{Apply, DataType, Entry, Operation};

const T: Duration = Duration::from_secs(30);

fn sqlite_config(extra: &str) -> String {
    format!("poll_interval_ms = 20\n[[sqlite]]\npath = \"@DIR@/app.db\"\n{extra}")
}

fn make_db(dir: &std::path::Path) -> Connection {
    let c = Connection::open(dir.join("app.db")).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT NOT NULL, balance REAL);
         CREATE TABLE orders(id INTEGER PRIMARY KEY, customer INTEGER, item TEXT);
         INSERT INTO customers VALUES (1, 'Alice', 10.0);",
    )
    .unwrap();
    c
}

fn row(e: &Entry, which: &str) -> Value {
    let t = if which == "old" { &e.old } else { &e.new };
    serde_json::from_str(t.as_deref().unwrap()).unwrap()
}

#[test]
fn sqlite_changes_are_captured_with_old_new_and_tx_and_rollbacks_are_not() {
    let s = Setup::new(&sqlite_config(""), |d| drop(make_db(d)));
    let db = s.file("app.db");
    // The schema of both tables and the baseline row.
    s.host.wait("baseline", T, |h| {
        of_source(h, &db)
            .iter()
            .filter(|e| e.op == Operation::Schema)
            .count()
            == 2
            && of_source(h, &db).iter().any(|e| e.op == Operation::Insert)
    });
    let c = Connection::open(s.path().join("app.db")).unwrap();
    c.execute_batch(
        "BEGIN;
         UPDATE customers SET name = 'Bob', balance = 12.5 WHERE id = 1;
         INSERT INTO orders VALUES (10, 1, 'book');
         INSERT INTO orders VALUES (11, 1, 'pen');
         COMMIT;
         BEGIN; INSERT INTO orders VALUES (99, 1, 'never'); DELETE FROM customers; ROLLBACK;",
    )
    .unwrap();
    let before = s.host.with(|h| h.last());
    s.host
        .wait("the transaction", T, |h| h.last() >= before + 3);
    c.execute("DELETE FROM orders WHERE id = 11", []).unwrap();
    s.host.wait("the delete", T, |h| h.last() >= before + 4);
    // sleep-ok: nothing more may arrive (no rolled-back row, no duplicate): a quiet spell
    std::thread::sleep(Duration::from_millis(300));
    let entries = s.host.with(|h| of_source(h, &db));
    let changes: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.op != Operation::Schema)
        .collect();
    assert_eq!(
        changes.len(),
        5,
        "baseline + 3 + 1, nothing rolled back: {changes:#?}"
    );
    let (base, upd, o10, o11, del) = (changes[0], changes[1], changes[2], changes[3], changes[4]);
    assert_eq!(
        (base.op, base.collection.as_str(), base.key.as_str()),
        (Operation::Insert, "customers", "[1]")
    );
    assert_eq!(upd.op, Operation::Update);
    assert_eq!(
        row(upd, "old"),
        json!({"id": 1, "name": "Alice", "balance": 10.0})
    );
    assert_eq!(
        row(upd, "new"),
        json!({"id": 1, "name": "Bob", "balance": 12.5})
    );
    assert_eq!((o10.key.as_str(), o11.key.as_str()), ("[10]", "[11]"));
    assert_eq!(row(o11, "new")["item"], "pen");
    assert!(
        upd.tx.is_some() && upd.tx == o10.tx && o10.tx == o11.tx,
        "one transaction, one tx id"
    );
    assert_ne!(base.tx, upd.tx);
    assert_ne!(
        del.tx, upd.tx,
        "a transaction made after a pause gets its own tx id"
    );
    assert_eq!((del.op, del.key.as_str()), (Operation::Delete, "[11]"));
    assert_eq!(row(del, "old")["item"], "pen");
    assert!(entries.iter().all(|e| e.data_type == DataType::Sqlite));
    assert!(!entries.iter().any(|e| e.key == "[99]"));
    // Schema entries come first and carry the CREATE TABLE statement.
    let schema: Value = serde_json::from_str(entries[0].new.as_deref().unwrap()).unwrap();
    assert!(schema.as_str().unwrap().starts_with("CREATE TABLE"));
    // Acknowledged rows leave the capture table.
    wait_until("acknowledged rows to leave the capture table", T, || {
        let n: i64 = c
            .query_row("SELECT count(*) FROM _weft_capture", [], |r| r.get(0))
            .unwrap();
        match n {
            0 => Ok(()),
            n => Err(format!("{n} capture rows left")),
        }
    })
    .unwrap();
}

#[test]
fn sigkill_mid_stream_loses_and_duplicates_nothing() {
    let mut s = Setup::new(&sqlite_config(""), |d| drop(make_db(d)));
    let db = s.file("app.db");
    let dir = s.path().to_path_buf();
    let writer = std::thread::spawn(move || {
        let c = Connection::open(dir.join("app.db")).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        for i in 0..300i64 {
            let tx = c.unchecked_transaction().unwrap();
            for j in 0..10i64 {
                tx.execute("INSERT INTO orders VALUES (?1, 1, 'x')", [i * 10 + j + 100])
                    .unwrap();
            }
            tx.commit().unwrap();
            // sleep-ok: the application's pace, so that the kills land mid-stream
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let mut kills = 0;
    while !writer.is_finished() {
        // sleep-ok: the kill schedule, one every 150 ms while the application writes
        std::thread::sleep(Duration::from_millis(150));
        s.agent.kill_and_restart();
        kills += 1;
    }
    writer.join().unwrap();
    s.host.wait("all 3000 rows", Duration::from_secs(60), |h| {
        of_source(h, &db)
            .iter()
            .filter(|e| e.collection == "orders" && e.op == Operation::Insert)
            .count()
            >= 3000
    });
    // sleep-ok: a late resend would show as a duplicate or a gap: a quiet spell
    std::thread::sleep(Duration::from_millis(500));
    s.host.with(|h| {
        let seqs: Vec<u64> = h.entries.keys().copied().collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "gap-free from 1");
        let keys: Vec<&str> = h
            .entries
            .values()
            .filter(|e| e.collection == "orders" && e.op == Operation::Insert)
            .map(|e| e.key.as_str())
            .collect();
        let unique: BTreeSet<&str> = keys.iter().copied().collect();
        assert_eq!(keys.len(), 3000, "each row once");
        assert_eq!(unique.len(), 3000);
        // Each transaction's ten rows share one tx id and no other transaction's rows do
        // unless the agent could not separate them (never split).
        let mut by_tx: BTreeMap<u64, BTreeSet<i64>> = BTreeMap::new();
        for e in h.entries.values().filter(|e| e.collection == "orders" && e.op == Operation::Insert) {
            let id: i64 = e.key.trim_matches(['[', ']']).parse().unwrap();
            by_tx.entry(e.tx.unwrap()).or_default().insert((id - 100) / 10);
        }
        let mut tx_of: BTreeMap<i64, u64> = BTreeMap::new();
        for (tx, apps) in &by_tx {
            for a in apps {
                assert!(tx_of.insert(*a, *tx).is_none(), "transaction {a} split over tx ids");
            }
        }
        eprintln!(
            "{kills} SIGKILLs; {} entries, {} resent and dropped as duplicates; {} application transactions in {} tx ids",
            seqs.len(),
            h.duplicates,
            tx_of.len(),
            by_tx.len()
        );
    });
    assert!(
        kills >= 2,
        "the agent was killed mid-stream ({kills} times)"
    );
}

#[test]
fn a_dropped_connection_resends_from_the_hosts_position() {
    let s = Setup::new(
        "poll_interval_ms = 20\nbatch_entries = 16\n[[kv]]\npath = \"@DIR@/app.env\"\n",
        |d| {
            let text: String = (0..100).map(|i| format!("K{i}=v{i}\n")).collect();
            std::fs::write(d.join("app.env"), text).unwrap();
        },
    );
    // The first connection is closed after two batches, unacknowledged.
    s.host.with(|h| h.drop_after_batches = Some(2));
    s.host.wait("all keys", T, |h| h.last() >= 100);
    s.host.with(|h| {
        assert!(h.connections >= 2, "the agent reconnected");
        assert_eq!(h.entries.len(), 100);
        let keys: BTreeSet<&str> = h.entries.values().map(|e| e.key.as_str()).collect();
        assert_eq!(keys.len(), 100);
        assert_eq!(h.entries[&1].new.as_deref(), Some("\"v0\""));
    });
}

/// A host that stops answering without closing the connection (a transport that lost
/// the close, as a vsock device can after weftd's SIGKILL) is given up after
/// `ack_timeout_ms`: the agent connects again and resends what was not acknowledged.
#[test]
fn a_host_that_goes_silent_is_left_and_the_entries_resent() {
    let s = Setup::new(
        "poll_interval_ms = 20\nbatch_entries = 16\nack_timeout_ms = 500\n[[kv]]\npath = \"@DIR@/app.env\"\n",
        |d| {
            let text: String = (0..100).map(|i| format!("K{i}=v{i}\n")).collect();
            std::fs::write(d.join("app.env"), text).unwrap();
        },
    );
    s.host.with(|h| h.stall_after_batches = Some(2));
    s.host.wait("all keys", T, |h| h.last() >= 100);
    s.host.with(|h| {
        assert!(h.connections >= 2, "the agent connected again");
        assert_eq!(h.entries.len(), 100);
    });
}

#[test]
fn json_writes_become_pointer_changes_and_bad_json_waits() {
    let s = Setup::new(
        "poll_interval_ms = 20\n[[json]]\npath = \"@DIR@/settings.json\"\n",
        |d| {
            std::fs::write(
                d.join("settings.json"),
                r#"{"name": "a", "list": [1, 2], "x/y": {"~": 1}}"#,
            )
            .unwrap();
        },
    );
    let f = s.file("settings.json");
    s.host.wait("the first document", T, |h| h.last() >= 1);
    // An atomic rename-write.
    let tmp = s.path().join("settings.json.new");
    std::fs::write(
        &tmp,
        r#"{"name": "b", "list": [1], "x/y": {"~": 2}, "new": null}"#,
    )
    .unwrap();
    std::fs::rename(&tmp, &f).unwrap();
    s.host.wait("the diff", T, |h| h.last() >= 5);
    // Not JSON: skipped; the next good write diffs against the last good document.
    std::fs::write(&f, "{broken").unwrap();
    wait_until("the agent to skip the broken document", T, || {
        s.agent.log_text().contains("not valid JSON right now")
    })
    .unwrap();
    std::fs::write(
        &f,
        r#"{"name": "c", "list": [1], "x/y": {"~": 2}, "new": null}"#,
    )
    .unwrap();
    s.host.wait("after the bad write", T, |h| h.last() >= 6);
    // sleep-ok: nothing more may arrive: a quiet spell
    std::thread::sleep(Duration::from_millis(200));
    let e = s.host.with(|h| of_source(h, &f));
    assert_eq!(e[0].key, "");
    let got: Vec<(Operation, &str, Option<&str>, Option<&str>)> = e[1..]
        .iter()
        .map(|e| (e.op, e.key.as_str(), e.old.as_deref(), e.new.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            (Operation::Delete, "/list/1", Some("2"), None),
            (Operation::Update, "/name", Some("\"a\""), Some("\"b\"")),
            (Operation::Update, "/x~1y/~0", Some("1"), Some("2")),
            (Operation::Insert, "/new", None, Some("null")),
            (Operation::Update, "/name", Some("\"b\""), Some("\"c\"")),
        ]
    );
    assert!(e
        .iter()
        .all(|e| e.tx.is_none() && e.data_type == DataType::Json));
}

#[test]
fn a_config_reload_adds_sources_without_a_restart() {
    let s = Setup::new("poll_interval_ms = 20\n", |_| {});
    let pid = s.agent.pid();
    std::fs::write(s.path().join("app.env"), "# settings\nMODE=fast\n").unwrap();
    std::fs::create_dir(s.path().join("flags")).unwrap();
    std::fs::write(s.path().join("flags/beta"), "on").unwrap();
    // sleep-ok: an agent without these sources must capture nothing in this time
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.host.with(|h| h.last()), 0, "nothing configured yet");
    write_config(
        s.path(),
        "poll_interval_ms = 20\n[[kv]]\npath = \"@DIR@/app.env\"\n[[kv]]\npath = \"@DIR@/flags\"\nformat = \"dir\"\n",
    );
    s.host.wait("the new sources", T, |h| h.last() >= 2);
    std::fs::write(s.path().join("app.env"), "MODE=slow\nNEW=1\n").unwrap();
    std::fs::remove_file(s.path().join("flags/beta")).unwrap();
    s.host.wait("their changes", T, |h| h.last() >= 5);
    let env = s.host.with(|h| of_source(h, &s.file("app.env")));
    let flags = s
        .host
        .with(|h| of_source(h, &format!("{}/", s.file("flags"))));
    assert_eq!(env.len(), 3);
    assert_eq!(
        (env[1].op, env[1].key.as_str(), env[1].new.as_deref()),
        (Operation::Update, "MODE", Some("\"slow\""))
    );
    assert_eq!((env[2].op, env[2].key.as_str()), (Operation::Insert, "NEW"));
    assert_eq!(flags.len(), 2);
    assert_eq!(
        (flags[1].op, flags[1].old.as_deref()),
        (Operation::Delete, Some("\"on\""))
    );
    assert_eq!(s.agent.pid(), pid);
    // SIGHUP also reloads: adding a JSON source this time.
    std::fs::write(s.path().join("doc.json"), "{\"a\": 1}").unwrap();
    let text = std::fs::read_to_string(s.path().join("dpa.toml")).unwrap()
        + &format!("[[json]]\npath = \"{}\"\n", s.file("doc.json"));
    // Written in place (no rename): inotify sees it too, so the signal is the second cause.
    std::fs::write(s.path().join("dpa.toml"), text).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    s.host.wait("the JSON source", T, |h| {
        h.entries.values().any(|e| e.data_type == DataType::Json)
    });
}

#[test]
fn apply_mode_changes_the_sources_and_the_changes_are_captured() {
    let s = Setup::new(
        &sqlite_config("[[json]]\npath = \"@DIR@/doc.json\"\n[[kv]]\npath = \"@DIR@/app.env\"\n"),
        |d| {
            drop(make_db(d));
            std::fs::write(d.join("doc.json"), "{\"a\": {\"b\": 1}}").unwrap();
        },
    );
    let db = s.file("app.db");
    s.host.wait("the baseline", T, |h| h.last() >= 4);
    // Apply changes pass the same validation as entries (seq ≥ 1), though the agent
    // ignores their seq.
    let change =
        |data_type, op, source: &str, collection: &str, key: &str, new: Option<&str>| Entry {
            seq: 1,
            guest_time_us: 0,
            data_type,
            op,
            source: source.into(),
            collection: collection.into(),
            key: key.into(),
            old: (op != Operation::Insert).then(|| "{}".to_string()),
            new: new.map(Into::into),
            tx: None,
        };
    let changes = vec![
        change(
            DataType::Sqlite,
            Operation::Insert,
            &db,
            "orders",
            "[500]",
            Some(r#"{"id":500,"customer":1,"item":"lamp"}"#),
        ),
        change(
            DataType::Sqlite,
            Operation::Update,
            &db,
            "customers",
            "[1]",
            Some(r#"{"id":1,"name":"Zed","balance":0}"#),
        ),
        change(
            DataType::Json,
            Operation::Update,
            &s.file("doc.json"),
            "",
            "/a/b",
            Some("2"),
        ),
        change(
            DataType::Kv,
            Operation::Insert,
            &s.file("app.env"),
            "",
            "COLOUR",
            Some("\"blue\""),
        ),
    ];
    s.host.with(|h| h.outbox.push(Apply { id: 7, changes }));
    s.host.wait("the answer", T, |h| !h.applied.is_empty());
    let applied = s.host.with(|h| h.applied[0].clone());
    assert_eq!((applied.id, applied.applied, applied.error), (7, 4, None));
    let c = Connection::open(s.path().join("app.db")).unwrap();
    let item: String = c
        .query_row("SELECT item FROM orders WHERE id=500", [], |r| r.get(0))
        .unwrap();
    assert_eq!(item, "lamp");
    let doc: Value =
        serde_json::from_slice(&std::fs::read(s.path().join("doc.json")).unwrap()).unwrap();
    assert_eq!(doc, json!({"a": {"b": 2}}));
    assert_eq!(
        std::fs::read_to_string(s.path().join("app.env")).unwrap(),
        "COLOUR=blue\n"
    );
    // The agent captured its own changes like any others.
    s.host.wait("the applied changes captured", T, |h| {
        let v: Vec<&Entry> = h.entries.values().collect();
        v.iter()
            .any(|e| e.key == "[500]" && e.op == Operation::Insert)
            && v.iter()
                .any(|e| e.key == "[1]" && e.op == Operation::Update)
            && v.iter()
                .any(|e| e.key == "/a/b" && e.new.as_deref() == Some("2"))
            && v.iter().any(|e| e.key == "COLOUR")
    });
    // A failing request reports what went wrong.
    let bad = vec![change(
        DataType::Sqlite,
        Operation::Insert,
        &db,
        "nosuch",
        "[1]",
        Some("{}"),
    )];
    s.host.with(|h| {
        h.outbox.push(Apply {
            id: 8,
            changes: bad,
        })
    });
    s.host
        .wait("the second answer", T, |h| h.applied.len() == 2);
    let a = s.host.with(|h| h.applied[1].clone());
    assert_eq!(a.applied, 0);
    assert!(a.error.unwrap().contains("nosuch"));
}

/// Capture throughput (entries/s from commit to host) and commit-to-ack latency on
/// this machine; prints the numbers (run with `--nocapture`).
#[test]
fn capture_throughput_and_commit_to_ack_latency() {
    let s = Setup::new(&sqlite_config(""), |d| drop(make_db(d)));
    let db = s.file("app.db");
    s.host.wait("baseline", T, |h| h.last() >= 3);
    let base = s.host.with(|h| h.last());
    let c = Connection::open(s.path().join("app.db")).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    // Throughput: 20,000 rows in transactions of 100.
    let n = 20_000i64;
    let started = Instant::now();
    for t in 0..n / 100 {
        let tx = c.unchecked_transaction().unwrap();
        for j in 0..100 {
            tx.execute(
                "INSERT INTO orders VALUES (?1, 1, 'thing')",
                [1000 + t * 100 + j],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let committed = started.elapsed();
    s.host.wait("all rows", Duration::from_secs(120), |h| {
        h.last() >= base + n as u64
    });
    let total = started.elapsed();
    let rate = n as f64 / total.as_secs_f64();
    // Latency: single-row transactions, paced, commit to arrival at the host.
    let mut lat = Vec::new();
    for i in 0..200i64 {
        let before = s.host.with(|h| h.last());
        c.execute("INSERT INTO orders VALUES (?1, 2, 'one')", [100_000 + i])
            .unwrap();
        let t0 = Instant::now();
        s.host.wait("one row", T, |h| h.last() > before);
        let arrived = s.host.with(|h| h.arrived[&(before + 1)]);
        lat.push(arrived.saturating_duration_since(t0));
        // sleep-ok: paced single-row transactions, as an application makes them
        std::thread::sleep(Duration::from_millis(5));
    }
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
    eprintln!(
        "capture: {n} rows committed in {:.2}s, all at the host after {:.2}s: {rate:.0} entries/s; \
         commit-to-host latency p50 {:.2} ms, p99 {:.2} ms (poll 20 ms, inotify wake-ups)",
        committed.as_secs_f64(),
        total.as_secs_f64(),
        p(0.5).as_secs_f64() * 1e3,
        p(0.99).as_secs_f64() * 1e3
    );
    let _ = db;
}
