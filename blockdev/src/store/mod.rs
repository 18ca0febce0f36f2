//! The content-addressed chunk store: deduplication, zstd compression,
//! optional AES-256-GCM encryption, hot/cold tiers, verify and GC.
//!
//! A disk backup is cut into fixed-size chunks aligned to the disk; each chunk
//! is stored once under its [`ChunkId`]; a snapshot is a [`BlockMap`] written
//! as an *index*. The on-disk format is documented in `docs/store-format.md`.
//!
//! The API is synchronous (`std::fs`); async callers wrap calls in
//! `spawn_blocking`. [`ChunkStore`] is cheap to clone and `Send + Sync`: many
//! threads may `put`/`get` at once, and two puts of the same chunk race safely.
//!
//! # Caller contract
//! Write an index only after every chunk it references was returned by a
//! successful [`ChunkStore::put`] (puts are durable when they return), and keep
//! every backup shorter than the gc grace period (default 24 h): gc assumes a
//! chunk that a running backup relies on was put or touched less than `grace` ago.

mod access;
mod batch;
mod blockmap;
mod chunk;
mod crypto;
mod error;
mod fsutil;
mod id;
mod maintenance;

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

pub use batch::PutBatch;
pub use blockmap::{BlockMap, Slot};
pub use chunk::Check;
pub use error::Error;
pub use fsutil::start_writeback;
pub use id::{ChunkId, ParseChunkIdError};
pub use maintenance::{
    BadChunk, BadIndex, GcReport, MissingChunk, StoreStats, TierPolicy, TierReport, VerifyReport,
};

use access::{AccessLog, Kind};
use crypto::Keys;
use error::IoContext;
use fsutil::{
    ensure_dir, ensure_dir_with, write_durable, write_published, Durability, Publish,
    PARKED_SUFFIX, TMP_SUFFIX,
};

/// Store format version written to `store.json`.
pub const STORE_FORMAT_VERSION: u32 = 2;
/// Default chunk size: 128 KiB (weftd's default too; see docs/benchmarks.md).
pub const DEFAULT_CHUNK_SIZE: u32 = 128 << 10;
/// Smallest chunk size: 64 KiB.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size: 64 MiB.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Default gc grace period: 24 h (a backup must finish within it).
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(24 * 3600);

const STORE_JSON: &str = "store.json";
const COLD_MARKER: &str = "weft-cold-tier.json";
const LOCK_FILE: &str = "store.lock";
const MAINTENANCE_LOCK: &str = "maintenance.lock";
const ACCESS_LOG: &str = "access.log";
const INDEX_SUFFIX: &str = ".idx";
/// Attempts of `put` when concurrent gc/tier runs keep moving the chunk.
const PUT_ATTEMPTS: usize = 8;
/// How long `get`/`write_index` wait for a parked chunk to come back.
const PARKED_WAITS: usize = 100;
const PARKED_WAIT: Duration = Duration::from_millis(5);

/// How a store is created. Fixed for the life of the store (kept in `store.json`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Chunk size in bytes: a power of two, 64 KiB ..= 64 MiB.
    pub chunk_size: u32,
    /// Encrypt chunks with AES-256-GCM and key chunk ids with HMAC.
    pub encrypted: bool,
    /// zstd level for new chunks.
    pub zstd_level: i32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            chunk_size: DEFAULT_CHUNK_SIZE,
            encrypted: false,
            zstd_level: 3,
        }
    }
}

impl StoreConfig {
    /// The default configuration (plain, zstd 3) with chunks of `chunk_size` bytes.
    pub fn with_chunk_size(chunk_size: u32) -> StoreConfig {
        StoreConfig {
            chunk_size,
            ..StoreConfig::default()
        }
    }

    fn check(&self) -> Result<(), Error> {
        let bad = |reason: String| Err(Error::InvalidConfig { reason });
        if !self.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
        {
            return bad(format!(
                "chunk size {} must be a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}",
                self.chunk_size
            ));
        }
        let range = zstd::compression_level_range();
        if !range.contains(&self.zstd_level) {
            return bad(format!(
                "zstd level {} outside {}..={}",
                self.zstd_level,
                range.start(),
                range.end()
            ));
        }
        Ok(())
    }
}

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

