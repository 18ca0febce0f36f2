//! Guest SQL on the host: the one place where weftd creates a table from a guest's
//! `CREATE TABLE` text and opens a SQLite file that came from a guest.
//!
//! A table definition reaches weftd from the guest, either as a DPA `schema` entry or
//! from `sqlite_master` of a database read off the guest's disk (`replay --base`,
//! compose reconciliation). weftd runs as root, so the text is never handed to SQLite
//! as a script: [`create_table`] prepares exactly one statement (the text after it
//! may only be blanks and semicolons) under an authorizer that admits a `CREATE
//! TABLE` of the expected table in the `main` database and what that statement
//! implies (its row in `sqlite_master`, its automatic indexes, `sqlite_sequence` for
//! `AUTOINCREMENT`, functions of its `CHECK` constraints) and denies everything else:
//! `ATTACH`, triggers, views, virtual tables, `PRAGMA`, `SELECT`, transactions,
//! temporary objects, `load_extension`. [`check_create_table`] runs the same
//! statement in a private in-memory database, which is how a replay refuses an entry
//! before any output exists.
//!
//! Every connection made here is [`harden`]ed: no attached databases
//! (`SQLITE_LIMIT_ATTACHED = 0`), defensive mode (no `writable_schema`, no shadow
//! table writes), `trusted_schema = OFF` (functions in a schema must be innocuous),
//! triggers, views and extension loading off. A guest's database file is opened
//! read-only on top of that ([`open_guest_copy`]).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::Path;
use std::ptr::{self, NonNull};

use libsqlite3_sys as ffi;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions as _, SqliteConnection};

/// Longest table definition taken from a guest, in bytes.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// Functions a table definition may not name, even in a `CHECK` constraint (with
/// `trusted_schema = OFF` SQLite also refuses to run any function that is not
/// innocuous from a schema; this list refuses the definition itself).
const DENIED_FUNCTIONS: &[&str] = &[
    "load_extension",
    "fts3_tokenizer",
    "readfile",
    "writefile",
    "edit",
];

// sqlite3.h codes newer than the bindings libsqlite3-sys ships for a system SQLite
// (3.14); the running library must know them, see `harden`.
const SQLITE_DBCONFIG_ENABLE_TRIGGER: c_int = 1003;
const SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION: c_int = 1005;
const SQLITE_DBCONFIG_DEFENSIVE: c_int = 1010;
const SQLITE_DBCONFIG_ENABLE_VIEW: c_int = 1015;
const SQLITE_DBCONFIG_TRUSTED_SCHEMA: c_int = 1017;

/// Why a guest's table definition was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the definition of table {table:?} is refused: {reason}")]
pub struct SchemaRefused {
    /// The table the definition was for.
    pub table: String,
    /// Why, in a few words.
    pub reason: String,
}

/// Errors opening or securing a SQLite connection.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// SQLite could not open or set up the database.
    #[error("SQLite database {path}: {source}")]
    Open {
        /// The database file.
        path: String,
        /// The error.
        #[source]
        source: sqlx::Error,
    },
    /// The SQLite library lacks a safety setting weftd requires.
    #[error("the SQLite library cannot {0}: weftd needs SQLite 3.31 or newer")]
    Unsafe(&'static str),
}

/// Opens (creating it) a database weftd builds from guest data, hardened.
pub async fn open_output(path: &Path) -> Result<SqliteConnection, SqlError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Delete)
        .pragma("trusted_schema", "OFF");
    open(path, options).await
}

/// Opens a copy of a guest's database read-only and hardened: its triggers, views
/// and schema functions cannot run, and it cannot attach other files. Not
/// `immutable`: SQLite ignores the write-ahead log of an immutable database, and the
/// log holds the guest's last transactions; read-only still reads it (into a
/// private `-shm` next to the copy), without writing the copy.
pub async fn open_guest_copy(path: &Path) -> Result<SqliteConnection, SqlError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false)
        .read_only(true)
        .pragma("trusted_schema", "OFF")
        .pragma("query_only", "ON")
        // Damaged pages are refused rather than trusted.
        .pragma("cell_size_check", "ON");
    open(path, options).await
}

