//! `weft-dpa-workload`: a deterministic application for the data provenance tests.
//!
//! From a seed it makes `--count` committed changes in DIR: row inserts, updates and
//! deletes in three SQLite tables of `app.db` (`customers`, `orders` with a blob
//! column, `inventory` with a text key), in transactions of one to five changes, a
//! tenth of them rolled back (not counted); edits of the JSON document
//! `settings.json` (members set and removed, arrays grown and shrunk, nested
//! objects), written atomically; and edits of the key-value env file `app.env` and
//! the key-per-file directory `flags/`. The same seed gives the same changes.
//!
//! At `--checkpoints` evenly spaced instants it waits `--settle-ms`, records the guest
//! clock, copies the state (`VACUUM INTO` of the database, the JSON and key-value
//! files) into `DIR/checkpoints/<n>/` with `meta.json` (`time_us`, `changes`, `seed`),
//! and waits `--settle-ms` again, so every change before the instant is older than it
//! and every change after it is newer. A last checkpoint named `final` is taken at
//! the end. Console lines (for test harnesses): `weft-dpa-workload: checkpoint <n>
//! time_us=<t> changes=<c>` and `weft-dpa-workload: done changes=<c>`. When DIR holds
//! a `final` checkpoint already (a guest booted again) it prints `weft-dpa-workload:
//! already done` and changes nothing.
//!
//! With `--writer DB` it is instead an application with NO busy timeout: it creates
//! `DB` (`PRAGMA journal_mode=WAL`, `synchronous=NORMAL`, table `items`), optionally
//! waits for the capture triggers (`--wait-capture`), then makes `--count` row writes
//! (inserts, updates, deletes; a third as single statements, the rest in deferred
//! transactions of two to eight writes that read first, `BEGIN; SELECT …; UPDATE …`),
//! never retrying. It counts every statement that fails and prints `weft-dpa-workload:
//! writer writes=N errors=E inserts=I updates=U deletes=D ms=T` (committed row changes),
//! after up to five `weft-dpa-workload: writer error: …` lines.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::Parser;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};

/// Makes deterministic SQLite, JSON and key-value changes for provenance tests.
#[derive(Debug, Parser)]
#[command(name = "weft-dpa-workload", version)]
struct Args {
    /// The directory holding app.db, settings.json, app.env, flags/ and checkpoints/.
    #[arg(long, required_unless_present = "writer")]
    dir: Option<PathBuf>,
    /// Instead of the workload: write `--count` row changes to this database with no
    /// busy timeout, counting errors.
    #[arg(long, conflicts_with = "dir")]
    writer: Option<PathBuf>,
    /// The seed of the change sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How many committed changes to make.
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// At most this many changes per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Checkpoints taken during the run (plus `final` at the end).
    #[arg(long, default_value_t = 3)]
    checkpoints: u64,
    /// Quiet time before and after each checkpoint, in milliseconds.
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
    /// Wait (up to 60 s) for a capture agent's triggers on the three tables before
    /// the first change.
    #[arg(long)]
    wait_capture: bool,
}

/// SplitMix64: small, fast and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn word(&mut self) -> String {
        const W: [&str; 12] = [
            "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
            "juliett", "kilo", "lima",
        ];
        W[self.below(W.len() as u64) as usize].to_string()
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut f =
        fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("cannot rename onto {}", path.display()))?;
    Ok(())
}

struct Work {
    dir: PathBuf,
    db: Connection,
    rng: Rng,
    changes: u64,
    next_id: i64,
}

