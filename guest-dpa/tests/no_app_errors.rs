//! The agent never makes the application fail: the real `weft-dpa` binary captures real
//! SQLite databases while applications create them and write to them, one with no busy
//! timeout at all. Every statement must succeed, checkpoints must not be held up, and
//! the host must still receive every change.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{of_source, Setup};
use rusqlite::{params, Connection, OptionalExtension};
use wait_until::{wait_until, Wait};
use weft_dpa::agent::sqlite;
use weft_dpa::proto::{Entry, Operation};

const T: Duration = Duration::from_secs(30);

fn config() -> String {
    "poll_interval_ms = 20\n[[sqlite]]\npath = \"@DIR@/app.db\"\n".to_string()
}

/// Waits until the agent watches the test's directory (its debug log says so).
fn wait_watching(s: &Setup) {
    let line = format!("watching dir={}", s.path().display());
    wait_until("the agent to watch the directory", T, || {
        s.agent.log_text().contains(&line)
    })
    .unwrap();
}

/// Waits until the agent's insert trigger is on `table`.
fn wait_trigger(c: &Connection, table: &str) {
    wait_until(&format!("a capture trigger on {table}"), T, || {
        let n: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type='trigger' AND name=?1",
                [format!("_weft_ins_{table}")],
                |r| r.get(0),
            )
            .unwrap();
        n == 1
    })
    .unwrap();
}

fn rows(path: &Path) -> Vec<(i64, String, i64)> {
    let c = Connection::open(path).unwrap();
    let mut stmt = c
        .prepare("SELECT id, name, qty FROM items ORDER BY id")
        .unwrap();
    let r = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap();
    r.collect::<Result<_, _>>().unwrap()
}

/// `n` mixed row writes on `items` through `c`: a third alone, the rest in deferred
/// transactions of two to six writes that read first; new rows get ids from `first_id`.
/// Returns the failed statements and the time taken.
fn mixed_writes(c: &Connection, n: u64, first_id: i64) -> (Vec<String>, Duration) {
    let mut writes = 0u64;
    let mut next_id = first_id;
    let mut x = 7 + first_id as u64;
    let mut rnd = move |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m.max(1)
    };
    let mut errors: Vec<String> = Vec::new();
    let mut note = |what: &str, e: rusqlite::Error| errors.push(format!("{what}: {e}"));
    let started = Instant::now();
    while writes < n {
        let in_tx = rnd(3) != 0;
        if in_tx {
            if let Err(e) = c.execute_batch("BEGIN") {
                note("BEGIN", e);
                continue;
            }
            if let Err(e) = c.query_row("SELECT count(*) FROM items", [], |r| r.get::<_, i64>(0)) {
                note("read", e);
            }
        }
        let k = if in_tx { rnd(5) + 2 } else { 1 };
        let mut failed = false;
        for _ in 0..k {
            writes += 1;
            let op = rnd(10);
            let victim: Option<i64> = if op >= 5 {
                match c
                    .query_row(
                        "SELECT id FROM items WHERE id >= ?1 ORDER BY id LIMIT 1",
                        [rnd(next_id as u64) as i64],
                        |r| r.get(0),
                    )
                    .optional()
                {
                    Ok(v) => v,
                    Err(e) => {
                        note("read", e);
                        None
                    }
                }
            } else {
                None
            };
            let res = match (op, victim) {
                (5..=7, Some(id)) => c.execute(
                    "UPDATE items SET qty = qty + 1, name = 'u' || ?2 WHERE id = ?1",
                    params![id, writes as i64],
                ),
                (8..=9, Some(id)) => c.execute("DELETE FROM items WHERE id = ?1", [id]),
                _ => {
                    next_id += 1;
                    c.execute(
                        "INSERT INTO items VALUES (?1, ?2, ?3)",
                        params![next_id - 1, format!("n{writes}"), rnd(100) as i64],
                    )
                }
            };
            if let Err(e) = res {
                note("write", e);
                failed = true;
                break;
            }
        }
        if in_tx {
            if failed {
                c.execute_batch("ROLLBACK").ok();
            } else if let Err(e) = c.execute_batch("COMMIT") {
                note("COMMIT", e);
                c.execute_batch("ROLLBACK").ok();
            }
        }
    }
    let took = started.elapsed();
    (errors, took)
}

