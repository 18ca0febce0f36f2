//! provenance: the host's provenance log against the obvious alternative, an indexed
//! SQLite table, on the same entries in the same run.
//!
//! N realistic DPA entries (SQLite row changes with JSON old/new rows across three
//! tables, JSON-pointer changes of two documents, key-value changes; inserts, updates and
//! deletes; transactions of 1-5 changes; one guest millisecond apart) are generated once
//! from a fixed seed. Per round, in alternating order, in a fresh directory under
//! `WEFT_BENCH_DIR`:
//!
//! - **weft**: `ProvenanceLog::append` in batches of 512 (each fsynced before it returns),
//!   weftd's default options (64 MiB segments, zstd 3) without a quota;
//! - **SQLite**: one table with a column per entry field, a unique index on (vm, seq) and
//!   indexes on (vm, guest_time_us) and (vm, key); WAL, `synchronous=FULL` (an fsync per
//!   commit, as weft's per append); one prepared INSERT per entry, one transaction per
//!   batch of 512.
//!
//! Every round starts after a `sync`, with one uncounted warm-up round of each before
//! them. Then, not in the append time: stored bytes at rest (weft: segments and
//! sidecars after a reopen, which cuts the up to 4 MiB of zeros the open segment
//! allocates ahead; SQLite: the database after a WAL checkpoint) against the entries as raw JSON lines (serde_json of
//! each entry, one per line); 200 queries by (table, key) of rows that exist; and one
//! full read in sequence order (what the replay engine reads), both decoding into
//! `weft_dpa::Entry`. SQLite gets `ANALYZE` after the load (not timed), so that its
//! planner uses the key index.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use rusqlite::{params, Connection};
use weft_dpa::{DataType, Entry, Operation};
use weft_provenance::log::{LogOptions, ProvenanceLog, Query};

use super::{median, min_max};

/// Entries per append (per SQLite transaction).
const BATCH: usize = 512;
/// Queries by key per round.
const KEY_QUERIES: usize = 200;
/// The acceptance goal: weft's append throughput over SQLite's.
const GOAL_RATIO: f64 = 3.0;
const VM: &str = "bench";
const TABLES: [&str; 3] = ["customers", "orders", "inventory"];
const ROWS_PER_TABLE: u64 = 4000;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const FIRST: [&str; 8] = [
    "Alice", "Bob", "Chen", "Dana", "Emeka", "Fatima", "Goran", "Hana",
];
const LAST: [&str; 8] = [
    "Smith", "Okafor", "Li", "Novak", "Garcia", "Kim", "Haddad", "Ito",
];
const ITEMS: [&str; 6] = ["widget", "gadget", "sprocket", "bolt", "gear", "spring"];
const STATUS: [&str; 4] = ["new", "paid", "shipped", "returned"];

/// A row of `table` with primary key `id`, at version `v`.
fn row(table: &str, id: u64, v: u64, rng: &mut Rng) -> String {
    let ts = format!(
        "2026-11-22T{:02}:{:02}:{:02}Z",
        v / 3600 % 24,
        v / 60 % 60,
        v % 60
    );
    match table {
        "customers" => format!(
            r#"{{"id":{id},"name":"{} {}","email":"user{id}@example.com","balance":{}.{:02},"tier":{},"updated_at":"{ts}"}}"#,
            FIRST[(id % 8) as usize],
            LAST[(id / 8 % 8) as usize],
            rng.below(100_000),
            rng.below(100),
            rng.below(4)
        ),
        "orders" => format!(
            r#"{{"id":{id},"customer_id":{},"item":"{}","quantity":{},"total":{}.{:02},"status":"{}","updated_at":"{ts}"}}"#,
            rng.below(ROWS_PER_TABLE) + 1,
            ITEMS[rng.below(6) as usize],
            rng.below(20) + 1,
            rng.below(5000),
            rng.below(100),
            STATUS[rng.below(4) as usize]
        ),
        _ => format!(
            r#"{{"sku":"SKU-{id:06}","item":"{}","on_hand":{},"warehouse":"wh-{}","updated_at":"{ts}"}}"#,
            ITEMS[(id % 6) as usize],
            rng.below(1000),
            rng.below(5)
        ),
    }
}

