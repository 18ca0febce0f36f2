//! Creating and opening a store: `store.json` and the cold tier's marker, the store
//! lock that tells whether another process has the store open, and the clean-up of what a
//! crash left behind (temp files, parked chunks).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::access::AccessLog;
use super::crypto::{self, Keys};
use super::error::{Error, IoContext};
use super::fsutil::{self, write_durable, Publish, PARKED_SUFFIX, TMP_SUFFIX};
use super::{
    id, maintenance, ChunkId, ChunkStore, Inner, StoreConfig, Tier, ACCESS_LOG, COLD_MARKER,
    LOCK_FILE, STORE_FORMAT_VERSION, STORE_JSON,
};

/// `store.json`.
#[derive(Serialize, Deserialize, Debug)]
struct StoreMeta {
    format: String,
    version: u32,
    store_id: String,
    chunk_size: u32,
    zstd_level: i32,
    encrypted: bool,
    key_fingerprint: Option<String>,
    cold: Option<PathBuf>,
}

/// `<cold>/weft-cold-tier.json`: proves the cold directory is the right one (mounted).
#[derive(Serialize, Deserialize, Debug)]
struct ColdMarker {
    format: String,
    version: u32,
    store_id: String,
}

const STORE_FORMAT_NAME: &str = "weft-chunk-store";
const COLD_FORMAT_NAME: &str = "weft-cold-tier";

fn write_json<T: Serialize>(tmp_dir: &Path, path: &Path, value: &T) -> Result<(), Error> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::BadMetadata {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    bytes.push(b'\n');
    write_durable(tmp_dir, "meta", path, &[&bytes], Publish::Replace)?;
    Ok(())
}

fn dir_is_empty(dir: &Path) -> Result<bool, Error> {
    match fs::read_dir(dir) {
        Ok(mut rd) => Ok(rd.next().is_none()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).ctx("read directory", dir),
    }
}
impl ChunkStore {
    /// Create a new store at `root` (which must be absent or empty), with an
    /// optional cold tier directory (absent or empty; may be on another file
    /// system). An encrypted store needs `key_file`: a new key (32 random
    /// bytes, mode 0600) is written there; an existing file is never overwritten.
    pub fn create(
        root: &Path,
        cold: Option<&Path>,
        config: &StoreConfig,
        key_file: Option<&Path>,
    ) -> Result<ChunkStore, Error> {
        config.check()?;
        if !dir_is_empty(root)? {
            return Err(Error::AlreadyExists {
                path: root.to_path_buf(),
            });
        }
        let key_file = match (config.encrypted, key_file) {
            (true, Some(k)) => Some(k),
            (true, None) => {
                return Err(Error::InvalidConfig {
                    reason: "an encrypted store needs a key file path".into(),
                })
            }
            (false, Some(_)) => {
                return Err(Error::InvalidConfig {
                    reason: "a key file was given for a store that is not encrypted".into(),
                })
            }
            (false, None) => None,
        };
        if let Some(c) = cold {
            if !dir_is_empty(c)? {
                return Err(Error::AlreadyExists {
                    path: c.to_path_buf(),
                });
            }
        }
        let mut store_id = [0u8; 16];
        crypto::random_bytes(&mut store_id)?;
        let fingerprint = match key_file {
            Some(k) => {
                let master = crypto::create_key_file(k)?;
                Some(id::hex(&Keys::derive(&master, &store_id)?.fingerprint))
            }
            None => None,
        };
        fs::create_dir_all(root).ctx("create store directory", root)?;
        let root = fs::canonicalize(root).ctx("resolve store directory", root)?;
        let hot = Tier::new("hot", &root);
        for d in [&hot.chunks, &hot.tmp, &root.join("indexes")] {
            fs::create_dir_all(d).ctx("create directory", d)?;
        }
        fsutil::fsync_dir(&root)?;
        let cold = match cold {
            Some(c) => {
                fs::create_dir_all(c).ctx("create cold tier directory", c)?;
                let c = fs::canonicalize(c).ctx("resolve cold tier directory", c)?;
                let t = Tier::new("cold", &c);
                for d in [&t.chunks, &t.tmp] {
                    fs::create_dir_all(d).ctx("create directory", d)?;
                }
                write_json(
                    &t.tmp,
                    &c.join(COLD_MARKER),
                    &ColdMarker {
                        format: COLD_FORMAT_NAME.into(),
                        version: STORE_FORMAT_VERSION,
                        store_id: id::hex(&store_id),
                    },
                )?;
                Some(c)
            }
            None => None,
        };
        let meta = StoreMeta {
            format: STORE_FORMAT_NAME.into(),
            version: STORE_FORMAT_VERSION,
            store_id: id::hex(&store_id),
            chunk_size: config.chunk_size,
            zstd_level: config.zstd_level,
            encrypted: config.encrypted,
            key_fingerprint: fingerprint,
            cold,
        };
        // store.json last: its presence means the store is complete.
        write_json(&hot.tmp, &root.join(STORE_JSON), &meta)?;
        ChunkStore::open(&root, key_file)
    }