impl Work {
    fn open(dir: &Path, seed: u64) -> anyhow::Result<Work> {
        fs::create_dir_all(dir.join("flags"))?;
        let db = Connection::open(dir.join("app.db"))?;
        db.busy_timeout(Duration::from_secs(30))?;
        // Switching to WAL needs the database to itself, and SQLite reports a busy
        // database at once (without its busy handler) when another connection holds a
        // lock at that moment: retry for a while.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let setup = db.execute_batch(
                "PRAGMA journal_mode=WAL;
                 CREATE TABLE IF NOT EXISTS customers(id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT, balance REAL NOT NULL DEFAULT 0);
                 CREATE TABLE IF NOT EXISTS orders(id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, item TEXT, qty INTEGER, note BLOB);
                 CREATE TABLE IF NOT EXISTS inventory(sku TEXT PRIMARY KEY, stock INTEGER NOT NULL, price REAL);",
            );
            match setup {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(
                        e.code,
                        rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => break other.context("creating the workload's tables")?,
            }
        }
        let settings = dir.join("settings.json");
        if !settings.exists() {
            write_atomic(
                &settings,
                json!({"version": 1, "features": {}, "servers": [], "owner": {"name": "ops"}})
                    .to_string()
                    .as_bytes(),
            )?;
        }
        if !dir.join("app.env").exists() {
            write_atomic(
                &dir.join("app.env"),
                b"# application settings\nMODE=start\n",
            )?;
        }
        let next_id: i64 = db.query_row(
            "SELECT max(m) FROM (SELECT max(id) AS m FROM customers UNION ALL SELECT max(id) FROM orders)",
            [],
            |r| r.get::<_, Option<i64>>(0),
        )?
        .unwrap_or(0)
            + 1;
        Ok(Work {
            dir: dir.to_path_buf(),
            db,
            rng: Rng(seed),
            changes: 0,
            next_id,
        })
    }

    fn random_key(&mut self, table: &str, col: &str) -> anyhow::Result<Option<Value>> {
        let n: i64 = self
            .db
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?;
        if n == 0 {
            return Ok(None);
        }
        let off = self.rng.below(n as u64) as i64;
        let v: rusqlite::types::Value = self.db.query_row(
            &format!("SELECT {col} FROM {table} ORDER BY {col} LIMIT 1 OFFSET ?1"),
            [off],
            |r| r.get(0),
        )?;
        Ok(Some(match v {
            rusqlite::types::Value::Integer(i) => json!(i),
            rusqlite::types::Value::Text(t) => json!(t),
            _ => return Ok(None),
        }))
    }

    /// One row change inside the open transaction; returns how many rows it changed.
    fn row_change(&mut self) -> anyhow::Result<u64> {
        let table = self.rng.below(3);
        let op = self.rng.below(10); // 0-4 insert, 5-7 update, 8-9 delete
        let id = self.next_id;
        let n = match (table, op) {
            (0, 0..=4) => {
                self.next_id += 1;
                let name = self.rng.word();
                let bal = self.rng.below(100_000) as f64 / 100.0;
                self.db.execute(
                    "INSERT INTO customers(id, name, email, balance) VALUES (?1, ?2, ?3, ?4)",
                    params![id, name, format!("{name}{id}@example.com"), bal],
                )?
            }
            (1, 0..=4) => {
                self.next_id += 1;
                let cust = self.rng.below(self.next_id as u64) as i64;
                let item = self.rng.word();
                let note: Option<Vec<u8>> = self.rng.chance(50).then(|| {
                    (0..self.rng.below(16) + 1)
                        .map(|i| (i * 37 + id as u64) as u8)
                        .collect()
                });
                self.db.execute(
                    "INSERT INTO orders(id, customer_id, item, qty, note) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![id, cust, item, self.rng.below(9) as i64 + 1, note],
                )?
            }
            (2, 0..=4) => {
                let sku = format!("SKU-{}-{}", self.rng.word(), self.rng.below(500));
                self.db.execute(
                    "INSERT OR REPLACE INTO inventory(sku, stock, price) VALUES (?1, ?2, ?3)",
                    params![
                        sku,
                        self.rng.below(1000) as i64,
                        (self.rng.below(10_000) as f64) / 4.0
                    ],
                )?
            }
            (t, 5..=7) => {
                let (tbl, col, set) = match t {
                    0 => ("customers", "id", "balance = balance + 1.25, name = ?2"),
                    1 => ("orders", "id", "qty = qty + 1, item = ?2"),
                    _ => ("inventory", "sku", "stock = stock - 1, price = length(?2)"),
                };
                let Some(key) = self.random_key(tbl, col)? else {
                    return Ok(0);
                };
                let word = self.rng.word();
                self.db.execute(
                    &format!("UPDATE {tbl} SET {set} WHERE {col} = ?1"),
                    params![json_to_sql(&key), word],
                )?
            }
            (t, _) => {
                let (tbl, col) = match t {
                    0 => ("customers", "id"),
                    1 => ("orders", "id"),
                    _ => ("inventory", "sku"),
                };
                let Some(key) = self.random_key(tbl, col)? else {
                    return Ok(0);
                };
                self.db.execute(
                    &format!("DELETE FROM {tbl} WHERE {col} = ?1"),
                    [json_to_sql(&key)],
                )?
            }
        };
        Ok(n as u64)
    }

    fn sqlite_tx(&mut self) -> anyhow::Result<()> {
        self.db
            .execute_batch("BEGIN IMMEDIATE")
            .context("BEGIN IMMEDIATE")?;
        let ops = self.rng.below(5) + 1;
        let mut n = 0;
        for _ in 0..ops {
            n += self.row_change()?;
        }
        if self.rng.chance(10) {
            self.db.execute_batch("ROLLBACK")?;
            // Ids handed out inside stay unused: the counter moves on anyway.
        } else {
            self.db.execute_batch("COMMIT").context("COMMIT")?;
            self.changes += n;
        }
        Ok(())
    }

    fn json_edit(&mut self) -> anyhow::Result<()> {
        let path = self.dir.join("settings.json");
        let mut doc: Value = serde_json::from_slice(&fs::read(&path)?)?;
        let k = format!("f{}", self.rng.below(20));
        match self.rng.below(6) {
            0 | 1 => {
                doc["features"][&k] = json!({"on": self.rng.chance(50), "level": self.rng.below(5)})
            }
            2 => {
                if let Some(m) = doc["features"].as_object_mut() {
                    m.remove(&k);
                }
            }
            3 => {
                if let Some(a) = doc["servers"].as_array_mut() {
                    a.push(json!({"host": self.rng.word(), "port": 8000 + self.rng.below(100)}));
                }
            }
            4 => {
                if let Some(a) = doc["servers"].as_array_mut() {
                    if !a.is_empty() {
                        let i = self.rng.below(a.len() as u64) as usize;
                        a.remove(i);
                    }
                }
            }
            _ => {
                doc["version"] = json!(doc["version"].as_u64().unwrap_or(0) + 1);
                doc["owner"]["name"] = json!(self.rng.word());
            }
        }
        write_atomic(&path, serde_json::to_string_pretty(&doc)?.as_bytes())?;
        self.changes += 1;
        Ok(())
    }

    fn kv_edit(&mut self) -> anyhow::Result<()> {
        if self.rng.chance(50) {
            let path = self.dir.join("app.env");
            let text = fs::read_to_string(&path)?;
            let key = format!("KEY_{}", self.rng.below(15));
            let mut lines: Vec<String> = text
                .lines()
                .filter(|l| !l.starts_with(&format!("{key}=")))
                .map(String::from)
                .collect();
            if self.rng.chance(75) {
                lines.push(format!(
                    "{key}={}-{}",
                    self.rng.word(),
                    self.rng.below(1000)
                ));
            }
            write_atomic(&path, (lines.join("\n") + "\n").as_bytes())?;
        } else {
            let path = self
                .dir
                .join("flags")
                .join(format!("flag{}", self.rng.below(10)));
            if self.rng.chance(70) {
                write_atomic(&path, format!("{}", self.rng.below(2)).as_bytes())?;
            } else if path.exists() {
                fs::remove_file(&path)?;
            }
        }
        self.changes += 1;
        Ok(())
    }

    fn checkpoint(&mut self, name: &str, settle: Duration) -> anyhow::Result<()> {
        std::thread::sleep(settle);
        let time_us = now_us();
        let out = self.dir.join("checkpoints").join(name);
        if out.exists() {
            fs::remove_dir_all(&out)?;
        }
        fs::create_dir_all(out.join("flags"))?;
        self.db
            .execute("VACUUM INTO ?1", [out.join("app.db").to_string_lossy()])
            .context("VACUUM INTO")?;
        for f in ["settings.json", "app.env"] {
            fs::copy(self.dir.join(f), out.join(f))?;
        }
        for ent in fs::read_dir(self.dir.join("flags"))? {
            let ent = ent?;
            let name = ent.file_name();
            if !name.to_string_lossy().starts_with('.') {
                fs::copy(ent.path(), out.join("flags").join(name))?;
            }
        }
        fs::write(
            out.join("meta.json"),
            json!({"time_us": time_us, "changes": self.changes}).to_string(),
        )?;
        sync_tree(&out)?;
        println!(
            "weft-dpa-workload: checkpoint {name} time_us={time_us} changes={}",
            self.changes
        );
        std::thread::sleep(settle);
        Ok(())
    }
}

