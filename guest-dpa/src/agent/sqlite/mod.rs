//! SQLite sources: capture triggers, the drain of the capture table, and apply mode.
//!
//! For every captured table the agent installs three `AFTER` triggers (insert, update,
//! delete) that write the row change into `_weft_capture` inside the application's own
//! transaction: a rolled-back change leaves nothing, a committed one is there. The
//! agent drains `_weft_capture` in id order (`AUTOINCREMENT`, so ids are never reused)
//! and deletes rows only after the host acknowledged their entries.
//!
//! The application never fails because of the agent. SQLite reports a busy database at
//! once, without calling the application's busy handler, when a connection that is
//! already reading wants to write while another connection holds the write lock (a
//! `PRAGMA journal_mode=WAL` on a new database, a `BEGIN; SELECT …; UPDATE …`), or when
//! another connection committed since its read began (`SQLITE_BUSY_SNAPSHOT` in WAL); an
//! application without a busy timeout gets the same error for every write that meets a
//! held lock. So the agent:
//! - does not open a database before it is past its creation (a complete header, and
//!   WAL mode or a schema, see [`past_creation`]), and installs nothing before the
//!   database holds a table;
//! - writes to the application's database only to install or refresh its triggers and
//!   to delete acknowledged capture rows, only after the database has been quiet (no
//!   commit by anyone else, no change to the database or `-wal` file) for [`QUIET`],
//!   only while no other process holds a SQLite lock on it (asked of the kernel with
//!   `F_GETLK`: a reader holds a read-mark lock for its whole read transaction, so an
//!   application between its `SELECT` and its `UPDATE` is never overtaken), and never
//!   with a busy timeout: a busy database is tried again later; the steady-state
//!   capture path only reads;
//! - reads in short transactions (one drain batch), never holding a statement or a
//!   read transaction across polls, so checkpoints and writers are never held up.
//!
//! Transaction ids. A trigger cannot see transaction boundaries, but one writer at a
//! time means a transaction's capture rows are contiguous ids, and a read sees whole
//! transactions only. Each drain reads, in one read transaction, the rows after the
//! spool's mark and the highest id committed (`end`): the rows up to `end` that were not
//! drained before are one or more whole transactions and get one tx id, recorded with
//! `end` in the spool's mark, so rows of that window read in a later batch keep it. All
//! changes of one transaction thus share one tx id; transactions that commit one after
//! the other before the agent sees the first (inotify wake-up plus a drain, typically
//! well under a millisecond to a few milliseconds) share it too.
//! `docs/provenance-dpa.md` states this guarantee for users.
//!
//! This module holds the capture rows and [`Db`], one captured database: when the agent
//! may open and write to it, the drain and the trim. `triggers` reads and installs the
//! capture tables and triggers; `apply` writes recorded changes into a database.

mod apply;
mod triggers;

use std::io::Read as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags};

use super::Error;
use crate::capture_format::quote_ident;
use crate::proto::Operation;

pub use apply::apply;
use triggers::{install, install_needed, weft_triggers, Needed};

/// The capture table.
pub const CAPTURE_TABLE: &str = "_weft_capture";
/// The epoch counter table.
pub const TX_TABLE: &str = "_weft_tx";
/// How long a database must have been quiet before the agent writes to it (installs
/// triggers, deletes acknowledged capture rows).
pub const QUIET: Duration = Duration::from_millis(300);

/// One row of the capture table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRow {
    /// Its id (the drain position).
    pub id: i64,
    /// The table.
    pub table: String,
    /// insert, update, delete or schema.
    pub op: Operation,
    /// The primary key as a JSON array (empty for schema).
    pub pk: String,
    /// The row before (JSON object).
    pub old: Option<String>,
    /// The row after (JSON object), or the `CREATE TABLE` statement (JSON string).
    pub new: Option<String>,
    /// The epoch the change was made in.
    pub epoch: i64,
    /// The guest clock at the change, µs.
    pub time_us: i64,
}

/// What a drain found.
#[derive(Debug, Default)]
pub struct Drained {
    /// Committed capture rows after the mark, in id order.
    pub rows: Vec<CaptureRow>,
    /// The highest capture row id committed when the rows were read (the end of the
    /// window of whole transactions they belong to).
    pub end: i64,
    /// The capture table's instance id.
    pub instance: String,
}

