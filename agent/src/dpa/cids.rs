//! Guest context ids (CIDs) for vsock: one per VM, unique among the VMs of this
//! weftd, kept in a small JSON file so a VM keeps its CID across weftd restarts
//! (kernel vhost-vsock tells VMs apart by CID alone).

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Why a CID could not be handed out or recorded.
#[derive(Debug, thiserror::Error)]
pub enum CidError {
    /// Every CID of the configured range is taken.
    #[error("no free vsock CID in {first}..={last}; widen [dpa] first_cid/last_cid")]
    Exhausted {
        /// First CID of the range.
        first: u32,
        /// Last CID of the range.
        last: u32,
    },
    /// The file could not be read or written.
    #[error("vsock CID file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse.
    #[error("vsock CID file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
}

/// The VM → CID table, persisted on every change.
#[derive(Debug)]
pub struct CidTable {
    path: PathBuf,
    range: RangeInclusive<u32>,
    map: Mutex<BTreeMap<String, u32>>,
}

impl CidTable {
    /// Opens (or starts) the table in `path`; new CIDs come from `range` (which
    /// callers keep within 3..u32::MAX).
    pub fn open(path: PathBuf, range: RangeInclusive<u32>) -> Result<CidTable, CidError> {
        let map = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| CidError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(CidError::Io { path, source }),
        };
        Ok(CidTable {
            path,
            range,
            map: Mutex::new(map),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u32>> {
        // Every change is a single insert or remove followed by a save.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The CID of `vm`, handing out the lowest free one of the range the first time.
    pub fn assign(&self, vm: &str) -> Result<u32, CidError> {
        let mut map = self.lock();
        if let Some(cid) = map.get(vm) {
            return Ok(*cid);
        }
        let used: std::collections::HashSet<u32> = map.values().copied().collect();
        let cid = self
            .range
            .clone()
            .find(|c| !used.contains(c))
            .ok_or(CidError::Exhausted {
                first: *self.range.start(),
                last: *self.range.end(),
            })?;
        map.insert(vm.to_string(), cid);
        if let Err(e) = save(&self.path, &map) {
            map.remove(vm);
            return Err(e);
        }
        Ok(cid)
    }

    /// The CID `vm` has, if any.
    pub fn get(&self, vm: &str) -> Option<u32> {
        self.lock().get(vm).copied()
    }

    /// The VM that holds `cid`.
    pub fn vm_of(&self, cid: u32) -> Option<String> {
        self.lock()
            .iter()
            .find(|(_, c)| **c == cid)
            .map(|(vm, _)| vm.clone())
    }

    /// Gives `vm`'s CID back (the VM was deleted).
    pub fn remove(&self, vm: &str) -> Result<(), CidError> {
        let mut map = self.lock();
        if map.remove(vm).is_some() {
            save(&self.path, &map)?;
        }
        Ok(())
    }
}

/// Writes the table to a temporary file, syncs it and renames it into place.
fn save(path: &Path, map: &BTreeMap<String, u32>) -> Result<(), CidError> {
    let io = |source| CidError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(map).map_err(|e| io(std::io::Error::other(e)))?;
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cids_are_unique_stable_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dpa/cids.json");
        let t = CidTable::open(path.clone(), 3..=5).unwrap();
        assert_eq!(t.assign("a").unwrap(), 3);
        assert_eq!(t.assign("b").unwrap(), 4);
        assert_eq!(t.assign("a").unwrap(), 3, "the same VM keeps its CID");
        assert_eq!(t.vm_of(4).as_deref(), Some("b"));
        t.remove("a").unwrap();
        assert_eq!(t.assign("c").unwrap(), 3, "a freed CID is reused");
        assert_eq!(t.assign("d").unwrap(), 5);
        assert!(matches!(t.assign("e"), Err(CidError::Exhausted { .. })));
        drop(t);
        let t = CidTable::open(path.clone(), 3..=5).unwrap();
        assert_eq!(t.get("b"), Some(4));
        assert_eq!(t.get("c"), Some(3));
        assert_eq!(t.get("a"), None);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            CidTable::open(path, 3..=5),
            Err(CidError::Corrupt { .. })
        ));
    }
}
