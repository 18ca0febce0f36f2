//! The host's provenance log (F25): an append-only, per-VM log of the semantic changes
//! the guest DPA reports, read back for audits (`weft provenance`) and by the replay
//! engine.
//!
//! Each VM has a shard, the directory `<root>/<vm>/`, of append-only segments
//! (`seg-<first seq>.log`). One [`ProvenanceLog::append`] writes its entries as
//! zstd-compressed blocks, with a CRC-32C per record and per block, and fsyncs before it
//! returns. A segment that reaches [`LogOptions::segment_bytes`] is sealed: it never
//! changes again and gets a sidecar index (`seg-<first seq>.idx`) with each block's
//! sequence, guest-time and host-time ranges and a bloom filter of its keys, tables and
//! sources, so queries skip blocks that cannot match. The open segment's index is
//! rebuilt in memory when the shard is opened; a torn tail (a crash in the middle of an
//! append, which was never acknowledged) is found by its checksums and cut off.
//! Retention drops whole sealed segments, by age and by size, never the newest one; a
//! per-VM quota refuses appends beyond it. The quota counts entries decompressed
//! ([`Usage::charged_bytes`]): zstd shrinks a guest's repetitive values a thousandfold,
//! and everything that reads the log (replay, the API) holds them decompressed. Decoded
//! blocks are kept in a small LRU cache.
//!
//! Reads stream: [`ProvenanceLog::scan`] hands over one record at a time and holds one
//! decoded block (at most [`segment::MAX_BLOCK_BYTES`] raw), whatever the log's size.
//!
//! A weave's log has lineage (`<root>/<weave>/lineage`): it starts with its parent's
//! entries up to the branch instant, then continues with its own, whose sequence
//! numbers follow on (the weave's disk holds the parent's DPA spool as of the branch).
//!
//! `docs/provenance.md` is the operator's description; [`segment`] is the format's
//! reference. All calls block (async callers use `spawn_blocking`); the log is shared
//! between threads. Calls on one VM are serialised; calls on different VMs proceed in
//! parallel.

mod cache;
mod filter;
pub mod segment;
mod shard;

use std::collections::HashMap;
use std::fs::File;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use cache::BlockCache;
use segment::{BlockMeta, Decoded};
use shard::{decoded_bytes, Shard};

/// One entry as the host keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The VM whose log holds the entry, assigned by the host. In a weave's lineage
    /// this is the parent (or an earlier ancestor) the entry was recorded for.
    pub vm: String,
    /// The host's clock when the entry was received, µs since the Unix epoch.
    pub host_time_us: i64,
    /// The entry as the guest sent it.
    pub entry: weft_dpa::Entry,
}

/// What to read; every field narrows; results come in `seq` order.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// `guest_time_us >= from_us`.
    pub from_us: Option<i64>,
    /// `guest_time_us <= to_us`.
    pub to_us: Option<i64>,
    /// `seq > after_seq` (for tail and paging).
    pub after_seq: Option<u64>,
    /// `entry.key == key`.
    pub key: Option<String>,
    /// `entry.collection == collection` (the SQLite table).
    pub collection: Option<String>,
    /// `entry.source == source`.
    pub source: Option<String>,
    /// At most this many records.
    pub limit: Option<usize>,
}

/// Tuning of a [`ProvenanceLog`]; the defaults suit a host with many VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogOptions {
    /// A segment is sealed once it holds this many bytes.
    pub segment_bytes: u64,
    /// Most bytes of one VM's log, its entries counted decompressed (see
    /// [`Usage::charged_bytes`]); an append beyond it fails with
    /// [`ProvenanceError::Quota`]. 0: no quota.
    pub quota_bytes: u64,
    /// Sealed segments whose newest entry was received longer ago than this (µs, host
    /// clock) are dropped. `None`: kept regardless of age.
    pub retain_us: Option<i64>,
    /// The oldest sealed segments are dropped while a VM's log is larger than this.
    /// 0: no size limit.
    pub retain_bytes: u64,
    /// Decoded blocks kept in the read cache (all VMs together). 0: no cache.
    pub cache_blocks: usize,
    /// zstd level of new blocks (1 fastest … 19 smallest).
    pub compression_level: i32,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: 64 << 20,
            quota_bytes: 1 << 30,
            retain_us: None,
            retain_bytes: 0,
            cache_blocks: 256,
            compression_level: 3,
        }
    }
}

