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
//!
//! # Where things are
//! This module holds the configuration, the tiers and the store handle; `lifecycle`
//! creates and opens a store, `chunks` puts and gets chunks, `index` writes and reads
//! indexes, `maintenance` verifies, collects garbage and moves chunks between tiers, `batch`
//! groups puts under one sync, and `files` exposes the file formats to tools and fuzzing.

mod access;
mod batch;
mod blockmap;
mod chunk;
mod chunks;
mod crypto;
mod error;
mod files;
mod fsutil;
mod id;
mod index;
mod lifecycle;
mod maintenance;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::fcntl::Flock;

pub use batch::PutBatch;
pub use blockmap::{BlockMap, Slot};
pub use chunk::Check;
pub use error::Error;
pub use files::{
    check_chunk_header, encode_chunk_file, encode_index_file, parse_chunk_file, parse_index_file,
    StoreKeys,
};
pub use fsutil::start_writeback;
pub use id::{ChunkId, ParseChunkIdError};
pub use index::validate_index_name;
pub use maintenance::{
    BadChunk, BadIndex, GcReport, MissingChunk, StoreStats, TierPolicy, TierReport, VerifyReport,
};

use access::AccessLog;
use crypto::Keys;
use fsutil::PARKED_SUFFIX;

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

impl ChunkStore {
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