async fn open(path: &Path, options: SqliteConnectOptions) -> Result<SqliteConnection, SqlError> {
    let fail = |source| SqlError::Open {
        path: path.display().to_string(),
        source,
    };
    let mut conn = options.connect().await.map_err(fail)?;
    {
        let mut handle = conn.lock_handle().await.map_err(fail)?;
        // SAFETY: the locked handle is an open connection that no other thread uses
        // while `handle` lives.
        unsafe { harden(handle.as_raw_handle().as_ptr()) }?;
    }
    Ok(conn)
}

/// Sets every connection-wide safety setting on `db` and reads each back.
///
/// # Safety
/// `db` is an open connection that no other thread uses during the call.
unsafe fn harden(db: *mut ffi::sqlite3) -> Result<(), SqlError> {
    // SAFETY: the caller's contract; sqlite3_limit takes any limit id.
    unsafe {
        ffi::sqlite3_limit(db, ffi::SQLITE_LIMIT_ATTACHED, 0);
        if ffi::sqlite3_limit(db, ffi::SQLITE_LIMIT_ATTACHED, -1) != 0 {
            return Err(SqlError::Unsafe("refuse attached databases"));
        }
    }
    for (op, on, what) in [
        (SQLITE_DBCONFIG_DEFENSIVE, 1, "turn on defensive mode"),
        (SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0, "distrust schemas"),
        (SQLITE_DBCONFIG_ENABLE_TRIGGER, 0, "turn triggers off"),
        (SQLITE_DBCONFIG_ENABLE_VIEW, 0, "turn views off"),
        (
            SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION,
            0,
            "turn extension loading off",
        ),
    ] {
        let mut now: c_int = -1;
        // SAFETY: these options take (int on/off, int *result), as passed; `now`
        // outlives the call.
        let rc = unsafe { ffi::sqlite3_db_config(db, op, on as c_int, &mut now as *mut c_int) };
        if rc != ffi::SQLITE_OK || now != on {
            return Err(SqlError::Unsafe(what));
        }
    }
    Ok(())
}

/// Creates table `table` on `conn` from a guest's definition `sql` (see the module
/// documentation for what is admitted).
pub async fn create_table(
    conn: &mut SqliteConnection,
    table: &str,
    sql: &str,
) -> Result<(), SchemaRefused> {
    let mut handle = conn.lock_handle().await.map_err(|e| SchemaRefused {
        table: table.to_string(),
        reason: e.to_string(),
    })?;
    // SAFETY: the locked handle is an open connection that no other thread uses
    // while `handle` lives.
    unsafe { create_on(handle.as_raw_handle(), table, sql) }
}

/// Whether `sql` is one `CREATE TABLE` of `table` that [`create_table`] admits: it is
/// run in a private in-memory database, hardened like the others.
pub fn check_create_table(table: &str, sql: &str) -> Result<(), SchemaRefused> {
    let refused = |reason: String| SchemaRefused {
        table: table.to_string(),
        reason,
    };
    let mut db: *mut ffi::sqlite3 = ptr::null_mut();
    // SAFETY: the name is NUL-terminated, `db` receives the handle; no VFS name.
    let rc = unsafe {
        ffi::sqlite3_open_v2(
            c":memory:".as_ptr(),
            &mut db,
            ffi::SQLITE_OPEN_READWRITE | ffi::SQLITE_OPEN_CREATE,
            ptr::null(),
        )
    };
    let Some(handle) = NonNull::new(db) else {
        return Err(refused("SQLite cannot open a scratch database".into()));
    };
    let checked = if rc != ffi::SQLITE_OK {
        Err(refused("SQLite cannot open a scratch database".into()))
    } else {
        // SAFETY: `handle` is the open connection made above, used by this thread only.
        match unsafe { harden(handle.as_ptr()) } {
            Err(e) => Err(refused(e.to_string())),
            // SAFETY: as above.
            Ok(()) => unsafe { create_on(handle, table, sql) },
        }
    };
    // SAFETY: every statement on `handle` was finalized by `create_on`.
    unsafe { ffi::sqlite3_close(handle.as_ptr()) };
    checked
}