/// An application with NO busy timeout creates its database while the agent watches
/// the path, then makes mixed writes, a third alone and the rest in deferred
/// transactions that read first (`BEGIN; SELECT; UPDATE …`), where SQLite reports a
/// busy database at once. Not one statement may fail; the host gets every change,
/// and a TRUNCATE checkpoint (which needs every reader gone) goes through.
#[test]
fn an_application_without_busy_timeout_never_fails_while_the_agent_captures() {
    let s = Setup::new(&config(), |_| {});
    let path = s.path().join("app.db");
    // The database is created under the agent's eyes.
    wait_watching(&s);
    let c = Connection::open(&path).unwrap();
    c.busy_timeout(Duration::ZERO).unwrap();
    if let Err(e) = c.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER NOT NULL);",
    ) {
        panic!("the application's first statement failed: {e}");
    }
    wait_trigger(&c, "items");

    let n = 3000u64;
    // What capture costs: the same writes on a database the agent does not capture,
    // in alternating blocks (the machine's load drifts); no fsync per commit
    // (`synchronous=NORMAL`), so the numbers are SQLite's work, not the disk's.
    c.execute_batch("PRAGMA synchronous=NORMAL").unwrap();
    let plain = Connection::open(s.path().join("plain.db")).unwrap();
    plain
        .execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER NOT NULL);",
        )
        .unwrap();
    let (mut errors, mut took, mut plain_took) = (Vec::new(), Duration::ZERO, Duration::ZERO);
    for block in 0..6 {
        let first_id = 1 + block * 1_000_000;
        let (e, t) = mixed_writes(&plain, n / 6, first_id);
        assert!(e.is_empty(), "{e:?}");
        plain_took += t;
        let (e, t) = mixed_writes(&c, n / 6, first_id);
        errors.extend(e);
        took += t;
    }
    assert!(
        errors.is_empty(),
        "{} of {n} writes failed with the agent running, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    eprintln!(
        "{n} mixed writes without a busy timeout, 0 errors: {:.0} µs a write captured, \
         {:.0} µs uncaptured (x{:.2})",
        per(took),
        per(plain_took),
        took.as_secs_f64() / plain_took.as_secs_f64()
    );

    // The host gets every change: replayed, the entries rebuild the table.
    let db = s.file("app.db");
    let want = rows(&path);
    let replayed = s.path().join("replayed.db");
    let entries = Wait::new(
        "the host's entries to rebuild the table",
        Duration::from_secs(60),
    )
    .interval(Duration::from_millis(200))
    .until(|| {
        let entries: Vec<Entry> = s.host.with(|h| of_source(h, &db));
        let _ = std::fs::remove_file(&replayed);
        let refs: Vec<&Entry> = entries.iter().collect();
        sqlite::apply(replayed.to_str().unwrap(), &refs).unwrap();
        let got = rows(&replayed);
        if got == want {
            Ok(entries)
        } else {
            Err(format!(
                "{} entries rebuild {} of {} rows",
                entries.len(),
                got.len(),
                want.len()
            ))
        }
    })
    .unwrap();
    assert!(entries.iter().any(|e| e.op == Operation::Delete));
    assert!(entries.iter().any(|e| e.op == Operation::Update));

    // No read transaction of the agent's holds the WAL: a TRUNCATE checkpoint without a
    // busy timeout goes through (tried a few times: a drain may be reading right then).
    Wait::new(
        "a TRUNCATE checkpoint to get through",
        Duration::from_secs(5),
    )
    .interval(Duration::from_millis(50))
    .until(|| {
        let (busy, log): (i64, i64) = c
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        if busy == 0 && log == 0 {
            Ok(())
        } else {
            Err(format!("busy {busy}, {log} WAL frames"))
        }
    })
    .unwrap();
    // The agent's own writes (their durations are in its log) came only while the
    // application was quiet.
    for l in s.agent.log_text().lines().filter(|l| {
        l.contains("capture triggers installed") || l.contains("acknowledged capture rows deleted")
    }) {
        eprintln!("agent: {l}");
    }
}

/// Applications that create their database while the agent watches its path, as
/// Debian's `sqlite3` CLI with `.timeout 10000` does (`PRAGMA journal_mode=WAL; CREATE
/// TABLE …` as the first statement, then a read-then-write transaction): over several
/// fresh databases, every statement succeeds, every table exists, and the agent
/// captures each database's rows.
#[test]
fn an_application_creating_its_database_under_the_agent_never_fails() {
    const ROUNDS: u64 = 12;
    // One path per round (a database file replaced under open connections is a
    // different matter).
    let config: String = std::iter::once("poll_interval_ms = 20\n".to_string())
        .chain((0..ROUNDS).map(|i| format!("[[sqlite]]\npath = \"@DIR@/app{i}.db\"\n")))
        .collect();
    let s = Setup::new(&config, |_| {});
    wait_watching(&s);
    let mut errors = Vec::new();
    for round in 0..ROUNDS {
        let path = s.path().join(format!("app{round}.db"));
        let c = Connection::open(&path).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        // An application's start-up work between opening and the first statement.
        // sleep-ok: the application's pause, a different one each round
        std::thread::sleep(Duration::from_millis(round * 3));
        let first = c.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER NOT NULL);
             INSERT INTO items VALUES (1, 'first', 1);",
        );
        if let Err(e) = first {
            errors.push(format!("round {round}: first statement: {e}"));
        }
        for i in 0..20i64 {
            // Read, a moment of work, then write: as an application does.
            let res = read_then_write(
                &c,
                Duration::from_millis(2),
                &format!("INSERT INTO items VALUES ({}, 'r{round}', {i})", i + 2),
            );
            if let Err(e) = res {
                errors.push(format!("round {round}: write {i}: {e}"));
                c.execute_batch("ROLLBACK").ok();
            }
        }
        let n: i64 = c
            .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
            .unwrap_or(-1);
        if n != 21 {
            errors.push(format!("round {round}: the table holds {n} rows, not 21"));
        }
        // The agent captures the database (triggers, then a baseline of its rows).
        wait_trigger(&c, "items");
    }
    assert!(errors.is_empty(), "application errors: {errors:#?}");
    for round in 0..ROUNDS {
        let db = s.file(&format!("app{round}.db"));
        s.host.wait("every database's rows", T, |h| {
            of_source(h, &db)
                .iter()
                .filter(|e| e.op == Operation::Insert)
                .count()
                == 21
        });
    }
}

