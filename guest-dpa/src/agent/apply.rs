//! Apply mode: changes pushed in by the host's replay engine. They go to the sources
//! through their normal interfaces (SQL statements, atomic file writes), so the capture
//! records them like any other change.

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use serde_json::Value;

use super::config::{Config, KvFormat};
use super::files::{self, write_atomic};
use super::jsonptr;
use super::{sqlite, Error};
use crate::proto::{Applied, Apply, DataType, Entry, Operation};

/// Makes the changes of `req`, grouped by source in the order sources first appear:
/// one SQLite transaction per database, one atomic write per file. Stops at the first
/// failing source; what was applied before stays.
pub fn apply(config: &Config, req: &Apply) -> Applied {
    let mut order: Vec<&str> = Vec::new();
    let mut groups: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for c in &req.changes {
        if !groups.contains_key(c.source.as_str()) {
            order.push(&c.source);
        }
        groups.entry(&c.source).or_default().push(c);
    }
    let mut applied = 0;
    for source in order {
        let changes = &groups[source];
        match apply_source(config, source, changes) {
            Ok(n) => applied += n,
            Err(e) => {
                return Applied {
                    id: req.id,
                    applied,
                    error: Some(format!("{source}: {e}")),
                }
            }
        }
    }
    Applied {
        id: req.id,
        applied,
        error: None,
    }
}

fn apply_source(config: &Config, source: &str, changes: &[&Entry]) -> Result<u64, Error> {
    let path = Path::new(source);
    let kind = changes[0].data_type;
    if changes.iter().any(|c| c.data_type != kind) {
        return Err(Error::Apply(
            "changes of one source have different data types".into(),
        ));
    }
    match kind {
        DataType::Sqlite => {
            if !config.sqlite.iter().any(|s| s.path == path) {
                return Err(Error::Apply("not a SQLite source of this agent".into()));
            }
            sqlite::apply(source, changes)
        }
        DataType::Json => {
            if !config.json.iter().any(|s| s.path == path) {
                return Err(Error::Apply("not a JSON source of this agent".into()));
            }
            apply_json(path, changes)
        }
        DataType::Kv => {
            let Some(kv) = config.kv.iter().find(|s| s.path == path) else {
                return Err(Error::Apply("not a key-value source of this agent".into()));
            };
            apply_kv(path, kv.format, changes)
        }
    }
}

fn value(c: &Entry) -> Result<Value, Error> {
    let text = c
        .new
        .as_deref()
        .ok_or_else(|| Error::Apply(format!("{} {} has no new value", c.op.as_str(), c.key)))?;
    let v: Value =
        serde_json::from_str(text).map_err(|e| Error::Apply(format!("{}: {e}", c.key)))?;
    if v.get("$omitted").is_some() {
        return Err(Error::Apply(format!(
            "{}: the value was too large to record",
            c.key
        )));
    }
    Ok(v)
}

fn apply_json(path: &Path, changes: &[&Entry]) -> Result<u64, Error> {
    let mut doc: Option<Value> = match fs::read(path) {
        Ok(b) => Some(
            serde_json::from_slice(&b)
                .map_err(|e| Error::Apply(format!("the file is not valid JSON now: {e}")))?,
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
    };
    for c in changes {
        match (c.op, c.key.as_str()) {
            (Operation::Delete, "") => doc = None,
            (Operation::Delete, ptr) => {
                let d = doc
                    .as_mut()
                    .ok_or_else(|| Error::Apply("the document does not exist".into()))?;
                jsonptr::remove(d, ptr).map_err(Error::Apply)?;
            }
            (Operation::Insert | Operation::Update, "") => doc = Some(value(c)?),
            (Operation::Insert | Operation::Update, ptr) => {
                let d = doc
                    .as_mut()
                    .ok_or_else(|| Error::Apply("the document does not exist".into()))?;
                jsonptr::set(d, ptr, value(c)?).map_err(Error::Apply)?;
            }
            (Operation::Schema, _) => {
                return Err(Error::Apply("JSON sources have no schema".into()))
            }
        }
    }
    match doc {
        Some(d) => {
            let mut text =
                serde_json::to_vec_pretty(&d).map_err(|e| Error::Apply(e.to_string()))?;
            text.push(b'\n');
            write_atomic(path, &text)?;
        }
        None => match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("cannot remove {}", path.display()), e)),
        },
    }
    Ok(changes.len() as u64)
}

fn kv_value(c: &Entry) -> Result<Option<String>, Error> {
    match c.op {
        Operation::Delete => Ok(None),
        Operation::Insert | Operation::Update => match value(c)? {
            Value::String(s) => Ok(Some(s)),
            _ => Err(Error::Apply(format!(
                "{}: a key-value value is a JSON string",
                c.key
            ))),
        },
        Operation::Schema => Err(Error::Apply("key-value sources have no schema".into())),
    }
}

fn apply_kv(path: &Path, format: KvFormat, changes: &[&Entry]) -> Result<u64, Error> {
    match format {
        KvFormat::Env => {
            let mut edits = BTreeMap::new();
            for c in changes {
                edits.insert(c.key.clone(), kv_value(c)?);
            }
            let text = match fs::read(path) {
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                Err(e) if e.kind() == ErrorKind::NotFound => String::new(),
                Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
            };
            write_atomic(path, files::env_edit(&text, &edits)?.as_bytes())?;
        }
        KvFormat::Dir => {
            fs::create_dir_all(path)
                .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
            for c in changes {
                if !files::is_dir_key(&c.key) || c.key == ".." {
                    return Err(Error::Apply(format!(
                        "{:?} cannot be a file name in {}",
                        c.key,
                        path.display()
                    )));
                }
                let file = path.join(&c.key);
                match kv_value(c)? {
                    Some(v) => write_atomic(&file, v.as_bytes())?,
                    None => match fs::remove_file(&file) {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(Error::io(format!("cannot remove {}", file.display()), e))
                        }
                    },
                }
            }
        }
    }
    Ok(changes.len() as u64)
}