/// What [`ChunkStore::put`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PutOutcome {
    /// The chunk's id.
    pub id: ChunkId,
    /// True when this call stored the chunk; false when it existed (in either tier).
    pub new: bool,
    /// Bytes this call added to the store (the chunk file size; 0 when `new` is false).
    pub stored_bytes: u64,
}

/// One tier: `<base>/chunks/ab/<hex>`, `<base>/tmp/` and `<base>/quarantine/`.
#[derive(Clone, Debug)]
pub(crate) struct Tier {
    pub name: &'static str,
    pub base: PathBuf,
    pub chunks: PathBuf,
    pub tmp: PathBuf,
    /// Bad chunk files moved aside by `verify` (or by `put`'s cheap check).
    pub quarantine: PathBuf,
    /// Set once the tier's file system refused an `O_DIRECT` open (tmpfs): direct
    /// reads of this tier are buffered from then on.
    pub direct_refused: Arc<std::sync::atomic::AtomicBool>,
}

impl Tier {
    fn new(name: &'static str, base: &Path) -> Tier {
        Tier {
            name,
            base: base.to_path_buf(),
            chunks: base.join("chunks"),
            tmp: base.join("tmp"),
            quarantine: base.join("quarantine"),
            direct_refused: Arc::default(),
        }
    }

    /// The first quarantine name of a chunk (later ones are `<hex>.1`, `<hex>.2` …).
    pub fn quarantine_path(&self, id: &ChunkId) -> PathBuf {
        self.quarantine.join(id.to_hex())
    }

    pub fn chunk_dir(&self, id: &ChunkId) -> PathBuf {
        let b = id.as_bytes();
        self.chunks.join(id::hex(&b[..1]))
    }

    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        self.chunk_dir(id).join(id.to_hex())
    }

    pub fn parked_path(&self, id: &ChunkId) -> PathBuf {
        self.tmp.join(format!("{}{PARKED_SUFFIX}", id.to_hex()))
    }

    /// Where a new chunk's temp file is written: `tmp/ab/`, one directory per chunk
    /// directory. Creating and unlinking temp files locks their directory, so with
    /// one `tmp/` concurrent puts queue on its lock (measured: a fifth of a full
    /// backup's CPU spent spinning on it with 8 puts in flight).
    pub fn chunk_tmp_dir(&self, id: &ChunkId) -> PathBuf {
        let b = id.as_bytes();
        self.tmp.join(id::hex(&b[..1]))
    }
}

/// The chunk store. Clone it freely (it is an `Arc`).
#[derive(Clone)]
pub struct ChunkStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    root: PathBuf,
    hot: Tier,
    cold: Option<Tier>,
    /// Why the configured cold tier is unusable (not mounted, wrong marker).
    cold_problem: Option<String>,
    chunk_size: u32,
    zstd_level: i32,
    keys: Option<Keys>,
    indexes: PathBuf,
    access: AccessLog,
    /// Writers whose chunks are not in an index yet, by token: when each began.
    writers: std::sync::Mutex<std::collections::BTreeMap<u64, SystemTime>>,
    /// The next writer token.
    next_writer: std::sync::atomic::AtomicU64,
    /// Shared lock held while the store is open (see `open`).
    _lock: Flock<File>,
}

/// A writer registered with [`ChunkStore::begin_write`]; gc keeps what it put until
/// it is dropped.
pub struct WriteGuard {
    inner: Arc<Inner>,
    token: u64,
}

