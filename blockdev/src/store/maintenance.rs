//! Whole-store operations: gc, tiering, verify and stats.
//!
//! gc and tier runs take `<root>/maintenance.lock` (exclusive flock, across
//! processes) so at most one of them runs at a time; put/get never wait for it.
//!
//! Removing or moving a chunk goes through *parking*: the chunk file is first
//! renamed into `<tier>/tmp/<hex>.parked`, its mtime is read again, and only
//! then is it deleted (or, when a concurrent `put` touched it in the meantime,
//! linked back). `put` confirms after touching that the inode it touched is
//! still the one at the chunk's path, so a touch either lands before the park
//! (and is seen by the re-read) or `put` notices the chunk is gone and writes
//! it again. A crash while a chunk is parked leaves the parked file, which the
//! next open or gc links back when the chunk is in neither tier.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};

use super::access::Kind;
use super::error::{Error, IoContext};
use super::fsutil::{self, ensure_dir, unix_secs, write_durable, Publish};
use super::{chunk, ChunkId, ChunkStore, Tier, MAINTENANCE_LOCK};

/// gc removes temp files only when they are older than this (and than the grace).
const TEMP_MIN_AGE: Duration = Duration::from_secs(3600);
/// gc keeps chunks touched up to this long before a running writer began.
const WRITER_MARGIN: Duration = Duration::from_secs(2);

/// When chunks move between tiers. Last access is the latest put or read
/// recorded in the access log (the chunk file's mtime when the log has none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierPolicy {
    /// Demote a hot chunk not accessed for this long.
    pub cold_after: Duration,
    /// A chunk read at least this many times since it last changed tier is
    /// *frequent* (0 disables the distinction).
    pub frequent_reads: u32,
    /// Idle time after which a frequent chunk is demoted (≥ `cold_after`).
    pub frequent_cold_after: Duration,
    /// Promote a cold chunk back to hot after this many cold reads (0 = never).
    pub promote_after_cold_reads: u32,
}

impl Default for TierPolicy {
    fn default() -> Self {
        TierPolicy {
            cold_after: Duration::from_secs(7 * 86400),
            frequent_reads: 8,
            frequent_cold_after: Duration::from_secs(30 * 86400),
            promote_after_cold_reads: 3,
        }
    }
}

/// What a tier run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TierReport {
    /// Chunks moved hot → cold.
    pub demoted: u64,
    /// Their file bytes.
    pub demoted_bytes: u64,
    /// Chunks moved cold → hot.
    pub promoted: u64,
    /// Their file bytes.
    pub promoted_bytes: u64,
    /// Hot chunks after the run.
    pub hot_chunks: u64,
    /// Cold chunks after the run.
    pub cold_chunks: u64,
}

/// What a gc run did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Chunks last touched before this time were candidates.
    pub cutoff: SystemTime,
    /// Indexes marked.
    pub indexes: u64,
    /// Distinct chunks referenced by them.
    pub referenced_chunks: u64,
    /// Referenced chunks found in neither tier (run `verify` for details).
    pub missing_chunks: u64,
    /// Chunks removed.
    pub removed_chunks: u64,
    /// Their file bytes.
    pub removed_bytes: u64,
    /// Chunks kept (referenced, or touched within the grace period).
    pub kept_chunks: u64,
    /// Stale temp files removed.
    pub temp_files_removed: u64,
}

/// Store-wide numbers.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct StoreStats {
    /// Chunks in the hot tier.
    pub hot_chunks: u64,
    /// Their file bytes.
    pub hot_bytes: u64,
    /// Chunks in the cold tier.
    pub cold_chunks: u64,
    /// Their file bytes.
    pub cold_bytes: u64,
    /// Plaintext bytes of all stored chunks (from their headers).
    pub plain_bytes: u64,
    /// Readable indexes.
    pub indexes: u64,
    /// Indexes that could not be read (see `verify`).
    pub bad_indexes: u64,
    /// Sum of the disk sizes of all indexes.
    pub disk_bytes: u64,
    /// Bytes in data slots over all indexes (what restores would write).
    pub referenced_bytes: u64,
    /// Bytes in zero slots over all indexes.
    pub zero_bytes: u64,
    /// `referenced_bytes / plain_bytes`: how often a stored byte is used.
    pub dedup_ratio: f64,
    /// `plain_bytes / (hot_bytes + cold_bytes)`.
    pub compression_ratio: f64,
}

