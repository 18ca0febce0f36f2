//! JSON and key-value sources: reading them, turning a new version into entries against
//! the last known one, and writing them back atomically (apply mode).

use std::collections::BTreeMap;
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::jsonptr::{self, Change};
use super::spool::Update;
use super::Error;
pub use crate::capture_format::{env_line, is_dir_key, parse_env};
use crate::proto::{self, DataType, Entry, Operation};

/// Entries and the state update that goes with them, to be appended together.
#[derive(Debug, Default)]
pub struct Scan {
    /// The changes found.
    pub entries: Vec<Entry>,
    /// The new last known state.
    pub updates: Vec<Update>,
}

/// The guest clock now, µs since the Unix epoch.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A file's modification time in µs (the instant of its last write), never in the
/// future; `now` when it cannot be read.
fn mtime_us(path: &Path) -> i64 {
    let now = now_us();
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| (d.as_micros() as i64).min(now))
        .unwrap_or(now)
}

fn entry(
    data_type: DataType,
    op: Operation,
    source: &str,
    key: String,
    old: Option<String>,
    new: Option<String>,
    time: i64,
) -> Entry {
    Entry {
        seq: 0,
        guest_time_us: time,
        data_type,
        op,
        source: source.to_string(),
        collection: String::new(),
        key,
        old,
        new,
        tx: None,
    }
}

/// Reads a JSON source and diffs it against `prev` (the last known document's text).
/// `Ok(None)`: nothing changed, or the file is not valid JSON right now (logged; the
/// next write is tried again).
pub fn scan_json(source: &str, prev: Option<&str>) -> Result<Option<Scan>, Error> {
    let path = Path::new(source);
    let new: Option<Value> = match fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::info!(
                    source,
                    "not valid JSON right now, skipped until the next write: {e}"
                );
                return Ok(None);
            }
        },
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(format!("cannot read {source}"), e)),
    };
    let old: Option<Value> = prev.and_then(|t| serde_json::from_str(t).ok());
    let changes = match (&old, &new) {
        (None, None) => return Ok(None),
        (None, Some(n)) => vec![Change::Insert {
            ptr: String::new(),
            new: n.clone(),
        }],
        (Some(o), None) => vec![Change::Delete {
            ptr: String::new(),
            old: o.clone(),
        }],
        (Some(o), Some(n)) => jsonptr::diff(o, n),
    };
    if changes.is_empty() {
        return Ok(None);
    }
    let time = if new.is_some() {
        mtime_us(path)
    } else {
        now_us()
    };
    let entries = jsonptr::fit(changes, proto::LIMITS.value)
        .into_iter()
        .map(|c| {
            let (op, ptr, old, new) = match c {
                Change::Insert { ptr, new } => (Operation::Insert, ptr, None, Some(new)),
                Change::Update { ptr, old, new } => (Operation::Update, ptr, Some(old), Some(new)),
                Change::Delete { ptr, old } => (Operation::Delete, ptr, Some(old), None),
            };
            entry(
                DataType::Json,
                op,
                source,
                ptr,
                old.map(|v| v.to_string()),
                new.map(|v| v.to_string()),
                time,
            )
        })
        .collect();
    Ok(Some(Scan {
        entries,
        updates: vec![Update::Json {
            source: source.to_string(),
            doc: new.map(|v| v.to_string()),
        }],
    }))
}

/// Formats one `KEY=value` line that [`crate::capture_format::parse_env`] reads back as the same value.
pub fn env_format(key: &str, value: &str) -> Result<String, Error> {
    if key.is_empty()
        || key.contains(['=', '\n', '\r'])
        || key.trim() != key
        || key.starts_with('#')
    {
        return Err(Error::Apply(format!(
            "{key:?} cannot be a key of an env file"
        )));
    }
    if value.contains(['\n', '\r']) {
        return Err(Error::Apply(format!(
            "the value of {key} has a line break, which an env file cannot hold"
        )));
    }
    let b = value.as_bytes();
    let quoted = value.trim() != value
        || (b.len() >= 2 && (b[0] == b'"' || b[0] == b'\'') && b[b.len() - 1] == b[0]);
    Ok(if quoted {
        format!("{key}=\"{value}\"")
    } else {
        format!("{key}={value}")
    })
}