impl std::fmt::Debug for WriteGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteGuard")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        self.inner
            .writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.token);
    }
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore")
            .field("root", &self.inner.root)
            .field("cold", &self.inner.cold.as_ref().map(|t| &t.chunks))
            .field("chunk_size", &self.inner.chunk_size)
            .field("encrypted", &self.inner.keys.is_some())
            .finish_non_exhaustive()
    }
}

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

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The chunk size (bytes per slot).
    pub fn chunk_size(&self) -> u32 {
        self.inner.chunk_size
    }

    /// Whether chunks are encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.inner.keys.is_some()
    }

    /// Whether a usable cold tier is configured.
    pub fn has_cold_tier(&self) -> bool {
        self.inner.cold.is_some()
    }

    /// The id `data` is stored under: SHA-256 of the plaintext in a plain
    /// store, HMAC-SHA256 with the store's id key in an encrypted one.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        chunk::chunk_id(self.inner.keys.as_ref(), data)
    }

    /// Store one chunk (at most `chunk_size` bytes; the last chunk of a disk
    /// may be shorter). Durable when it returns. A chunk already present in
    /// either tier is only touched (its mtime set to now, which protects it
    /// from a concurrent gc) and `new` is false.
    ///
    /// Before deduplicating against an existing file, `put` checks its header
    /// and length (one 16-byte read); a file that fails is quarantined like
    /// `verify` does and the chunk is stored again. A chunk that `verify`
    /// quarantined is no longer at its path, so `put` stores it again too
    /// (`new` is true), which heals every index that references it.
    pub fn put(&self, data: &[u8]) -> Result<PutOutcome, Error> {
        self.put_as(data, Durability::Now)
    }

    /// `put` with a choice of durability (see [`PutBatch`]).
    pub(crate) fn put_as(&self, data: &[u8], sync: Durability) -> Result<PutOutcome, Error> {
        if data.len() > self.inner.chunk_size as usize {
            return Err(Error::ChunkTooLarge {
                len: data.len(),
                max: self.inner.chunk_size,
            });
        }
        let id = self.chunk_id(data);
        self.put_with_id(id, data, sync)
    }

    fn put_with_id(&self, id: ChunkId, data: &[u8], sync: Durability) -> Result<PutOutcome, Error> {
        let inner = &self.inner;
        let hot_path = inner.hot.chunk_path(&id);
        for _ in 0..PUT_ATTEMPTS {
            let mut existing = false;
            for tier in inner.tiers() {
                match self.touch_checked(tier, &id)? {
                    Existing::Absent => {}
                    Existing::Good => {
                        existing = true;
                        break;
                    }
                    Existing::Implausible => {
                        maintenance::quarantine(self, tier, &id)?;
                    }
                }
            }
            if existing {
                inner.access.note(&id, Kind::Put);
                return Ok(PutOutcome {
                    id,
                    new: false,
                    stored_bytes: 0,
                });
            }
            let dir = inner.hot.chunk_dir(&id);
            ensure_dir_with(&inner.hot.chunks, &dir, sync)?;
            let tmp = inner.hot.chunk_tmp_dir(&id);
            ensure_dir_with(&inner.hot.tmp, &tmp, sync)?;
            let (created, len) =
                chunk::encode(&id, data, inner.zstd_level, inner.keys.as_ref(), |parts| {
                    write_published(&tmp, "chunk", &hot_path, parts, Publish::NoReplace, sync)
                })?;
            if created {
                inner.access.note(&id, Kind::Put);
                return Ok(PutOutcome {
                    id,
                    new: true,
                    stored_bytes: len,
                });
            }
            // Another writer published it first: loop to touch its copy.
        }
        Err(Error::Contended { id })
    }

    /// Read a chunk from either tier, decrypt, decompress and re-verify its id.
    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>, Error> {
        self.get_checked(id, Check::Id)
    }

    /// [`get`](Self::get) with a choice of content check: `Check::Checksum` trusts the
    /// chunk's CRC-32 (plain stores) or GCM tag (encrypted ones) instead of recomputing
    /// the id, for readers that serve data and leave forgery detection to `verify`.
    pub fn get_checked(&self, id: &ChunkId, check: Check) -> Result<Vec<u8>, Error> {
        self.get_with(id, check, false)
    }

    /// [`get_checked`](Self::get_checked) reading the chunk file with `O_DIRECT` where
    /// the tier's file system allows it: the disk writes straight into the returned
    /// buffer, the page cache is neither filled nor copied from. For readers that keep
    /// what they read themselves (weft-blk's chunk cache and assembly), where a second
    /// copy in the page cache only costs memory and CPU: serving a disk sequentially,
    /// the page cache's allocation and copy were a fifth of the chunk reads' CPU time.
    pub fn get_direct(&self, id: &ChunkId, check: Check) -> Result<Vec<u8>, Error> {
        self.get_with(id, check, true)
    }

    fn get_with(&self, id: &ChunkId, check: Check, direct: bool) -> Result<Vec<u8>, Error> {
        let inner = &self.inner;
        // Hot, cold, then hot again: a promotion (cold → hot) creates the hot
        // copy before removing the cold one.
        let tiers = [Some(&inner.hot), inner.cold.as_ref(), Some(&inner.hot)];
        for attempt in 0..=PARKED_WAITS {
            for tier in tiers.into_iter().flatten() {
                let read = if direct {
                    self.read_chunk_direct(tier, id, check)?
                } else {
                    self.read_chunk(tier, id, check)?
                };
                if let Some(data) = read {
                    let kind = if tier.name == "cold" {
                        Kind::ColdRead
                    } else {
                        Kind::HotRead
                    };
                    inner.access.note(id, kind);
                    return Ok(data);
                }
            }
            if attempt == PARKED_WAITS || !self.is_parked(id) {
                break;
            }
            // A gc or tier run parked it for a moment; it may come back.
            std::thread::sleep(PARKED_WAIT);
        }
        Err(self.not_found(id))
    }

    /// The error for a chunk in neither tier: `Corrupt` naming its quarantine
    /// file when it was quarantined, `ColdTier` when the cold tier is
    /// unusable, else `Missing`.
    fn not_found(&self, id: &ChunkId) -> Error {
        let inner = &self.inner;
        if let Some(path) = self.quarantined(id) {
            return Error::Corrupt {
                id: *id,
                path,
                reason: "quarantined: the chunk file failed its checks and was moved aside; \
                         a backup of a disk holding this data stores it again"
                    .into(),
            };
        }
        match &inner.cold_problem {
            Some(why) => Error::ColdTier {
                root: inner.root.clone(),
                reason: format!(
                    "chunk {id} is not in the hot tier and the cold tier is unusable: {why}"
                ),
            },
            None => Error::Missing {
                id: *id,
                root: inner.root.clone(),
            },
        }
    }

    /// The first quarantine file of a chunk, if one was quarantined in any tier.
    pub fn quarantined(&self, id: &ChunkId) -> Option<PathBuf> {
        self.inner
            .tiers()
            .map(|t| t.quarantine_path(id))
            .find(|p| p.exists())
    }

    /// Open an existing chunk file, check its header and length against the
    /// file size, and touch it (see [`touch_verified`]).
    fn touch_checked(&self, tier: &Tier, id: &ChunkId) -> Result<Existing, Error> {
        let path = tier.chunk_path(id);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Absent),
            Err(e) => return Err(e).ctx("open chunk", &path),
        };
        let len = f.metadata().ctx("stat chunk", &path)?.len();
        let mut hb = [0u8; chunk::HEADER_LEN];
        let n = read_up_to(&mut f, &mut hb).ctx("read chunk", &path)?;
        if chunk::check_header(&hb[..n], len, self.inner.chunk_size, self.is_encrypted()).is_err() {
            return Ok(Existing::Implausible);
        }
        Ok(if touch_file_verified(&f, &path)? {
            Existing::Good
        } else {
            Existing::Absent
        })
    }

    /// Whether a chunk exists in either tier (no content check).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.locate(id).is_some()
    }

    /// Whether a gc or tier run has the chunk parked right now.
    fn is_parked(&self, id: &ChunkId) -> bool {
        self.inner.tiers().any(|t| t.parked_path(id).exists())
    }

    /// Like `contains`, but waits briefly while the chunk is parked (a sweep
    /// that finds it freshly touched links it back).
    fn contains_settled(&self, id: &ChunkId) -> bool {
        for _ in 0..PARKED_WAITS {
            if self.contains(id) {
                return true;
            }
            if !self.is_parked(id) {
                return false;
            }
            std::thread::sleep(PARKED_WAIT);
        }
        self.contains(id)
    }

    pub(crate) fn locate(&self, id: &ChunkId) -> Option<(&Tier, PathBuf)> {
        let inner = &self.inner;
        [Some(&inner.hot), inner.cold.as_ref(), Some(&inner.hot)]
            .into_iter()
            .flatten()
            .map(|t| (t, t.chunk_path(id)))
            .find(|(_, p)| p.exists())
    }

    /// Read and check one chunk file; `Ok(None)` when absent from `tier`.
    pub(crate) fn read_chunk(
        &self,
        tier: &Tier,
        id: &ChunkId,
        check: Check,
    ) -> Result<Option<Vec<u8>>, Error> {
        self.read_chunk_file(&tier.chunk_path(id), id, check)
    }

    /// [`read_chunk`](Self::read_chunk) with `O_DIRECT` (see [`get_direct`](Self::get_direct)),
    /// buffered where the file system refuses it.
    fn read_chunk_direct(
        &self,
        tier: &Tier,
        id: &ChunkId,
        check: Check,
    ) -> Result<Option<Vec<u8>>, Error> {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        use std::sync::atomic::Ordering;
        if tier.direct_refused.load(Ordering::Relaxed) {
            return self.read_chunk(tier, id, check);
        }
        let path = tier.chunk_path(id);
        let open = |flags| {
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(flags)
                .open(&path)
        };
        let direct = nix::libc::O_DIRECT;
        let f = match open(direct | nix::libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => open(direct),
            r => r,
        };
        let f = match f {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                tier.direct_refused.store(true, Ordering::Relaxed);
                return self.read_chunk(tier, id, check);
            }
            Err(e) => return Err(e).ctx("open chunk", &path),
        };
        let file_len = f.metadata().ctx("stat chunk", &path)?.len();
        let max = chunk::max_file_len(self.inner.chunk_size);
        if file_len > max {
            return Err(Error::Corrupt {
                id: *id,
                path,
                reason: format!(
                    "file is {file_len} bytes, more than a chunk file of this store can be ({max})"
                ),
            });
        }
        // One read of the whole file, rounded up to the alignment, into a buffer
        // whose read position is aligned; it comes back short at the end of the file.
        const ALIGN: usize = 4096;
        let want = (file_len as usize).div_ceil(ALIGN) * ALIGN + ALIGN;
        let mut buf = vec![0u8; want + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        let n = match f.read_at(&mut buf[start..start + want], 0) {
            Ok(n) => n,
            // A file system that opens with O_DIRECT but refuses this read.
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                tier.direct_refused.store(true, Ordering::Relaxed);
                return self.read_chunk(tier, id, check);
            }
            Err(e) => return Err(e).ctx("read chunk", &path),
        };
        if n as u64 != file_len {
            // Replaced or truncated meanwhile: read it the ordinary way.
            return self.read_chunk(tier, id, check);
        }
        buf.truncate(start + n);
        chunk::decode_file_at(
            buf,
            start,
            id,
            self.inner.chunk_size,
            self.inner.keys.as_ref(),
            check,
        )
        .map(Some)
        .map_err(|reason| Error::Corrupt {
            id: *id,
            path,
            reason,
        })
    }

    /// Read the chunk file at `path` (a chunk path, or a quarantined file) as
    /// chunk `id` with every check of `get`; `Ok(None)` when absent.
    pub(crate) fn read_chunk_file(
        &self,
        path: &Path,
        id: &ChunkId,
        check: Check,
    ) -> Result<Option<Vec<u8>>, Error> {
        let f = match open_noatime(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx("open chunk", path),
        };
        let corrupt = |reason: String| Error::Corrupt {
            id: *id,
            path: path.to_path_buf(),
            reason,
        };
        let file_len = f.metadata().ctx("stat chunk", path)?.len();
        let max = chunk::max_file_len(self.inner.chunk_size);
        if file_len > max {
            return Err(corrupt(format!(
                "file is {file_len} bytes, more than a chunk file of this store can be ({max})"
            )));
        }
        // Bounded even if the file grows meanwhile; decode_file checks the length.
        let mut buf = Vec::with_capacity(file_len as usize);
        f.take(max + 1)
            .read_to_end(&mut buf)
            .ctx("read chunk", path)?;
        chunk::decode_file(
            buf,
            id,
            self.inner.chunk_size,
            self.inner.keys.as_ref(),
            check,
        )
        .map(Some)
        .map_err(corrupt)
    }

    /// Write a block map as index `name` (e.g. `env-web/disk-vda/0001`),
    /// atomically replacing an index of the same name. Every referenced chunk
    /// must already be in the store ([`Error::Missing`] otherwise): indexes
    /// are written only after all their chunks are durable.
    pub fn write_index(&self, name: &str, map: &BlockMap) -> Result<(), Error> {
        let path = self.index_path(name)?;
        map.check()
            .map_err(|reason| Error::BadBlockMap { reason })?;
        if map.chunk_size != self.inner.chunk_size {
            return Err(Error::BadBlockMap {
                reason: format!(
                    "chunk size {} differs from the store's {}",
                    map.chunk_size, self.inner.chunk_size
                ),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for id in map.data_ids() {
            if seen.insert(*id) && !self.contains_settled(id) {
                return Err(self.not_found(id));
            }
        }
        let bytes = map.encode(self.inner.keys.as_ref().map(|k| &k.index));
        let dir = path.parent().unwrap_or(&self.inner.indexes).to_path_buf();
        // A concurrent remove_index may prune the (empty) directory between
        // ensure_dir and the write: retry a few times.
        let mut last = None;
        for _ in 0..4 {
            ensure_dir(&self.inner.indexes, &dir)?;
            match write_durable(
                &self.inner.hot.tmp,
                "index",
                &path,
                &[&bytes],
                Publish::Replace,
            ) {
                Ok(_) => return Ok(()),
                Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    last = Some(source)
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Io {
            op: "write index",
            path,
            source: last.unwrap_or_else(|| io::Error::other("directory kept vanishing")),
        })
    }

    /// Read and verify index `name`.
    pub fn read_index(&self, name: &str) -> Result<BlockMap, Error> {
        let path = self.index_path(name)?;
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::IndexNotFound {
                    name: name.to_string(),
                    root: self.inner.root.clone(),
                })
            }
            Err(e) => return Err(e).ctx("read index", &path),
        };
        let corrupt = |reason: String| Error::CorruptIndex {
            name: name.to_string(),
            path: path.clone(),
            reason,
        };
        let map = BlockMap::decode(&bytes, self.inner.keys.as_ref().map(|k| &k.index))
            .map_err(corrupt)?;
        if map.chunk_size != self.inner.chunk_size {
            return Err(corrupt(format!(
                "chunk size {} differs from the store's {}",
                map.chunk_size, self.inner.chunk_size
            )));
        }
        Ok(map)
    }

    /// All index names, sorted.
    pub fn list_indexes(&self) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        let mut stack = vec![(self.inner.indexes.clone(), String::new())];
        while let Some((dir, prefix)) = stack.pop() {
            for e in fsutil::read_dir_or_empty(&dir)? {
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with('.') {
                    continue;
                }
                let ft = e.file_type().ctx("stat", &e.path())?;
                if ft.is_dir() {
                    stack.push((e.path(), format!("{prefix}{name}/")));
                } else if let Some(stem) = name.strip_suffix(INDEX_SUFFIX) {
                    out.push(format!("{prefix}{stem}"));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Remove index `name` (its chunks go at the next gc). Empty parent
    /// directories are pruned.
    pub fn remove_index(&self, name: &str) -> Result<(), Error> {
        let path = self.index_path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::IndexNotFound {
                    name: name.to_string(),
                    root: self.inner.root.clone(),
                })
            }
            Err(e) => return Err(e).ctx("remove index", &path),
        }
        let mut dir = path.parent().map(Path::to_path_buf);
        if let Some(d) = &dir {
            fsutil::fsync_dir(d)?;
        }
        while let Some(d) = dir {
            if d == self.inner.indexes || fs::remove_dir(&d).is_err() {
                break;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        Ok(())
    }

    fn index_path(&self, name: &str) -> Result<PathBuf, Error> {
        validate_index_name(name)?;
        Ok(self.inner.indexes.join(format!("{name}{INDEX_SUFFIX}")))
    }
}

/// The keys of an encrypted store, derived from its master key (the key file's
/// 32 bytes) and its 16-byte store id, for the file parsers below.
pub struct StoreKeys(Keys);

impl std::fmt::Debug for StoreKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreKeys").finish_non_exhaustive()
    }
}