/// `n` entries as a guest's DPA would report them.
pub fn workload(n: usize) -> Vec<Entry> {
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    let mut rows: Vec<Vec<Option<String>>> = vec![vec![None; ROWS_PER_TABLE as usize + 1]; 3];
    let mut out = Vec::with_capacity(n);
    let t0: i64 = 1_795_000_000_000_000;
    let mut tx = 0u64;
    let mut left_in_tx = 0;
    while out.len() < n {
        let seq = out.len() as u64 + 1;
        let guest_time_us = t0 + seq as i64 * 1000;
        let pick = rng.below(100);
        let entry = if pick < 60 {
            if left_in_tx == 0 {
                tx += 1;
                left_in_tx = rng.below(5) + 1;
            }
            left_in_tx -= 1;
            let t = rng.below(3) as usize;
            let id = rng.below(ROWS_PER_TABLE) + 1;
            let old = rows[t][id as usize].clone();
            let delete = old.is_some() && rng.below(10) == 0;
            let new = (!delete).then(|| row(TABLES[t], id, seq, &mut rng));
            rows[t][id as usize].clone_from(&new);
            let op = match (&old, &new) {
                (None, _) => Operation::Insert,
                (Some(_), Some(_)) => Operation::Update,
                (Some(_), None) => Operation::Delete,
            };
            Entry {
                seq,
                guest_time_us,
                data_type: DataType::Sqlite,
                op,
                source: "/var/lib/app/app.db".into(),
                collection: TABLES[t].into(),
                key: format!("[{id}]"),
                old,
                new,
                tx: Some(tx),
            }
        } else if pick < 85 {
            let doc = rng.below(2);
            let key = format!(
                "/services/{}/{}",
                rng.below(40),
                ["port", "enabled", "replicas", "image"][rng.below(4) as usize]
            );
            Entry {
                seq,
                guest_time_us,
                data_type: DataType::Json,
                op: Operation::Update,
                source: format!("/etc/app/{}.json", ["settings", "deploy"][doc as usize]),
                collection: String::new(),
                key,
                old: Some(rng.below(10_000).to_string()),
                new: Some(rng.below(10_000).to_string()),
                tx: None,
            }
        } else {
            let k = rng.below(200);
            Entry {
                seq,
                guest_time_us,
                data_type: DataType::Kv,
                op: Operation::Update,
                source: "/etc/app/app.env".into(),
                collection: String::new(),
                key: format!("APP_SETTING_{k}"),
                old: Some(format!("\"value-{}\"", rng.below(1_000_000))),
                new: Some(format!("\"value-{}\"", rng.below(1_000_000))),
                tx: None,
            }
        };
        out.push(entry);
    }
    out
}