/// Errors of the provenance log.
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    /// A new entry does not follow the VM's last durable one.
    #[error("vm {vm}: entry {got} does not follow the last durable entry {last}")]
    Gap {
        /// The VM.
        vm: String,
        /// The highest durable seq.
        last: u64,
        /// The first new seq offered.
        got: u64,
    },
    /// The VM's log is at its storage quota.
    #[error("vm {vm}: provenance log is at its quota of {quota} bytes")]
    Quota {
        /// The VM.
        vm: String,
        /// The quota in bytes.
        quota: u64,
    },
    /// A VM name that cannot name a shard.
    #[error("invalid vm name {0:?}: use 1-64 characters from a-z, A-Z, 0-9, '-', '_' and '.', starting with a letter or digit")]
    InvalidName(String),
    /// Entries that cannot be stored (not consecutive, over the size limits).
    #[error("invalid entries: {0}")]
    Invalid(String),
    /// An I/O error on a file of the log.
    #[error("cannot {op} {path}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Stored data that does not decode (beyond a torn tail).
    #[error("corrupt provenance data in {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A branch that cannot be recorded.
    #[error("cannot record the branch: {0}")]
    Branch(String),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ProvenanceError + 'a {
    move |source| ProvenanceError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Bytes of zeros the open segment is extended by ahead of its appends.
const PREALLOC: u64 = 4 << 20;
/// Deepest weave-of-a-weave chain followed (a damaged lineage cannot loop forever).
const MAX_LINEAGE_DEPTH: usize = 16;
/// The name of a shard's lineage file.
const LINEAGE_FILE: &str = "lineage";

/// Checks that `vm` can name a shard directory.
pub fn check_vm_name(vm: &str) -> Result<(), ProvenanceError> {
    let ok = !vm.is_empty()
        && vm.len() <= 64
        && vm.as_bytes()[0].is_ascii_alphanumeric()
        && vm
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ProvenanceError::InvalidName(vm.to_string()))
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn sync_dir(dir: &Path) -> Result<(), ProvenanceError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir))
}

/// Where a weave's log starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    /// The VM it branched from.
    pub parent: String,
    /// The branch instant (guest time, µs): the parent's entries up to it are the
    /// weave's too.
    pub until_us: i64,
    /// The parent's highest seq at or before the branch instant when the branch was
    /// recorded; the weave's own entries follow it.
    pub until_seq: u64,
}

/// The size of one VM's log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes of its segments and indexes on disk.
    pub bytes: u64,
    /// Bytes the quota counts: every block's header and its payload decompressed (or
    /// as stored, if larger), segment headers and indexes. A guest cannot store more
    /// than the quota by sending values that compress well.
    #[serde(default)]
    pub charged_bytes: u64,
    /// Segments, the open one included.
    pub segments: usize,
    /// Its oldest stored seq (0 for none).
    pub first_seq: u64,
    /// Its highest durable seq, lineage included (0 for none).
    pub last_seq: u64,
    /// Its lineage, for a weave.
    pub lineage: Option<Lineage>,
}

/// What one retention pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    /// Segments dropped.
    pub segments: usize,
    /// Bytes freed.
    pub bytes: u64,
}

/// A block a query will read.
struct Candidate {
    segment_first: u64,
    path: Arc<PathBuf>,
    meta: Arc<BlockMeta>,
}

/// The narrowing a lineage adds to a query of an ancestor.
#[derive(Debug, Clone, Copy, Default)]
struct Bound {
    max_seq: Option<u64>,
    max_time: Option<i64>,
}

fn min_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

enum Slot {
    Unloaded,
    Ready(Box<Shard>),
    Removed,
}

struct Inner {
    root: PathBuf,
    options: LogOptions,
    shards: Mutex<HashMap<String, Arc<Mutex<Slot>>>>,
    cache: BlockCache,
    generation: AtomicU64,
}