/// A chunk that failed verification.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BadChunk {
    /// The chunk.
    pub id: ChunkId,
    /// Its file (where it was found).
    pub path: PathBuf,
    /// What failed.
    pub reason: String,
    /// Indexes that reference it (sorted): restores of these fail until a
    /// backup holding the same data stores the chunk again.
    pub referenced_by: Vec<String>,
    /// Where the file was moved (`<tier>/quarantine/<hex>`); `None` when it
    /// vanished before it could be moved (a concurrent gc or tier run).
    pub quarantined: Option<PathBuf>,
}

/// A referenced chunk in neither tier.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MissingChunk {
    /// The chunk.
    pub id: ChunkId,
    /// Indexes that reference it (sorted).
    pub referenced_by: Vec<String>,
    /// Its quarantined file when an earlier `verify` (or `put`) moved it aside.
    pub quarantined: Option<PathBuf>,
}

/// An index that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BadIndex {
    /// The index name.
    pub name: String,
    /// The error.
    pub reason: String,
}

/// What `verify` found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Chunk files checked.
    pub chunks_checked: u64,
    /// Their plaintext bytes.
    pub plain_bytes_checked: u64,
    /// Indexes checked.
    pub indexes_checked: u64,
    /// Chunks that fail their checks.
    pub bad_chunks: Vec<BadChunk>,
    /// Referenced chunks that do not exist.
    pub missing_chunks: Vec<MissingChunk>,
    /// Indexes that cannot be read.
    pub bad_indexes: Vec<BadIndex>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.bad_chunks.is_empty() && self.missing_chunks.is_empty() && self.bad_indexes.is_empty()
    }
}

/// Every chunk file of a tier.
pub(crate) fn walk_chunks(tier: &Tier) -> Result<Vec<(ChunkId, PathBuf)>, Error> {
    let mut out = Vec::new();
    for a in fsutil::read_dir_or_empty(&tier.chunks)? {
        let an = a.file_name();
        if an.len() != 2 {
            continue;
        }
        for c in fsutil::read_dir_or_empty(&a.path())? {
            let name = c.file_name();
            let Some(id) = name.to_str().and_then(|s| s.parse::<ChunkId>().ok()) else {
                continue;
            };
            let path = c.path();
            if tier.chunk_path(&id) == path {
                out.push((id, path));
            }
        }
    }
    Ok(out)
}

fn mtime(path: &Path) -> Result<Option<SystemTime>, Error> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(m.modified().ctx("read mtime", path)?)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).ctx("stat chunk", path),
    }
}

/// Raise a file's mtime to at least `t`.
fn bump_mtime(path: &Path, t: SystemTime) -> Result<(), Error> {
    let f = File::open(path).ctx("open chunk", path)?;
    let cur = f
        .metadata()
        .and_then(|m| m.modified())
        .ctx("read mtime", path)?;
    if cur < t {
        f.set_modified(t).ctx("set mtime", path)?;
    }
    Ok(())
}

/// Park a chunk file (rename into `<tier>/tmp`). `Ok(false)` when absent.
fn park(tier: &Tier, id: &ChunkId) -> Result<bool, Error> {
    let src = tier.chunk_path(id);
    match fs::rename(&src, tier.parked_path(id)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).ctx("park chunk", &src),
    }
}

fn remove_parked(tier: &Tier, id: &ChunkId) -> Result<(), Error> {
    let p = tier.parked_path(id);
    match fs::remove_file(&p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).ctx("remove parked chunk", &p),
        _ => Ok(()),
    }
}

/// Put a parked chunk back in its tier unless it exists in some tier, then
/// drop the parked name.
pub(crate) fn unpark(store: &ChunkStore, tier: &Tier, id: &ChunkId) -> Result<(), Error> {
    let parked = tier.parked_path(id);
    if !store.contains(id) {
        let dir = tier.chunk_dir(id);
        ensure_dir(&tier.chunks, &dir)?;
        let dest = tier.chunk_path(id);
        match fs::hard_link(&parked, &dest) {
            Ok(()) => fsutil::fsync_dir(&dir)?,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::AlreadyExists | io::ErrorKind::NotFound
                ) => {}
            Err(e) => return Err(e).ctx("restore parked chunk", &dest),
        }
    }
    remove_parked(tier, id)
}

