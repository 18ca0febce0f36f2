//! Application state as items (F12): what compositions merge key by key. A SQLite
//! table's definition, a row by primary key, a JSON document's leaf by JSON pointer,
//! a key-value source's key; [`State::items`] and [`State::from_items`] turn a state
//! into items and back, [`with_chosen`] replaces the sources a `data:` pattern names.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::state::State;

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
            for (pointer, leaf) in flatten(v) {
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
            state.json.insert(doc.to_string(), unflatten(&leaves));
        }
        state
    }
}

/// Whether resource pattern `pattern` (`data:*`, `data:<glob>`) names source `source`.
pub fn data_source_matches(pattern: &str, source: &str) -> bool {
    weft_api::composition::matches(pattern, &format!("data:{source}"))
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

/// JSON flattened to leaf JSON pointers (arrays are leaves: a list is one value).
pub fn flatten(v: &Value) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    let esc = k.replace('~', "~0").replace('/', "~1");
                    walk(&format!("{prefix}/{esc}"), x, out);
                }
            }
            _ => {
                out.insert(prefix.to_string(), v.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", v, &mut out);
    out
}

/// The inverse of [`flatten`].
pub fn unflatten(m: &BTreeMap<String, Value>) -> Value {
    fn insert(cur: &mut Value, parts: &[String], v: Value) {
        let Some((first, rest)) = parts.split_first() else {
            *cur = v;
            return;
        };
        if !cur.is_object() {
            *cur = Value::Object(Default::default());
        }
        if let Value::Object(obj) = cur {
            insert(obj.entry(first.clone()).or_insert(Value::Null), rest, v);
        }
    }
    let mut root = Value::Null;
    for (k, v) in m {
        let parts: Vec<String> = if k.is_empty() {
            Vec::new()
        } else {
            k[1..]
                .split('/')
                .map(|p| p.replace("~1", "/").replace("~0", "~"))
                .collect()
        };
        insert(&mut root, &parts, v.clone());
    }
    root
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map};

    use super::*;

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
    fn json_flattens_and_back() {
        let v = serde_json::json!({"a": {"b": 1, "c/d": [1, 2]}, "e": null, "f": {}});
        let f = flatten(&v);
        assert_eq!(f.get("/a/c~1d"), Some(&serde_json::json!([1, 2])));
        assert_eq!(unflatten(&f), v);
    }
}