/// Sets (`Some`) or removes (`None`) keys in an env file's text, keeping comments,
/// order and other lines.
pub fn env_edit(text: &str, edits: &BTreeMap<String, Option<String>>) -> Result<String, Error> {
    let mut out = String::new();
    let mut done = std::collections::BTreeSet::new();
    for line in text.lines() {
        match env_line(line) {
            Some((k, _)) if edits.contains_key(&k) => {
                if let (Some(Some(v)), true) = (edits.get(&k), done.insert(k.clone())) {
                    out.push_str(&env_format(&k, v)?);
                    out.push('\n');
                }
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for (k, v) in edits {
        if let (Some(v), false) = (v, done.contains(k)) {
            out.push_str(&env_format(k, v)?);
            out.push('\n');
        }
    }
    Ok(out)
}

/// Keys and values, and the modification time of each key's file (dir sources).
type KvRead = (BTreeMap<String, String>, BTreeMap<String, i64>);

fn read_kv(path: &Path, dir: bool) -> Result<KvRead, Error> {
    let mut times = BTreeMap::new();
    if !dir {
        return match fs::read(path) {
            Ok(b) => Ok((parse_env(&String::from_utf8_lossy(&b)), times)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok((BTreeMap::new(), times)),
            Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
        };
    }
    let mut map = BTreeMap::new();
    let list = match fs::read_dir(path) {
        Ok(l) => l,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok((map, times)),
        Err(e) => return Err(Error::io(format!("cannot list {}", path.display()), e)),
    };
    for ent in list {
        let ent = ent.map_err(|e| Error::io(format!("cannot list {}", path.display()), e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if !is_dir_key(&name) || !ent.file_type().map(|t| t.is_file()).unwrap_or(false) {
            continue;
        }
        match fs::read(ent.path()) {
            Ok(b) => {
                times.insert(name.clone(), mtime_us(&ent.path()));
                map.insert(name, String::from_utf8_lossy(&b).into_owned());
            }
            // Deleted between the listing and the read: it is gone.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::io(
                    format!("cannot read {}", ent.path().display()),
                    e,
                ))
            }
        }
    }
    Ok((map, times))
}

fn json_str(s: &str) -> String {
    let v = Value::String(s.to_string()).to_string();
    if v.len() > proto::LIMITS.value {
        tracing::warn!(
            bytes = v.len(),
            "a key-value value is too large for one entry; recorded as omitted"
        );
        jsonptr::omitted(v.len()).to_string()
    } else {
        v
    }
}

/// Reads a key-value source and diffs it against `prev`.
pub fn scan_kv(
    source: &str,
    dir: bool,
    prev: Option<&BTreeMap<String, String>>,
) -> Result<Option<Scan>, Error> {
    let path = Path::new(source);
    let (map, times) = read_kv(path, dir)?;
    // A directory source is named with a trailing `/` in its entries, so that replay
    // knows to rebuild a directory (a file per key) rather than a `KEY=value` file.
    let named = if dir {
        format!("{}/", source.trim_end_matches('/'))
    } else {
        source.to_string()
    };

    let empty = BTreeMap::new();
    let old = prev.unwrap_or(&empty);
    if prev.is_some() && *old == map {
        return Ok(None);
    }
    let file_time = if dir { now_us() } else { mtime_us(path) };
    let del_time = if dir { mtime_us(path) } else { file_time };
    let time_of = |k: &str| times.get(k).copied().unwrap_or(file_time);
    let mut entries = Vec::new();
    for (k, v) in old {
        match map.get(k) {
            None => entries.push(entry(
                DataType::Kv,
                Operation::Delete,
                &named,
                k.clone(),
                Some(json_str(v)),
                None,
                del_time,
            )),
            Some(n) if n != v => entries.push(entry(
                DataType::Kv,
                Operation::Update,
                &named,
                k.clone(),
                Some(json_str(v)),
                Some(json_str(n)),
                time_of(k),
            )),
            Some(_) => {}
        }
    }
    for (k, n) in &map {
        if !old.contains_key(k) {
            entries.push(entry(
                DataType::Kv,
                Operation::Insert,
                &named,
                k.clone(),
                None,
                Some(json_str(n)),
                time_of(k),
            ));
        }
    }
    entries.sort_by_key(|e| e.guest_time_us);
    Ok(Some(Scan {
        entries,
        updates: vec![Update::Kv {
            source: source.to_string(),
            map: Some(map),
        }],
    }))
}

/// Writes `data` to `path` atomically: a temporary dotfile next to it, fsync, rename,
/// fsync of the directory. An existing file's permissions are kept.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.weft-dpa.tmp"));
    let res = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        if let Ok(meta) = fs::metadata(path) {
            f.set_permissions(fs::Permissions::from_mode(meta.permissions().mode()))?;
        }
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files_parse_and_edit_round_trip() {
        let text =
            "# comment\n\nexport A=1\nB = two words \nC=\"  spaced  \"\nD='q'\nnoequals\nA=3\n";
        let m = parse_env(text);
        assert_eq!(m["A"], "3");
        assert_eq!(m["B"], "two words");
        assert_eq!(m["C"], "  spaced  ");
        assert_eq!(m["D"], "q");
        assert_eq!(m.len(), 4);
        let mut edits = BTreeMap::new();
        edits.insert("A".to_string(), Some(" x ".to_string()));
        edits.insert("B".to_string(), None);
        edits.insert("E".to_string(), Some("\"quoted\"".to_string()));
        let out = env_edit(text, &edits).unwrap();
        assert!(out.starts_with("# comment\n"));
        let m = parse_env(&out);
        assert_eq!(m["A"], " x ");
        assert!(!m.contains_key("B"));
        assert_eq!(m["E"], "\"quoted\"");
        assert_eq!(m["C"], "  spaced  ");
        assert!(env_format("K", "a\nb").is_err());
    }

    #[test]
    fn json_scan_diffs_against_the_last_known_document() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("doc.json");
        let src = p.to_str().unwrap();
        assert!(
            scan_json(src, None).unwrap().is_none(),
            "no file, no state: nothing"
        );
        fs::write(&p, r#"{"a": 1, "b": {"c": 2}}"#).unwrap();
        let s = scan_json(src, None).unwrap().unwrap();
        assert_eq!(s.entries.len(), 1);
        assert_eq!(s.entries[0].key, "");
        assert_eq!(s.entries[0].op, Operation::Insert);
        let Update::Json {
            doc: Some(prev), ..
        } = &s.updates[0]
        else {
            panic!()
        };
        fs::write(&p, "{not json").unwrap();
        assert!(scan_json(src, Some(prev)).unwrap().is_none());
        fs::write(&p, r#"{"a": 1, "b": {"c": 3}}"#).unwrap();
        let s = scan_json(src, Some(prev)).unwrap().unwrap();
        assert_eq!(s.entries.len(), 1);
        assert_eq!(s.entries[0].key, "/b/c");
        assert_eq!(s.entries[0].old.as_deref(), Some("2"));
        assert_eq!(s.entries[0].new.as_deref(), Some("3"));
        fs::remove_file(&p).unwrap();
        let Update::Json {
            doc: Some(prev), ..
        } = &s.updates[0]
        else {
            panic!()
        };
        let s = scan_json(src, Some(prev)).unwrap().unwrap();
        assert_eq!(s.entries[0].op, Operation::Delete);
    }

    #[test]
    fn kv_dir_scan_reports_keys() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().to_str().unwrap();
        fs::write(dir.path().join("alpha"), "1").unwrap();
        fs::write(dir.path().join(".hidden"), "x").unwrap();
        let s = scan_kv(src, true, None).unwrap().unwrap();
        assert_eq!(s.entries.len(), 1);
        assert_eq!(s.entries[0].new.as_deref(), Some("\"1\""));
        let Update::Kv {
            map: Some(prev), ..
        } = &s.updates[0]
        else {
            panic!()
        };
        assert!(scan_kv(src, true, Some(prev)).unwrap().is_none());
        fs::write(dir.path().join("alpha"), "2").unwrap();
        fs::write(dir.path().join("beta"), "b").unwrap();
        let s = scan_kv(src, true, Some(prev)).unwrap().unwrap();
        let ops: Vec<_> = s.entries.iter().map(|e| (e.key.as_str(), e.op)).collect();
        assert!(ops.contains(&("alpha", Operation::Update)));
        assert!(ops.contains(&("beta", Operation::Insert)));
    }
}