/// Makes a checkpoint durable: every file and directory under `dir`, and `dir` itself.
fn sync_tree(dir: &Path) -> anyhow::Result<()> {
    for ent in fs::read_dir(dir)? {
        let path = ent?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            fs::File::open(&path)?.sync_all()?;
        }
    }
    fs::File::open(dir)?.sync_all()?;
    if let Some(parent) = dir.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

fn json_to_sql(v: &Value) -> rusqlite::types::Value {
    match v {
        Value::Number(n) => rusqlite::types::Value::Integer(n.as_i64().unwrap_or(0)),
        Value::String(s) => rusqlite::types::Value::Text(s.clone()),
        _ => rusqlite::types::Value::Null,
    }
}

fn wait_capture(db: &Connection) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = db.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type='trigger' AND name IN \
             ('_weft_ins_customers','_weft_ins_orders','_weft_ins_inventory')",
            [],
            |r| r.get(0),
        )?;
        if n == 3 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no capture triggers on the workload's tables after 60 s (is weft-dpa running with this database?)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the no-busy-timeout writer did.
#[derive(Debug, Default)]
struct WriterReport {
    writes: u64,
    errors: u64,
    messages: Vec<String>,
    inserts: u64,
    updates: u64,
    deletes: u64,
}

impl WriterReport {
    fn error(&mut self, what: &str, e: &rusqlite::Error) {
        self.errors += 1;
        if self.messages.len() < 5 {
            self.messages.push(format!("{what}: {e}"));
        }
    }
}

