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

use std::collections::BTreeSet;
use std::io::Read as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde_json::Value;

use super::Error;
use crate::capture_format::{json_key, json_row, quote_ident, quote_lit, Key};
use crate::proto::{Entry, Operation};

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

const NOW_US: &str = "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)";

#[derive(Debug, Clone)]
struct TableInfo {
    name: String,
    sql: String,
    cols: Vec<String>,
    key: Key,
}

fn table_info(conn: &Connection, name: &str, sql: String) -> rusqlite::Result<TableInfo> {
    let mut stmt = conn.prepare("SELECT name, pk FROM pragma_table_info(?1) ORDER BY cid")?;
    let rows = stmt.query_map([name], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
    })?;
    let mut cols = Vec::new();
    let mut pk = Vec::new();
    for row in rows {
        let (c, p) = row?;
        if p > 0 {
            pk.push((p, c.clone()));
        }
        cols.push(c);
    }
    pk.sort();
    let key = if pk.is_empty() {
        Key::Rowid
    } else {
        Key::Columns(pk.into_iter().map(|(_, c)| c).collect())
    };
    Ok(TableInfo {
        name: name.to_string(),
        sql,
        cols,
        key,
    })
}

fn trigger_names(table: &str) -> [String; 3] {
    [
        format!("_weft_ins_{table}"),
        format!("_weft_upd_{table}"),
        format!("_weft_del_{table}"),
    ]
}

fn trigger_sqls(t: &TableInfo) -> [String; 3] {
    let [ins, upd, del] = trigger_names(&t.name);
    let tbl = quote_ident(&t.name);
    let lit = quote_lit(&t.name);
    let epoch = format!("(SELECT epoch FROM {TX_TABLE} WHERE id=1)");
    let insert = |op: &str, pk: String, old: &str, new: &str| {
        format!(
            "INSERT INTO {CAPTURE_TABLE}(tbl,op,pk,old,new,epoch,time_us) VALUES ({lit},'{op}',{pk},{old},{new},{epoch},{NOW_US})"
        )
    };
    [
        format!(
            "CREATE TRIGGER {} AFTER INSERT ON {tbl} BEGIN {}; END",
            quote_ident(&ins),
            insert(
                "insert",
                json_key("NEW.", &t.key),
                "NULL",
                &json_row("NEW.", &t.cols)
            )
        ),
        format!(
            "CREATE TRIGGER {} AFTER UPDATE ON {tbl} BEGIN {}; END",
            quote_ident(&upd),
            insert(
                "update",
                json_key("NEW.", &t.key),
                &json_row("OLD.", &t.cols),
                &json_row("NEW.", &t.cols)
            )
        ),
        format!(
            "CREATE TRIGGER {} AFTER DELETE ON {tbl} BEGIN {}; END",
            quote_ident(&del),
            insert(
                "delete",
                json_key("OLD.", &t.key),
                &json_row("OLD.", &t.cols),
                "NULL"
            )
        ),
    ]
}

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

/// Names of the agent's triggers, on `table` or on every table.
fn weft_triggers(conn: &Connection, table: Option<&str>) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type='trigger' AND name LIKE '\\_weft\\_%' ESCAPE '\\' \
         AND (?1 IS NULL OR tbl_name = ?1)",
    )?;
    let names = stmt
        .query_map([table], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(names)
}

/// The user tables to capture: `(name, CREATE TABLE statement)`, by name.
fn capture_targets(
    conn: &Connection,
    wanted: Option<&[String]>,
) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare(
        "SELECT name, sql FROM sqlite_master WHERE type='table' \
         AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE '\\_weft\\_%' ESCAPE '\\' \
         AND sql NOT LIKE 'CREATE VIRTUAL%' ORDER BY name",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let tables: Vec<(String, String)> = rows.collect::<rusqlite::Result<_>>()?;
    Ok(tables
        .into_iter()
        .filter(|(n, _)| wanted.is_none_or(|w| w.iter().any(|t| t == n)))
        .collect())
}

