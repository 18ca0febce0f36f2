//! `weft replay --base SNAPSHOT`: the application state as a disk snapshot holds it,
//! read straight out of the chunk store (no image is restored), as the starting point
//! of a replay.
//!
//! The snapshot's file system (ext4, on the whole disk or in an MBR partition) is read
//! with `ext4-view` through [`SnapshotDisk`], which serves reads from the snapshot's
//! chunks. For every source the provenance log names, the file is looked up under the
//! guest path, then under the path with leading directories taken off (the disk may be
//! mounted at `/data` in the guest and hold `app.db` at its root). SQLite databases are
//! copied out with their write-ahead log and opened, so SQLite recovers what had
//! committed; rows and keys are rendered with the same SQL as the DPA's triggers
//! ([`weft_dpa::capture_format`]), key-value files parsed as the DPA parses them.
//!
//! The disk is the guest's: what is read is bounded by [`BaseLimits`], checked
//! against each inode's size before a byte is read (a sparse file claiming 1 GiB costs
//! nothing to refuse), and a database copy is opened read-only with its triggers,
//! views and attachments off ([`crate::sql::open_guest_copy`]); a table whose
//! definition is not one plain `CREATE TABLE` is left out with a warning.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use ext4_view::Ext4;

mod paths;
use crate::error::error_chain;
use paths::{locate, resolve};
use serde_json::Value;
use sqlx::{Connection, Row};
use weft_blockdev::store::{BlockMap, ChunkStore, Slot};
use weft_dpa::capture_format::{self, Key};
use weft_dpa::DataType;

use crate::log::{ProvenanceError, ProvenanceLog, Query, Record};
use crate::state::{canonical_key, SqliteState, State};