impl StoreKeys {
    /// Derive the keys as `open` does (HKDF-SHA256, see `docs/store-format.md`).
    pub fn derive(master: &[u8; 32], store_id: &[u8; 16]) -> Result<StoreKeys, Error> {
        Keys::derive(master, store_id).map(StoreKeys)
    }
}

/// Decode and check an index file's bytes with exactly the checks of
/// [`ChunkStore::read_index`] (`keys` for an encrypted store's HMAC). The error
/// is the reason `Error::CorruptIndex` would carry. For tools and fuzzing:
/// index files may be damaged or planted on disk.
pub fn parse_index_file(bytes: &[u8], keys: Option<&StoreKeys>) -> Result<BlockMap, String> {
    BlockMap::decode(bytes, keys.map(|k| &k.0.index))
}

/// Encode a block map as an index file, as [`ChunkStore::write_index`] does.
pub fn encode_index_file(map: &BlockMap, keys: Option<&StoreKeys>) -> Vec<u8> {
    map.encode(keys.map(|k| &k.0.index))
}

/// Decode and check the bytes of a chunk file stored under `id` in a store of
/// `chunk_size`, with exactly the checks of [`ChunkStore::get`] (header,
/// length, authentication, decompression, id). The error is the reason
/// `Error::Corrupt` would carry. For tools and fuzzing.
pub fn parse_chunk_file(
    bytes: &[u8],
    id: &ChunkId,
    chunk_size: u32,
    keys: Option<&StoreKeys>,
) -> Result<Vec<u8>, String> {
    if bytes.len() as u64 > chunk::max_file_len(chunk_size) {
        return Err(format!(
            "file is {} bytes, more than a chunk file of this store can be",
            bytes.len()
        ));
    }
    chunk::decode_file(
        bytes.to_vec(),
        id,
        chunk_size,
        keys.map(|k| &k.0),
        Check::Id,
    )
}