    /// Open an existing store. An encrypted store needs its key file
    /// ([`Error::KeyRequired`] without one, [`Error::WrongKey`] with another).
    ///
    /// When no other process has the store open, leftovers of a crash (temp
    /// files, chunks parked by an interrupted gc/tier run) are cleaned up.
    pub fn open(root: &Path, key_file: Option<&Path>) -> Result<ChunkStore, Error> {
        let meta_path = root.join(STORE_JSON);
        let text = match fs::read(&meta_path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotAStore {
                    path: root.to_path_buf(),
                })
            }
            Err(e) => return Err(e).ctx("read store metadata", &meta_path),
        };
        let bad = |reason: String| Error::BadMetadata {
            path: meta_path.clone(),
            reason,
        };
        let meta: StoreMeta = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if meta.format != STORE_FORMAT_NAME {
            return Err(bad(format!(
                "format is {:?}, not {STORE_FORMAT_NAME:?}",
                meta.format
            )));
        }
        if meta.version != STORE_FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                path: meta_path,
                what: "store",
                version: meta.version,
                supported: STORE_FORMAT_VERSION,
            });
        }
        StoreConfig {
            chunk_size: meta.chunk_size,
            encrypted: meta.encrypted,
            zstd_level: meta.zstd_level,
        }
        .check()
        .map_err(|e| bad(e.to_string()))?;
        let store_id: [u8; 16] =
            id::unhex(&meta.store_id).ok_or_else(|| bad("store_id is not 32 hex digits".into()))?;
        let root = fs::canonicalize(root).ctx("resolve store directory", root)?;
        let keys = match (meta.encrypted, key_file) {
            (true, None) => return Err(Error::KeyRequired { root }),
            (false, Some(_)) => return Err(Error::KeyNotExpected { root }),
            (false, None) => None,
            (true, Some(k)) => {
                let master = crypto::read_key_file(k)?;
                let keys = Keys::derive(&master, &store_id)?;
                let want = meta
                    .key_fingerprint
                    .as_deref()
                    .and_then(id::unhex::<16>)
                    .ok_or_else(|| bad("key_fingerprint missing or malformed".into()))?;
                if want != keys.fingerprint {
                    return Err(Error::WrongKey {
                        root,
                        key_file: k.to_path_buf(),
                    });
                }
                Some(keys)
            }
        };
        let hot = Tier::new("hot", &root);
        let (cold, cold_problem) = match &meta.cold {
            None => (None, None),
            Some(c) => match check_cold_marker(c, &meta.store_id) {
                Ok(()) => (Some(Tier::new("cold", c)), None),
                Err(why) => (None, Some(format!("{}: {why}", c.display()))),
            },
        };
        let lock = take_store_lock(&root)?;
        let inner = Inner {
            indexes: root.join("indexes"),
            access: AccessLog::new(root.join(ACCESS_LOG)),
            root,
            hot,
            cold,
            cold_problem,
            chunk_size: meta.chunk_size,
            zstd_level: meta.zstd_level,
            keys,
            writers: Default::default(),
            next_writer: Default::default(),
            _lock: lock.0,
        };
        let store = ChunkStore {
            inner: Arc::new(inner),
        };
        if lock.1 {
            store.recover_leftovers(None)?;
        }
        store.recover_batches()?;
        Ok(store)
    }

    /// Remove temp files and restore parked chunks. With `older_than`, only
    /// temp files last modified before it are removed (other writers may be
    /// active); without it, all are (nobody else has the store open).
    /// Returns the number of temp files removed.
    pub(crate) fn recover_leftovers(&self, older_than: Option<SystemTime>) -> Result<u64, Error> {
        let inner = &self.inner;
        let mut removed = 0;
        for tier in [Some(&inner.hot), inner.cold.as_ref()]
            .into_iter()
            .flatten()
        {
            // Temp files sit in `tmp/` and in its per-prefix directories `tmp/ab/`.
            let mut entries = Vec::new();
            for e in fsutil::read_dir_or_empty(&tier.tmp)? {
                let shard = e
                    .file_name()
                    .to_str()
                    .is_some_and(|n| n.len() == 2 && n.bytes().all(|b| b.is_ascii_hexdigit()))
                    && e.file_type().is_ok_and(|t| t.is_dir());
                if shard {
                    entries.extend(fsutil::read_dir_or_empty(&e.path())?);
                } else {
                    entries.push(e);
                }
            }
            for e in entries {
                let path = e.path();
                let Some(name) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if let Some(hex) = name.strip_suffix(PARKED_SUFFIX) {
                    if let Ok(id) = hex.parse::<ChunkId>() {
                        maintenance::unpark(self, tier, &id)?;
                    }
                } else if name.ends_with(TMP_SUFFIX) {
                    let old = match older_than {
                        None => true,
                        Some(t) => e
                            .metadata()
                            .and_then(|m| m.modified())
                            .map(|m| m < t)
                            .unwrap_or(false),
                    };
                    if old {
                        match fs::remove_file(&path) {
                            Ok(()) => removed += 1,
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => return Err(e).ctx("remove temp file", &path),
                        }
                    }
                }
            }
        }
        Ok(removed)
    }
}

