//! The replay engine (F26): application state rebuilt from a VM's provenance log.
//!
//! [`State`] folds log entries, in sequence order, into the state they describe: per
//! SQLite source its table definitions and rows by primary key, per JSON source the
//! document, per key-value source its keys. [`rebuild`] streams a VM's log into one,
//! [`State::changes_to`] lists the changes that turn one state into another (what apply
//! mode pushes into a running weave's DPA), and [`Pages`] reads a state back a page at
//! a time in key order, from memory or from a replay spilled to a scratch database,
//! for whoever writes it out as files.
//!
//! The log comes from an untrusted guest: entries that cannot apply (a JSON pointer
//! into a missing parent, a row for a table without a definition) are counted as
//! skipped and reported, never a panic.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use serde::Serialize;
use serde_json::{Map, Value};
use weft_dpa::{jsonptr, DataType, Entry, Operation};

use crate::error::ReplayError;
use crate::log::{ProvenanceError, ProvenanceLog, Query, Record};

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
                        crate::sql::check_create_table(&e.collection, sql)
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
}

/// A state read back a page at a time, in key order, by whoever writes it out: from
/// memory ([`State`]) or from the scratch database of a spilled replay.
pub trait Pages {
    /// The state's sources: SQLite table definitions, JSON documents and the names of
    /// key-value sources (its rows and keys may be elsewhere, read by page).
    fn shape(&self) -> &State;

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
pub type RowPage = Vec<(String, Map<String, Value>)>;

/// Rows or keys per page when a state is written out.
pub const PAGE: usize = 256;

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
    fn shape(&self) -> &State {
        self
    }

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

/// The state of `vm`'s sources as of guest time `to_us`, from its whole log (a weave's
/// lineage included), in sequence order. With `from_us`, only the items changed in
/// `[from_us, to_us]` are kept, each as it stood at `to_us` (an item deleted in the
/// window is absent): what a time range did, without the rest of the state.
///
/// The log streams through, one decoded block at a time: memory holds the state (and,
/// with `from_us`, the window's items), never the log.
pub fn rebuild(
    log: &ProvenanceLog,
    vm: &str,
    from_us: Option<i64>,
    to_us: i64,
) -> Result<(State, Summary), ProvenanceError> {
    let mut state = State::default();
    let mut summary = Summary::default();
    let mut seen = 0;
    log.scan(
        vm,
        &Query {
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
        &Query {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::change as e;

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
}