fn dir_bytes(path: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(path)? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() {
            dir_bytes(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(total)
}

/// The disk's cost of what both stores do once per batch: append about one weft block
/// (40 KiB) to a file and `fdatasync` it; median µs of 200.
fn fsync_us(dir: &Path) -> Result<f64> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let block = vec![0x5au8; 40 << 10];
    let mut times = Vec::with_capacity(200);
    for _ in 0..200 {
        let start = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(median(&times))
}

fn host_now() -> i64 {
    weft::provenance::service::host_now_us()
}

/// One round's figures of one side.
#[derive(Default, Clone)]
struct Side {
    append_eps: f64,
    bytes: u64,
    key_ms: f64,
    read_eps: f64,
    /// Replay: the full read folded into application state (`weft_provenance::state::State`).
    replay_eps: f64,
}

fn run_weft(dir: &Path, entries: &[Entry], keys: &[(String, String)]) -> Result<Side> {
    let root = dir.join("weft");
    let options = LogOptions {
        quota_bytes: 0,
        ..LogOptions::default()
    };
    let log = ProvenanceLog::open(root.clone(), options.clone())?;
    let start = Instant::now();
    for batch in entries.chunks(BATCH) {
        log.append(VM, host_now(), batch)?;
    }
    let append = start.elapsed().as_secs_f64();
    drop(log);
    // Reads from a fresh open, as after a weftd restart.
    let log = ProvenanceLog::open(root.clone(), options)?;
    // At rest: opening cut the zeros the open segment had allocated ahead.
    ensure!(
        log.last_seq(VM)? == entries.len() as u64,
        "weft lost entries"
    );
    let bytes = dir_bytes(&root)?;
    let start = Instant::now();
    let mut found = 0;
    for (table, key) in keys {
        let q = Query {
            collection: Some(table.clone()),
            key: Some(key.clone()),
            ..Query::default()
        };
        found += log.query(VM, &q)?.len();
    }
    let key_ms = start.elapsed().as_secs_f64() * 1000.0 / keys.len() as f64;
    let start = Instant::now();
    let all = log.query(VM, &Query::default())?;
    let read = start.elapsed().as_secs_f64();
    ensure!(
        all.len() == entries.len(),
        "weft read {} of {} entries",
        all.len(),
        entries.len()
    );
    ensure!(
        all.last().map(|r| &r.entry) == entries.last(),
        "weft read back a different last entry"
    );
    ensure!(found > 0, "no key query found anything");
    // Replay: read everything again and fold it into state, as `weft replay` does.
    let start = Instant::now();
    let all = log.query(VM, &Query::default())?;
    let mut state = weft_provenance::state::State::default();
    let summary = state.apply_all(&all);
    let replay = start.elapsed().as_secs_f64();
    ensure!(
        summary.applied + summary.skipped == entries.len() as u64,
        "replay saw {} of {} entries",
        summary.applied + summary.skipped,
        entries.len()
    );
    Ok(Side {
        append_eps: entries.len() as f64 / append,
        bytes,
        key_ms,
        read_eps: all.len() as f64 / read,
        replay_eps: entries.len() as f64 / replay,
    })
}

fn data_type(s: &str) -> DataType {
    match s {
        "sqlite" => DataType::Sqlite,
        "json" => DataType::Json,
        _ => DataType::Kv,
    }
}

fn operation(s: &str) -> Operation {
    match s {
        "insert" => Operation::Insert,
        "update" => Operation::Update,
        "delete" => Operation::Delete,
        _ => Operation::Schema,
    }
}

fn entry_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, Entry)> {
    let host: i64 = r.get(1)?;
    let seq: i64 = r.get(0)?;
    let tx: Option<i64> = r.get(10)?;
    Ok((
        host,
        Entry {
            seq: seq as u64,
            guest_time_us: r.get(2)?,
            data_type: data_type(&r.get::<_, String>(3)?),
            op: operation(&r.get::<_, String>(4)?),
            source: r.get(5)?,
            collection: r.get(6)?,
            key: r.get(7)?,
            old: r.get(8)?,
            new: r.get(9)?,
            tx: tx.map(|t| t as u64),
        },
    ))
}

const SELECT: &str = "SELECT seq, host_time_us, guest_time_us, data_type, op, source, collection, key, old, new, tx FROM provenance";

fn run_sqlite(dir: &Path, entries: &[Entry], keys: &[(String, String)]) -> Result<Side> {
    let sqlite_dir = dir.join("sqlite");
    std::fs::create_dir_all(&sqlite_dir)?;
    let path = sqlite_dir.join("peer.db");
    let mut db = Connection::open(&path)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.execute_batch(
        "CREATE TABLE provenance (
             vm TEXT NOT NULL, seq INTEGER NOT NULL, guest_time_us INTEGER NOT NULL,
             host_time_us INTEGER NOT NULL, data_type TEXT NOT NULL, op TEXT NOT NULL,
             source TEXT NOT NULL, collection TEXT NOT NULL, key TEXT NOT NULL,
             old TEXT, new TEXT, tx INTEGER);
         CREATE UNIQUE INDEX provenance_seq ON provenance (vm, seq);
         CREATE INDEX provenance_time ON provenance (vm, guest_time_us);
         CREATE INDEX provenance_key ON provenance (vm, key);",
    )?;
    let start = Instant::now();
    for batch in entries.chunks(BATCH) {
        let host = host_now();
        let tx = db.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO provenance (vm, seq, guest_time_us, host_time_us, data_type, op, source, collection, key, old, new, tx)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )?;
            for e in batch {
                insert.execute(params![
                    VM,
                    e.seq as i64,
                    e.guest_time_us,
                    host,
                    e.data_type.as_str(),
                    e.op.as_str(),
                    e.source,
                    e.collection,
                    e.key,
                    e.old,
                    e.new,
                    e.tx.map(|t| t as i64),
                ])?;
            }
        }
        tx.commit()?;
    }
    let append = start.elapsed().as_secs_f64();
    db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    // Statistics for the planner (not timed): without them SQLite walks the (vm, seq)
    // index for a query by key, to save the sort, and is 15x slower.
    db.execute_batch("ANALYZE")?;
    drop(db);
    let bytes = dir_bytes(&sqlite_dir)?;
    let db = Connection::open(&path)?;
    let start = Instant::now();
    let mut found = 0;
    {
        let mut by_key = db.prepare_cached(&format!(
            "{SELECT} WHERE vm = ? AND key = ? AND collection = ? ORDER BY seq"
        ))?;
        for (table, key) in keys {
            let rows = by_key.query_map(params![VM, key, table], entry_of)?;
            for r in rows {
                r?;
                found += 1;
            }
        }
    }
    let key_ms = start.elapsed().as_secs_f64() * 1000.0 / keys.len() as f64;
    let start = Instant::now();
    let mut all = Vec::with_capacity(entries.len());
    {
        let mut every = db.prepare(&format!("{SELECT} WHERE vm = ? ORDER BY seq"))?;
        for r in every.query_map(params![VM], entry_of)? {
            all.push(r?);
        }
    }
    let read = start.elapsed().as_secs_f64();
    ensure!(
        all.len() == entries.len(),
        "SQLite read {} of {} entries",
        all.len(),
        entries.len()
    );
    ensure!(found > 0, "no key query found anything");
    Ok(Side {
        append_eps: entries.len() as f64 / append,
        bytes,
        key_ms,
        read_eps: all.len() as f64 / read,
        replay_eps: f64::NAN,
    })
}