/// The host's provenance log: one shard per VM under a root directory.
#[derive(Clone)]
pub struct ProvenanceLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ProvenanceLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvenanceLog")
            .field("root", &self.inner.root)
            .field("options", &self.inner.options)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change to a shard either completes or marks it broken (reloaded from
    // disk), so a panic elsewhere leaves nothing half-done behind the lock.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ProvenanceLog {
    /// Opens (creating) the log under `root`. VMs' shards are loaded on first use.
    pub fn open(root: PathBuf, options: LogOptions) -> Result<Self, ProvenanceError> {
        if options.segment_bytes < 4096 {
            return Err(ProvenanceError::Invalid(
                "segments must be at least 4 KiB".into(),
            ));
        }
        if !(1..=19).contains(&options.compression_level) {
            return Err(ProvenanceError::Invalid(
                "the zstd level must be in 1..=19".into(),
            ));
        }
        std::fs::create_dir_all(&root).map_err(io("create", &root))?;
        Ok(ProvenanceLog {
            inner: Arc::new(Inner {
                cache: BlockCache::new(options.cache_blocks, cache::CACHE_BYTES),
                root,
                options,
                shards: Mutex::new(HashMap::new()),
                generation: AtomicU64::new(1),
            }),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The options it was opened with.
    pub fn options(&self) -> &LogOptions {
        &self.inner.options
    }

    /// Runs `f` on `vm`'s shard, loading it first if needed.
    fn with_shard<T>(
        &self,
        vm: &str,
        f: impl FnOnce(&mut Shard) -> Result<T, ProvenanceError>,
    ) -> Result<T, ProvenanceError> {
        check_vm_name(vm)?;
        loop {
            let slot = lock(&self.inner.shards)
                .entry(vm.to_string())
                .or_insert_with(|| Arc::new(Mutex::new(Slot::Unloaded)))
                .clone();
            let mut guard = lock(&slot);
            if matches!(*guard, Slot::Removed) {
                // Removed while we waited: the map holds a fresh slot now.
                continue;
            }
            if matches!(*guard, Slot::Unloaded) {
                let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed);
                let shard = Shard::load(self.inner.root.join(vm), generation)?;
                *guard = Slot::Ready(Box::new(shard));
            }
            let Slot::Ready(shard) = &mut *guard else {
                continue;
            };
            let result = f(shard);
            if shard.broken {
                self.inner.cache.forget_shard(shard.generation);
                *guard = Slot::Unloaded;
            }
            return result;
        }
    }

    /// Appends entries of `vm` received at `host_time_us`, durable (fsynced) on return.
    /// Entries whose seq <= last_seq(vm) are skipped (resends); a first new seq beyond
    /// last_seq + 1 is [`ProvenanceError::Gap`]. Over the VM's storage quota:
    /// [`ProvenanceError::Quota`]. Returns the VM's highest durable seq.
    ///
    /// The entries must have consecutive sequence numbers and keep to the protocol's
    /// size limits ([`weft_dpa::proto::LIMITS`]); everything else about them was
    /// checked by the protocol decoder.
    pub fn append(
        &self,
        vm: &str,
        host_time_us: i64,
        entries: &[weft_dpa::Entry],
    ) -> Result<u64, ProvenanceError> {
        check_entries(entries)?;
        let options = &self.inner.options;
        let (last, sealed) = self.with_shard(vm, |s| {
            let last = s.append(vm, host_time_us, entries, options)?;
            let mut sealed = false;
            if s.segments
                .last()
                .is_some_and(|seg| !seg.sealed && seg.len >= options.segment_bytes)
            {
                s.seal()?;
                sealed = true;
            }
            Ok((last, sealed))
        })?;
        if sealed && (options.retain_us.is_some() || options.retain_bytes > 0) {
            // Retention is housekeeping: the append itself is durable and done.
            if let Err(e) = self.with_shard(vm, |s| s.retain(options, now_us())) {
                warn!(vm, error = %e, "provenance retention failed");
            }
        }
        Ok(last)
    }

    /// The highest durable seq of `vm` (0 for none), lineage included (see
    /// [`Self::branch`]).
    pub fn last_seq(&self, vm: &str) -> Result<u64, ProvenanceError> {
        self.with_shard(vm, |s| Ok(s.last_seq()))
    }

    /// How much `vm`'s log holds.
    pub fn usage(&self, vm: &str) -> Result<Usage, ProvenanceError> {
        self.with_shard(vm, |s| {
            Ok(Usage {
                bytes: s.bytes(),
                charged_bytes: s.charged_bytes(),
                segments: s.segments.len(),
                first_seq: s
                    .segments
                    .iter()
                    .find_map(|seg| seg.blocks.first().map(|b| b.first_seq))
                    .unwrap_or(0),
                last_seq: s.last_seq(),
                lineage: s.lineage.clone(),
            })
        })
    }

    /// Entries of `vm` matching `q`, including, for a weave, its parent's entries up to
    /// the branch instant (lineage). A VM without a log has no entries. The answer is
    /// in memory whole: for a log of any size, use [`Self::scan`].
    pub fn query(&self, vm: &str, q: &Query) -> Result<Vec<Record>, ProvenanceError> {
        let mut out = Vec::new();
        self.scan(vm, q, |r| {
            out.push(r);
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    /// Calls `f` with each entry of `vm` matching `q`, in seq order (a weave's lineage
    /// first), until `f` breaks or `q.limit` entries were handed over. Holds one decoded
    /// block at a time: memory does not grow with the log.
    pub fn scan(
        &self,
        vm: &str,
        q: &Query,
        mut f: impl FnMut(Record) -> ControlFlow<()>,
    ) -> Result<(), ProvenanceError> {
        let limit = q.limit.unwrap_or(usize::MAX);
        if limit == 0 {
            return Ok(());
        }
        let mut given = 0usize;
        let mut sink = |r: Record| {
            given += 1;
            let flow = f(r);
            if given >= limit {
                ControlFlow::Break(())
            } else {
                flow
            }
        };
        // Whether `f` or the limit ended the scan early is the caller's to know.
        let _ended = self.collect(vm, q, Bound::default(), 0, &mut sink)?;
        Ok(())
    }

    fn collect(
        &self,
        vm: &str,
        q: &Query,
        bound: Bound,
        depth: usize,
        sink: &mut dyn FnMut(Record) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, ProvenanceError> {
        if depth > MAX_LINEAGE_DEPTH {
            return Err(ProvenanceError::Branch(format!(
                "the lineage of {vm} is deeper than {MAX_LINEAGE_DEPTH} (a loop?)"
            )));
        }
        let (generation, lineage, candidates) = self.with_shard(vm, |s| {
            Ok((s.generation, s.lineage.clone(), s.candidates(q, bound)))
        })?;
        if let Some(l) = lineage {
            let wanted =
                q.after_seq.is_none_or(|a| a < l.until_seq) && bound.max_seq.is_none_or(|m| m > 0);
            if wanted {
                let inherited = Bound {
                    max_seq: min_opt(bound.max_seq, Some(l.until_seq)),
                    max_time: min_opt(bound.max_time, Some(l.until_us)),
                };
                if self
                    .collect(&l.parent, q, inherited, depth + 1, sink)?
                    .is_break()
                {
                    return Ok(ControlFlow::Break(()));
                }
            }
        }
        self.read(vm, generation, candidates, q, bound, sink)
    }

    fn read(
        &self,
        vm: &str,
        generation: u64,
        candidates: Vec<Candidate>,
        q: &Query,
        bound: Bound,
        sink: &mut dyn FnMut(Record) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, ProvenanceError> {
        // A scan larger than half the cache would only evict what others use: it
        // decodes blocks for itself, moves entries out instead of copying them, and
        // holds one block at a time.
        let raw: u64 = candidates.iter().map(|c| decoded_bytes(&c.meta)).sum();
        let use_cache = candidates.len() <= self.inner.options.cache_blocks / 2
            && raw <= self.inner.cache.max_bytes() / 2;
        let mut file: Option<(u64, File)> = None;
        for c in candidates {
            let key = (generation, c.segment_first, c.meta.offset);
            let cached = if use_cache {
                self.inner.cache.get(&key)
            } else {
                None
            };
            let block: Arc<Decoded> = match cached {
                Some(b) => b,
                None => {
                    if file
                        .as_ref()
                        .is_none_or(|(first, _)| *first != c.segment_first)
                    {
                        match File::open(c.path.as_ref()) {
                            Ok(f) => file = Some((c.segment_first, f)),
                            // Dropped by retention or removed since the query began.
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                            Err(e) => return Err(io("open", &c.path)(e)),
                        }
                    }
                    let Some((_, f)) = &file else { continue };
                    let decoded = Arc::new(segment::read_block(f, &c.path, &c.meta)?);
                    if use_cache {
                        self.inner
                            .cache
                            .put(key, decoded.clone(), decoded_bytes(&c.meta));
                    }
                    decoded
                }
            };
            let keep = |host: i64, e: &weft_dpa::Entry| matches(q, bound, host, e);
            match Arc::try_unwrap(block) {
                Ok(owned) => {
                    for (host_time_us, entry) in owned {
                        if keep(host_time_us, &entry) {
                            let r = Record {
                                vm: vm.to_string(),
                                host_time_us,
                                entry,
                            };
                            if sink(r).is_break() {
                                return Ok(ControlFlow::Break(()));
                            }
                        }
                    }
                }
                Err(shared) => {
                    for (host_time_us, entry) in shared.iter() {
                        if keep(*host_time_us, entry) {
                            let r = Record {
                                vm: vm.to_string(),
                                host_time_us: *host_time_us,
                                entry: entry.clone(),
                            };
                            if sink(r).is_break() {
                                return Ok(ControlFlow::Break(()));
                            }
                        }
                    }
                }
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Records that `weave`'s log starts with `parent`'s entries whose
    /// `guest_time_us <= until_us`. The weave must not have entries of its own yet;
    /// recording the same branch again is a no-op.
    pub fn branch(&self, weave: &str, parent: &str, until_us: i64) -> Result<(), ProvenanceError> {
        check_vm_name(weave)?;
        check_vm_name(parent)?;
        if weave == parent {
            return Err(ProvenanceError::Branch(format!(
                "{weave} cannot branch from itself"
            )));
        }
        let until_seq = self.max_seq_until(parent, until_us, None, 0)?;
        self.with_shard(weave, |s| {
            if let Some(l) = &s.lineage {
                if l.parent == parent && l.until_us == until_us {
                    return Ok(());
                }
                return Err(ProvenanceError::Branch(format!(
                    "{weave} already branched from {} at {}",
                    l.parent, l.until_us
                )));
            }
            if s.segments.iter().any(|seg| !seg.blocks.is_empty()) {
                return Err(ProvenanceError::Branch(format!(
                    "{weave} already has entries of its own"
                )));
            }
            let lineage = Lineage {
                parent: parent.to_string(),
                until_us,
                until_seq,
            };
            s.write_lineage(&lineage)?;
            s.lineage = Some(lineage);
            Ok(())
        })?;
        info!(
            weave,
            parent, until_us, until_seq, "provenance lineage recorded"
        );
        Ok(())
    }

    /// The highest seq of `vm`'s log (lineage included) at or below `max_seq` whose
    /// guest time is at or before `until_us`; 0 for none.
    fn max_seq_until(
        &self,
        vm: &str,
        until_us: i64,
        max_seq: Option<u64>,
        depth: usize,
    ) -> Result<u64, ProvenanceError> {
        if depth > MAX_LINEAGE_DEPTH {
            return Err(ProvenanceError::Branch(format!(
                "the lineage of {vm} is deeper than {MAX_LINEAGE_DEPTH} (a loop?)"
            )));
        }
        let (lineage, blocks) = self.with_shard(vm, |s| {
            let blocks: Vec<(Arc<PathBuf>, Arc<BlockMeta>)> = s
                .segments
                .iter()
                .rev()
                .flat_map(|seg| {
                    seg.blocks
                        .iter()
                        .rev()
                        .map(|b| (seg.path.clone(), b.clone()))
                })
                .filter(|(_, b)| {
                    b.min_guest_us <= until_us && max_seq.is_none_or(|m| b.first_seq <= m)
                })
                .collect();
            Ok((s.lineage.clone(), blocks))
        })?;
        for (path, meta) in blocks {
            let file = match File::open(path.as_ref()) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("open", &path)(e)),
            };
            let decoded = segment::read_block(&file, &path, &meta)?;
            let best = decoded
                .iter()
                .filter(|(_, e)| e.guest_time_us <= until_us && max_seq.is_none_or(|m| e.seq <= m))
                .map(|(_, e)| e.seq)
                .max();
            if let Some(seq) = best {
                return Ok(seq);
            }
        }
        match lineage {
            Some(l) => self.max_seq_until(
                &l.parent,
                until_us.min(l.until_us),
                min_opt(max_seq, Some(l.until_seq)),
                depth + 1,
            ),
            None => Ok(0),
        }
    }

    /// Removes everything of `vm` (its shards, index and lineage). Weaves branched
    /// from it keep their own entries; their lineage then reads as empty.
    pub fn remove(&self, vm: &str) -> Result<(), ProvenanceError> {
        check_vm_name(vm)?;
        // The map stays locked until the files are gone, so nobody loads a shard from
        // a half-removed directory; only lookups wait, never another VM's I/O.
        let mut shards = lock(&self.inner.shards);
        if let Some(slot) = shards.remove(vm) {
            let mut guard = lock(&slot);
            if let Slot::Ready(s) = &*guard {
                self.inner.cache.forget_shard(s.generation);
            }
            *guard = Slot::Removed;
        }
        let dir = self.inner.root.join(vm);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => sync_dir(&self.inner.root)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove", &dir)(e)),
        }
        drop(shards);
        info!(vm, "provenance log removed");
        Ok(())
    }

    /// Applies the retention rules to every VM's log (weftd runs this periodically;
    /// appends apply them when they seal a segment).
    pub fn enforce_retention(&self) -> Result<RetentionReport, ProvenanceError> {
        let options = &self.inner.options;
        let mut report = RetentionReport::default();
        if options.retain_us.is_none() && options.retain_bytes == 0 {
            return Ok(report);
        }
        let root = &self.inner.root;
        let entries = std::fs::read_dir(root).map_err(io("list", root))?;
        let now = now_us();
        for entry in entries {
            let entry = entry.map_err(io("list", root))?;
            let Some(vm) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if check_vm_name(&vm).is_err() || !entry.path().is_dir() {
                continue;
            }
            let r = self.with_shard(&vm, |s| s.retain(options, now))?;
            report.segments += r.segments;
            report.bytes += r.bytes;
        }
        Ok(report)
    }
}

/// Whether a stored entry matches the query and the lineage bound.
fn matches(q: &Query, bound: Bound, _host: i64, e: &weft_dpa::Entry) -> bool {
    q.after_seq.is_none_or(|a| e.seq > a)
        && bound.max_seq.is_none_or(|m| e.seq <= m)
        && q.from_us.is_none_or(|t| e.guest_time_us >= t)
        && q.to_us.is_none_or(|t| e.guest_time_us <= t)
        && bound.max_time.is_none_or(|t| e.guest_time_us <= t)
        && q.key.as_deref().is_none_or(|k| e.key == k)
        && q.collection.as_deref().is_none_or(|c| e.collection == c)
        && q.source.as_deref().is_none_or(|s| e.source == s)
}

/// The structural checks the log relies on (the protocol decoder checks the rest).
fn check_entries(entries: &[weft_dpa::Entry]) -> Result<(), ProvenanceError> {
    let limits = weft_dpa::proto::LIMITS;
    if entries.first().is_some_and(|e| e.seq == 0) {
        return Err(ProvenanceError::Invalid(
            "sequence numbers start at 1".into(),
        ));
    }
    if entries
        .windows(2)
        .any(|w| w[0].seq.checked_add(1) != Some(w[1].seq))
    {
        return Err(ProvenanceError::Invalid(
            "sequence numbers are not consecutive".into(),
        ));
    }
    for e in entries {
        let names = [&e.source, &e.collection, &e.key];
        let values = [&e.old, &e.new];
        if names.iter().any(|s| s.len() > limits.name)
            || values
                .iter()
                .any(|v| v.as_ref().is_some_and(|v| v.len() > limits.value))
        {
            return Err(ProvenanceError::Invalid(format!(
                "entry {} is over the size limits",
                e.seq
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