/// The application with no busy timeout (`--writer`); see the crate docs.
fn writer(path: &Path, count: u64, seed: u64, wait: bool) -> anyhow::Result<WriterReport> {
    let db = Connection::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // rusqlite sets a 5 s busy timeout on open; this application has none.
    db.busy_timeout(Duration::ZERO)?;
    let mut rep = WriterReport::default();
    // Its first start: create the database. A failure is an error; the writer tries
    // again (it needs its table), counting each failure.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match db.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER NOT NULL, note BLOB);",
        ) {
            Ok(()) => break,
            Err(e) => {
                rep.error("create", &e);
                if Instant::now() > deadline {
                    bail!("cannot create {}: {e}", path.display());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    if wait {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n: i64 = db.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type='trigger' AND name='_weft_ins_items'",
                [],
                |r| r.get(0),
            )?;
            if n == 1 {
                break;
            }
            if Instant::now() > deadline {
                bail!("no capture trigger on items after 60 s (is weft-dpa running with this database?)");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let mut rng = Rng(seed);
    let mut next_id: i64 = db.query_row("SELECT COALESCE(max(id), 0) + 1 FROM items", [], |r| {
        r.get(0)
    })?;
    // One write: (inserts, updates, deletes) it made.
    let write =
        |db: &Connection, rng: &mut Rng, next_id: &mut i64| -> rusqlite::Result<(u64, u64, u64)> {
            let op = rng.below(10);
            let probe = rng.below(*next_id as u64) as i64;
            let victim: Option<i64> = if op >= 5 {
                db.query_row(
                    "SELECT id FROM items WHERE id >= ?1 ORDER BY id LIMIT 1",
                    [probe],
                    |r| r.get(0),
                )
                .optional()?
            } else {
                None
            };
            Ok(match (op, victim) {
                (5..=7, Some(id)) => {
                    let n = db.execute(
                        "UPDATE items SET qty = qty + 1, name = ?2 WHERE id = ?1",
                        params![id, rng.word()],
                    )?;
                    (0, n as u64, 0)
                }
                (8..=9, Some(id)) => {
                    let n = db.execute("DELETE FROM items WHERE id = ?1", [id])?;
                    (0, 0, n as u64)
                }
                _ => {
                    let id = *next_id;
                    *next_id += 1;
                    let note: Option<Vec<u8>> = rng.chance(30).then(|| vec![id as u8; 8]);
                    let n = db.execute(
                        "INSERT INTO items(id, name, qty, note) VALUES (?1, ?2, ?3, ?4)",
                        params![id, rng.word(), rng.below(100) as i64, note],
                    )?;
                    (n as u64, 0, 0)
                }
            })
        };
    while rep.writes < count {
        if rng.below(3) == 0 {
            rep.writes += 1;
            match write(&db, &mut rng, &mut next_id) {
                Ok((i, u, d)) => {
                    rep.inserts += i;
                    rep.updates += u;
                    rep.deletes += d;
                }
                Err(e) => rep.error("write", &e),
            }
            continue;
        }
        // A deferred transaction that reads before it writes: it needs the write lock
        // while already reading, where SQLite reports a busy database at once.
        let n = (rng.below(7) + 2).min(count - rep.writes);
        if let Err(e) = db.execute_batch("BEGIN") {
            rep.error("BEGIN", &e);
            continue;
        }
        let mut made = (0, 0, 0);
        let read: rusqlite::Result<i64> = db.query_row(
            "SELECT count(*) FROM items WHERE id > ?1",
            [next_id - 50],
            |r| r.get(0),
        );
        let mut failed = match read {
            Ok(_) => false,
            Err(e) => {
                rep.error("read in a transaction", &e);
                true
            }
        };
        for _ in 0..n {
            if failed {
                break;
            }
            rep.writes += 1;
            match write(&db, &mut rng, &mut next_id) {
                Ok((i, u, d)) => made = (made.0 + i, made.1 + u, made.2 + d),
                Err(e) => {
                    rep.error("write in a transaction", &e);
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            db.execute_batch("ROLLBACK").ok();
            continue;
        }
        match db.execute_batch("COMMIT") {
            Ok(()) => {
                rep.inserts += made.0;
                rep.updates += made.1;
                rep.deletes += made.2;
            }
            Err(e) => {
                rep.error("COMMIT", &e);
                db.execute_batch("ROLLBACK").ok();
            }
        }
    }
    Ok(rep)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(path) = &args.writer {
        let started = Instant::now();
        let rep = writer(path, args.count, args.seed, args.wait_capture)?;
        for m in &rep.messages {
            println!("weft-dpa-workload: writer error: {m}");
        }
        println!(
            "weft-dpa-workload: writer writes={} errors={} inserts={} updates={} deletes={} ms={}",
            rep.writes,
            rep.errors,
            rep.inserts,
            rep.updates,
            rep.deletes,
            started.elapsed().as_millis()
        );
        return Ok(());
    }
    let Some(dir) = args.dir.clone() else {
        bail!("--dir or --writer is needed");
    };
    // A guest that boots again after a complete run keeps its state: the run is not
    // repeated (the same seed would make the same, now conflicting, changes).
    if dir
        .join("checkpoints")
        .join("final")
        .join("meta.json")
        .exists()
    {
        println!("weft-dpa-workload: already done");
        return Ok(());
    }
    let mut w = Work::open(&dir, args.seed)?;
    if args.wait_capture {
        wait_capture(&w.db)?;
    }
    let settle = Duration::from_millis(args.settle_ms);
    let every = args.count / (args.checkpoints + 1);
    let mut next_cp = 1;
    let started = Instant::now();
    while w.changes < args.count {
        match w.rng.below(100) {
            0..=69 => w.sqlite_tx()?,
            70..=84 => w.json_edit()?,
            _ => w.kv_edit()?,
        }
        if args.rate > 0 {
            let due = Duration::from_secs_f64(w.changes as f64 / args.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if next_cp <= args.checkpoints && w.changes >= every * next_cp {
            w.checkpoint(&next_cp.to_string(), settle)?;
            next_cp += 1;
        }
    }
    w.checkpoint("final", settle)?;
    println!("weft-dpa-workload: done changes={}", w.changes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(dir: &Path) -> String {
        let db = Connection::open(dir.join("app.db")).unwrap();
        let mut out = String::new();
        for t in ["customers", "orders", "inventory"] {
            let mut stmt = db
                .prepare(&format!("SELECT * FROM {t} ORDER BY 1"))
                .unwrap();
            let cols = stmt.column_count();
            let mut rows = stmt.query([]).unwrap();
            while let Some(r) = rows.next().unwrap() {
                for i in 0..cols {
                    out.push_str(&format!(
                        "{:?}|",
                        r.get::<_, rusqlite::types::Value>(i).unwrap()
                    ));
                }
                out.push('\n');
            }
        }
        out + &fs::read_to_string(dir.join("settings.json")).unwrap()
            + &fs::read_to_string(dir.join("app.env")).unwrap()
    }

    fn run(dir: &Path, seed: u64) {
        let mut w = Work::open(dir, seed).unwrap();
        while w.changes < 500 {
            match w.rng.below(100) {
                0..=69 => w.sqlite_tx().unwrap(),
                70..=84 => w.json_edit().unwrap(),
                _ => w.kv_edit().unwrap(),
            }
        }
        w.checkpoint("final", Duration::ZERO).unwrap();
    }

    #[test]
    fn the_same_seed_makes_the_same_state() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        run(a.path(), 7);
        run(b.path(), 7);
        run(c.path(), 8);
        assert_eq!(digest(a.path()), digest(b.path()));
        assert_ne!(digest(a.path()), digest(c.path()));
        let cp = a.path().join("checkpoints/final");
        assert_eq!(digest(&cp), digest(a.path()), "the checkpoint is the state");
        let n: i64 = Connection::open(a.path().join("app.db"))
            .unwrap()
            .query_row("SELECT count(*) FROM orders", [], |r| r.get(0))
            .unwrap();
        assert!(n > 0);
    }
}