/// The agent's triggers: `(name, table)`.
fn existing_triggers(conn: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare(
        "SELECT name, tbl_name FROM sqlite_master WHERE type='trigger' AND name LIKE '\\_weft\\_%' ESCAPE '\\'",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Whether table `name`'s triggers are exactly the ones the agent would install.
fn triggers_current(conn: &Connection, info: &TableInfo) -> rusqlite::Result<bool> {
    let want = trigger_sqls(info);
    for (n, w) in trigger_names(&info.name).iter().zip(&want) {
        let sql: Option<String> = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type='trigger' AND name=?1",
                [n],
                |r| r.get(0),
            )
            .optional()?;
        if sql.as_deref() != Some(w.as_str()) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What [`install`] would have to do, found by reading only.
#[derive(Debug, PartialEq, Eq)]
enum Needed {
    /// The database holds no table to capture yet: it is not past its creation.
    NoTables,
    /// Everything is in place.
    Nothing,
    /// A write is needed; `capture_tables`: the capture tables exist already.
    Install { capture_tables: bool },
}

/// Reads (never writes) what [`install`] would change, so the agent takes the write
/// lock only when something is to be done.
fn install_needed(conn: &Connection, wanted: Option<&[String]>) -> rusqlite::Result<Needed> {
    let targets = capture_targets(conn, wanted)?;
    if targets.is_empty() {
        return Ok(Needed::NoTables);
    }
    let capture_tables: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type='table' AND name IN (?1, ?2)",
        [CAPTURE_TABLE, TX_TABLE],
        |r| r.get(0),
    )?;
    let capture_tables = capture_tables == 2;
    let install = Needed::Install { capture_tables };
    if !capture_tables {
        return Ok(install);
    }
    let names: BTreeSet<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();
    if existing_triggers(conn)?
        .iter()
        .any(|(_, t)| !names.contains(t.as_str()))
    {
        return Ok(install);
    }
    for (name, sql) in &targets {
        let info = table_info(conn, name, sql.clone())?;
        if !triggers_current(conn, &info)? {
            return Ok(install);
        }
    }
    Ok(Needed::Nothing)
}

/// Installs or refreshes the capture in one write transaction; returns how many tables
/// got new triggers.
fn install(conn: &mut Connection, wanted: Option<&[String]>) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {CAPTURE_TABLE}(id INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, \
           op TEXT NOT NULL, pk TEXT NOT NULL, old TEXT, new TEXT, epoch INTEGER NOT NULL, time_us INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS {TX_TABLE}(id INTEGER PRIMARY KEY CHECK (id = 1), epoch INTEGER NOT NULL, instance TEXT NOT NULL);
         INSERT OR IGNORE INTO {TX_TABLE}(id, epoch, instance) VALUES (1, 1, lower(hex(randomblob(8))));"
    ))?;
    let targets = capture_targets(&tx, wanted)?;
    let target_names: BTreeSet<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();
    // Triggers on tables no longer captured go.
    for (name, tbl) in &existing_triggers(&tx)? {
        if !target_names.contains(tbl.as_str()) {
            tx.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote_ident(name)))?;
        }
    }
    let bump = format!("UPDATE {TX_TABLE} SET epoch = epoch + 1 WHERE id = 1");
    let mut installed = 0;
    for (name, sql) in targets {
        let info = table_info(&tx, &name, sql)?;
        let want = trigger_sqls(&info);
        let names = trigger_names(&name);
        let mut have = Vec::new();
        for n in &names {
            let sql: Option<String> = tx
                .query_row(
                    "SELECT sql FROM sqlite_master WHERE type='trigger' AND name=?1",
                    [n],
                    |r| r.get(0),
                )
                .optional()?;
            have.push(sql);
        }
        if have
            .iter()
            .zip(&want)
            .all(|(h, w)| h.as_deref() == Some(w.as_str()))
        {
            continue;
        }
        let fresh = have.iter().all(Option::is_none);
        for n in weft_triggers(&tx, Some(&name))? {
            tx.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote_ident(&n)))?;
        }
        // The schema and (for a table seen the first time) its current rows form a
        // transaction of their own.
        tx.execute_batch(&bump)?;
        tx.execute(
            &format!(
                "INSERT INTO {CAPTURE_TABLE}(tbl,op,pk,old,new,epoch,time_us) \
                 VALUES (?1,'schema','',NULL,json_quote(?2),(SELECT epoch FROM {TX_TABLE} WHERE id=1),{NOW_US})"
            ),
            params![info.name, info.sql],
        )?;
        if fresh {
            tx.execute_batch(&format!(
                "INSERT INTO {CAPTURE_TABLE}(tbl,op,pk,old,new,epoch,time_us) \
                 SELECT {},'insert',{},NULL,{},(SELECT epoch FROM {TX_TABLE} WHERE id=1),{NOW_US} FROM {} ORDER BY rowid",
                quote_lit(&name),
                json_key("", &info.key),
                json_row("", &info.cols),
                quote_ident(&name)
            ))
            .or_else(|e| {
                // WITHOUT ROWID tables have no rowid to order by.
                if e.to_string().contains("rowid") {
                    tx.execute_batch(&format!(
                        "INSERT INTO {CAPTURE_TABLE}(tbl,op,pk,old,new,epoch,time_us) \
                         SELECT {},'insert',{},NULL,{},(SELECT epoch FROM {TX_TABLE} WHERE id=1),{NOW_US} FROM {}",
                        quote_lit(&name),
                        json_key("", &info.key),
                        json_row("", &info.cols),
                        quote_ident(&name)
                    ))
                } else {
                    Err(e)
                }
            })?;
        }
        for sql in &want {
            tx.execute_batch(sql)?;
        }
        tx.execute_batch(&bump)?;
        installed += 1;
    }
    if installed > 0 {
        // Later application rows carry an epoch of their own (the install's rows are
        // one transaction of the agent's).
        tx.execute_batch(&bump)?;
    }
    tx.commit()?;
    Ok(installed)
}