/// `BEGIN; SELECT …`, `hold` of work, then a write and `COMMIT`.
fn read_then_write(c: &Connection, hold: Duration, write: &str) -> rusqlite::Result<()> {
    c.execute_batch("BEGIN")?;
    c.query_row("SELECT count(*) FROM items", [], |r| r.get::<_, i64>(0))?;
    // sleep-ok: the application's work inside its read transaction, what the agent must wait out
    std::thread::sleep(hold);
    c.execute_batch(write)?;
    c.execute_batch("COMMIT")
}

/// An application that holds a read transaction longer than the agent's quiet period
/// (`BEGIN; SELECT …`, a second of work, then `INSERT`/`UPDATE` and `COMMIT`) is never
/// overtaken by the agent's own writes, the trigger install and the trim of
/// acknowledged rows: its write would fail with `SQLITE_BUSY_SNAPSHOT`, busy timeout or
/// not. The agent writes once the application's transaction is over.
#[test]
fn an_application_reading_across_the_quiet_period_is_not_overtaken() {
    let s = Setup::new(&config(), |_| {});
    let path = s.path().join("app.db");
    wait_watching(&s);
    let c = Connection::open(&path).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER NOT NULL);
         INSERT INTO items VALUES (1, 'one', 1);",
    )
    .unwrap();
    // The install waits for the application's transaction.
    read_then_write(
        &c,
        Duration::from_secs(1),
        "INSERT INTO items VALUES (2, 'two', 2)",
    )
    .expect("a read-then-write transaction across the agent's trigger install");
    wait_trigger(&c, "items");
    // The trim of acknowledged rows waits too.
    for i in 3..50 {
        c.execute("INSERT INTO items VALUES (?1, 'n', 0)", [i])
            .unwrap();
    }
    let db = s.file("app.db");
    s.host.wait("the inserts", T, |h| {
        of_source(h, &db)
            .iter()
            .any(|e| e.op == Operation::Insert && e.key == "[49]")
    });
    read_then_write(
        &c,
        Duration::from_secs(1),
        "UPDATE items SET qty = qty + 1 WHERE id = 1",
    )
    .expect("a read-then-write transaction across the agent's trim");
    // Afterwards the agent trims.
    wait_until("the agent to trim the capture rows", T, || {
        let n: i64 = c
            .query_row("SELECT count(*) FROM _weft_capture", [], |r| r.get(0))
            .unwrap();
        match n {
            0 => Ok(()),
            n => Err(format!("{n} capture rows")),
        }
    })
    .unwrap();
}

/// A source removed from the configuration loses its triggers, but not while the
/// application is inside a transaction: its write would fail (`SQLITE_BUSY_SNAPSHOT`).
#[test]
fn a_removed_source_loses_its_triggers_without_overtaking_the_application() {
    let s = Setup::new(&config(), |d| {
        Connection::open(d.join("app.db"))
            .unwrap()
            .execute_batch(
                "PRAGMA journal_mode=WAL;
                 CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER NOT NULL);",
            )
            .unwrap();
    });
    let c = Connection::open(s.path().join("app.db")).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    wait_trigger(&c, "items");
    c.execute_batch("BEGIN").unwrap();
    c.query_row("SELECT count(*) FROM items", [], |r| r.get::<_, i64>(0))
        .unwrap();
    common::write_config(s.path(), "poll_interval_ms = 20\n");
    wait_until("the agent to let the source go", T, || {
        s.agent.log_text().contains("SQLite source removed")
    })
    .unwrap();
    // sleep-ok: the application's transaction stays open while the agent tries (every 20 ms) to drop the triggers
    std::thread::sleep(Duration::from_secs(1));
    c.execute("INSERT INTO items VALUES (1, 'one', 1)", [])
        .expect("a write in a transaction that began before the source was removed");
    c.execute_batch("COMMIT").unwrap();
    wait_until("the agent to drop its triggers", T, || {
        let n: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type='trigger' AND name LIKE '\\_weft\\_%' ESCAPE '\\'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        match n {
            0 => Ok(()),
            n => Err(format!("{n} triggers left")),
        }
    })
    .unwrap();
}