/// What the authorizer admits while one definition is prepared and run, and what it
/// saw.
struct Policy<'a> {
    table: &'a str,
    created: bool,
    denied: Option<String>,
}

impl Policy<'_> {
    fn admits(
        &mut self,
        action: c_int,
        a1: Option<&str>,
        a2: Option<&str>,
        db: Option<&str>,
    ) -> bool {
        let main = db.is_some_and(|d| d.eq_ignore_ascii_case("main"));
        let is = |a: Option<&str>, name: &str| a.is_some_and(|a| a.eq_ignore_ascii_case(name));
        let schema_table = is(a1, "sqlite_master") || is(a1, "sqlite_schema");
        match action {
            ffi::SQLITE_CREATE_TABLE if main && is(a1, self.table) => {
                self.created = true;
                true
            }
            // AUTOINCREMENT makes SQLite create its own counter table.
            ffi::SQLITE_CREATE_TABLE => main && is(a1, "sqlite_sequence"),
            ffi::SQLITE_INSERT | ffi::SQLITE_UPDATE => main && schema_table,
            ffi::SQLITE_READ => main && (schema_table || is(a1, self.table)),
            // PRIMARY KEY and UNIQUE constraints' indexes.
            ffi::SQLITE_CREATE_INDEX => {
                main && is(a2, self.table)
                    && a1.is_some_and(|i| {
                        i.get(..17)
                            .is_some_and(|p| p.eq_ignore_ascii_case("sqlite_autoindex_"))
                    })
            }
            ffi::SQLITE_FUNCTION => {
                a2.is_some_and(|f| !DENIED_FUNCTIONS.iter().any(|d| d.eq_ignore_ascii_case(f)))
            }
            _ => false,
        }
    }
}

/// The name of an authorizer action, for messages.
fn action_name(action: c_int) -> &'static str {
    match action {
        ffi::SQLITE_ATTACH => "ATTACH",
        ffi::SQLITE_DETACH => "DETACH",
        ffi::SQLITE_PRAGMA => "PRAGMA",
        ffi::SQLITE_SELECT => "SELECT",
        ffi::SQLITE_TRANSACTION => "a transaction",
        ffi::SQLITE_SAVEPOINT => "a savepoint",
        ffi::SQLITE_CREATE_TRIGGER | ffi::SQLITE_CREATE_TEMP_TRIGGER => "CREATE TRIGGER",
        ffi::SQLITE_CREATE_VIEW | ffi::SQLITE_CREATE_TEMP_VIEW => "CREATE VIEW",
        ffi::SQLITE_CREATE_VTABLE => "CREATE VIRTUAL TABLE",
        ffi::SQLITE_CREATE_TEMP_TABLE => "CREATE TEMP TABLE",
        ffi::SQLITE_CREATE_TABLE => "CREATE TABLE",
        ffi::SQLITE_CREATE_INDEX | ffi::SQLITE_CREATE_TEMP_INDEX => "CREATE INDEX",
        ffi::SQLITE_INSERT => "INSERT",
        ffi::SQLITE_UPDATE => "UPDATE",
        ffi::SQLITE_DELETE => "DELETE",
        ffi::SQLITE_READ => "a read",
        ffi::SQLITE_FUNCTION => "a function",
        ffi::SQLITE_ALTER_TABLE => "ALTER TABLE",
        ffi::SQLITE_REINDEX => "REINDEX",
        ffi::SQLITE_ANALYZE => "ANALYZE",
        ffi::SQLITE_RECURSIVE => "a recursive query",
        _ => "a statement",
    }
}