/// Converts a JSON value of a row to a SQLite value.
fn to_sql(v: &Value) -> Result<SqlValue, Error> {
    Ok(match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => SqlValue::Integer(i),
            None => SqlValue::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => SqlValue::Text(s.clone()),
        Value::Object(m) if m.len() == 1 && m.contains_key("$blob") => {
            let hex = m["$blob"].as_str().unwrap_or_default();
            SqlValue::Blob(
                decode_hex(hex).ok_or_else(|| Error::Apply(format!("bad $blob hex {hex:?}")))?,
            )
        }
        Value::Object(m) if m.contains_key("$omitted") => {
            return Err(Error::Apply(
                "a value was omitted from the record (too large); cannot apply it".into(),
            ))
        }
        other => SqlValue::Text(other.to_string()),
    })
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, text: Option<&str>) -> Result<T, Error> {
    let text = text.ok_or_else(|| Error::Apply(format!("the change has no {what}")))?;
    serde_json::from_str(text)
        .map_err(|e| Error::Apply(format!("{what} is not the expected JSON: {e}")))
}

/// Applies SQLite changes of one database in one transaction; returns how many were
/// made. The database is created if a schema change needs it.
pub fn apply(path: &str, changes: &[&Entry]) -> Result<u64, Error> {
    let mut conn =
        Connection::open(path).map_err(|e| Error::sqlite(format!("cannot open {path}"), e))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(|e| Error::sqlite("cannot set a busy timeout", e))?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| Error::sqlite(format!("cannot begin a transaction on {path}"), e))?;
    let mut n = 0;
    for c in changes {
        apply_one(&tx, c).map_err(|e| {
            Error::Apply(format!("{} {} {}: {e}", c.op.as_str(), c.collection, c.key))
        })?;
        n += 1;
    }
    tx.commit()
        .map_err(|e| Error::sqlite(format!("cannot commit to {path}"), e))?;
    Ok(n)
}