/// One SQLite source the agent captures.
#[derive(Debug)]
pub struct Db {
    /// The database path.
    pub source: String,
    tables: Option<Vec<String>>,
    /// Declared before `probe`: dropped first (see [`LockProbe`]).
    conn: Option<Connection>,
    probe: LockProbe,
    ino: (u64, u64),
    schema_version: Option<i64>,
    data_version: Option<i64>,
    /// Whether the capture tables exist in the open database.
    installed: bool,
    /// The database and `-wal` files as last seen (size, mtime), to notice writes.
    files: Option<[(u64, i64, i64); 2]>,
    /// When someone else last wrote to the database, as far as the agent saw.
    last_activity: Option<Instant>,
    quiet: Duration,
}

/// Descriptors on the database's lock files, to ask the kernel whether another process
/// holds a SQLite lock right now (`F_GETLK` takes nothing). They live as long as the
/// connection and are closed only after it: closing a descriptor drops every POSIX lock
/// this process holds on the file, SQLite's own included.
#[derive(Debug, Default)]
struct LockProbe {
    shm: Option<std::fs::File>,
    db: Option<std::fs::File>,
}

/// Whether another process holds a lock on bytes `start..start+len` of `f`.
fn lock_held(f: &std::fs::File, start: i64, len: i64) -> bool {
    use nix::libc;
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        l_pid: 0,
    };
    match nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_GETLK(&mut fl)) {
        Ok(_) => fl.l_type != libc::F_UNLCK as libc::c_short,
        Err(_) => true,
    }
}

/// SQLite's lock bytes: in the WAL index (`-shm`) the write, checkpoint, recovery and
/// five read-mark locks (a reader holds one for its whole read transaction); in the
/// database file of a rollback-journal database the pending, reserved and shared locks.
const SHM_LOCKS: (i64, i64) = (120, 8);
const DB_LOCKS: (i64, i64) = (0x4000_0000, 512);

pub(crate) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

/// Whether the file at `path` is a SQLite database past its creation: its 100-byte
/// header is complete, and it is in WAL mode (readers never stand in a writer's way) or
/// holds a schema (its schema cookie moved). A new database is a file of 0 bytes until
/// the application's first statement, and that statement (often `PRAGMA
/// journal_mode=WAL`) needs the database to itself: a reader's lock at that moment fails
/// it at once, busy timeout or not.
///
/// Only call this while the agent has no connection to this file: closing a file
/// descriptor drops every POSIX lock the process holds on the file, SQLite's included.
pub fn past_creation(path: &Path) -> bool {
    let mut h = [0u8; 100];
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    if f.read_exact(&mut h).is_err() || &h[..16] != b"SQLite format 3\0" {
        return false;
    }
    let wal = h[18] == 2 && h[19] == 2;
    let cookie = u32::from_be_bytes([h[40], h[41], h[42], h[43]]);
    wal || cookie != 0
}

/// Size and modification time of a file, zeros when it is missing.
fn file_stamp(path: &Path) -> (u64, i64, i64) {
    std::fs::metadata(path)
        .map(|m| (m.size(), m.mtime(), m.mtime_nsec()))
        .unwrap_or((0, 0, 0))
}

impl Db {
    /// A source; nothing is opened until [`Db::ensure`].
    pub fn new(source: String, tables: Option<Vec<String>>) -> Db {
        Db {
            source,
            tables,
            conn: None,
            probe: LockProbe::default(),
            ino: (0, 0),
            schema_version: None,
            data_version: None,
            installed: false,
            files: None,
            last_activity: None,
            quiet: QUIET,
        }
    }

    /// Changes how long the database must be quiet before the agent writes to it
    /// (tests).
    pub fn set_quiet(&mut self, quiet: Duration) {
        self.quiet = quiet;
    }

    /// Changes the captured tables (a configuration reload); triggers follow at the
    /// next [`Db::ensure`].
    pub fn set_tables(&mut self, tables: Option<Vec<String>>) {
        if self.tables != tables {
            self.tables = tables;
            self.schema_version = None;
        }
    }

    /// Notes a write by someone else when the database or `-wal` file changed.
    fn observe_files(&mut self) {
        let wal = format!("{}-wal", self.source);
        let now = [
            file_stamp(Path::new(&self.source)),
            file_stamp(Path::new(&wal)),
        ];
        if self.files != Some(now) {
            self.files = Some(now);
            self.last_activity = Some(Instant::now());
        }
    }

    /// Whether nobody else wrote to the database for the quiet period (as far as the
    /// agent's polls saw).
    pub fn quiet(&self) -> bool {
        self.last_activity.is_none_or(|t| t.elapsed() >= self.quiet)
    }