fn check_cold_marker(cold: &Path, store_id: &str) -> Result<(), String> {
    let path = cold.join(COLD_MARKER);
    let text = fs::read(&path).map_err(|e| {
        format!(
            "cannot read {} ({e}): is the cold file system mounted?",
            path.display()
        )
    })?;
    let m: ColdMarker =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if m.format != COLD_FORMAT_NAME || m.version != STORE_FORMAT_VERSION {
        return Err(format!(
            "{}: unknown format {:?} v{}",
            path.display(),
            m.format,
            m.version
        ));
    }
    if m.store_id != store_id {
        return Err(format!(
            "{} belongs to another store ({})",
            path.display(),
            m.store_id
        ));
    }
    Ok(())
}

/// Take the store lock: exclusive if nobody else has the store open (then
/// `.1` is true and leftovers may be cleaned), downgraded to shared.
fn take_store_lock(root: &Path) -> Result<(Flock<File>, bool), Error> {
    let path = root.join(LOCK_FILE);
    let open = || {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .ctx("open store lock", &path)
    };
    let lock_err = |e: nix::errno::Errno| Error::Io {
        op: "lock store",
        path: path.clone(),
        source: io::Error::from(e),
    };
    match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
        Ok(l) => {
            l.relock(FlockArg::LockShared).map_err(lock_err)?;
            Ok((l, true))
        }
        Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
            let l = Flock::lock(f, FlockArg::LockShared).map_err(|(_, e)| lock_err(e))?;
            Ok((l, false))
        }
        Err((_, e)) => Err(lock_err(e)),
    }
}
