//! The replay engine (F26): application state rebuilt from a VM's provenance log.
//!
//! [`State`] folds log entries, in sequence order, into the state they describe: per
//! SQLite source its table definitions and rows by primary key, per JSON source the
//! document, per key-value source its keys. [`State::write_to`] writes that state out
//! as files (a SQLite database per SQLite source, the JSON documents, the key-value
//! files or directories) under a directory that mirrors the guest's paths, and
//! [`State::changes_to`] lists the changes that turn one state into another, which is
//! what apply mode pushes into a running weave's DPA.
//!
//! The log comes from an untrusted guest: entries that cannot apply (a JSON pointer
//! into a missing parent, a row for a table without a definition) are counted as
//! skipped and reported, never a panic; paths are confined to the output directory.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};
use weft_dpa::{jsonptr, DataType, Entry, Operation};

use crate::provenance::Record;
pub use weft_api::provenance::{ReplayReport, ReplayRequest};

/// The rows of one SQLite source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SqliteState {
    /// Each table's `CREATE TABLE` statement, as the DPA found it.
    pub schemas: BTreeMap<String, String>,
    /// Each table's rows by primary key (the key's JSON text), column → value.
    pub rows: BTreeMap<String, BTreeMap<String, Map<String, Value>>>,
}

/// Application state as of some instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// SQLite sources by database path.
    pub sqlite: BTreeMap<String, SqliteState>,
    /// JSON documents by file path (absent: the file does not exist).
    pub json: BTreeMap<String, Value>,
    /// Key-value sources by path (a directory source ends with `/`), key → value.
    pub kv: BTreeMap<String, BTreeMap<String, String>>,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Entries applied.
    pub applied: u64,
    /// Entries that could not apply (see the log for each).
    pub skipped: u64,
    /// The last sequence number applied.
    pub last_seq: u64,
    /// The guest time of the last entry applied (µs since the Unix epoch).
    pub last_guest_time_us: Option<i64>,
    /// Files written by [`State::write_to`].
    pub files: Vec<String>,
}

impl Summary {
    /// Counts record `r` as applied, or as skipped with one warning saying why.
    pub fn count(&mut self, r: &Record, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                self.applied += 1;
                self.last_seq = r.entry.seq;
                self.last_guest_time_us = Some(r.entry.guest_time_us);
            }
            Err(why) => {
                tracing::warn!(vm = %r.vm, seq = r.entry.seq, %why, "replay skipped an entry");
                self.skipped += 1;
            }
        }
    }
}

/// Errors of the replay engine.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A path from the log cannot be placed under the output directory.
    #[error("unsafe path {0:?} in the log")]
    Path(String),
    /// Writing the output failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being written.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// Reading the provenance log failed.
    #[error("reading the provenance log: {0}")]
    Log(#[from] crate::provenance::ProvenanceError),
    /// The scratch database of a replay larger than memory failed (disk full?).
    #[error("the replay's scratch database {path}: {source}")]
    Scratch {
        /// The scratch database.
        path: String,
        /// The error.
        source: rusqlite::Error,
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
    Confine(#[from] crate::confine::ConfineError),
}

impl From<ReplayError> for crate::error::ApiError {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::Confine(c) => c.into(),
            e => crate::error::ApiError::Internal(e.to_string()),
        }
    }
}

/// Where a replay writes a state: a directory opened below an export directory
/// ([`crate::confine::ExportDirs::open_dir`]), into which every file is created or
/// moved without following symlinks, and a private scratch directory of weftd's where
/// SQLite databases are built (SQLite opens files by name, so it never opens one in a
/// directory a caller can change) before they are moved in.
pub struct Output {
    dir: crate::confine::OutDir,
    work: tempfile::TempDir,
    built: std::sync::atomic::AtomicU64,
}

impl Output {
    /// `dir`, with a scratch directory of its own under `work_root`.
    pub fn new(dir: crate::confine::OutDir, work_root: &Path) -> Result<Output, ReplayError> {
        Output::with_scratch(dir, work_root, "replay-")
    }

    /// Directory `out` taken as it is (created if missing), with its scratch directory
    /// inside it: for tools and tests; weftd's API confines `--out` with [`Output::new`].
    pub fn unconfined(out: &Path) -> Result<Output, ReplayError> {
        let dir = crate::confine::OutDir::open_unconfined(out)?;
        Output::with_scratch(dir, out, ".weft-work-")
    }