/// Check only the 16-byte header of a chunk file and the file length it
/// implies: the cheap check [`ChunkStore::put`] makes before deduplicating.
pub fn check_chunk_header(
    header: &[u8],
    file_len: u64,
    chunk_size: u32,
    encrypted: bool,
) -> Result<(), String> {
    chunk::check_header(header, file_len, chunk_size, encrypted).map(|_| ())
}

/// Encode `data` as a chunk file as [`ChunkStore::put`] would; returns its id
/// and the file bytes.
pub fn encode_chunk_file(
    data: &[u8],
    zstd_level: i32,
    keys: Option<&StoreKeys>,
) -> Result<(ChunkId, Vec<u8>), Error> {
    let keys = keys.map(|k| &k.0);
    let id = chunk::chunk_id(keys, data);
    let (bytes, _) = chunk::encode(&id, data, zstd_level, keys, |parts| Ok(parts.concat()))?;
    Ok((id, bytes))
}

/// Check an index name: `/`-separated segments of `[A-Za-z0-9._+@-]`, none
/// empty, none starting with `.`, at most 16 segments and 255 bytes.
pub fn validate_index_name(name: &str) -> Result<(), Error> {
    let bad = |reason| {
        Err(Error::InvalidIndexName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 255 {
        return bad("longer than 255 bytes");
    }
    if name.starts_with('/') {
        return bad("absolute (starts with '/')");
    }
    let segments: Vec<&str> = name.split('/').collect();
    if segments.len() > 16 {
        return bad("more than 16 segments");
    }
    for s in segments {
        if s.is_empty() {
            return bad("empty segment ('//' or trailing '/')");
        }
        if s == "." || s == ".." {
            return bad("'.' and '..' segments are not allowed");
        }
        if s.starts_with('.') {
            return bad("a segment starts with '.'");
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+' | b'@'))
        {
            return bad("only ASCII letters, digits and . _ - + @ are allowed");
        }
    }
    Ok(())
}

/// What `put` found at a chunk's path.
enum Existing {
    Absent,
    /// Header and length are plausible; touched.
    Good,
    /// The file fails the cheap check: quarantine it, store again.
    Implausible,
}

/// Read until `buf` is full or the file ends; the number of bytes read.
fn read_up_to(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Set a chunk file's mtime to now and confirm that the file touched is still
/// the one at `path` (a gc or tier run may park it concurrently; see
/// `maintenance::park`). `Ok(false)` when the chunk is not (or no longer) there.
#[cfg(test)]
pub(crate) fn touch_verified(path: &Path) -> Result<bool, Error> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).ctx("open chunk", path),
    };
    touch_file_verified(&f, path)
}

/// [`touch_verified`] through an open file.
fn touch_file_verified(f: &File, path: &Path) -> Result<bool, Error> {
    f.set_modified(SystemTime::now()).ctx("touch chunk", path)?;
    let fm = f.metadata().ctx("stat chunk", path)?;
    match fs::metadata(path) {
        Ok(pm) => Ok(pm.dev() == fm.dev() && pm.ino() == fm.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).ctx("stat chunk", path),
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
/// Opens a file for reading without updating its access time where the kernel
/// allows it (owner or CAP_FOWNER): a restore would otherwise dirty the inode of
/// every chunk it reads (relatime updates the first read after a write).
fn open_noatime(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOATIME)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => File::open(path),
        r => r,
    }
}

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

impl ChunkStore {
    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// Registers a writer (a backup) whose chunks reach an index only when it ends:
    /// until the guard is dropped, [`ChunkStore::gc`] keeps every chunk put or
    /// touched since this call, whatever its grace. Covers writers of this process;
    /// another process that puts chunks must finish within the grace it gives gc.
    pub fn begin_write(&self) -> WriteGuard {
        let token = self
            .inner
            .next_writer
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner
            .writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token, SystemTime::now());
        WriteGuard {
            inner: Arc::clone(&self.inner),
            token,
        }
    }

    /// When the oldest registered writer began, if one runs.
    pub(crate) fn oldest_writer(&self) -> Option<SystemTime> {
        self.inner
            .writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .min()
            .copied()
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

impl Inner {
    pub(crate) fn tiers(&self) -> impl Iterator<Item = &Tier> {
        [Some(&self.hot), self.cold.as_ref()].into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names() {
        for ok in ["a", "env-web/disk-vda/0001", "x.y_z+1@2"] {
            assert!(validate_index_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/abs", "a/../b", "..", "a//b", "a/", ".hidden", "a/.b", "a b", "a\\b", "é",
        ] {
            assert!(validate_index_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_checks() {
        let mut c = StoreConfig::default();
        assert!(c.check().is_ok());
        c.chunk_size = 3 << 20;
        assert!(c.check().is_err());
        c.chunk_size = 32 << 10;
        assert!(c.check().is_err());
        c.chunk_size = 64 << 10;
        assert!(c.check().is_ok());
        c.zstd_level = 99;
        assert!(c.check().is_err());
    }
}