fn apply_one(tx: &rusqlite::Transaction<'_>, c: &Entry) -> Result<(), Error> {
    let sq = |e| Error::sqlite("sqlite", e);
    let table = &c.collection;
    if c.op == Operation::Schema {
        let sql: String = parse_json("schema", c.new.as_deref())?;
        if !sql
            .trim_start()
            .to_ascii_uppercase()
            .starts_with("CREATE TABLE")
        {
            return Err(Error::Apply(
                "a schema change must be a CREATE TABLE statement".into(),
            ));
        }
        let exists: bool = tx
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type='table' AND name=?1",
                [table],
                |r| r.get::<_, i64>(0),
            )
            .map_err(sq)?
            > 0;
        if !exists {
            tx.execute_batch(&sql).map_err(sq)?;
        }
        return Ok(());
    }
    let info = table_info(tx, table, String::new()).map_err(sq)?;
    if info.cols.is_empty() {
        return Err(Error::Apply(format!("no table {table}")));
    }
    let key: Vec<Value> = serde_json::from_str(&c.key)
        .map_err(|e| Error::Apply(format!("the key is not a JSON array: {e}")))?;
    let key_cols: Vec<String> = match &info.key {
        Key::Rowid => vec!["rowid".into()],
        Key::Columns(k) => k.iter().map(|c| quote_ident(c)).collect(),
    };
    if key.len() != key_cols.len() {
        return Err(Error::Apply(format!(
            "the key has {} parts, the table's key {}",
            key.len(),
            key_cols.len()
        )));
    }
    let key_vals = key.iter().map(to_sql).collect::<Result<Vec<_>, _>>()?;
    let where_ = key_cols
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{k} = ?{}", i + 1))
        .collect::<Vec<_>>()
        .join(" AND ");
    let row = |text: Option<&str>| -> Result<Vec<(String, SqlValue)>, Error> {
        let obj: serde_json::Map<String, Value> = parse_json("row", text)?;
        obj.iter()
            .map(|(k, v)| {
                if !info.cols.contains(k) {
                    return Err(Error::Apply(format!("no column {k} in {table}")));
                }
                Ok((quote_ident(k), to_sql(v)?))
            })
            .collect()
    };
    let upsert = |cols: Vec<(String, SqlValue)>| -> Result<(), Error> {
        let mut names: Vec<String> = cols.iter().map(|(k, _)| k.clone()).collect();
        let mut vals: Vec<SqlValue> = cols.into_iter().map(|(_, v)| v).collect();
        if info.key == Key::Rowid {
            names.push("rowid".into());
            vals.push(key_vals[0].clone());
        }
        let marks = (1..=vals.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(",");
        tx.execute(
            &format!(
                "INSERT OR REPLACE INTO {}({}) VALUES ({marks})",
                quote_ident(table),
                names.join(",")
            ),
            rusqlite::params_from_iter(vals),
        )
        .map_err(sq)?;
        Ok(())
    };
    match c.op {
        Operation::Insert => upsert(row(c.new.as_deref())?)?,
        Operation::Update => {
            let cols = row(c.new.as_deref())?;
            // The row is found by its key before the change (a key may change too).
            let mut old_key = key_vals.clone();
            if let (Key::Columns(k), Some(old)) = (&info.key, c.old.as_deref()) {
                let old: serde_json::Map<String, Value> = parse_json("old row", Some(old))?;
                if k.iter().all(|c| old.contains_key(c)) {
                    old_key = k
                        .iter()
                        .map(|c| to_sql(&old[c]))
                        .collect::<Result<_, _>>()?;
                }
            }
            let sets = cols
                .iter()
                .enumerate()
                .map(|(i, (k, _))| format!("{k} = ?{}", i + 1 + old_key.len()))
                .collect::<Vec<_>>()
                .join(",");
            let changed = if sets.is_empty() {
                1
            } else {
                let vals: Vec<SqlValue> = old_key
                    .iter()
                    .cloned()
                    .chain(cols.iter().map(|(_, v)| v.clone()))
                    .collect();
                tx.execute(
                    &format!("UPDATE {} SET {sets} WHERE {where_}", quote_ident(table)),
                    rusqlite::params_from_iter(vals),
                )
                .map_err(sq)?
            };
            if changed == 0 {
                upsert(cols)?;
            }
        }
        Operation::Delete => {
            tx.execute(
                &format!("DELETE FROM {} WHERE {where_}", quote_ident(table)),
                rusqlite::params_from_iter(key_vals),
            )
            .map_err(sq)?;
        }
        Operation::Schema => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, String, Connection) {
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

    #[test]
    fn apply_makes_the_changes() {
        let (_dir, path, conn) = db();
        let e = |op, table: &str, key: &str, old: Option<&str>, new: Option<&str>| Entry {
            seq: 1,
            guest_time_us: 0,
            data_type: crate::proto::DataType::Sqlite,
            op,
            source: path.clone(),
            collection: table.into(),
            key: key.into(),
            old: old.map(Into::into),
            new: new.map(Into::into),
            tx: None,
        };
        let changes = [
            e(
                Operation::Insert,
                "customers",
                "[2]",
                None,
                Some(r#"{"id":2,"name":"Carol","photo":{"$blob":"0a0b"},"score":null}"#),
            ),
            e(
                Operation::Update,
                "customers",
                "[1]",
                Some(r#"{"id":1}"#),
                Some(r#"{"id":1,"name":"Bob"}"#),
            ),
            e(
                Operation::Insert,
                "notes",
                "[7]",
                None,
                Some(r#"{"body":"seven"}"#),
            ),
            e(Operation::Delete, "pairs", r#"["x",2]"#, Some("{}"), None),
            e(
                Operation::Schema,
                "extra",
                "",
                None,
                Some(r#""CREATE TABLE extra(k TEXT PRIMARY KEY)""#),
            ),
        ];
        let refs: Vec<&Entry> = changes.iter().collect();
        assert_eq!(apply(&path, &refs).unwrap(), 5);
        let name: String = conn
            .query_row("SELECT name FROM customers WHERE id=1", [], |r| r.get(0))
            .unwrap();
        assert_eq!(name, "Bob");
        let photo: Vec<u8> = conn
            .query_row("SELECT photo FROM customers WHERE id=2", [], |r| r.get(0))
            .unwrap();
        assert_eq!(photo, [10, 11]);
        let rowid: i64 = conn
            .query_row("SELECT rowid FROM notes WHERE body='seven'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(rowid, 7);
        let n: i64 = conn
            .query_row("SELECT count(*) FROM extra", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
        let bad = [e(
            Operation::Insert,
            "customers",
            "[3]",
            None,
            Some(r#"{"nope":1}"#),
        )];
        let refs: Vec<&Entry> = bad.iter().collect();
        assert!(apply(&path, &refs).is_err());
    }
}