/// Why a base could not be read off a disk snapshot. A limit names the weftd.toml key
/// that raises it; a cause is kept as the source.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// More files (or key-value directory entries) than [`BaseLimits::max_files`].
    #[error("{path}: a base reads at most {max} files from a disk (replay.base_max_files in weftd.toml)")]
    TooManyFiles {
        /// The file or directory being read.
        path: String,
        /// The limit.
        max: u64,
    },
    /// A file larger than [`BaseLimits::max_file_bytes`].
    #[error("{path} in the snapshot is {len} bytes, more than the {max} a base reads from one file (replay.base_max_file_mib in weftd.toml)")]
    FileTooLarge {
        /// The file.
        path: String,
        /// Its size.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A file that would take the disk past [`BaseLimits::max_total_bytes`].
    #[error("{path} in the snapshot ({len} bytes) would take the base past the {max} bytes it reads from one disk (replay.base_max_total_mib in weftd.toml)")]
    DiskTooLarge {
        /// The file.
        path: String,
        /// Its size.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A file or directory of the snapshot's file system cannot be read.
    #[error("{path} in the snapshot")]
    File {
        /// The path in the file system.
        path: String,
        /// The file system's error.
        #[source]
        source: ext4_view::Ext4Error,
    },
    /// A symbolic link on the way to a source that weft will not follow: longer than
    /// ext4 allows, or one of too many in a row.
    #[error("{path} in the snapshot: {why}")]
    Symlink {
        /// The link (or the path being resolved).
        path: String,
        /// Why it is not followed.
        why: String,
    },
    /// A chunk of the snapshot cannot be read from the store.
    #[error(transparent)]
    Store(#[from] weft_blockdev::store::Error),
    /// A chunk whose size is not its slot's.
    #[error("chunk of slot {slot} holds {got} bytes, not {want}")]
    ChunkSize {
        /// The slot.
        slot: usize,
        /// The chunk's size.
        got: usize,
        /// The slot's size.
        want: usize,
    },
    /// A read past the disk's end.
    #[error("read of {len} bytes at {at} is past the disk's end")]
    PastEnd {
        /// Where the read starts.
        at: u64,
        /// Its length.
        len: usize,
    },
    /// No ext4 file system on the disk or its MBR partitions.
    #[error("the snapshot holds no ext4 file system (whole disk or MBR partition)")]
    NoExt4,
    /// The superblock cannot be read.
    #[error("the ext4 superblock")]
    Superblock(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A superblock `ext4-view` would fail on (see [`load_ext4`]).
    #[error("the ext4 file system is corrupt: its superblock says {0}")]
    Corrupt(String),
    /// `ext4-view` refused the file system.
    #[error("the ext4 file system")]
    Ext4(#[source] ext4_view::Ext4Error),
    /// A copy in the scratch directory cannot be written.
    #[error("cannot write {path}")]
    Write {
        /// The copy.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON source that is not JSON.
    #[error("{src} in the snapshot is not JSON")]
    NotJson {
        /// The guest path.
        src: String,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A SQLite source that cannot be read.
    #[error("{src} in the snapshot: {reason}")]
    Database {
        /// The guest path.
        src: String,
        /// Why.
        reason: String,
    },
    /// The scratch directory cannot be made.
    #[error("scratch directory")]
    Scratch(#[source] std::io::Error),
    /// The blocking task that reads a disk failed.
    #[error("reading the disk failed: {0}")]
    Task(String),
    /// No disk could be read: why, for each.
    #[error("{}", .0.join("; "))]
    Unreadable(Vec<String>),
    /// There was no disk.
    #[error("no disk to read")]
    NoDisk,
}

/// Decompressed chunks kept while a file system is read.
const CACHE_CHUNKS: usize = 64;

/// How much a base may read from a guest's disk (`[replay]` in weftd.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseLimits {
    /// Largest file read (a database, its write-ahead log, a document, a key file).
    pub max_file_bytes: u64,
    /// Most bytes read from one disk, all files together.
    pub max_total_bytes: u64,
    /// Most files read plus entries listed in key-value directories, per disk.
    pub max_files: u64,
}

impl Default for BaseLimits {
    fn default() -> Self {
        BaseLimits {
            max_file_bytes: 256 << 20,
            max_total_bytes: 1 << 30,
            max_files: 10_000,
        }
    }
}

/// What a base has read so far from one disk, against its [`BaseLimits`].
struct Budget {
    limits: BaseLimits,
    bytes: u64,
    files: u64,
}

impl Budget {
    fn new(limits: BaseLimits) -> Budget {
        Budget {
            limits,
            bytes: 0,
            files: 0,
        }
    }

    /// Counts one more file (or directory entry) against the limit.
    fn count_file(&mut self, path: &str) -> Result<(), BaseError> {
        self.files += 1;
        if self.files > self.limits.max_files {
            return Err(BaseError::TooManyFiles {
                path: path.to_string(),
                max: self.limits.max_files,
            });
        }
        Ok(())
    }

    /// Reads file `path` of `fs` whole, once its inode's size is within the limits.
    fn read(&mut self, fs: &Ext4, path: &str) -> Result<Vec<u8>, BaseError> {
        let resolved = resolve(fs, path)?.ok_or_else(|| BaseError::File {
            path: path.to_string(),
            source: ext4_view::Ext4Error::NotFound,
        })?;
        let meta = fs
            .symlink_metadata(resolved.as_str())
            .map_err(file_error(path))?;
        let len = meta.len();
        let l = self.limits;
        let path_s = path.to_string();
        if len > l.max_file_bytes {
            return Err(BaseError::FileTooLarge {
                path: path_s,
                len,
                max: l.max_file_bytes,
            });
        }
        if self.bytes.saturating_add(len) > l.max_total_bytes {
            return Err(BaseError::DiskTooLarge {
                path: path_s,
                len,
                max: l.max_total_bytes,
            });
        }
        self.count_file(path)?;
        self.bytes += len;
        fs.read(resolved.as_str()).map_err(file_error(path))
    }
}

fn file_error(path: &str) -> impl FnOnce(ext4_view::Ext4Error) -> BaseError + '_ {
    move |source| BaseError::File {
        path: path.to_string(),
        source,
    }
}

/// A disk snapshot as a readable device: reads are served from its chunks.
pub struct SnapshotDisk {
    store: ChunkStore,
    map: BlockMap,
    /// Where the file system starts (a partition's offset).
    offset: u64,
    cache: HashMap<usize, Arc<Vec<u8>>>,
}

impl SnapshotDisk {
    /// The disk `map` of `store`, from its first byte.
    pub fn new(store: ChunkStore, map: BlockMap) -> SnapshotDisk {
        SnapshotDisk {
            store,
            map,
            offset: 0,
            cache: HashMap::new(),
        }
    }

    fn chunk(&mut self, slot: usize) -> Result<Arc<Vec<u8>>, BaseError> {
        if let Some(c) = self.cache.get(&slot) {
            return Ok(Arc::clone(c));
        }
        let len = self.map.chunk_len(slot) as usize;
        let data = match &self.map.slots[slot] {
            Slot::Zero => vec![0u8; len],
            Slot::Data(id) => {
                let d = self.store.get(id)?;
                if d.len() != len {
                    return Err(BaseError::ChunkSize {
                        slot,
                        got: d.len(),
                        want: len,
                    });
                }
                d
            }
        };
        if self.cache.len() >= CACHE_CHUNKS {
            self.cache.clear();
        }
        let data = Arc::new(data);
        self.cache.insert(slot, Arc::clone(&data));
        Ok(data)
    }

    /// Reads `dst.len()` bytes at `at` (from the disk's start).
    pub fn read_at(&mut self, at: u64, dst: &mut [u8]) -> Result<(), BaseError> {
        let end = at
            .checked_add(dst.len() as u64)
            .filter(|e| *e <= self.map.disk_size)
            .ok_or(BaseError::PastEnd { at, len: dst.len() })?;
        let mut pos = at;
        while pos < end {
            let slot = self.map.slot_of(pos);
            let base = self.map.chunk_offset(slot);
            let chunk = self.chunk(slot)?;
            let from = (pos - base) as usize;
            let n = (chunk.len() - from).min((end - pos) as usize);
            let out = (pos - at) as usize;
            dst[out..out + n].copy_from_slice(&chunk[from..from + n]);
            pos += n as u64;
        }
        Ok(())
    }

    /// Finds the ext4 file system: on the whole disk, else in the first MBR primary
    /// partition that holds one.
    pub fn find_ext4(mut self) -> Result<Ext4, BaseError> {
        let mut starts = vec![0u64];
        let mut mbr = [0u8; 512];
        if self.read_at(0, &mut mbr).is_ok() && mbr[510] == 0x55 && mbr[511] == 0xaa {
            for i in 0..4 {
                let e = &mbr[446 + 16 * i..446 + 16 * (i + 1)];
                let lba = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
                if e[4] != 0 && lba != 0 {
                    starts.push(u64::from(lba) * 512);
                }
            }
        }
        for start in starts {
            let mut magic = [0u8; 2];
            if self.read_at(start + 1080, &mut magic).is_ok() && magic == [0x53, 0xef] {
                self.offset = start;
                let len = self.map.disk_size - start;
                return load_ext4(Box::new(self), len);
            }
        }
        Err(BaseError::NoExt4)
    }
}

/// Most block groups a file system read from a snapshot may have: `ext4-view` keeps
/// all their descriptors in memory (16 bytes each: 16 MiB at most; the usual layout
/// of 32768 blocks of 4 KiB per group makes that 128 TiB).
pub const MAX_BLOCK_GROUPS: u64 = 1 << 20;

/// Loads the ext4 file system `reader` holds (from its first byte; `len` bytes).
/// Superblocks that `ext4-view` 0.9 panics or runs out of memory on are refused
/// first, as the kernel refuses them (all found by the `ext4_base` fuzz target): zero
/// blocks per group (a division by zero in `Ext4::load`); with the 64-bit feature, a
/// group descriptor size outside 64..=1024 or not a power of two (descriptors read
/// past their end); more blocks than the disk holds, or more than
/// [`MAX_BLOCK_GROUPS`] groups (their descriptors are allocated at once: a guest's
/// superblock asked for 12 GiB).
pub fn load_ext4(mut reader: Box<dyn ext4_view::Ext4Read>, len: u64) -> Result<Ext4, BaseError> {
    const INCOMPAT_64BIT: u32 = 0x80;
    let mut sb = [0u8; 1024];
    reader.read(1024, &mut sb).map_err(BaseError::Superblock)?;
    let u32_at = |at: usize| u32::from_le_bytes([sb[at], sb[at + 1], sb[at + 2], sb[at + 3]]);
    let corrupt = BaseError::Corrupt;
    let per_group = u64::from(u32_at(0x20));
    if per_group == 0 {
        return Err(corrupt("0 blocks per group".into()));
    }
    let is_64bit = u32_at(0x60) & INCOMPAT_64BIT != 0;
    let desc_size = u16::from_le_bytes([sb[0xfe], sb[0xff]]);
    if is_64bit && (!(64..=1024).contains(&desc_size) || !desc_size.is_power_of_two()) {
        return Err(corrupt(format!("group descriptors of {desc_size} bytes")));
    }
    let hi = if is_64bit {
        u64::from(u32_at(0x150))
    } else {
        0
    };
    let blocks = hi << 32 | u64::from(u32_at(0x04));
    // 1 KiB << s_log_block_size, up to 64 KiB (ext4-view refuses others itself).
    let block_size = 1024u64 << u32_at(0x18).min(6);
    if blocks.saturating_mul(block_size) > len {
        return Err(corrupt(format!(
            "{blocks} blocks of {block_size} bytes, more than the disk's {len} bytes"
        )));
    }
    let groups = blocks
        .saturating_sub(u64::from(u32_at(0x14)))
        .div_ceil(per_group);
    if groups > MAX_BLOCK_GROUPS {
        return Err(corrupt(format!(
            "{groups} block groups, more than the {MAX_BLOCK_GROUPS} weft reads"
        )));
    }
    Ext4::load(reader).map_err(BaseError::Ext4)
}

impl ext4_view::Ext4Read for SnapshotDisk {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let at = self
            .offset
            .checked_add(start_byte)
            .ok_or("offset overflow")?;
        self.read_at(at, dst).map_err(Into::into)
    }
}

/// The sources a log names, by type: paths, and each SQLite source's tables.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// SQLite database path → tables.
    pub sqlite: BTreeMap<String, BTreeSet<String>>,
    /// JSON document paths.
    pub json: BTreeSet<String>,
    /// Key-value sources (a directory ends with `/`).
    pub kv: BTreeSet<String>,
}

impl Sources {
    /// Every source and table named in `records`.
    pub fn of(records: &[Record]) -> Sources {
        let mut s = Sources::default();
        for r in records {
            s.add(&r.entry);
        }
        s
    }

    /// Every source and table `vm`'s log names up to `to_us`, streamed; and the highest
    /// seq seen.
    pub fn of_log(
        log: &ProvenanceLog,
        vm: &str,
        to_us: Option<i64>,
    ) -> Result<(Sources, u64), ProvenanceError> {
        let mut sources = Sources::default();
        let mut seen = 0;
        log.scan(
            vm,
            &Query {
                to_us,
                ..Default::default()
            },
            |r| {
                seen = r.entry.seq;
                sources.add(&r.entry);
                std::ops::ControlFlow::Continue(())
            },
        )?;
        Ok((sources, seen))
    }

    /// Adds the source and table `e` names (replay streams the log through this).
    pub fn add(&mut self, e: &weft_dpa::Entry) {
        match e.data_type {
            DataType::Sqlite => {
                self.sqlite
                    .entry(e.source.clone())
                    .or_default()
                    .insert(e.collection.clone());
            }
            DataType::Json => {
                self.json.insert(e.source.clone());
            }
            DataType::Kv => {
                self.kv.insert(e.source.clone());
            }
        }
    }
}

/// Where each source was found on the snapshot's file system.
pub type Found = BTreeMap<String, String>;

/// The files a base needs, read out of the file system: (source, found at, bytes) for
/// JSON and key-value files, directory listings for key-value directories, and the
/// database and write-ahead log of each SQLite source copied into `scratch`.
pub struct Extracted {
    /// JSON documents: guest path → bytes.
    pub json: BTreeMap<String, Vec<u8>>,
    /// Key-value files and directories: guest path → key → value.
    pub kv: BTreeMap<String, BTreeMap<String, String>>,
    /// SQLite sources: guest path → database copy under `scratch`.
    pub sqlite: BTreeMap<String, std::path::PathBuf>,
    /// Where each source was found (sources the snapshot lacks are absent).
    pub found: Found,
}

/// Reads what `sources` need out of `fs` (blocking), within `limits`.
pub fn extract(
    fs: &Ext4,
    sources: &Sources,
    scratch: &Path,
    limits: &BaseLimits,
) -> Result<Extracted, BaseError> {
    let mut budget = Budget::new(*limits);
    let mut x = Extracted {
        json: BTreeMap::new(),
        kv: BTreeMap::new(),
        sqlite: BTreeMap::new(),
        found: Found::new(),
    };
    for src in &sources.json {
        if let Some(p) = locate(fs, src) {
            x.json.insert(src.clone(), budget.read(fs, &p)?);
            x.found.insert(src.clone(), p);
        }
    }
    for src in &sources.kv {
        let Some(p) = locate(fs, src) else { continue };
        let mut map = BTreeMap::new();
        if src.ends_with('/') {
            let dir = resolve(fs, &p)?.ok_or_else(|| BaseError::File {
                path: p.clone(),
                source: ext4_view::Ext4Error::NotFound,
            })?;
            let list = fs.read_dir(dir.as_str()).map_err(file_error(&p))?;
            for ent in list {
                let ent = ent.map_err(file_error(&p))?;
                budget.count_file(&p)?;
                let name = ent.file_name().as_str().unwrap_or_default().to_string();
                let is_file = ent
                    .file_type()
                    .map(|t| t.is_regular_file())
                    .unwrap_or(false);
                if !capture_format::is_dir_key(&name) || !is_file {
                    continue;
                }
                let bytes = budget.read(fs, &format!("{p}/{name}"))?;
                map.insert(name, String::from_utf8_lossy(&bytes).into_owned());
            }
        } else {
            let bytes = budget.read(fs, &p)?;
            map = capture_format::parse_env(&String::from_utf8_lossy(&bytes));
        }
        x.kv.insert(src.clone(), map);
        x.found.insert(src.clone(), p);
    }
    for (n, src) in sources.sqlite.keys().enumerate() {
        let Some(p) = locate(fs, src) else { continue };
        let copy = scratch.join(format!("db{n}.sqlite"));
        std::fs::write(&copy, budget.read(fs, &p)?).map_err(write_error(&copy))?;
        let wal = format!("{p}-wal");
        if resolve(fs, &wal).ok().flatten().is_some() {
            let to = scratch.join(format!("db{n}.sqlite-wal"));
            std::fs::write(&to, budget.read(fs, &wal)?).map_err(write_error(&to))?;
        }
        x.sqlite.insert(src.clone(), copy);
        x.found.insert(src.clone(), p);
    }
    Ok(x)
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> BaseError + '_ {
    move |source| BaseError::Write {
        path: path.to_owned(),
        source,
    }
}

/// Builds the base state from what [`extract`] read.
pub async fn state_of(x: &Extracted, sources: &Sources) -> Result<State, BaseError> {
    let mut state = State::default();
    for (src, bytes) in &x.json {
        let doc: Value = serde_json::from_slice(bytes).map_err(|source| BaseError::NotJson {
            src: src.clone(),
            source,
        })?;
        state.json.insert(src.clone(), doc);
    }
    state.kv = x.kv.clone();
    for (src, copy) in &x.sqlite {
        let tables = sources.sqlite.get(src).cloned().unwrap_or_default();
        let db = read_sqlite(copy, &tables)
            .await
            .map_err(|reason| BaseError::Database {
                src: src.clone(),
                reason,
            })?;
        state.sqlite.insert(src.clone(), db);
    }
    Ok(state)
}

/// The application state the file systems of `maps` (a weave's disks, in order) hold
/// for `sources`: each source from the first disk that holds it (a source no disk
/// holds is absent), each disk read within `limits`. Disks without an ext4 file
/// system are passed over; when no disk has one, the error says why for each.
pub async fn disks_state(
    store: &ChunkStore,
    maps: Vec<BlockMap>,
    sources: &Sources,
    limits: &BaseLimits,
) -> Result<(State, Found), BaseError> {
    let mut state = State::default();
    let mut found = Found::new();
    let mut unreadable = Vec::new();
    let n = maps.len();
    for (i, map) in maps.into_iter().enumerate() {
        let scratch = tempfile::tempdir().map_err(BaseError::Scratch)?;
        let (store, srcs, path) = (store.clone(), sources.clone(), scratch.path().to_owned());
        let limits = *limits;
        let extracted = tokio::task::spawn_blocking(move || {
            let fs = SnapshotDisk::new(store, map).find_ext4()?;
            extract(&fs, &srcs, &path, &limits)
        })
        .await
        .map_err(|e| BaseError::Task(e.to_string()))?;
        let x = match extracted {
            Ok(x) => x,
            Err(e) if n == 1 => {
                unreadable.push(error_chain(&e));
                continue;
            }
            Err(e) => {
                unreadable.push(format!("disk {}: {}", i + 1, error_chain(&e)));
                continue;
            }
        };
        let mut disk = state_of(&x, sources).await?;
        for (src, at) in x.found {
            if found.contains_key(&src) {
                continue;
            }
            if let Some(db) = disk.sqlite.remove(&src) {
                state.sqlite.insert(src.clone(), db);
            }
            if let Some(doc) = disk.json.remove(&src) {
                state.json.insert(src.clone(), doc);
            }
            if let Some(keys) = disk.kv.remove(&src) {
                state.kv.insert(src.clone(), keys);
            }
            found.insert(src, at);
        }
    }
    if unreadable.len() == n {
        return Err(if n == 0 {
            BaseError::NoDisk
        } else {
            BaseError::Unreadable(unreadable)
        });
    }
    Ok((state, found))
}

async fn read_sqlite(copy: &Path, tables: &BTreeSet<String>) -> Result<SqliteState, String> {
    // Read-only, which still reads what the write-ahead log holds.
    let mut conn = crate::sql::open_guest_copy(copy)
        .await
        .map_err(|e| e.to_string())?;
    let mut db = SqliteState::default();
    for table in tables {
        if capture_format::is_internal_table(table) {
            continue;
        }
        let sql: Option<String> =
            sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE type='table' AND name=?1")
                .bind(table)
                .fetch_optional(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
        let Some(sql) = sql else { continue };
        if let Err(refused) = crate::sql::check_create_table(table, &sql) {
            tracing::warn!(db = %copy.display(), %refused, "the base leaves a table out");
            continue;
        }
        let cols = sqlx::query("SELECT name, pk FROM pragma_table_info(?1) ORDER BY cid")
            .bind(table)
            .fetch_all(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let mut names = Vec::new();
        let mut pk = Vec::new();
        // A guest's text need not be UTF-8: every value is decoded with `try_get`
        // (`get` panics on a decode error).
        let bad = |e: sqlx::Error| format!("table {table:?} of {}: {e}", copy.display());
        for c in &cols {
            let name: String = c.try_get(0).map_err(bad)?;
            let p: i64 = c.try_get(1).map_err(bad)?;
            if p > 0 {
                pk.push((p, name.clone()));
            }
            names.push(name);
        }
        pk.sort();
        let key = if pk.is_empty() {
            Key::Rowid
        } else {
            Key::Columns(pk.into_iter().map(|(_, c)| c).collect())
        };
        let select = format!(
            "SELECT {}, {} FROM {}",
            capture_format::json_key("", &key),
            capture_format::json_row("", &names),
            capture_format::quote_ident(table)
        );
        let rows = sqlx::query(&select)
            .fetch_all(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let out = db.rows.entry(table.clone()).or_default();
        for r in rows {
            let (k, v): (String, String) = (r.try_get(0).map_err(bad)?, r.try_get(1).map_err(bad)?);
            let key = canonical_key(&k)?;
            let Value::Object(row) =
                serde_json::from_str::<Value>(&v).map_err(|e| e.to_string())?
            else {
                return Err(format!("a row of {table} is not a JSON object"));
            };
            out.insert(key, row);
        }
        db.schemas.insert(table.clone(), sql);
    }
    conn.close().await.map_err(|e| e.to_string())?;
    Ok(db)
}

#[cfg(test)]
mod tests;
