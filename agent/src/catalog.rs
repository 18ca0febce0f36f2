//! The catalog: SQLite through sqlx, with embedded migrations.
//!
//! It holds environments (with their VM configuration as JSON) and the
//! append-only audit log. Triggers in the schema refuse updates and deletes
//! of audit rows.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::Connection as _;
use sqlx::{Row, SqlitePool};
use weft_qmp::launch::VmConfig;

use crate::model::{EnvKind, EnvState, Environment};

/// Errors of the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The database failed.
    #[error("{}", db_message(.0))]
    Db(#[from] sqlx::Error),
    /// A migration failed.
    #[error("catalog migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A row holds something this version cannot read.
    #[error("catalog row for {name:?} is corrupt: {reason}")]
    Corrupt {
        /// The row's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A name is taken.
    #[error("an environment named {0:?} already exists")]
    Duplicate(String),
}

/// The catalog files this process opened. SQLite's message for a full disk ("database
/// or disk is full") names no file; weftd opens one catalog, and names it.
static FILES: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// A database error for the operator: a full disk says so, and where.
fn db_message(e: &sqlx::Error) -> String {
    // SQLITE_FULL.
    let full = matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("13"));
    if !full {
        return format!("catalog: {e}");
    }
    let files = FILES.lock().map(|f| f.clone()).unwrap_or_default();
    match files.as_slice() {
        [one] => format!("catalog {}: no space left on device ({e})", one.display()),
        _ => format!("catalog: no space left on device ({e})"),
    }
}