    /// Whether another process is inside a transaction on the database right now (it
    /// holds a SQLite lock): a write of the agent's would then fail its next statement,
    /// or its commit (`SQLITE_BUSY_SNAPSHOT` after a read that began before).
    fn others_in_transaction(&mut self) -> bool {
        if self.conn.is_none() {
            return true;
        }
        let shm = format!("{}-shm", self.source);
        if self.probe.shm.is_none() && Path::new(&shm).exists() {
            self.probe.shm = std::fs::File::open(&shm).ok();
        }
        if let Some(f) = &self.probe.shm {
            return lock_held(f, SHM_LOCKS.0, SHM_LOCKS.1);
        }
        if self.probe.db.is_none() {
            self.probe.db = std::fs::File::open(&self.source).ok();
        }
        match &self.probe.db {
            Some(f) => lock_held(f, DB_LOCKS.0, DB_LOCKS.1),
            None => true,
        }
    }

    /// Whether the agent may write to the database now: it has been quiet, and nobody
    /// else is inside a transaction.
    pub fn may_write(&mut self) -> bool {
        self.quiet() && !self.others_in_transaction()
    }

    /// Closes the connection, then the lock probes (in this order, see [`LockProbe`]).
    fn close(&mut self) {
        self.conn = None;
        self.probe = LockProbe::default();
        self.installed = false;
    }

