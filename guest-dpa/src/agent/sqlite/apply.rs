//! Apply mode: recorded SQLite changes written into a database in one transaction,
//! rows found by their key before the change.

use std::time::Duration;

use rusqlite::types::Value as SqlValue;
use rusqlite::Connection;
use serde_json::Value;

use super::triggers::table_info;
use super::Error;
use crate::capture_format::{quote_ident, Key};
use crate::proto::{Entry, Operation};

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
    use super::super::tests::db;
    use super::*;

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