/// Inserts a new environment row on `conn` (inside a caller's transaction, or not);
/// fails with [`CatalogError::Duplicate`] if the name is taken.
pub(crate) async fn insert_environment_in(
    conn: &mut sqlx::SqliteConnection,
    new: &NewEnvironment<'_>,
) -> Result<(), CatalogError> {
    let config = new
        .config
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| CatalogError::Corrupt {
            name: new.name.to_string(),
            reason: e.to_string(),
        })?;
    let now = now();
    let result = sqlx::query(
        "INSERT INTO environments (name, kind, config, qmp_socket, state, pid, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(new.name)
    .bind(new.kind.as_str())
    .bind(config)
    .bind(new.qmp_socket.to_string_lossy().into_owned())
    .bind(new.state.as_str())
    .bind(new.pid.map(i64::from))
    .bind(&now)
    .bind(&now)
    .execute(conn)
    .await;
    match result {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            Err(CatalogError::Duplicate(new.name.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

/// RFC 3339 timestamp of now, in UTC with microseconds.
pub fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// Handle on the catalog database.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub(crate) pool: SqlitePool,
    /// Serialises audit appends (each links to the one before).
    pub(crate) audit_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Where the audit chain's head is kept, outside the database (none in memory).
    pub(crate) audit_head: Option<std::path::PathBuf>,
}

/// A new environment row.
#[derive(Debug, Clone)]
pub struct NewEnvironment<'a> {
    /// Unique name.
    pub name: &'a str,
    /// Managed or attached.
    pub kind: EnvKind,
    /// VM configuration (managed).
    pub config: Option<&'a VmConfig>,
    /// QMP socket.
    pub qmp_socket: &'a Path,
    /// Initial state.
    pub state: EnvState,
    /// QEMU's PID if known.
    pub pid: Option<u32>,
}

impl Catalog {
    /// Opens (creating if needed) the catalog at `path` and applies migrations.
    pub async fn open(path: &Path) -> Result<Catalog, CatalogError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .after_release(|conn, _| {
                Box::pin(async move {
                    // SQLite rolls a transaction back by itself on a full disk
                    // (SQLITE_FULL, SQLITE_IOERR); sqlx's own ROLLBACK then fails and it
                    // keeps counting the connection inside the transaction, refusing every
                    // later BEGIN on it. The ping runs after that queued rollback; a
                    // connection still counted inside is closed instead of pooled.
                    conn.ping().await?;
                    Ok(!conn.is_in_transaction())
                })
            })
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        if let Ok(mut files) = FILES.lock() {
            if !files.iter().any(|f| f == path) {
                files.push(path.to_path_buf());
            }
        }
        let mut head = path.as_os_str().to_owned();
        head.push(".audit-head");
        let catalog = Catalog {
            pool,
            audit_lock: Default::default(),
            audit_head: Some(head.into()),
        };
        catalog.seal_audit().await?;
        Ok(catalog)
    }

    /// Opens a private in-memory catalog (tests).
    pub async fn open_in_memory() -> Result<Catalog, CatalogError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:")?;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Catalog {
            pool,
            audit_lock: Default::default(),
            audit_head: None,
        })
    }

    /// Inserts a new environment; fails with [`CatalogError::Duplicate`] if the name is taken.
    pub async fn insert_environment(&self, new: &NewEnvironment<'_>) -> Result<(), CatalogError> {
        insert_environment_in(&mut *self.pool.acquire().await?, new).await
    }

    /// Records a state change; `last_exit` is kept unless a new one is given.
    pub async fn set_state(
        &self,
        name: &str,
        state: EnvState,
        pid: Option<u32>,
        last_exit: Option<&str>,
    ) -> Result<bool, CatalogError> {
        let done = sqlx::query(
            "UPDATE environments SET state = ?, pid = ?, last_exit = COALESCE(?, last_exit), updated_at = ?
             WHERE name = ?",
        )
        .bind(state.as_str())
        .bind(pid.map(i64::from))
        .bind(last_exit)
        .bind(now())
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Removes an environment row.
    pub async fn delete_environment(&self, name: &str) -> Result<bool, CatalogError> {
        let done = sqlx::query("DELETE FROM environments WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// One environment by name.
    pub async fn environment(&self, name: &str) -> Result<Option<Environment>, CatalogError> {
        let row = sqlx::query(
            "SELECT name, kind, config, qmp_socket, state, pid, last_exit, created_at, updated_at
             FROM environments WHERE name = ?",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| env_from_row(&r)).transpose()
    }

    /// All environments, by name.
    pub async fn environments(&self) -> Result<Vec<Environment>, CatalogError> {
        let rows = sqlx::query(
            "SELECT name, kind, config, qmp_socket, state, pid, last_exit, created_at, updated_at
             FROM environments ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(env_from_row).collect()
    }

    /// Closes the pool, checkpointing the WAL.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn env_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Environment, CatalogError> {
    let name: String = r.try_get("name")?;
    let corrupt = |reason: String| CatalogError::Corrupt {
        name: name.clone(),
        reason,
    };
    let kind = match r.try_get::<String, _>("kind")?.as_str() {
        "managed" => EnvKind::Managed,
        "attached" => EnvKind::Attached,
        other => return Err(corrupt(format!("unknown kind {other:?}"))),
    };
    let state_text: String = r.try_get("state")?;
    let state = EnvState::parse(&state_text)
        .ok_or_else(|| corrupt(format!("unknown state {state_text:?}")))?;
    let config = r
        .try_get::<Option<String>, _>("config")?
        .map(|c| serde_json::from_str::<VmConfig>(&c))
        .transpose()
        .map_err(|e| corrupt(format!("config: {e}")))?;
    let pid = r
        .try_get::<Option<i64>, _>("pid")?
        .map(u32::try_from)
        .transpose()
        .map_err(|e| corrupt(format!("pid: {e}")))?;
    Ok(Environment {
        kind,
        state,
        config,
        pid,
        qmp_socket: PathBuf::from(r.try_get::<String, _>("qmp_socket")?),
        last_exit: r.try_get("last_exit")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        files: None,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attached<'a>(name: &'a str, sock: &'a Path) -> NewEnvironment<'a> {
        NewEnvironment {
            name,
            kind: EnvKind::Attached,
            config: None,
            qmp_socket: sock,
            state: EnvState::Running,
            pid: None,
        }
    }

    #[tokio::test]
    async fn environments_round_trip_and_names_are_unique() {
        let c = Catalog::open_in_memory().await.unwrap();
        let sock = Path::new("/run/x.sock");
        c.insert_environment(&attached("web", sock)).await.unwrap();
        let e = c
            .insert_environment(&attached("web", sock))
            .await
            .unwrap_err();
        assert!(matches!(e, CatalogError::Duplicate(ref n) if n == "web"));
        let env = c.environment("web").await.unwrap().unwrap();
        assert_eq!(env.kind, EnvKind::Attached);
        assert_eq!(env.state, EnvState::Running);
        assert!(c
            .set_state("web", EnvState::Stopped, None, Some("quit"))
            .await
            .unwrap());
        let env = c.environment("web").await.unwrap().unwrap();
        assert_eq!(env.state, EnvState::Stopped);
        assert_eq!(env.last_exit.as_deref(), Some("quit"));
        assert!(c.delete_environment("web").await.unwrap());
        assert!(c.environment("web").await.unwrap().is_none());
        assert!(!c.delete_environment("web").await.unwrap());
    }

    #[tokio::test]
    async fn managed_rows_need_a_config() {
        let c = Catalog::open_in_memory().await.unwrap();
        let mut new = attached("m", Path::new("/s"));
        new.kind = EnvKind::Managed;
        assert!(c.insert_environment(&new).await.is_err());
    }

    /// A tmpfs of `size` mounted on a new directory, unmounted on drop (tests run as
    /// root).
    struct SmallFs {
        point: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    impl SmallFs {
        fn mount(size: &str) -> SmallFs {
            let dir = tempfile::tempdir().unwrap();
            let point = dir.path().join("fs");
            std::fs::create_dir(&point).unwrap();
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(&point)
                .output()
                .unwrap();
            assert!(out.status.success(), "mount a tmpfs: {out:?}");
            SmallFs { point, _dir: dir }
        }

        /// Writes a file until the file system is full; returns it.
        fn fill(&self) -> std::path::PathBuf {
            use std::io::Write as _;
            let path = self.point.join("filler");
            let mut f = std::fs::File::create(&path).unwrap();
            while f.write_all(&[1u8; 4096]).is_ok() {}
            path
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(&self.point)
                .status();
        }
    }

    /// On a full disk SQLite rolls a transaction back by itself and sqlx's ROLLBACK
    /// fails; the connection must not go back to the pool still counted inside the
    /// transaction (every later BEGIN on it failed, until weftd restarted). The error
    /// names the lack of space and the catalog's file.
    #[tokio::test]
    async fn a_full_disk_fails_cleanly_and_the_catalog_works_once_space_is_back() {
        let fs = SmallFs::mount("2m");
        let file = fs.point.join("catalog.db");
        let c = Catalog::open(&file).await.unwrap();
        let filler = fs.fill();
        let detail = "x".repeat(3000);
        let mut failures = Vec::new();
        for i in 0..20 {
            if let Err(e) = c
                .audit("t", "fill", Some(&i.to_string()), Some(&detail), "ok")
                .await
            {
                failures.push(e.to_string());
            }
        }
        assert!(!failures.is_empty(), "the disk never filled");
        // The file is named when it is the only catalog this process opened.
        let one = FILES.lock().map(|f| f.len() == 1).unwrap_or(false);
        for f in &failures {
            assert!(
                f.contains("no space left on device") && (!one || f.contains("catalog.db")),
                "{f}"
            );
        }
        std::fs::remove_file(filler).unwrap();
        for i in 0..12 {
            c.audit("t", "after", Some(&i.to_string()), None, "ok")
                .await
                .unwrap_or_else(|e| panic!("audit {i} once space is back: {e}"));
        }
        c.pool.close().await;
    }
}