/// Why the authorizer denied `action`, in a few words (guest names cut to 64 chars).
fn denial(
    action: c_int,
    a1: Option<&str>,
    a2: Option<&str>,
    db: Option<&str>,
    table: &str,
) -> String {
    let cut = |s: &str| s.chars().take(64).collect::<String>();
    let place = match db {
        Some(d) if !d.eq_ignore_ascii_case("main") => format!(" in database {:?}", cut(d)),
        _ => String::new(),
    };
    if action == ffi::SQLITE_CREATE_TABLE {
        return format!(
            "it creates table {:?}{place}, not {:?} in main",
            cut(a1.unwrap_or("")),
            cut(table)
        );
    }
    let what = [a1, a2]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let what = if what.is_empty() {
        String::new()
    } else {
        format!(" {:?}", cut(&what))
    };
    format!(
        "it asks for {}{what}{place}, and only a CREATE TABLE is run",
        action_name(action)
    )
}

/// Longest SQLite message kept in a refusal, in characters.
const MAX_MESSAGE: usize = 200;

/// A SQLite message as one line: it can quote the guest's text (`near "…": syntax
/// error`), newlines included, so control characters are escaped and it is cut to
/// [`MAX_MESSAGE`] characters.
fn one_line(msg: &str) -> String {
    let mut out = String::new();
    for (i, c) in msg.chars().enumerate() {
        if i == MAX_MESSAGE {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// SAFETY (for callers): `p` is NULL or a NUL-terminated string that lives for the call.
unsafe fn text<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL strings SQLite passes to an authorizer are NUL-terminated and
    // live until the callback returns.
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}

unsafe extern "C" fn authorize(
    data: *mut c_void,
    action: c_int,
    a1: *const c_char,
    a2: *const c_char,
    db: *const c_char,
    _inner: *const c_char,
) -> c_int {
    // SAFETY: `create_on` installs this callback with a `Policy` that outlives the
    // statement's preparation and run, and removes it before the policy goes.
    let policy = unsafe { &mut *data.cast::<Policy<'_>>() };
    // SAFETY: SQLite's arguments are NULL or NUL-terminated strings (see `text`).
    let (a1, a2, db) = unsafe { (text(a1), text(a2), text(db)) };
    if policy.admits(action, a1, a2, db) {
        return ffi::SQLITE_OK;
    }
    if policy.denied.is_none() {
        policy.denied = Some(denial(action, a1, a2, db, policy.table));
    }
    ffi::SQLITE_DENY
}

/// Prepares and runs `sql` on `db` under the [`Policy`] for `table`.
///
/// # Safety
/// `db` is an open connection that no other thread uses during the call.
unsafe fn create_on(
    db: NonNull<ffi::sqlite3>,
    table: &str,
    sql: &str,
) -> Result<(), SchemaRefused> {
    let refused = |reason: String| SchemaRefused {
        table: table.to_string(),
        reason,
    };
    if sql.len() > MAX_SCHEMA_BYTES {
        return Err(refused(format!(
            "it is {} bytes, more than {MAX_SCHEMA_BYTES}",
            sql.len()
        )));
    }
    if sql.contains('\0') {
        return Err(refused("it holds a NUL character".into()));
    }
    let db = db.as_ptr();
    let mut policy = Policy {
        table,
        created: false,
        denied: None,
    };
    let errmsg = || {
        // SAFETY: `db` is open; the message is copied before any other call on it.
        one_line(unsafe { text(ffi::sqlite3_errmsg(db)) }.unwrap_or("unknown error"))
    };
    // SAFETY: `policy` lives until the authorizer is removed at the end of this
    // function, on every path.
    unsafe {
        ffi::sqlite3_set_authorizer(db, Some(authorize), (&mut policy as *mut Policy<'_>).cast());
    }
    let mut stmt: *mut ffi::sqlite3_stmt = ptr::null_mut();
    let mut tail: *const c_char = ptr::null();
    // `sql` is at most MAX_SCHEMA_BYTES long, so its length fits a c_int.
    let len = sql.len() as c_int;
    // SAFETY: SQLite reads at most `len` bytes of `sql`; `stmt` and `tail` receive
    // the statement and a pointer into `sql`.
    let rc = unsafe { ffi::sqlite3_prepare_v2(db, sql.as_ptr().cast(), len, &mut stmt, &mut tail) };
    let result = if rc != ffi::SQLITE_OK {
        Err(match policy.denied.take() {
            Some(why) => refused(why),
            None => refused(format!("SQLite: {}", errmsg())),
        })
    } else if stmt.is_null() {
        Err(refused("it holds no statement".into()))
    } else {
        // `tail` points into `sql` (or at its end) when prepare succeeds.
        let used = (tail as usize)
            .saturating_sub(sql.as_ptr() as usize)
            .min(sql.len());
        let rest = sql.get(used..).unwrap_or("");
        if rest
            .trim_matches(|c: char| c.is_whitespace() || c == ';')
            .is_empty()
        {
            if !policy.created {
                Err(refused(format!("it does not create table {table:?}")))
            } else {
                // SAFETY: `stmt` is the statement prepared above.
                match unsafe { ffi::sqlite3_step(stmt) } {
                    ffi::SQLITE_DONE => Ok(()),
                    _ => Err(match policy.denied.take() {
                        Some(why) => refused(why),
                        None => refused(format!("SQLite: {}", errmsg())),
                    }),
                }
            }
        } else {
            Err(refused(
                "more than one statement; only one CREATE TABLE is run".into(),
            ))
        }
    };
    // SAFETY: finalizing NULL is a no-op; a prepared `stmt` is finalized once. The
    // authorizer is removed before `policy` goes out of scope.
    unsafe {
        ffi::sqlite3_finalize(stmt);
        ffi::sqlite3_set_authorizer(db, None, ptr::null_mut());
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(table: &str, sql: &str) {
        if let Err(e) = check_create_table(table, sql) {
            panic!("{sql}: {e}");
        }
    }

    fn refused(table: &str, sql: &str) -> String {
        match check_create_table(table, sql) {
            Ok(()) => panic!("{sql} was admitted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn table_definitions_that_applications_write_are_admitted() {
        ok("t", "CREATE TABLE t(x)");
        ok("t", "  CREATE TABLE t(x);  \n");
        ok("T", "create table \"t\"(x)");
        ok(
            "items",
            "CREATE TABLE items(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL, \
             price REAL CHECK (price >= 0 AND abs(price) < 1e9), at TEXT DEFAULT (datetime('now')), \
             owner INTEGER REFERENCES users(id))",
        );
        ok(
            "pairs",
            "CREATE TABLE pairs(a TEXT, b INTEGER, PRIMARY KEY(a, b)) WITHOUT ROWID",
        );
        ok(
            "s",
            "CREATE TABLE IF NOT EXISTS main.s(a INTEGER, b INTEGER AS (a + 1)) STRICT",
        );
        ok("we\"ird; name", "CREATE TABLE \"we\"\"ird; name\"(x)");
    }

    #[test]
    fn anything_but_one_create_table_of_the_named_table_is_refused() {
        let attach = refused(
            "t",
            "CREATE TABLE t(x); COMMIT; ATTACH DATABASE '/root/x' AS p; CREATE TABLE p.y(z); BEGIN",
        );
        assert!(attach.contains("more than one statement"), "{attach}");
        let e = refused("p", "ATTACH DATABASE '/tmp/weft-never' AS p");
        assert!(e.contains("ATTACH"), "{e}");
        assert!(!Path::new("/tmp/weft-never").exists());
        let e = refused("v", "CREATE VIEW v AS SELECT 1");
        assert!(e.contains("CREATE VIEW"), "{e}");
        let e = refused(
            "tr",
            "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END",
        );
        assert!(
            e.contains("CREATE TRIGGER") || e.contains("no such table"),
            "{e}"
        );
        let e = refused("x", "SELECT load_extension('/tmp/evil.so')");
        assert!(e.contains("SELECT") || e.contains("load_extension"), "{e}");
        let e = refused("x", "PRAGMA writable_schema=1");
        assert!(e.contains("PRAGMA"), "{e}");
        let e = refused("x", "CREATE TEMP TABLE x(a)");
        assert!(e.to_lowercase().contains("temp"), "{e}");
        let e = refused("x", "CREATE VIRTUAL TABLE x USING fts5(a)");
        assert!(e.contains("VIRTUAL") || e.contains("no such module"), "{e}");
        let e = refused("x", "CREATE TABLE x AS SELECT 1 AS a");
        assert!(e.contains("SELECT"), "{e}");
        let e = refused("x", "CREATE TABLE x(a CHECK (load_extension('/tmp/e.so')))");
        assert!(e.contains("load_extension"), "{e}");
        let e = refused("x", "CREATE TABLE y(a)");
        assert!(e.contains("it creates table \"y\", not \"x\""), "{e}");
        let e = refused("x", "CREATE TABLE temp.x(a)");
        assert!(e.to_lowercase().contains("temp"), "{e}");
        let e = refused("x", "BEGIN; CREATE TABLE x(a)");
        assert!(e.contains("transaction"), "{e}");
        let e = refused("x", "CREATE TABLE x(a); -- trailing text");
        assert!(e.contains("more than one statement"), "{e}");
        assert!(refused("x", "   ").contains("no statement"));
        assert!(refused("x", "CREATE TABLE x(a\0)").contains("NUL"));
        let big = format!("CREATE TABLE x(a){}", " ".repeat(MAX_SCHEMA_BYTES));
        assert!(refused("x", &big).contains("bytes"));
        assert!(refused("x", "CREATE TABLE x(").contains("SQLite"));
        // SQLite quotes the text near a syntax error: a guest's newline stays escaped
        // (found by the schema_sql fuzz target).
        let e = refused("p", "ATTACH DAT '/x\nforged: a second line' AS p");
        assert!(!e.contains('\n') && e.contains("/x\\nforged"), "{e}");
        let e = refused("p", &format!("ATTACH DAT '{}' AS p", "y".repeat(1000)));
        assert!(e.chars().count() < MAX_MESSAGE + 100, "{e}");
    }

    #[tokio::test]
    async fn connections_are_hardened_and_create_only_the_named_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_output(&dir.path().join("out.db")).await.unwrap();
        create_table(
            &mut conn,
            "t",
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)",
        )
        .await
        .unwrap();
        assert!(
            create_table(&mut conn, "u", "CREATE TABLE u(a); CREATE TABLE w(b)")
                .await
                .is_err()
        );
        // Where the table a trigger or view would name exists, the authorizer refuses.
        let e = create_table(
            &mut conn,
            "tr",
            "CREATE TRIGGER tr AFTER INSERT ON t BEGIN INSERT INTO t(v) VALUES ('planted'); END",
        )
        .await
        .unwrap_err();
        assert!(e.reason.contains("CREATE TRIGGER"), "{e}");
        let e = create_table(&mut conn, "v", "CREATE VIEW v AS SELECT * FROM t")
            .await
            .unwrap_err();
        assert!(e.reason.contains("CREATE VIEW"), "{e}");
        let e = create_table(
            &mut conn,
            "x",
            "CREATE TABLE x(a CHECK (a IN (SELECT v FROM t)))",
        )
        .await
        .unwrap_err();
        assert!(
            e.reason.contains("SELECT") || e.reason.contains("subqueries"),
            "{e}"
        );
        use sqlx::Executor as _;
        let outside = dir.path().join("outside.db");
        let attach = format!("ATTACH DATABASE '{}' AS p", outside.display());
        assert!(conn.execute(attach.as_str()).await.is_err(), "no ATTACH");
        assert!(!outside.exists());
        assert!(conn
            .execute("PRAGMA writable_schema=ON; UPDATE sqlite_master SET sql='x'")
            .await
            .is_err());
        // A DEFAULT is not resolved when the table is created; when a row leaves the
        // column out, the untrusted schema cannot load an extension.
        let so = dir.path().join("evil.so");
        std::fs::write(&so, b"not a library").unwrap();
        let sql = format!(
            "CREATE TABLE d(a, b DEFAULT (load_extension('{}')))",
            so.display()
        );
        create_table(&mut conn, "d", &sql).await.unwrap();
        let e = conn
            .execute("INSERT INTO d(a) VALUES (1)")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("load_extension"), "{e}");
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM sqlite_master ORDER BY name")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(names, vec!["d".to_string(), "t".to_string()]);
    }
}
