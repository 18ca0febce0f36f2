//! A replayed state written out as files (`weft replay --out`): a SQLite database per
//! SQLite source, each JSON document, each key-value file or directory, under a
//! directory that mirrors the guest's paths.
//!
//! The state is read page by page ([`Pages`]) from memory or from a spilled replay's
//! scratch database, so writing never holds a second copy of it. Paths come from an
//! untrusted guest: they are confined to the output directory, every file is created
//! or moved in without following symlinks ([`crate::confine::OutDir`]), and SQLite
//! databases are built in a private scratch directory before they are moved in.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};
use weft_provenance::error::ReplayError;
use weft_provenance::item::MAX_LABEL;
use weft_provenance::spill::Spilled;
use weft_provenance::state::{Pages, RowPage};

use crate::confine::{ConfineError, OutDir, Replace};
use crate::error::{one_line, ApiError};

/// Why writing a state out failed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// A path from the log cannot be placed under the output directory.
    #[error("unsafe path {0:?} in the log")]
    Path(String),
    /// Writing the output failed.
    #[error("{what}")]
    Io {
        /// What was being written.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Building a SQLite database failed.
    #[error("SQLite database {path}: {reason}")]
    Sqlite {
        /// The output database.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// An output path was refused, or writing it failed (see [`crate::confine`]).
    #[error(transparent)]
    Confine(#[from] ConfineError),
    /// Reading the state (a spilled replay's scratch database, the log) failed.
    #[error(transparent)]
    Replay(#[from] ReplayError),
}

impl From<OutputError> for ApiError {
    fn from(e: OutputError) -> Self {
        match e {
            OutputError::Confine(c) => c.into(),
            OutputError::Io { what, source } => ApiError::io(what, source),
            OutputError::Replay(source) => ApiError::from(source),
            e @ (OutputError::Path(_) | OutputError::Sqlite { .. }) => {
                ApiError::Internal(one_line(&e.to_string()))
            }
        }
    }
}

/// Where a replay writes a state: a directory opened below an export directory
/// ([`crate::confine::ExportDirs::open_dir`]), into which every file is created or
/// moved without following symlinks, and a private scratch directory of weftd's where
/// SQLite databases are built (SQLite opens files by name, so it never opens one in a
/// directory a caller can change) before they are moved in.
pub struct Output {
    dir: OutDir,
    work: tempfile::TempDir,
    built: std::sync::atomic::AtomicU64,
}

impl Output {
    /// `dir`, with a scratch directory of its own under `work_root`.
    pub fn new(dir: OutDir, work_root: &Path) -> Result<Output, OutputError> {
        Output::with_scratch(dir, work_root, "replay-")
    }

    /// Directory `out` taken as it is (created if missing), with its scratch directory
    /// inside it: for tools and tests; weftd's API confines `--out` with [`Output::new`].
    pub fn unconfined(out: &Path) -> Result<Output, OutputError> {
        let dir = OutDir::open_unconfined(out)?;
        Output::with_scratch(dir, out, ".weft-work-")
    }

    fn with_scratch(dir: OutDir, parent: &Path, prefix: &str) -> Result<Output, OutputError> {
        let work = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(parent)
            .map_err(|source| OutputError::Io {
                what: format!("create a scratch directory in {}", parent.display()),
                source,
            })?;
        Ok(Output {
            dir,
            work,
            built: Default::default(),
        })
    }

    /// The output directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The private scratch directory.
    pub fn work(&self) -> &Path {
        self.work.path()
    }

    /// The directory (created below the output directory) and file name of `rel`.
    fn place_of<'a>(&self, rel: &'a Path) -> Result<(OutDir, &'a std::ffi::OsStr), OutputError> {
        let name = rel
            .file_name()
            .ok_or_else(|| OutputError::Path(rel.display().to_string()))?;
        let dir = match rel.parent() {
            Some(p) if !p.as_os_str().is_empty() => self.dir.subdir(p)?,
            _ => self.dir.clone(),
        };
        Ok((dir, name))
    }
}

/// What writing a state out did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// The files written.
    pub files: Vec<PathBuf>,
    /// Rows left out of their database because SQLite refused them (a column the
    /// table lacks, a value of the wrong type for a `STRICT` table, a constraint);
    /// each is logged.
    pub rows_skipped: u64,
}

/// Writes `state` under directory `out` (created if missing) as it is, unconfined: for
/// tools and tests (weftd's API confines `--out` with [`Output::new`]); returns the
/// files written. See [`write_state`].
pub async fn write_to(state: &impl Pages, out: &Path) -> Result<Vec<PathBuf>, OutputError> {
    Ok(write_counted(state, out).await?.files)
}

/// [`write_to`], also saying how many rows no table would take.
pub async fn write_counted(state: &impl Pages, out: &Path) -> Result<Written, OutputError> {
    write_state(state, &Output::unconfined(out)?).await
}

/// Writes a spilled replay into `out` ([`write_state`], its rows and keys read back
/// from its scratch database).
pub async fn write_spilled(spilled: &mut Spilled, out: &Output) -> Result<Written, OutputError> {
    spilled.finish()?;
    write_state(&*spilled, out).await
}

/// Writes `pages` under `out`, mirroring guest paths (`/data/app.db` becomes
/// `<out>/data/app.db`): a SQLite database per SQLite source (tables from their
/// definitions, rows in key order), each JSON document (pretty-printed), each
/// key-value file (`KEY=value` lines in key order) or directory (a file per key).
/// Existing regular files at those paths are replaced; symlinks are never followed
/// nor replaced. The rows and keys are read page by page.
pub async fn write_state(pages: &impl Pages, out: &Output) -> Result<Written, OutputError> {
    let shape = pages.shape();
    let mut written = Written::default();
    for (source, db) in &shape.sqlite {
        let rel = confined(source)?;
        let (dir, name) = out.place_of(&rel)?;
        written.rows_skipped += write_sqlite(out, &dir, name, &db.schemas, |table, after| {
            Ok(pages.row_page(source, table, after)?)
        })
        .await?;
        written.files.push(out.path().join(&rel));
    }
    for (source, doc) in &shape.json {
        let rel = confined(source)?;
        let (dir, name) = out.place_of(&rel)?;
        let mut text = serde_json::to_vec_pretty(doc).unwrap_or_default();
        text.push(b'\n');
        write_file(&dir, name, &text)?;
        written.files.push(out.path().join(&rel));
    }
    for source in shape.kv.keys() {
        if let Some(dir) = source.strip_suffix('/') {
            let rel = confined(dir)?;
            let dir = out.dir.subdir(&rel)?;
            let mut after: Option<String> = None;
            loop {
                let page = pages.kv_page(source, after.as_deref())?;
                for (key, value) in &page {
                    if !is_file_name(key) {
                        return Err(OutputError::Path(format!("{source}{key}")));
                    }
                    write_file(&dir, key.as_ref(), value.as_bytes())?;
                    written.files.push(dir.path().join(key));
                }
                match page.into_iter().last() {
                    Some((key, _)) => after = Some(key),
                    None => break,
                }
            }
        } else {
            let rel = confined(source)?;
            let (dir, name) = out.place_of(&rel)?;
            // Page by page: the file is never a second copy of the state in memory.
            let mut failed = None;
            write_file_with(&dir, name, |w| {
                let mut after: Option<String> = None;
                loop {
                    let page = match pages.kv_page(source, after.as_deref()) {
                        Ok(page) => page,
                        Err(e) => {
                            failed = Some(OutputError::from(e));
                            return Err(std::io::Error::other("reading the replayed keys failed"));
                        }
                    };
                    for (key, value) in &page {
                        w.write_all(key.as_bytes())?;
                        w.write_all(b"=")?;
                        w.write_all(value.as_bytes())?;
                        w.write_all(b"\n")?;
                    }
                    match page.into_iter().last() {
                        Some((key, _)) => after = Some(key),
                        None => return Ok(()),
                    }
                }
            })
            .map_err(|e| failed.take().unwrap_or(e))?;
            written.files.push(out.path().join(&rel));
        }
    }
    Ok(written)
}

/// `guest` (an absolute guest path) as a path relative to the output directory; `..`
/// and other escapes refused.
fn confined(guest: &str) -> Result<PathBuf, OutputError> {
    let rel = Path::new(guest);
    let mut path = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(p) => path.push(p),
            _ => return Err(OutputError::Path(guest.to_string())),
        }
    }
    if path.as_os_str().is_empty() {
        return Err(OutputError::Path(guest.to_string()));
    }
    Ok(path)
}