    /// Opens the database once it is past its creation (never creates it) and, once it
    /// holds a table and has been quiet, installs or refreshes the capture triggers when
    /// its schema changed. `Ok(true)`: the capture tables are there to drain;
    /// `Ok(false)`: not yet (no file, still being created, not installed yet, or busy);
    /// try again later.
    pub fn ensure(&mut self) -> Result<bool, Error> {
        let source = self.source.clone();
        let path = Path::new(&source);
        let Ok(meta) = std::fs::metadata(path) else {
            self.close();
            return Ok(false);
        };
        self.observe_files();
        let ino = (meta.dev(), meta.ino());
        if self.conn.is_none() || ino != self.ino {
            self.close();
            // No connection of ours is open on this file now (see `past_creation`).
            if !past_creation(path) {
                return Ok(false);
            }
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| Error::sqlite(format!("cannot open {}", self.source), e))?;
            // Never wait for a lock: a busy database is tried again at the next poll,
            // and a lock the agent got after waiting would meet the application's next
            // statement.
            conn.busy_timeout(Duration::ZERO)
                .map_err(|e| Error::sqlite("cannot set a busy timeout", e))?;
            self.conn = Some(conn);
            self.ino = ino;
            self.schema_version = None;
            self.data_version = None;
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(false);
        };
        let sv: i64 = match conn.query_row("PRAGMA schema_version", [], |r| r.get(0)) {
            Ok(v) => v,
            Err(e) if is_busy(&e) => return Ok(self.installed),
            Err(e) => {
                return Err(Error::sqlite(
                    format!("cannot read the schema version of {}", self.source),
                    e,
                ))
            }
        };
        if self.schema_version == Some(sv) {
            return Ok(self.installed);
        }
        let needed = match install_needed(conn, self.tables.as_deref()) {
            Ok(n) => n,
            Err(e) if is_busy(&e) => return Ok(self.installed),
            Err(e) => {
                return Err(Error::sqlite(
                    format!("cannot read the schema of {}", self.source),
                    e,
                ))
            }
        };
        match needed {
            Needed::NoTables => return Ok(false),
            Needed::Nothing => {
                self.installed = true;
                self.schema_version = Some(sv);
                return Ok(true);
            }
            Needed::Install { capture_tables } => {
                self.installed = capture_tables;
                if !self.may_write() {
                    return Ok(self.installed);
                }
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(false);
        };
        let started = Instant::now();
        match install(conn, self.tables.as_deref()) {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(source = %self.source, tables = n, us = started.elapsed().as_micros() as u64, "capture triggers installed");
                }
            }
            Err(e) if is_busy(&e) => return Ok(self.installed),
            Err(e) => {
                return Err(Error::sqlite(
                    format!("cannot install capture triggers in {}", self.source),
                    e,
                ))
            }
        }
        self.installed = true;
        let sv: i64 = conn
            .query_row("PRAGMA schema_version", [], |r| r.get(0))
            .map_err(|e| Error::sqlite("cannot read the schema version", e))?;
        self.schema_version = Some(sv);
        // Anything committed so far is drained once after an install.
        self.data_version = None;
        Ok(true)
    }

    /// Whether something was committed by another connection since the last call.
    pub fn changed(&mut self) -> Result<bool, Error> {
        let Some(conn) = self.conn.as_ref() else {
            return Ok(false);
        };
        let dv: i64 = match conn.query_row("PRAGMA data_version", [], |r| r.get(0)) {
            Ok(v) => v,
            Err(e) if is_busy(&e) => return Ok(true),
            Err(e) => {
                return Err(Error::sqlite(
                    format!("cannot read the data version of {}", self.source),
                    e,
                ))
            }
        };
        let changed = self.data_version != Some(dv);
        if changed && self.data_version.is_some() {
            self.last_activity = Some(Instant::now());
        }
        self.data_version = Some(dv);
        Ok(changed)
    }

    /// Forgets the data version, so the next [`Db::changed`] says yes.
    pub fn mark_dirty(&mut self) {
        self.data_version = None;
    }

    /// Committed capture rows after `after`, at most `max`, in id order, read in one
    /// short read transaction (never a write).
    pub fn drain(&mut self, after: i64, max: usize) -> Result<Drained, Error> {
        let source = self.source.clone();
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Drained::default());
        };
        let ctx = |e| Error::sqlite(format!("cannot read the capture table of {source}"), e);
        let tx = conn.transaction().map_err(ctx)?;
        let instance: String = tx
            .query_row(
                &format!("SELECT instance FROM {TX_TABLE} WHERE id=1"),
                [],
                |r| r.get(0),
            )
            .map_err(ctx)?;
        let end: i64 = tx
            .query_row(
                &format!("SELECT COALESCE(max(id), 0) FROM {CAPTURE_TABLE}"),
                [],
                |r| r.get(0),
            )
            .map_err(ctx)?;
        let mut rows = Vec::new();
        {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT id, tbl, op, pk, old, new, epoch, time_us FROM {CAPTURE_TABLE} WHERE id > ?1 ORDER BY id LIMIT ?2"
                ))
                .map_err(ctx)?;
            let mut q = stmt.query(params![after, max as i64]).map_err(ctx)?;
            while let Some(r) = q.next().map_err(ctx)? {
                let op: String = r.get(2).map_err(ctx)?;
                let op = match op.as_str() {
                    "insert" => Operation::Insert,
                    "update" => Operation::Update,
                    "delete" => Operation::Delete,
                    "schema" => Operation::Schema,
                    other => {
                        return Err(Error::Apply(format!(
                            "capture row with unknown operation {other:?} in {}",
                            self.source
                        )))
                    }
                };
                rows.push(CaptureRow {
                    id: r.get(0).map_err(ctx)?,
                    table: r.get(1).map_err(ctx)?,
                    op,
                    pk: r.get(3).map_err(ctx)?,
                    old: r.get(4).map_err(ctx)?,
                    new: r.get(5).map_err(ctx)?,
                    epoch: r.get(6).map_err(ctx)?,
                    time_us: r.get(7).map_err(ctx)?,
                });
            }
        }
        tx.commit().map_err(ctx)?;
        Ok(Drained {
            rows,
            end,
            instance,
        })
    }

    /// Deletes capture rows up to `id` (their entries are acknowledged), once the
    /// database is quiet. Returns false when it was not done (not quiet, or busy); a
    /// later call tries again.
    pub fn delete_upto(&mut self, id: i64) -> Result<bool, Error> {
        if !self.may_write() {
            return Ok(false);
        }
        let Some(conn) = self.conn.as_ref() else {
            return Ok(false);
        };
        let started = Instant::now();
        match conn.execute(&format!("DELETE FROM {CAPTURE_TABLE} WHERE id <= ?1"), [id]) {
            Ok(n) => {
                tracing::debug!(source = %self.source, rows = n, us = started.elapsed().as_micros() as u64, "acknowledged capture rows deleted");
                Ok(true)
            }
            Err(e) if is_busy(&e) => Ok(false),
            Err(e) => Err(Error::sqlite(
                format!("cannot trim the capture table of {}", self.source),
                e,
            )),
        }
    }

    /// Drops the capture triggers (the source left the configuration), under the same
    /// rule as the agent's other writes (quiet, nobody in a transaction). The capture
    /// table stays; its rows are drained if the source comes back. `Ok(false)`: not
    /// now; call again later.
    pub fn uninstall(&mut self) -> Result<bool, Error> {
        if self.conn.is_none() {
            return Ok(true);
        }
        self.observe_files();
        let _ = self.changed()?;
        if !self.may_write() {
            return Ok(false);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(true);
        };
        let res = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for name in weft_triggers(&tx, None)? {
                tx.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote_ident(&name)))?;
            }
            tx.commit()
        })();
        match res {
            Ok(()) => Ok(true),
            Err(e) if is_busy(&e) => Ok(false),
            Err(e) => Err(Error::sqlite(
                format!("cannot remove the capture triggers of {}", self.source),
                e,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    /// A database with three tables (integer key, rowid, composite key without rowid)
    /// and one row.
    pub(super) fn db() -> (tempfile::TempDir, String, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db").to_str().unwrap().to_string();
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT, photo BLOB, score REAL);
             CREATE TABLE notes(body TEXT);
             CREATE TABLE pairs(a TEXT, b INTEGER, v TEXT, PRIMARY KEY (a, b)) WITHOUT ROWID;
             INSERT INTO customers VALUES (1, 'Alice', x'00ff', 1.5);",
        )
        .unwrap();
        (dir, path, conn)
    }

    #[test]
    fn triggers_capture_rows_and_a_baseline() {
        let (_dir, path, conn) = db();
        let mut d = Db::new(path, None);
        d.set_quiet(Duration::ZERO);
        assert!(d.ensure().unwrap());
        conn.execute_batch(
            "BEGIN; UPDATE customers SET name='Bob' WHERE id=1; INSERT INTO notes VALUES ('n''1');
             INSERT INTO pairs VALUES ('x', 2, NULL); COMMIT;
             BEGIN; DELETE FROM customers; ROLLBACK;",
        )
        .unwrap();
        let got = d.drain(0, 100).unwrap();
        let ops: Vec<_> = got.rows.iter().map(|r| (r.table.as_str(), r.op)).collect();
        assert_eq!(
            ops,
            [
                ("customers", Operation::Schema),
                ("customers", Operation::Insert),
                ("notes", Operation::Schema),
                ("pairs", Operation::Schema),
                ("customers", Operation::Update),
                ("notes", Operation::Insert),
                ("pairs", Operation::Insert),
            ]
        );
        let base = &got.rows[1];
        assert_eq!(base.pk, "[1]");
        let v: Value = serde_json::from_str(base.new.as_deref().unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": 1, "name": "Alice", "photo": {"$blob": "00FF"}, "score": 1.5})
        );
        let upd = &got.rows[4];
        assert!(upd.old.as_deref().unwrap().contains("Alice"));
        assert!(upd.new.as_deref().unwrap().contains("Bob"));
        assert_eq!(got.rows[5].pk, "[1]", "rowid key");
        assert_eq!(got.rows[6].pk, "[\"x\",2]");
        let tx_epochs: BTreeSet<i64> = got.rows[4..].iter().map(|r| r.epoch).collect();
        assert_eq!(tx_epochs.len(), 1, "one transaction, one epoch");
        assert_ne!(
            got.rows[1].epoch, got.rows[4].epoch,
            "the baseline is its own transaction"
        );
        // Schema unchanged: nothing reinstalled.
        assert!(d.ensure().unwrap());
        assert_eq!(d.drain(got.rows[6].id, 100).unwrap().rows.len(), 0);
    }

    #[test]
    fn reals_keep_every_bit() {
        let (_dir, path, conn) = db();
        let mut d = Db::new(path, Some(vec!["customers".into()]));
        d.set_quiet(Duration::ZERO);
        assert!(d.ensure().unwrap());
        conn.execute_batch("UPDATE customers SET score = 6.36 + 1.25, photo = 0.1 + 0.2")
            .unwrap();
        let got = d.drain(0, 100).unwrap();
        let new: Value =
            serde_json::from_str(got.rows.last().unwrap().new.as_deref().unwrap()).unwrap();
        assert_eq!(new["score"].as_f64(), Some(6.36 + 1.25));
        assert_eq!(new["photo"].as_f64(), Some(0.1 + 0.2));
        // Parsed back exactly: serde_json's `float_roundtrip` (its default parser may be
        // one unit in the last place off).
        let v: Value = serde_json::from_str("7.6099999999999994").unwrap();
        assert_eq!(v.as_f64(), Some(7.609_999_999_999_999));
    }
}