    fn with_scratch(
        dir: crate::confine::OutDir,
        parent: &Path,
        prefix: &str,
    ) -> Result<Output, ReplayError> {
        let work = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(parent)
            .map_err(|source| ReplayError::Io {
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
    fn place_of<'a>(
        &self,
        rel: &'a Path,
    ) -> Result<(crate::confine::OutDir, &'a std::ffi::OsStr), ReplayError> {
        let name = rel
            .file_name()
            .ok_or_else(|| ReplayError::Path(rel.display().to_string()))?;
        let dir = match rel.parent() {
            Some(p) if !p.as_os_str().is_empty() => self.dir.subdir(p)?,
            _ => self.dir.clone(),
        };
        Ok((dir, name))
    }
}

impl State {
    /// Applies `records` in order; returns how many applied and were skipped.
    pub fn apply_all<'a>(&mut self, records: impl IntoIterator<Item = &'a Record>) -> Summary {
        let mut summary = Summary::default();
        for r in records {
            self.apply_counted(r, &mut summary);
        }
        summary
    }

    /// Applies one record, counting it in `summary` as applied or skipped.
    pub fn apply_counted(&mut self, r: &Record, summary: &mut Summary) {
        let outcome = self.apply(&r.entry);
        summary.count(r, outcome);
    }

    /// Applies one entry.
    pub fn apply(&mut self, e: &Entry) -> Result<(), String> {
        let parse = parse_value;
        match e.data_type {
            DataType::Sqlite => {
                let db = self.sqlite.entry(e.source.clone()).or_default();
                match e.op {
                    Operation::Schema => {
                        let sql = parse(&e.new)?;
                        let sql = sql.as_str().ok_or("a schema is a JSON string")?;
                        crate::replay_sql::check_create_table(&e.collection, sql)
                            .map_err(|refused| refused.to_string())?;
                        db.schemas.insert(e.collection.clone(), sql.to_string());
                        db.rows.entry(e.collection.clone()).or_default();
                    }
                    Operation::Insert | Operation::Update => {
                        let Value::Object(row) = parse(&e.new)? else {
                            return Err("a row is a JSON object".into());
                        };
                        let key = canonical_key(&e.key)?;
                        db.rows
                            .entry(e.collection.clone())
                            .or_default()
                            .insert(key, row);
                    }
                    Operation::Delete => {
                        let key = canonical_key(&e.key)?;
                        if let Some(rows) = db.rows.get_mut(&e.collection) {
                            rows.remove(&key);
                        }
                    }
                }
            }
            DataType::Json => match e.op {
                Operation::Insert | Operation::Update => {
                    let value = parse(&e.new)?;
                    if e.key.is_empty() {
                        self.json.insert(e.source.clone(), value);
                    } else {
                        let doc = self
                            .json
                            .entry(e.source.clone())
                            .or_insert_with(|| Value::Object(Map::new()));
                        jsonptr::set(doc, &e.key, value)?;
                    }
                }
                Operation::Delete => {
                    if e.key.is_empty() {
                        self.json.remove(&e.source);
                    } else if let Some(doc) = self.json.get_mut(&e.source) {
                        jsonptr::remove(doc, &e.key)?;
                    }
                }
                Operation::Schema => return Err("JSON sources have no schema".into()),
            },
            DataType::Kv => {
                let kv = self.kv.entry(e.source.clone()).or_default();
                match e.op {
                    Operation::Insert | Operation::Update => {
                        let Value::String(v) = parse(&e.new)? else {
                            return Err("a key-value value is a JSON string".into());
                        };
                        kv.insert(e.key.clone(), v);
                    }
                    Operation::Delete => {
                        kv.remove(&e.key);
                    }
                    Operation::Schema => return Err("key-value sources have no schema".into()),
                }
            }
        }
        Ok(())
    }

    /// Writes the state under `out`, mirroring guest paths (`/data/app.db` becomes
    /// `<out>/data/app.db`): a SQLite database per SQLite source (tables from their
    /// definitions, rows in key order), each JSON document (pretty-printed), each
    /// key-value file (`KEY=value` lines in key order) or directory (a file per key).
    /// Existing regular files at those paths are replaced; symlinks are never followed
    /// nor replaced. Returns the files written.
    pub async fn write_to(&self, out: &Path) -> Result<Vec<PathBuf>, ReplayError> {
        Ok(self.write_counted(out).await?.files)
    }

    /// [`State::write_to`], also saying how many rows no table would take.
    pub async fn write_counted(&self, out: &Path) -> Result<Written, ReplayError> {
        self.write_into(&Output::unconfined(out)?).await
    }

    /// [`State::write_counted`] into an [`Output`].
    pub async fn write_into(&self, out: &Output) -> Result<Written, ReplayError> {
        write_state(self, self, out).await
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

/// Rows and keys fetched a page at a time, in key order, for [`write_state`]: from
/// memory ([`State`]) or from the scratch database of a spilled replay
/// ([`crate::replay_spill::Spilled`]).
pub(crate) trait Pages {
    /// Up to [`PAGE`] rows of `table` in SQLite source `db`, by key, after `after`.
    fn row_page(&self, db: &str, table: &str, after: Option<&str>) -> Result<RowPage, ReplayError>;

    /// Up to [`PAGE`] keys of key-value source `store`, by key, after `after`.
    fn kv_page(
        &self,
        store: &str,
        after: Option<&str>,
    ) -> Result<Vec<(String, String)>, ReplayError>;
}

/// A page of rows: each row's key and its columns.
pub(crate) type RowPage = Vec<(String, Map<String, Value>)>;

/// Rows or keys per page when a state is written out.
pub(crate) const PAGE: usize = 256;

fn page_of<V: Clone>(map: Option<&BTreeMap<String, V>>, after: Option<&str>) -> Vec<(String, V)> {
    use std::ops::Bound;
    let Some(map) = map else {
        return Vec::new();
    };
    let from = after.map_or(Bound::Unbounded, Bound::Excluded);
    map.range::<str, _>((from, Bound::Unbounded))
        .take(PAGE)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl Pages for State {
    fn row_page(&self, db: &str, table: &str, after: Option<&str>) -> Result<RowPage, ReplayError> {
        let rows = self.sqlite.get(db).and_then(|d| d.rows.get(table));
        Ok(page_of(rows, after))
    }

    fn kv_page(
        &self,
        store: &str,
        after: Option<&str>,
    ) -> Result<Vec<(String, String)>, ReplayError> {
        Ok(page_of(self.kv.get(store), after))
    }
}

/// Writes the sources `shape` names (SQLite definitions, JSON documents, key-value
/// sources) under `out`, the rows and keys read page by page from `pages`: see
/// [`State::write_to`].
pub(crate) async fn write_state(
    shape: &State,
    pages: &impl Pages,
    out: &Output,
) -> Result<Written, ReplayError> {
    let mut written = Written::default();
    for (source, db) in &shape.sqlite {
        let rel = confined(source)?;
        let (dir, name) = out.place_of(&rel)?;
        written.rows_skipped += write_sqlite(out, &dir, name, &db.schemas, |table, after| {
            pages.row_page(source, table, after)
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
                        return Err(ReplayError::Path(format!("{source}{key}")));
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
                            failed = Some(e);
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

impl State {
    /// The changes that turn `self` into `target`, as DPA entries (numbered from 1 in
    /// order, times zero: apply mode ignores both), sources in path order. For SQLite
    /// tables absent from `self`, the target's definitions come first.
    pub fn changes_to(&self, target: &State) -> Vec<Entry> {
        let mut out = Vec::new();
        let empty_db = SqliteState::default();
        let sources: std::collections::BTreeSet<&String> =
            self.sqlite.keys().chain(target.sqlite.keys()).collect();
        for source in sources {
            let from = self.sqlite.get(source).unwrap_or(&empty_db);
            let to = target.sqlite.get(source).unwrap_or(&empty_db);
            for (table, sql) in &to.schemas {
                if !from.schemas.contains_key(table) {
                    out.push(change(
                        DataType::Sqlite,
                        Operation::Schema,
                        source,
                        table,
                        "",
                        None,
                        Some(Value::String(sql.clone())),
                    ));
                }
            }
            let no_rows = BTreeMap::new();
            let tables: std::collections::BTreeSet<&String> =
                from.rows.keys().chain(to.rows.keys()).collect();
            for table in tables {
                let a = from.rows.get(table).unwrap_or(&no_rows);
                let b = to.rows.get(table).unwrap_or(&no_rows);
                diff_maps(a, b, |key, old, new| {
                    out.push(change(
                        DataType::Sqlite,
                        op_of(&old, &new),
                        source,
                        table,
                        key,
                        old.map(|r| Value::Object(r.clone())),
                        new.map(|r| Value::Object(r.clone())),
                    ))
                });
            }
        }
        let docs: std::collections::BTreeSet<&String> =
            self.json.keys().chain(target.json.keys()).collect();
        for source in docs {
            let (a, b) = (self.json.get(source), target.json.get(source));
            if a != b {
                out.push(change(
                    DataType::Json,
                    op_of(&a, &b),
                    source,
                    "",
                    "",
                    a.cloned(),
                    b.cloned(),
                ));
            }
        }
        let no_keys = BTreeMap::new();
        let stores: std::collections::BTreeSet<&String> =
            self.kv.keys().chain(target.kv.keys()).collect();
        for source in stores {
            let a = self.kv.get(source).unwrap_or(&no_keys);
            let b = target.kv.get(source).unwrap_or(&no_keys);
            diff_maps(a, b, |key, old, new| {
                out.push(change(
                    DataType::Kv,
                    op_of(&old, &new),
                    source,
                    "",
                    key,
                    old.map(|v| Value::String(v.clone())),
                    new.map(|v| Value::String(v.clone())),
                ))
            });
        }
        for (i, e) in out.iter_mut().enumerate() {
            e.seq = i as u64 + 1;
        }
        out
    }
}

/// Longest conflict key a data item gets ([`Item::label`]).
pub const MAX_LABEL: usize = 512;

/// One item of application state: what compositions merge key by key (F12).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Item {
    /// A SQLite table's definition (its `CREATE TABLE` text).
    Schema {
        /// The database.
        db: String,
        /// The table.
        table: String,
    },
    /// A SQLite row (column → value) by primary key (the key's JSON text).
    Row {
        /// The database.
        db: String,
        /// The table.
        table: String,
        /// The primary key.
        key: String,
    },
    /// A leaf of a JSON document by JSON pointer (arrays are leaves; `""`: the
    /// document is no object, or an empty one).
    Json {
        /// The document.
        doc: String,
        /// The pointer.
        pointer: String,
    },
    /// A key of a key-value source.
    Kv {
        /// The source.
        store: String,
        /// The key.
        key: String,
    },
}

impl Item {
    /// The source (database, document or key-value path) the item belongs to.
    pub fn source(&self) -> &str {
        match self {
            Item::Schema { db, .. } | Item::Row { db, .. } => db,
            Item::Json { doc, .. } => doc,
            Item::Kv { store, .. } => store,
        }
    }

    /// How conflicts name the item: the source, then the table and primary key (or
    /// `(definition)`), the JSON pointer, or the key. The names come from the guest:
    /// control characters are escaped, and a label longer than [`MAX_LABEL`] bytes is
    /// cut and ends with a checksum of the whole, so it stays one item's.
    pub fn label(&self) -> String {
        let raw = match self {
            Item::Schema { db, table } => format!("{db} {table} (definition)"),
            Item::Row { db, table, key } => format!("{db} {table} {key}"),
            Item::Json { doc, pointer } => format!("{doc} {pointer}"),
            Item::Kv { store, key } => format!("{store} {key}"),
        };
        let mut out = String::with_capacity(raw.len().min(MAX_LABEL));
        for c in raw.chars() {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        if out.len() <= MAX_LABEL {
            return out;
        }
        let mut cut = MAX_LABEL - 16;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str(&format!("… {:08x}", crc32c::crc32c(raw.as_bytes())));
        out
    }
}

impl State {
    /// The state as items, of the sources `keep` admits.
    pub fn items(&self, keep: impl Fn(&str) -> bool) -> BTreeMap<Item, Value> {
        let mut out = BTreeMap::new();
        for (db, s) in self.sqlite.iter().filter(|(db, _)| keep(db)) {
            for (table, sql) in &s.schemas {
                let item = Item::Schema {
                    db: db.clone(),
                    table: table.clone(),
                };
                out.insert(item, Value::String(sql.clone()));
            }
            for (table, rows) in &s.rows {
                for (key, row) in rows {
                    let item = Item::Row {
                        db: db.clone(),
                        table: table.clone(),
                        key: key.clone(),
                    };
                    out.insert(item, Value::Object(row.clone()));
                }
            }
        }
        for (doc, v) in self.json.iter().filter(|(doc, _)| keep(doc)) {
            for (pointer, leaf) in crate::compose::flatten(v) {
                out.insert(
                    Item::Json {
                        doc: doc.clone(),
                        pointer,
                    },
                    leaf,
                );
            }
        }
        for (store, keys) in self.kv.iter().filter(|(store, _)| keep(store)) {
            for (key, v) in keys {
                let item = Item::Kv {
                    store: store.clone(),
                    key: key.clone(),
                };
                out.insert(item, Value::String(v.clone()));
            }
        }
        out
    }

    /// The state the items make (the inverse of [`State::items`]; a row that is no
    /// object or a key whose value is no string is left out).
    pub fn from_items(items: &BTreeMap<Item, Value>) -> State {
        let mut state = State::default();
        let mut docs: BTreeMap<&str, BTreeMap<String, Value>> = BTreeMap::new();
        for (item, v) in items {
            match (item, v) {
                (Item::Schema { db, table }, Value::String(sql)) => {
                    let s = state.sqlite.entry(db.clone()).or_default();
                    s.schemas.insert(table.clone(), sql.clone());
                }
                (Item::Row { db, table, key }, Value::Object(row)) => {
                    let s = state.sqlite.entry(db.clone()).or_default();
                    let rows = s.rows.entry(table.clone()).or_default();
                    rows.insert(key.clone(), row.clone());
                }
                (Item::Json { doc, pointer }, leaf) => {
                    docs.entry(doc)
                        .or_default()
                        .insert(pointer.clone(), leaf.clone());
                }
                (Item::Kv { store, key }, Value::String(v)) => {
                    let keys = state.kv.entry(store.clone()).or_default();
                    keys.insert(key.clone(), v.clone());
                }
                _ => {}
            }
        }
        for (doc, leaves) in docs {
            state
                .json
                .insert(doc.to_string(), crate::compose::unflatten(&leaves));
        }
        state
    }
}

/// The state of `vm`'s sources as of guest time `to_us`, from its whole log (a weave's
/// lineage included), in sequence order. With `from_us`, only the items changed in
/// `[from_us, to_us]` are kept, each as it stood at `to_us` (an item deleted in the
/// window is absent): what a time range did, without the rest of the state.
///
/// The log streams through, one decoded block at a time: memory holds the state (and,
/// with `from_us`, the window's items), never the log.
pub fn rebuild(
    log: &crate::provenance::ProvenanceLog,
    vm: &str,
    from_us: Option<i64>,
    to_us: i64,
) -> Result<(State, Summary), crate::provenance::ProvenanceError> {
    let mut state = State::default();
    let mut summary = Summary::default();
    let mut seen = 0;
    log.scan(
        vm,
        &crate::provenance::Query {
            to_us: Some(to_us),
            ..Default::default()
        },
        |r| {
            seen = r.entry.seq;
            state.apply_counted(&r, &mut summary);
            ControlFlow::Continue(())
        },
    )?;
    let Some(from) = from_us else {
        return Ok((state, summary));
    };
    // A second pass over the window only (the index skips blocks outside it), up to
    // the last entry the first pass saw: appends since then are not in `state`.
    let mut window = State::default();
    log.scan(
        vm,
        &crate::provenance::Query {
            from_us: Some(from),
            to_us: Some(to_us),
            ..Default::default()
        },
        |r| {
            if r.entry.seq > seen {
                return ControlFlow::Break(());
            }
            window.take_item(&state, &r.entry);
            ControlFlow::Continue(())
        },
    )?;
    Ok((window, summary))
}

impl State {
    /// Copies into `self` the item of `state` that `e` changed, as it stands in `state`
    /// (nothing for an item `state` no longer holds).
    pub(crate) fn take_item(&mut self, state: &State, e: &Entry) {
        match e.data_type {
            DataType::Sqlite => {
                let Some(db) = state.sqlite.get(&e.source) else {
                    return;
                };
                let w = self.sqlite.entry(e.source.clone()).or_default();
                if let Some(sql) = db.schemas.get(&e.collection) {
                    w.schemas.insert(e.collection.clone(), sql.clone());
                }
                let rows = w.rows.entry(e.collection.clone()).or_default();
                if let Ok(key) = canonical_key(&e.key) {
                    if let Some(row) = db.rows.get(&e.collection).and_then(|t| t.get(&key)) {
                        rows.insert(key, row.clone());
                    }
                }
            }
            DataType::Json => {
                if let Some(doc) = state.json.get(&e.source) {
                    self.json.insert(e.source.clone(), doc.clone());
                }
            }
            DataType::Kv => {
                let w = self.kv.entry(e.source.clone()).or_default();
                if let Some(v) = state.kv.get(&e.source).and_then(|kv| kv.get(&e.key)) {
                    w.insert(e.key.clone(), v.clone());
                }
            }
        }
    }
}

/// Every source (and SQLite table) `vm`'s log names up to `to_us`, streamed; and the
/// highest seq seen.
fn sources_of_log(
    log: &crate::provenance::ProvenanceLog,
    vm: &str,
    to_us: Option<i64>,
) -> Result<(crate::replay_base::Sources, u64), crate::provenance::ProvenanceError> {
    let mut sources = crate::replay_base::Sources::default();
    let mut seen = 0;
    log.scan(
        vm,
        &crate::provenance::Query {
            to_us,
            ..Default::default()
        },
        |r| {
            seen = r.entry.seq;
            sources.add(&r.entry);
            ControlFlow::Continue(())
        },
    )?;
    Ok((sources, seen))
}

/// Default of [`ReplayRequest::base_margin_secs`].
pub const BASE_MARGIN_SECS: u64 = 120;

/// Fills a report from what a replay applied and wrote.
fn set_report(report: &mut ReplayReport, summary: &Summary, written: Written) {
    report.applied = summary.applied;
    report.skipped = summary.skipped;
    report.last_seq = summary.last_seq;
    report.files = written
        .files
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    report.rows_skipped = written.rows_skipped;
}

/// Why `into` is not a weave of `env` (its parent in the catalog), or `None` when
/// it is one. A replay pushes an environment's state only into its own weaves
/// unless forced: anything else (the environment itself, another environment or
/// its weave, an attached guest) would have its data overwritten by a state that
/// never was its own. An `into` that does not exist is `NotFound`.
pub async fn not_a_weave_of(
    manager: &crate::envs::Manager,
    env: &str,
    into: &str,
) -> Result<Option<String>, crate::error::ApiError> {
    let catalog = manager.catalog();
    if catalog.environment(into).await?.is_none() {
        return Err(crate::error::ApiError::NotFound(into.to_string()));
    }
    Ok(match catalog.weave(into).await? {
        Some(w) if w.parent == env => None,
        Some(w) => Some(format!(
            "{into:?} is a weave of {:?}, not of {env:?}",
            w.parent
        )),
        None if into == env => Some(format!("{into:?} is the replayed environment itself")),
        None => Some(format!(
            "{into:?} is an environment, not a weave of {env:?}"
        )),
    })
}

/// Most changes sent to a DPA in one apply request.
const APPLY_CHUNK: usize = 512;

/// Runs a replay for weftd's API.
pub async fn run(
    manager: &crate::envs::Manager,
    snapshots: &crate::snapshots::Snapshots,
    env: &str,
    req: &ReplayRequest,
) -> Result<ReplayReport, crate::error::ApiError> {
    use crate::error::ApiError;
    use crate::provenance::service::parse_time;
    if manager.catalog().environment(env).await?.is_none() {
        return Err(ApiError::NotFound(env.to_string()));
    }
    if req.out.is_none() && req.into.is_none() {
        return Err(ApiError::BadRequest(
            "say where the state goes: --out DIR or --into WEAVE".into(),
        ));
    }
    if req.force && req.into.is_none() {
        return Err(ApiError::BadRequest(
            "--force only applies to --into WEAVE".into(),
        ));
    }
    if let Some(into) = &req.into {
        if let Some(why) = not_a_weave_of(manager, env, into).await? {
            if !req.force {
                return Err(ApiError::Conflict(format!(
                    "replay pushes only into weaves of {env:?}: {why}; give --force to push anyway (audited)"
                )));
            }
        }
    }
    let to_us = if req.to == "now" {
        now_us()
    } else {
        parse_time("to", &req.to).map_err(ApiError::BadRequest)?
    };
    let from_us = req
        .from
        .as_deref()
        .map(|f| parse_time("from", f))
        .transpose()
        .map_err(ApiError::BadRequest)?;
    if from_us.is_some_and(|f| f > to_us) {
        return Err(ApiError::BadRequest("--from is after --to".into()));
    }
    let log = manager
        .provenance()
        .ok_or_else(|| ApiError::Conflict("weftd has no provenance log".into()))?
        .clone();
    if req.base.is_some() && req.from.is_some() {
        return Err(ApiError::BadRequest(
            "--base and --from both say where to start: give one".into(),
        ));
    }
    // The output directory, opened (and made) below an export directory before any
    // work: a refused path is the request's answer.
    let output = match &req.out {
        None => None,
        Some(out) => {
            let config = manager.config();
            let dir = crate::confine::ExportDirs::new(config).open_dir("--out", out, true)?;
            Some(std::sync::Arc::new(Output::new(dir, &config.work_dir())?))
        }
    };
    let margin = req.base_margin_secs.unwrap_or(BASE_MARGIN_SECS);
    let limits = manager.config().replay.base_limits();
    let internal = |e: String| ApiError::Internal(e);
    // The base (a disk snapshot's application state) and where the log applies from.
    let based = match req.base {
        None => None,
        Some(id) => Some((
            id,
            base_of(snapshots, &log, env, id, margin, to_us, &limits).await?,
        )),
    };
    let mut report = ReplayReport {
        env: env.to_string(),
        to_us,
        applied: 0,
        skipped: 0,
        rows_skipped: 0,
        last_seq: 0,
        files: Vec::new(),
        into: req.into.clone(),
        changes_made: 0,
        base: based.as_ref().map(|b| b.0),
        base_found: based
            .as_ref()
            .map(|b| b.1.found.clone())
            .unwrap_or_default(),
        base_log_from_us: based.as_ref().map(|b| b.1.log_from),
    };
    let (log, vm) = (log.clone(), env.to_string());
    let base_query = move |b: &Base| crate::provenance::Query {
        from_us: Some(b.log_from),
        to_us: Some(to_us),
        ..Default::default()
    };
    if let (Some(out), None) = (&output, &req.into) {
        // Written out only: the rows and keys go to disk as the log streams in, so
        // weftd's memory does not grow with the state (see `replay_spill`).
        let (out, handle) = (out.clone(), tokio::runtime::Handle::current());
        let (summary, written) = tokio::task::spawn_blocking(move || {
            let mut spilled = crate::replay_spill::Spilled::create(out.work())?;
            let summary = match based {
                None => spilled.rebuild(&log, &vm, from_us, to_us)?,
                Some((_, base)) => {
                    let q = base_query(&base);
                    spilled.load(base.state)?;
                    spilled.apply_log(&log, &vm, &q, base.seen)?.0
                }
            };
            let written = handle.block_on(spilled.write_to(&out))?;
            Ok::<_, ReplayError>((summary, written))
        })
        .await
        .map_err(|e| internal(e.to_string()))??;
        set_report(&mut report, &summary, written);
        return Ok(report);
    }
    let (state, summary) = tokio::task::spawn_blocking(move || match based {
        None => rebuild(&log, &vm, from_us, to_us),
        Some((_, base)) => {
            let q = base_query(&base);
            let mut state = base.state;
            let mut summary = Summary::default();
            log.scan(&vm, &q, |r| {
                if r.entry.seq > base.seen {
                    return ControlFlow::Break(());
                }
                state.apply_counted(&r, &mut summary);
                ControlFlow::Continue(())
            })
            .map(|()| (state, summary))
        }
    })
    .await
    .map_err(|e| internal(e.to_string()))?
    .map_err(|e| internal(e.to_string()))?;
    set_report(&mut report, &summary, Written::default());
    if let Some(out) = &output {
        let written = state.write_into(out).await?;
        set_report(&mut report, &summary, written);
    }
    if let Some(weave) = &req.into {
        if manager.catalog().environment(weave).await?.is_none() {
            return Err(ApiError::NotFound(weave.clone()));
        }
        if req.from.is_some() {
            return Err(ApiError::BadRequest(
                "--into pushes a whole state: leave out --from".into(),
            ));
        }
        let state = &state;
        report.changes_made = push_state(manager, weave, None, |_| state.clone()).await?;
    }
    Ok(report)
}

/// Pushes a state into running weave `weave` through its guest's DPA: `target` gets
/// what the weave holds — `holds`, or else what its own log (its lineage included)
/// says — and says what it should hold; only the difference is sent. Returns the
/// changes the DPA made.
pub async fn push_state(
    manager: &crate::envs::Manager,
    weave: &str,
    holds: Option<&State>,
    target: impl FnOnce(&State) -> State,
) -> Result<u64, crate::error::ApiError> {
    use crate::error::ApiError;
    let log = manager
        .provenance()
        .ok_or_else(|| ApiError::Conflict("weftd has no provenance log".into()))?
        .clone();
    let link = manager
        .vsock()
        .ok_or_else(|| ApiError::Conflict("weftd has no DPA transport".into()))?
        .link()
        .clone();
    let current = match holds {
        Some(state) => state.clone(),
        None => {
            let weave = weave.to_string();
            tokio::task::spawn_blocking(move || rebuild(&log, &weave, None, i64::MAX))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .0
        }
    };
    let changes = current.changes_to(&target(&current));
    let mut made = 0;
    for chunk in changes.chunks(APPLY_CHUNK) {
        let mut chunk = chunk.to_vec();
        for (i, c) in chunk.iter_mut().enumerate() {
            c.seq = i as u64 + 1;
        }
        let applied = link
            .apply(weave, chunk)
            .await
            .map_err(|e| ApiError::Conflict(e.to_string()))?;
        made += applied.applied;
        if let Some(error) = applied.error {
            return Err(ApiError::Conflict(format!(
                "the DPA of {weave} stopped after {made} changes: {error}"
            )));
        }
    }
    Ok(made)
}

/// What a composed weave's `data:` resource takes (state reconciliation, F14).
#[derive(Debug, Clone)]
pub enum DataPick {
    /// The parent's state at an instant, of the sources `pattern` names.
    Instant {
        /// The resource pattern (`data:*`, `data:<glob>`).
        pattern: String,
        /// The instant (RFC 3339).
        at: String,
    },
    /// A merged state, of the sources `pattern` names.
    Merged {
        /// The resource pattern.
        pattern: String,
        /// The merged items.
        items: BTreeMap<Item, Value>,
    },
}

/// The items `picks` choose, each with its pattern, read from `parent`'s log where a
/// pick names an instant; and how many log entries were applied for them.
pub async fn chosen_items(
    manager: &crate::envs::Manager,
    parent: &str,
    picks: &[DataPick],
) -> Result<(Vec<(String, BTreeMap<Item, Value>)>, u64), crate::error::ApiError> {
    use crate::error::ApiError;
    use crate::provenance::service::parse_time;
    let log = manager
        .provenance()
        .ok_or_else(|| ApiError::Conflict("weftd has no provenance log".into()))?;
    let mut out = Vec::new();
    let mut applied = 0;
    for pick in picks {
        match pick {
            DataPick::Instant { pattern, at } => {
                let log = log.clone();
                let to_us = parse_time("at", at).map_err(ApiError::BadRequest)?;
                let (vm, pat) = (parent.to_string(), pattern.clone());
                let (items, summary) = tokio::task::spawn_blocking(move || {
                    rebuild(&log, &vm, None, to_us).map(|(state, summary)| {
                        (state.items(|src| data_source_matches(&pat, src)), summary)
                    })
                })
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .map_err(|e| ApiError::Internal(e.to_string()))?;
                applied += summary.applied;
                out.push((pattern.clone(), items));
            }
            DataPick::Merged { pattern, items } => out.push((pattern.clone(), items.clone())),
        }
    }
    Ok((out, applied))
}

/// What the disks `maps` hold of the sources `vm`'s log names (see
/// [`crate::replay_base::disks_state`]).
pub async fn disk_state(
    manager: &crate::envs::Manager,
    store: &weft_blockdev::store::ChunkStore,
    vm: &str,
    maps: Vec<weft_blockdev::store::BlockMap>,
) -> Result<(State, crate::replay_base::Found), String> {
    let log = manager
        .provenance()
        .ok_or("weftd has no provenance log")?
        .clone();
    let vm = vm.to_string();
    let (sources, _) = tokio::task::spawn_blocking(move || sources_of_log(&log, &vm, None))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let limits = manager.config().replay.base_limits();
    crate::replay_base::disks_state(store, maps, &sources, &limits).await
}

/// Whether resource pattern `pattern` (`data:*`, `data:<glob>`) names source `source`.
pub fn data_source_matches(pattern: &str, source: &str) -> bool {
    crate::compose::matches(pattern, &format!("data:{source}"))
}

/// `current` with the sources each pattern names replaced by the chosen items.
pub fn with_chosen(current: &State, chosen: &[(String, BTreeMap<Item, Value>)]) -> State {
    let mut items = current.items(|_| true);
    for (pattern, picked) in chosen {
        items.retain(|k, _| !data_source_matches(pattern, k.source()));
        items.extend(picked.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    State::from_items(&items)
}

/// The application state inside a disk snapshot, and how the log applies on it.
struct Base {
    /// The state the snapshot's file systems hold.
    state: State,
    /// Where each source was found (guest path → path in the file system).
    found: BTreeMap<String, String>,
    /// The log applies on the base from this instant (the snapshot's, less the margin).
    log_from: i64,
    /// ... up to this seq: the last entry whose source the base was read for.
    seen: u64,
}

/// The application state inside disk snapshot `id` of `env` (for the sources its log
/// names up to `to_us`), and where the log applies on it from: `margin_secs` before
/// the snapshot's instant.
async fn base_of(
    snapshots: &crate::snapshots::Snapshots,
    log: &crate::provenance::ProvenanceLog,
    env: &str,
    id: i64,
    margin_secs: u64,
    to_us: i64,
    limits: &crate::replay_base::BaseLimits,
) -> Result<Base, crate::error::ApiError> {
    use crate::error::ApiError;
    use crate::model::SnapshotState;
    use crate::provenance::service::parse_time;
    let snap = snapshots.get(id).await?;
    if snap.env != env {
        return Err(ApiError::BadRequest(format!(
            "snapshot {id} is of {}, not of {env}",
            snap.env
        )));
    }
    if !snap.resource.starts_with("disk:") {
        return Err(ApiError::BadRequest(format!(
            "snapshot {id} is of {}: --base takes a disk snapshot",
            snap.resource
        )));
    }
    if snap.state != SnapshotState::Complete {
        return Err(ApiError::Conflict(format!("snapshot {id} is not complete")));
    }
    let taken_us = parse_time("taken_at", &snap.taken_at).map_err(ApiError::Internal)?;
    if to_us < taken_us {
        return Err(ApiError::BadRequest(format!(
            "--to is before base snapshot {id} ({})",
            snap.taken_at
        )));
    }
    let log_from = taken_us.saturating_sub(
        i64::try_from(margin_secs)
            .unwrap_or(i64::MAX / 2)
            .saturating_mul(1_000_000),
    );
    let map = snapshots.block_map(id).await?;
    let (l, vm) = (log.clone(), env.to_string());
    let (sources, seen) = tokio::task::spawn_blocking(move || sources_of_log(&l, &vm, Some(to_us)))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let (state, found) =
        crate::replay_base::disks_state(snapshots.store(), vec![map], &sources, limits)
            .await
            .map_err(|e| ApiError::BadRequest(format!("base snapshot {id}: {e}")))?;
    Ok(Base {
        state,
        found,
        log_from,
        seen,
    })
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn op_of<T>(old: &Option<T>, new: &Option<T>) -> Operation {
    match (old, new) {
        (None, _) => Operation::Insert,
        (Some(_), Some(_)) => Operation::Update,
        (Some(_), None) => Operation::Delete,
    }
}

fn change(
    data_type: DataType,
    op: Operation,
    source: &str,
    collection: &str,
    key: &str,
    old: Option<Value>,
    new: Option<Value>,
) -> Entry {
    Entry {
        seq: 0,
        guest_time_us: 0,
        data_type,
        op,
        source: source.to_string(),
        collection: collection.to_string(),
        key: key.to_string(),
        old: old.map(|v| v.to_string()),
        new: new.map(|v| v.to_string()),
        tx: None,
    }
}

/// Calls `f(key, old, new)` for every key whose value differs between `a` and `b`.
fn diff_maps<V: PartialEq>(
    a: &BTreeMap<String, V>,
    b: &BTreeMap<String, V>,
    mut f: impl FnMut(&str, Option<&V>, Option<&V>),
) {
    for (k, va) in a {
        match b.get(k) {
            Some(vb) if vb == va => {}
            other => f(k, Some(va), other),
        }
    }
    for (k, vb) in b {
        if !a.contains_key(k) {
            f(k, None, Some(vb));
        }
    }
}

/// An entry's value (`old` or `new`) as JSON.
pub(crate) fn parse_value(v: &Option<String>) -> Result<Value, String> {
    let text = v.as_deref().ok_or("no value")?;
    serde_json::from_str(text).map_err(|err| format!("value is not JSON: {err}"))
}

/// A primary key in one canonical JSON text (so `[1]` and `[ 1 ]` are one row).
pub(crate) fn canonical_key(key: &str) -> Result<String, String> {
    let v: Value = serde_json::from_str(key).map_err(|e| format!("key is not JSON: {e}"))?;
    if !v.is_array() {
        return Err("a SQLite key is a JSON array".into());
    }
    Ok(v.to_string())
}

/// `guest` (an absolute guest path) as a path relative to the output directory; `..`
/// and other escapes refused.
fn confined(guest: &str) -> Result<PathBuf, ReplayError> {
    let rel = Path::new(guest);
    let mut path = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(p) => path.push(p),
            _ => return Err(ReplayError::Path(guest.to_string())),
        }
    }
    if path.as_os_str().is_empty() {
        return Err(ReplayError::Path(guest.to_string()));
    }
    Ok(path)
}

fn is_file_name(key: &str) -> bool {
    !key.is_empty() && key != "." && key != ".." && !key.contains('/') && !key.contains('\0')
}

/// Writes `bytes` to `name` in `dir` through a temporary file and a rename, fsynced.
fn write_file(
    dir: &crate::confine::OutDir,
    name: &std::ffi::OsStr,
    bytes: &[u8],
) -> Result<(), ReplayError> {
    write_file_with(dir, name, |w| w.write_all(bytes))
}

/// Writes what `fill` writes (buffered) to `name` in `dir` through a temporary file
/// (0600) and a rename, fsynced; a regular file there is replaced, a symlink refused.
fn write_file_with(
    dir: &crate::confine::OutDir,
    name: &std::ffi::OsStr,
    fill: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<(), ReplayError> {
    let pending = dir.create(name, crate::confine::Replace::RegularFile)?;
    let io = |source| ReplayError::Io {
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
    dir: &crate::confine::OutDir,
    name: &std::ffi::OsStr,
    schemas: &BTreeMap<String, String>,
    mut page: impl FnMut(&str, Option<&str>) -> Result<RowPage, ReplayError>,
) -> Result<u64, ReplayError> {
    use sqlx::Connection as _;
    let path = dir.path().join(name);
    let path = path.as_path();
    let n = out.built.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = out.work().join(format!("{n}.db"));
    let fail = |reason: String| ReplayError::Sqlite {
        path: path.display().to_string(),
        reason,
    };
    let mut conn = crate::replay_sql::open_output(&tmp)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let built = async {
        let sql_fail = |e: sqlx::Error| fail(e.to_string());
        let mut tx = conn.begin().await.map_err(sql_fail)?;
        let mut created = Vec::new();
        for (table, sql) in schemas {
            match crate::replay_sql::create_table(&mut tx, table, sql).await {
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
        Ok::<_, ReplayError>(skipped)
    }
    .await;
    let closed = conn.close().await;
    let skipped = built?;
    closed.map_err(|e| fail(e.to_string()))?;
    dir.place(&tmp, name, crate::confine::Replace::RegularFile)?;
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
mod tests {
    use serde_json::json;

    use super::*;

    fn e(
        dt: DataType,
        op: Operation,
        source: &str,
        coll: &str,
        key: &str,
        old: Option<&str>,
        new: Option<&str>,
    ) -> Entry {
        Entry {
            seq: 1,
            guest_time_us: 0,
            data_type: dt,
            op,
            source: source.into(),
            collection: coll.into(),
            key: key.into(),
            old: old.map(str::to_string),
            new: new.map(str::to_string),
            tx: None,
        }
    }

    #[test]
    fn sqlite_rows_follow_insert_update_delete() {
        let mut s = State::default();
        let db = "/data/app.db";
        s.apply(&e(
            DataType::Sqlite,
            Operation::Schema,
            db,
            "t",
            "",
            None,
            Some(r#""CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT)""#),
        ))
        .unwrap();
        s.apply(&e(
            DataType::Sqlite,
            Operation::Insert,
            db,
            "t",
            "[1]",
            None,
            Some(r#"{"id":1,"name":"Alice"}"#),
        ))
        .unwrap();
        s.apply(&e(
            DataType::Sqlite,
            Operation::Insert,
            db,
            "t",
            "[ 2 ]",
            None,
            Some(r#"{"id":2,"name":"Carol"}"#),
        ))
        .unwrap();
        s.apply(&e(
            DataType::Sqlite,
            Operation::Update,
            db,
            "t",
            "[1]",
            Some(r#"{"id":1,"name":"Alice"}"#),
            Some(r#"{"id":1,"name":"Bob"}"#),
        ))
        .unwrap();
        s.apply(&e(
            DataType::Sqlite,
            Operation::Delete,
            db,
            "t",
            "[2]",
            Some(r#"{"id":2,"name":"Carol"}"#),
            None,
        ))
        .unwrap();
        let rows = &s.sqlite[db].rows["t"];
        assert_eq!(rows.len(), 1);
        assert_eq!(rows["[1]"]["name"], "Bob");
    }

    #[test]
    fn json_pointers_set_and_remove_nested_values() {
        let mut s = State::default();
        let f = "/etc/app.json";
        s.apply(&e(
            DataType::Json,
            Operation::Insert,
            f,
            "",
            "",
            None,
            Some(r#"{"a":{"b":1},"l":[1,2,3]}"#),
        ))
        .unwrap();
        s.apply(&e(
            DataType::Json,
            Operation::Update,
            f,
            "",
            "/a/b",
            Some("1"),
            Some("2"),
        ))
        .unwrap();
        s.apply(&e(
            DataType::Json,
            Operation::Insert,
            f,
            "",
            "/a/c~1d",
            None,
            Some(r#""x""#),
        ))
        .unwrap();
        s.apply(&e(
            DataType::Json,
            Operation::Delete,
            f,
            "",
            "/l/0",
            Some("1"),
            None,
        ))
        .unwrap();
        s.apply(&e(
            DataType::Json,
            Operation::Insert,
            f,
            "",
            "/l/2",
            None,
            Some("9"),
        ))
        .unwrap();
        assert_eq!(
            s.json[f],
            serde_json::json!({"a": {"b": 2, "c/d": "x"}, "l": [2, 3, 9]})
        );
        assert!(s
            .apply(&e(
                DataType::Json,
                Operation::Insert,
                f,
                "",
                "/no/such",
                None,
                Some("1")
            ))
            .is_err());
        s.apply(&e(
            DataType::Json,
            Operation::Delete,
            f,
            "",
            "",
            Some("{}"),
            None,
        ))
        .unwrap();
        assert!(!s.json.contains_key(f));
    }

    #[test]
    fn kv_keys_and_changes_between_states() {
        let mut a = State::default();
        a.apply(&e(
            DataType::Kv,
            Operation::Insert,
            "/etc/app.env",
            "",
            "MODE",
            None,
            Some(r#""fast""#),
        ))
        .unwrap();
        a.apply(&e(
            DataType::Kv,
            Operation::Insert,
            "/etc/app.env",
            "",
            "OLD",
            None,
            Some(r#""1""#),
        ))
        .unwrap();
        let mut b = a.clone();
        b.apply(&e(
            DataType::Kv,
            Operation::Update,
            "/etc/app.env",
            "",
            "MODE",
            Some(r#""fast""#),
            Some(r#""safe""#),
        ))
        .unwrap();
        b.apply(&e(
            DataType::Kv,
            Operation::Delete,
            "/etc/app.env",
            "",
            "OLD",
            Some(r#""1""#),
            None,
        ))
        .unwrap();
        let changes = a.changes_to(&b);
        assert_eq!(changes.len(), 2);
        let mut c = a.clone();
        for ch in &changes {
            c.apply(ch).unwrap();
        }
        assert_eq!(c, b, "applying the changes reaches the target");
    }

    #[test]
    fn items_round_trip_and_chosen_sources_replace_current_ones() {
        let mut state = State::default();
        let db = state.sqlite.entry("/data/app.db".into()).or_default();
        db.schemas.insert(
            "t".into(),
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v)".into(),
        );
        let mut row = Map::new();
        row.insert("v".into(), json!("x"));
        db.rows
            .entry("t".into())
            .or_default()
            .insert("[1]".into(), row);
        state.json.insert(
            "/etc/app.json".into(),
            json!({"a": {"b": [1, 2], "c/d": {}}, "e": null}),
        );
        state.json.insert("/etc/list.json".into(), json!([1]));
        state
            .kv
            .entry("/etc/app.kv".into())
            .or_default()
            .insert("k".into(), "v".into());
        let items = state.items(|_| true);
        assert_eq!(items.len(), 7, "{items:?}");
        assert_eq!(State::from_items(&items), state);
        assert!(items.keys().any(|i| i.label() == "/etc/app.json /a/c~1d"));
        assert!(items.keys().any(|i| i.label() == "/data/app.db t [1]"));
        // Guest names: control characters escaped, long ones cut but kept apart.
        let kv = |key: String| Item::Kv {
            store: "/etc/app.kv".into(),
            key,
        };
        assert_eq!(kv("a\u{1b}[2J".into()).label(), "/etc/app.kv a\\u{1b}[2J");
        let (a, b) = (kv("x".repeat(5000)), kv(format!("{}y", "x".repeat(4999))));
        assert!(a.label().len() <= MAX_LABEL && b.label().len() <= MAX_LABEL);
        assert_ne!(a.label(), b.label());

        // Only the sources a pattern names are replaced.
        let mut other = State::default();
        other
            .kv
            .entry("/etc/app.kv".into())
            .or_default()
            .insert("k".into(), "w".into());
        let chosen = vec![(
            "data:*.kv".to_string(),
            other.items(|s| data_source_matches("data:*.kv", s)),
        )];
        let target = with_chosen(&state, &chosen);
        assert_eq!(target.kv["/etc/app.kv"]["k"], "w");
        assert_eq!(target.json, state.json);
        assert_eq!(target.sqlite, state.sqlite);
        assert_eq!(state.changes_to(&target).len(), 1);
    }

    #[test]
    fn paths_stay_under_the_output_directory() {
        assert_eq!(
            confined("/data/app.db").unwrap(),
            PathBuf::from("data/app.db")
        );
        assert!(confined("/data/../../etc/passwd").is_err());
        assert!(confined("/").is_err());
    }

    #[tokio::test]
    async fn a_state_is_written_as_real_files_and_a_sqlite_database() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::default();
        let db = "/data/app.db";
        s.apply(&e(
            DataType::Sqlite,
            Operation::Schema,
            db,
            "t",
            "",
            None,
            Some(r#""CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, b BLOB)""#),
        ))
        .unwrap();
        s.apply(&e(
            DataType::Sqlite,
            Operation::Insert,
            db,
            "t",
            "[7]",
            None,
            Some(r#"{"id":7,"name":"Bob","b":{"$blob":"00ff"}}"#),
        ))
        .unwrap();
        s.apply(&e(
            DataType::Json,
            Operation::Insert,
            "/etc/app.json",
            "",
            "",
            None,
            Some(r#"{"k":1}"#),
        ))
        .unwrap();
        s.apply(&e(
            DataType::Kv,
            Operation::Insert,
            "/etc/app.env",
            "",
            "A",
            None,
            Some(r#""1""#),
        ))
        .unwrap();
        s.apply(&e(
            DataType::Kv,
            Operation::Insert,
            "/etc/keys/",
            "",
            "token",
            None,
            Some(r#""abc""#),
        ))
        .unwrap();
        let files = s.write_to(dir.path()).await.unwrap();
        assert_eq!(files.len(), 4);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/app.env")).unwrap(),
            "A=1\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/keys/token")).unwrap(),
            "abc"
        );
        let doc: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("etc/app.json")).unwrap())
                .unwrap();
        assert_eq!(doc, serde_json::json!({"k": 1}));
        use sqlx::Connection as _;
        let mut conn = sqlx::SqliteConnection::connect(&format!(
            "sqlite://{}",
            dir.path().join("data/app.db").display()
        ))
        .await
        .unwrap();
        let (id, name, b): (i64, String, Vec<u8>) = sqlx::query_as("SELECT id, name, b FROM t")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!((id, name.as_str(), b), (7, "Bob", vec![0, 255]));
    }
    #[tokio::test]
    async fn a_row_sqlite_refuses_is_skipped_not_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::default();
        let db = "/data/app.db";
        s.apply(&e(
            DataType::Sqlite,
            Operation::Schema,
            db,
            "t",
            "",
            None,
            Some(r#""CREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER) STRICT""#),
        ))
        .unwrap();
        for (key, row) in [
            ("[1]", r#"{"id":1,"n":10}"#),
            ("[2]", r#"{"id":2,"nope":1}"#),
            ("[3]", r#"{"id":3,"n":"not a number"}"#),
            ("[4]", r#"{"id":4,"n\u0000x":1}"#),
            ("[5]", r#"{}"#),
            ("[6]", r#"{"id":6,"n":60}"#),
        ] {
            s.apply(&e(
                DataType::Sqlite,
                Operation::Insert,
                db,
                "t",
                key,
                None,
                Some(row),
            ))
            .unwrap();
        }
        let written = s
            .write_counted(dir.path())
            .await
            .expect("the database is written");
        assert_eq!(written.rows_skipped, 4);
        use sqlx::Connection as _;
        let mut conn = sqlx::SqliteConnection::connect(&format!(
            "sqlite://{}",
            dir.path().join("data/app.db").display()
        ))
        .await
        .unwrap();
        let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT id, n FROM t ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(rows, vec![(1, 10), (6, 60)]);
    }
}