fn is_file_name(key: &str) -> bool {
    !key.is_empty() && key != "." && key != ".." && !key.contains('/') && !key.contains('\0')
}

/// Writes `bytes` to `name` in `dir` through a temporary file and a rename, fsynced.
fn write_file(dir: &OutDir, name: &std::ffi::OsStr, bytes: &[u8]) -> Result<(), OutputError> {
    write_file_with(dir, name, |w| w.write_all(bytes))
}

/// Writes what `fill` writes (buffered) to `name` in `dir` through a temporary file
/// (0600) and a rename, fsynced; a regular file there is replaced, a symlink refused.
fn write_file_with(
    dir: &OutDir,
    name: &std::ffi::OsStr,
    fill: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<(), OutputError> {
    let pending = dir.create(name, Replace::RegularFile)?;
    let io = |source| OutputError::Io {
        what: format!("write {}", pending.path().display()),
        source,
    };
    let mut w = std::io::BufWriter::new(&**pending.file());
    fill(&mut w).map_err(io)?;
    std::io::Write::flush(&mut w).map_err(io)?;
    drop(w);
    pending.commit()?;
    Ok(())
}

/// Builds a SQLite database as `name` in `dir` (replacing a regular file there): the
/// tables `schemas` define (a refused definition leaves its table out), each filled
/// with the rows `page(table, after)` returns page by page, in large transactions. A
/// row SQLite refuses is skipped and logged; returns how many were. The database is
/// built in `out`'s scratch directory and then moved in.
async fn write_sqlite(
    out: &Output,
    dir: &OutDir,
    name: &std::ffi::OsStr,
    schemas: &BTreeMap<String, String>,
    mut page: impl FnMut(&str, Option<&str>) -> Result<RowPage, OutputError>,
) -> Result<u64, OutputError> {
    use sqlx::Connection as _;
    let path = dir.path().join(name);
    let path = path.as_path();
    let n = out.built.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = out.work().join(format!("{n}.db"));
    let fail = |reason: String| OutputError::Sqlite {
        path: path.display().to_string(),
        reason,
    };
    let mut conn = weft_provenance::sql::open_output(&tmp)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let built = async {
        let sql_fail = |e: sqlx::Error| fail(e.to_string());
        let mut tx = conn.begin().await.map_err(sql_fail)?;
        let mut created = Vec::new();
        for (table, sql) in schemas {
            match weft_provenance::sql::create_table(&mut tx, table, sql).await {
                Ok(()) => created.push(table),
                Err(refused) => {
                    tracing::warn!(db = %path.display(), %refused, "replay left a table out")
                }
            }
        }
        let (mut skipped, mut in_tx) = (0u64, 0usize);
        for table in created {
            let mut after: Option<String> = None;
            loop {
                let rows = page(table, after.as_deref())?;
                for (key, row) in &rows {
                    if let Err(why) = insert_row(&mut tx, table, row).await {
                        skipped += 1;
                        tracing::warn!(
                            db = %path.display(),
                            table = ?table,
                            key = ?key.chars().take(MAX_LABEL).collect::<String>(),
                            why = ?why,
                            "replay left a row out"
                        );
                    }
                    in_tx += 1;
                }
                if in_tx >= ROWS_PER_TRANSACTION {
                    tx.commit().await.map_err(sql_fail)?;
                    tx = conn.begin().await.map_err(sql_fail)?;
                    in_tx = 0;
                }
                match rows.into_iter().last() {
                    Some((key, _)) => after = Some(key),
                    None => break,
                }
            }
        }
        tx.commit().await.map_err(sql_fail)?;
        Ok::<_, OutputError>(skipped)
    }
    .await;
    let closed = conn.close().await;
    let skipped = built?;
    closed.map_err(|e| fail(e.to_string()))?;
    dir.place(&tmp, name, Replace::RegularFile)?;
    Ok(skipped)
}

/// Rows written to an output database per transaction.
const ROWS_PER_TRANSACTION: usize = 16 * 1024;

/// Inserts (or replaces) one guest row into `table`; the row's column names are
/// quoted identifiers and its values bound parameters.
async fn insert_row(
    conn: &mut sqlx::SqliteConnection,
    table: &str,
    row: &Map<String, Value>,
) -> Result<(), String> {
    if row.is_empty() {
        return Err("the row has no columns".into());
    }
    if let Some(bad) = row.keys().find(|c| c.contains('\0')) {
        return Err(format!("column name {bad:?} holds a NUL"));
    }
    let cols: Vec<String> = row.keys().map(|c| quote_ident(c)).collect();
    let marks = vec!["?"; cols.len()].join(", ");
    let sql = format!(
        "INSERT OR REPLACE INTO {} ({}) VALUES ({marks})",
        quote_ident(table),
        cols.join(", ")
    );
    let mut q = sqlx::query(&sql);
    for v in row.values() {
        q = match v {
            Value::Null => q.bind(None::<i64>),
            Value::Bool(b) => q.bind(i64::from(*b)),
            Value::Number(n) => match n.as_i64() {
                Some(i) => q.bind(i),
                None => q.bind(n.as_f64().unwrap_or(0.0)),
            },
            Value::String(s) => q.bind(s.clone()),
            Value::Object(o) => match o.get("$blob").and_then(Value::as_str) {
                Some(hex) => q.bind(from_hex(hex).unwrap_or_default()),
                None => q.bind(v.to_string()),
            },
            Value::Array(_) => q.bind(v.to_string()),
        };
    }
    q.execute(&mut *conn)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests;