/// Rename without replacing an existing destination (`renameat2(RENAME_NOREPLACE)`;
/// plain `rename` after checking, on file systems without it). `Ok(false)` when
/// the destination exists.
fn rename_no_replace(from: &Path, to: &Path) -> Result<bool, Error> {
    use nix::errno::Errno;
    use nix::fcntl::{renameat2, RenameFlags};
    match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(Errno::EINVAL | Errno::ENOSYS) => {
            if to.exists() {
                return Ok(false);
            }
            fs::rename(from, to).ctx("rename", from)?;
            Ok(true)
        }
        Err(e) => Err(Error::Io {
            op: "rename",
            path: from.to_path_buf(),
            source: io::Error::from(e),
        }),
    }
}

/// Move a bad chunk file of `tier` aside to `<tier>/quarantine/<hex>` (or
/// `<hex>.1`, `<hex>.2` … when earlier evidence holds that name; evidence is
/// never overwritten or deleted), durably: rename, fsync both directories.
///
/// The moved file is then checked again: if it reads fine, it was a good copy
/// that a concurrent `put` stored after the bad one was found, and it is put
/// back. Returns the quarantine path, or `None` when nothing was quarantined
/// (the file was gone, or good).
pub(crate) fn quarantine(
    store: &ChunkStore,
    tier: &Tier,
    id: &ChunkId,
) -> Result<Option<PathBuf>, Error> {
    let src = tier.chunk_path(id);
    ensure_dir(&tier.base, &tier.quarantine)?;
    let mut n = 0u32;
    let dest = loop {
        let dest = match n {
            0 => tier.quarantine_path(id),
            n => tier.quarantine.join(format!("{}.{n}", id.to_hex())),
        };
        if !src.exists() {
            return Ok(None);
        }
        match rename_no_replace(&src, &dest) {
            Ok(true) => break dest,
            Ok(false) => n += 1,
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        }
    };
    fsutil::fsync_dir(&tier.quarantine)?;
    fsutil::fsync_dir(&tier.chunk_dir(id))?;
    if let Ok(Some(_)) = store.read_chunk_file(&dest, id, chunk::Check::Id) {
        // A good copy (re-created meanwhile): back into place, unless another
        // good copy is there already.
        if !rename_no_replace(&dest, &src)? {
            fs::remove_file(&dest).ctx("remove good copy", &dest)?;
        }
        fsutil::fsync_dir(&tier.chunk_dir(id))?;
        fsutil::fsync_dir(&tier.quarantine)?;
        return Ok(None);
    }
    Ok(Some(dest))
}

/// Copy a chunk to another tier (durably), then remove it from `from`.
/// Returns the file size, or `None` when the chunk was not in `from`.
fn move_chunk(
    store: &ChunkStore,
    from: &Tier,
    to: &Tier,
    id: &ChunkId,
) -> Result<Option<u64>, Error> {
    let src = from.chunk_path(id);
    let Some(src_mtime) = mtime(&src)? else {
        return Ok(None);
    };
    let bytes = match fs::read(&src) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).ctx("read chunk", &src),
    };
    let dir = to.chunk_dir(id);
    ensure_dir(&to.chunks, &dir)?;
    let dst = to.chunk_path(id);
    write_durable(&to.tmp, "move", &dst, &[&bytes], Publish::NoReplace)?;
    // gc age travels with the chunk.
    bump_mtime(&dst, src_mtime)?;
    if park(from, id)? {
        // A put that touched the source before it was parked must count.
        if let Some(t) = mtime(&from.parked_path(id))? {
            bump_mtime(&dst, t)?;
        }
        remove_parked(from, id)?;
    }
    store.inner().access.note(id, Kind::Moved);
    Ok(Some(bytes.len() as u64))
}

fn maintenance_lock(store: &ChunkStore) -> Result<Flock<File>, Error> {
    let root = &store.inner().root;
    let path = root.join(MAINTENANCE_LOCK);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .ctx("open maintenance lock", &path)?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            Err(Error::MaintenanceBusy { root: root.clone() })
        }
        Err((_, e)) => Err(Error::Io {
            op: "lock maintenance",
            path,
            source: io::Error::from(e),
        }),
    }
}

fn require_cold_ok(store: &ChunkStore) -> Result<(), Error> {
    match &store.inner().cold_problem {
        Some(why) => Err(Error::ColdTier {
            root: store.inner().root.clone(),
            reason: format!("unusable, refusing to run: {why}"),
        }),
        None => Ok(()),
    }
}