fn bench_base() -> Result<std::path::PathBuf> {
    let dir = match std::env::var_os("WEFT_BENCH_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("cannot find the target directory")?
            .join("bench"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// Runs the benchmark: `n` entries, `rounds` rounds.
pub fn bench_provenance(n: usize, rounds: usize) -> Result<()> {
    let entries = workload(n);
    let raw_json: u64 = entries
        .iter()
        .map(|e| serde_json::to_string(e).map(|s| s.len() as u64 + 1))
        .sum::<Result<u64, _>>()?;
    let mix = |t: DataType| entries.iter().filter(|e| e.data_type == t).count();
    eprintln!(
        "{n} entries: {} sqlite, {} json, {} kv; {:.1} MiB as JSON lines",
        mix(DataType::Sqlite),
        mix(DataType::Json),
        mix(DataType::Kv),
        raw_json as f64 / (1 << 20) as f64
    );
    // Keys that exist: spread over the run.
    let rows: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.data_type == DataType::Sqlite)
        .collect();
    let keys: Vec<(String, String)> = (0..KEY_QUERIES)
        .map(|i| {
            let e = rows[i * rows.len() / KEY_QUERIES];
            (e.collection.clone(), e.key.clone())
        })
        .collect();
    let base = bench_base()?;
    {
        // One uncounted warm-up round of each, on a tenth of the entries.
        let warm = tempfile::Builder::new()
            .prefix("provenance-")
            .tempdir_in(&base)?;
        let few = &entries[..n / 10];
        let few_keys: Vec<(String, String)> = few
            .iter()
            .filter(|e| e.data_type == DataType::Sqlite)
            .take(10)
            .map(|e| (e.collection.clone(), e.key.clone()))
            .collect();
        run_weft(warm.path(), few, &few_keys)?;
        run_sqlite(warm.path(), few, &few_keys)?;
    }
    let (mut weft, mut peer, mut fsyncs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let dir = tempfile::Builder::new()
            .prefix("provenance-")
            .tempdir_in(&base)?;
        // Start each round with nothing left to write back from the last one.
        let synced = std::process::Command::new("sync").status()?;
        ensure!(synced.success(), "sync failed");
        fsyncs.push(fsync_us(dir.path())?);
        let order = if round.is_multiple_of(2) {
            [true, false]
        } else {
            [false, true]
        };
        for weft_first in order {
            if weft_first {
                weft.push(run_weft(dir.path(), &entries, &keys)?);
            } else {
                peer.push(run_sqlite(dir.path(), &entries, &keys)?);
            }
        }
        let (w, p) = (&weft[round], &peer[round]);
        eprintln!(
            "round {}: 40 KiB append + fdatasync {:.0} µs",
            round + 1,
            fsyncs[round]
        );
        eprintln!(
            "round {}: append weft {:.0}/s, SQLite {:.0}/s ({:.2}x); bytes/entry {:.1} vs {:.1}; key query {:.2} vs {:.2} ms; full read {:.0} vs {:.0}/s; replay {:.0}/s",
            round + 1,
            w.append_eps,
            p.append_eps,
            w.append_eps / p.append_eps,
            w.bytes as f64 / n as f64,
            p.bytes as f64 / n as f64,
            w.key_ms,
            p.key_ms,
            w.read_eps,
            p.read_eps,
            w.replay_eps
        );
    }
    let col = |v: &[Side], f: fn(&Side) -> f64| v.iter().map(f).collect::<Vec<_>>();
    let ratios: Vec<f64> = weft
        .iter()
        .zip(&peer)
        .map(|(w, p)| w.append_eps / p.append_eps)
        .collect();
    let row = |name: &str, v: &[f64], unit: &str| {
        let (lo, hi) = min_max(v);
        println!("| {name} | {:.0} | {lo:.0} | {hi:.0} | {unit} |", median(v));
    };
    println!(
        "\n**append** ({n} entries, batches of {BATCH}, an fsync per batch, {rounds} rounds)\n"
    );
    println!("| store | entries/s (median) | min | max | |");
    println!("| --- | ---: | ---: | ---: | --- |");
    row("weft provenance log", &col(&weft, |s| s.append_eps), "");
    row(
        "SQLite, indexed table (WAL, synchronous=FULL)",
        &col(&peer, |s| s.append_eps),
        "",
    );
    let ratio = median(&ratios);
    let (lo, hi) = min_max(&ratios);
    println!(
        "\nratio weft / SQLite (entries/s, median of per-round ratios): **{ratio:.2}** (min {lo:.2}, max {hi:.2}); goal ≥ {GOAL_RATIO}: {}\n",
        if ratio >= GOAL_RATIO { "met" } else { "NOT met" }
    );
    let batches = n.div_ceil(BATCH) as f64;
    println!(
        "per batch of {BATCH} (median): weft {:.2} ms, SQLite {:.2} ms; one 40 KiB append + fdatasync on this disk: {:.2} ms\n",
        batches.recip() * n as f64 / median(&col(&weft, |s| s.append_eps)) * 1000.0,
        batches.recip() * n as f64 / median(&col(&peer, |s| s.append_eps)) * 1000.0,
        median(&fsyncs) / 1000.0
    );
    let per = |b: u64| b as f64 / n as f64;
    println!("**stored bytes per entry**\n");
    println!("| store | bytes/entry | vs raw JSON lines |");
    println!("| --- | ---: | ---: |");
    let raw = per(raw_json);
    println!("| raw JSON lines | {raw:.1} | 1.00 |");
    let wb = per(median(&col(&weft, |s| s.bytes as f64)) as u64);
    let pb = per(median(&col(&peer, |s| s.bytes as f64)) as u64);
    println!(
        "| weft provenance log (zstd 3, indexes included) | {wb:.1} | {:.2} |",
        wb / raw
    );
    println!("| SQLite table + 3 indexes | {pb:.1} | {:.2} |", pb / raw);
    println!("\n**reads** (after a fresh open)\n");
    println!("| store | query by (table, key), ms (median) | full read, entries/s (median) |");
    println!("| --- | ---: | ---: |");
    println!(
        "| weft provenance log | {:.2} | {:.0} |",
        median(&col(&weft, |s| s.key_ms)),
        median(&col(&weft, |s| s.read_eps))
    );
    println!(
        "| SQLite (index on key) | {:.2} | {:.0} |",
        median(&col(&peer, |s| s.key_ms)),
        median(&col(&peer, |s| s.read_eps))
    );
    println!(
        "\n**replay** (full read + fold into state, `weft_provenance::state::State::apply_all`): {:.0} entries/s (median)",
        median(&col(&weft, |s| s.replay_eps))
    );
    Ok(())
}