impl ChunkStore {
    /// Mark and sweep. Mark reads every index (any unreadable index aborts the
    /// run: its chunks would be lost) and touches every referenced chunk; sweep
    /// removes chunks whose mtime is older than (start − `grace`), and never one
    /// put or touched since a writer registered with [`ChunkStore::begin_write`]
    /// began. Safe while backups run: a registered backup's chunks stay whatever
    /// `grace` is; one in another process must take less than `grace`
    /// ([`super::DEFAULT_GC_GRACE`] is 24 h), as every chunk it relies on was put or
    /// touched after it started.
    pub fn gc(&self, grace: Duration) -> Result<GcReport, Error> {
        require_cold_ok(self)?;
        let _lock = maintenance_lock(self)?;
        let start = SystemTime::now();
        let mut cutoff = start.checked_sub(grace).unwrap_or(UNIX_EPOCH);
        // A running writer's chunks are in no index yet: keep all since it began
        // (less a margin for file systems with coarse timestamps).
        if let Some(began) = self.oldest_writer() {
            let floor = began.checked_sub(WRITER_MARGIN).unwrap_or(UNIX_EPOCH);
            cutoff = cutoff.min(floor);
        }
        // Temp files live for seconds; never remove one younger than an hour,
        // whatever the grace.
        let temp_cutoff = cutoff.min(start.checked_sub(TEMP_MIN_AGE).unwrap_or(UNIX_EPOCH));
        let temp_files_removed = self.recover_leftovers(Some(temp_cutoff))?;
        let inner = self.inner();

        // Mark.
        let names = self.list_indexes()?;
        let mut referenced = HashSet::new();
        for name in &names {
            let map = self.read_index(name)?;
            referenced.extend(map.data_ids().copied());
        }
        let mut missing = 0;
        for id in &referenced {
            let mut found = false;
            for tier in inner.tiers() {
                let p = tier.chunk_path(id);
                match File::open(&p) {
                    Ok(f) => {
                        f.set_modified(SystemTime::now()).ctx("touch chunk", &p)?;
                        found = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).ctx("open chunk", &p),
                }
            }
            if !found {
                missing += 1;
            }
        }

        // Sweep.
        let mut report = GcReport {
            cutoff,
            indexes: names.len() as u64,
            referenced_chunks: referenced.len() as u64,
            missing_chunks: missing,
            removed_chunks: 0,
            removed_bytes: 0,
            kept_chunks: 0,
            temp_files_removed,
        };
        for tier in inner.tiers() {
            for (id, path) in walk_chunks(tier)? {
                let meta = match fs::metadata(&path) {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e).ctx("stat chunk", &path),
                };
                if meta.modified().ctx("read mtime", &path)? >= cutoff || referenced.contains(&id) {
                    report.kept_chunks += 1;
                    continue;
                }
                if !park(tier, &id)? {
                    continue;
                }
                let parked = tier.parked_path(&id);
                let touched = mtime(&parked)?.is_some_and(|t| t >= cutoff);
                if touched {
                    unpark(self, tier, &id)?;
                    report.kept_chunks += 1;
                } else {
                    remove_parked(tier, &id)?;
                    report.removed_chunks += 1;
                    report.removed_bytes += meta.len();
                }
            }
        }
        Ok(report)
    }

    /// Move chunks between tiers by the policy, now.
    pub fn tier(&self, policy: &TierPolicy) -> Result<TierReport, Error> {
        self.tier_at(policy, SystemTime::now())
    }

    /// [`ChunkStore::tier`] as if the time were `now` (simulations, tests).
    pub fn tier_at(&self, policy: &TierPolicy, now: SystemTime) -> Result<TierReport, Error> {
        require_cold_ok(self)?;
        let inner = self.inner();
        let Some(cold) = inner.cold.as_ref() else {
            return Err(Error::ColdTier {
                root: inner.root.clone(),
                reason: "the store has no cold tier (create it with one)".into(),
            });
        };
        let _lock = maintenance_lock(self)?;
        let stats = inner.access.load();
        let now_s = unix_secs(now);
        let mut report = TierReport::default();

        for (id, path) in walk_chunks(&inner.hot)? {
            let st = stats.get(&id).copied().unwrap_or_default();
            let last = if st.last > 0 {
                st.last
            } else {
                match mtime(&path)? {
                    Some(t) => unix_secs(t),
                    None => continue,
                }
            };
            let frequent = policy.frequent_reads > 0 && st.reads >= policy.frequent_reads;
            let keep_for = if frequent {
                policy.frequent_cold_after.max(policy.cold_after)
            } else {
                policy.cold_after
            };
            if now_s.saturating_sub(last) >= keep_for.as_secs() {
                if let Some(n) = move_chunk(self, &inner.hot, cold, &id)? {
                    report.demoted += 1;
                    report.demoted_bytes += n;
                }
            } else {
                report.hot_chunks += 1;
            }
        }
        for (id, _) in walk_chunks(cold)? {
            let st = stats.get(&id).copied().unwrap_or_default();
            if policy.promote_after_cold_reads > 0
                && st.cold_reads >= policy.promote_after_cold_reads
            {
                if let Some(n) = move_chunk(self, cold, &inner.hot, &id)? {
                    report.promoted += 1;
                    report.promoted_bytes += n;
                    report.hot_chunks += 1;
                }
            } else {
                report.cold_chunks += 1;
            }
        }
        inner
            .access
            .compact(&inner.hot.tmp, |id| self.contains(id))?;
        Ok(report)
    }

    /// Re-read and re-hash every chunk of both tiers, read every index, and
    /// report bad chunks (with the indexes referencing them), referenced
    /// chunks that are missing, and unreadable indexes.
    pub fn verify(&self) -> Result<VerifyReport, Error> {
        require_cold_ok(self)?;
        let inner = self.inner();
        let mut report = VerifyReport::default();
        let mut refs: HashMap<ChunkId, Vec<String>> = HashMap::new();
        for name in self.list_indexes()? {
            report.indexes_checked += 1;
            match self.read_index(&name) {
                Ok(map) => {
                    let mut ids: Vec<ChunkId> = map.data_ids().copied().collect();
                    ids.sort_unstable();
                    ids.dedup();
                    for id in ids {
                        refs.entry(id).or_default().push(name.clone());
                    }
                }
                Err(e) => report.bad_indexes.push(BadIndex {
                    name,
                    reason: e.to_string(),
                }),
            }
        }
        let mut work = Vec::new();
        for tier in inner.tiers() {
            for (id, path) in walk_chunks(tier)? {
                work.push((tier, id, path));
            }
        }
        let next = AtomicUsize::new(0);
        let results = Mutex::new((0u64, 0u64, Vec::<BadChunk>::new()));
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((tier, id, path)) = work.get(i) else {
                        break;
                    };
                    let res = self.read_chunk(tier, id, chunk::Check::Id);
                    let mut r = results.lock().unwrap_or_else(|p| p.into_inner());
                    match res {
                        Ok(Some(data)) => {
                            r.0 += 1;
                            r.1 += data.len() as u64;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            r.0 += 1;
                            let reason = match e {
                                Error::Corrupt { reason, .. } => reason,
                                other => other.to_string(),
                            };
                            r.2.push(BadChunk {
                                id: *id,
                                path: path.clone(),
                                reason,
                                referenced_by: Vec::new(),
                                quarantined: None,
                            });
                        }
                    }
                });
            }
        });
        let (checked, bytes, mut bad) = results.into_inner().unwrap_or_else(|p| p.into_inner());
        report.chunks_checked = checked;
        report.plain_bytes_checked = bytes;
        // Move every bad file aside: a later put of the same data then stores
        // it again instead of deduplicating against it.
        for b in &mut bad {
            b.referenced_by = refs.get(&b.id).cloned().unwrap_or_default();
            let tier = work
                .iter()
                .find(|(_, id, path)| *id == b.id && *path == b.path)
                .map(|(t, _, _)| *t);
            if let Some(tier) = tier {
                b.quarantined = quarantine(self, tier, &b.id)?;
            }
        }
        bad.sort_by(|a, b| a.path.cmp(&b.path));
        let reported: HashSet<ChunkId> = bad.iter().map(|b| b.id).collect();
        report.bad_chunks = bad;
        // Chunks quarantined just now are reported above, not again as missing.
        let mut missing: Vec<MissingChunk> = refs
            .into_iter()
            .filter(|(id, _)| !reported.contains(id) && !self.contains(id))
            .map(|(id, referenced_by)| MissingChunk {
                id,
                referenced_by,
                quarantined: self.quarantined(&id),
            })
            .collect();
        missing.sort_by_key(|m| m.id);
        report.missing_chunks = missing;
        Ok(report)
    }

    /// Chunk and byte counts per tier, logical bytes referenced by indexes,
    /// dedup and compression ratios. Reads every chunk header and index.
    pub fn stats(&self) -> Result<StoreStats, Error> {
        let inner = self.inner();
        let mut s = StoreStats::default();
        for tier in inner.tiers() {
            let is_cold = tier.name == "cold";
            for (_, path) in walk_chunks(tier)? {
                let mut f = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e).ctx("open chunk", &path),
                };
                let len = f.metadata().ctx("stat chunk", &path)?.len();
                if is_cold {
                    s.cold_chunks += 1;
                    s.cold_bytes += len;
                } else {
                    s.hot_chunks += 1;
                    s.hot_bytes += len;
                }
                let mut hb = [0u8; chunk::HEADER_LEN];
                if f.read_exact(&mut hb).is_ok() {
                    if let Ok(h) = chunk::Header::parse(&hb, inner.chunk_size, inner.keys.is_some())
                    {
                        s.plain_bytes += u64::from(h.plain_len);
                    }
                }
            }
        }
        for name in self.list_indexes()? {
            match self.read_index(&name) {
                Ok(map) => {
                    s.indexes += 1;
                    s.disk_bytes += map.disk_size;
                    let data = map.data_bytes();
                    s.referenced_bytes += data;
                    s.zero_bytes += map.disk_size - data;
                }
                Err(_) => s.bad_indexes += 1,
            }
        }
        let stored = s.hot_bytes + s.cold_bytes;
        s.dedup_ratio = if s.plain_bytes > 0 {
            s.referenced_bytes as f64 / s.plain_bytes as f64
        } else {
            1.0
        };
        s.compression_ratio = if stored > 0 {
            s.plain_bytes as f64 / stored as f64
        } else {
            1.0
        };
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{chunks::touch_verified, StoreConfig};
    use super::*;

    fn store(dir: &Path) -> ChunkStore {
        let cfg = StoreConfig::with_chunk_size(64 << 10);
        ChunkStore::create(dir, None, &cfg, None).unwrap()
    }

    #[test]
    fn gc_keeps_what_a_running_writer_put_whatever_the_grace() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let writing = s.begin_write();
        let other = s.begin_write();
        let id = s
            .put(b"put by a backup whose block map is not written yet")
            .unwrap()
            .id;
        drop(other);
        let report = s.gc(Duration::ZERO).unwrap();
        assert_eq!(report.removed_chunks, 0, "{report:?}");
        assert!(s.get(&id).is_ok());
        // The writer ended without an index (it failed): its chunks may go now (once the
        // file system's coarse clock has passed their mtime).
        drop(writing);
        let gc = || Some(s.gc(Duration::ZERO).unwrap()).filter(|r| r.removed_chunks > 0);
        let report = wait_until::wait_until("gc to remove it", Duration::from_secs(10), gc);
        let report = report.unwrap();
        assert_eq!(report.removed_chunks, 1, "{report:?}");
    }

    #[test]
    fn put_racing_a_park_rewrites_or_is_restored() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let hot = s.inner().hot.clone();
        let id = s.put(b"racing chunk").unwrap().id;
        let path = hot.chunk_path(&id);
        let old = SystemTime::now() - Duration::from_secs(7200);
        let cutoff = SystemTime::now() - Duration::from_secs(3600);

        // put after the park: sees the chunk gone and writes it again.
        File::open(&path).unwrap().set_modified(old).unwrap();
        assert!(park(&hot, &id).unwrap());
        assert!(!touch_verified(&path).unwrap());
        assert!(s.put(b"racing chunk").unwrap().new);
        // gc then finds the parked copy stale and drops it; the new one stays.
        assert!(mtime(&hot.parked_path(&id)).unwrap().unwrap() < cutoff);
        remove_parked(&hot, &id).unwrap();
        assert_eq!(s.get(&id).unwrap(), b"racing chunk");

        // put (touch) before the park: the re-read mtime keeps the chunk.
        File::open(&path).unwrap().set_modified(old).unwrap();
        let f = File::open(&path).unwrap();
        assert!(park(&hot, &id).unwrap());
        f.set_modified(SystemTime::now()).unwrap(); // the touch, through an fd opened before
        assert!(mtime(&hot.parked_path(&id)).unwrap().unwrap() >= cutoff);
        unpark(&s, &hot, &id).unwrap();
        assert!(path.exists());
        assert!(!hot.parked_path(&id).exists());
        assert_eq!(s.get(&id).unwrap(), b"racing chunk");
    }

    #[test]
    fn default_policy_is_sane() {
        let p = TierPolicy::default();
        assert!(p.frequent_cold_after >= p.cold_after);
        assert!(p.promote_after_cold_reads > 0);
    }
}
