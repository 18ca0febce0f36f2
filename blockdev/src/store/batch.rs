//! Put batches: many chunk writes made durable by one `syncfs` instead of two
//! fsyncs each.
//!
//! A plain [`ChunkStore::put`] fsyncs the chunk file and its directory, which
//! costs a journal commit per chunk and dominates backups made of many small
//! chunks. A [`PutBatch`] writes chunks the same way (temp file, `link` into
//! place, so a reader never sees a partial file) but without fsync, and makes
//! them all durable at [`PutBatch::commit`] with one `syncfs` of the hot tier's
//! file system (what Proxmox Backup Server's default `sync-level=filesystem`
//! does). Indexes that reference the chunks are written after the commit.
//!
//! Crash safety: before its first chunk, a batch durably creates a marker
//! `<root>/pending/<name>.batch` holding its start time, and keeps an exclusive
//! `flock` on it until it ends. A crash before the commit may leave chunk files
//! that are empty or partly written under their final names (their directory
//! entries reached the disk, their data did not). No index references them, but
//! a later put would deduplicate against them, so a marker whose lock nobody
//! holds means "re-check every hot chunk written since this time": when a store
//! is opened or a new batch starts, each such chunk is read and verified in
//! full, bad ones are removed (a later backup stores them again), the file
//! system is synced and the marker is removed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::error::IoContext;
use super::fsutil::{self, Durability};
use super::{maintenance, ChunkStore, Error, PutOutcome};

/// Directory of batch markers, under the store root.
pub(crate) const PENDING_DIR: &str = "pending";
const MARKER_SUFFIX: &str = ".batch";
const NEW_SUFFIX: &str = ".new";
/// Chunks modified this long before a crashed batch's start are re-checked
/// too (clock steps, coarse timestamps).
const CLOCK_SLACK: Duration = Duration::from_secs(300);
/// A marker file is a few dozen bytes; anything larger is not ours.
const MAX_MARKER_LEN: u64 = 4096;

#[derive(Serialize, Deserialize)]
struct Marker {
    format: String,
    /// Seconds since the Unix epoch when the batch started.
    started: u64,
}

const MARKER_FORMAT: &str = "weft-put-batch";

/// A group of chunk puts made durable together by [`PutBatch::commit`].
///
/// `Send + Sync`: many threads may put through one batch. Dropping a batch
/// without committing leaves its marker, and the next open or batch re-checks
/// its chunks; commit also after a failed backup (committing unreferenced
/// chunks is harmless: gc removes them).
pub struct PutBatch {
    store: ChunkStore,
    marker: PathBuf,
    _lock: Flock<File>,
}

impl std::fmt::Debug for PutBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PutBatch")
            .field("marker", &self.marker)
            .finish_non_exhaustive()
    }
}

impl ChunkStore {
    /// Start a put batch (see [`PutBatch`]). Re-checks the chunks of batches
    /// that crashed first.
    pub fn batch(&self) -> Result<PutBatch, Error> {
        self.recover_batches()?;
        let dir = self.pending_dir();
        fsutil::ensure_dir(self.root(), &dir)?;
        // Locked under a temporary name, then renamed: a marker is never
        // visible unlocked while its batch lives.
        let tmp = fsutil::temp_path(&dir, "batch").with_extension("new");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .ctx("create batch marker", &tmp)?;
        let mut lock =
            Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| Error::Io {
                op: "lock batch marker",
                path: tmp.clone(),
                source: io::Error::from(e),
            })?;
        let marker = Marker {
            format: MARKER_FORMAT.into(),
            started: fsutil::unix_secs(SystemTime::now()),
        };
        let text = serde_json::to_vec(&marker).unwrap_or_default();
        let written = lock
            .write_all(&text)
            .and_then(|()| lock.sync_all())
            .ctx("write batch marker", &tmp);
        let path = tmp.with_extension("batch");
        let published = written.and_then(|()| {
            fs::rename(&tmp, &path).ctx("publish batch marker", &path)?;
            fsutil::fsync_dir(&dir)
        });
        if let Err(e) = published {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(PutBatch {
            store: self.clone(),
            marker: path,
            _lock: lock,
        })
    }

    fn pending_dir(&self) -> PathBuf {
        self.root().join(PENDING_DIR)
    }

    /// Re-check the chunks of every batch whose marker nobody holds (its
    /// process died before the commit). Returns the number of chunk files
    /// removed because they did not read back intact.
    pub(crate) fn recover_batches(&self) -> Result<u64, Error> {
        let dir = self.pending_dir();
        let mut stale: Vec<(PathBuf, Flock<File>, Option<u64>)> = Vec::new();
        for e in fsutil::read_dir_or_empty(&dir)? {
            let path = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            let is_marker = name.ends_with(MARKER_SUFFIX);
            if !is_marker && !name.ends_with(NEW_SUFFIX) {
                continue;
            }
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).ctx("open batch marker", &path),
            };
            let Ok(mut lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
                continue; // a live batch
            };
            if !is_marker {
                // Died before publishing its marker, so before its first chunk.
                let _ = fs::remove_file(&path);
                continue;
            }
            let mut text = Vec::new();
            let started = (&mut *lock)
                .take(MAX_MARKER_LEN)
                .read_to_end(&mut text)
                .ok()
                .and_then(|_| serde_json::from_slice::<Marker>(&text).ok())
                .filter(|m| m.format == MARKER_FORMAT)
                .map(|m| m.started);
            stale.push((path, lock, started));
        }
        if stale.is_empty() {
            return Ok(0);
        }
        // An unreadable marker (torn by the crash) re-checks everything.
        let since = stale
            .iter()
            .map(|(_, _, s)| s.unwrap_or(0))
            .min()
            .unwrap_or(0)
            .saturating_sub(CLOCK_SLACK.as_secs());
        let since = SystemTime::UNIX_EPOCH + Duration::from_secs(since);
        let removed = self.recheck_chunks_since(since)?;
        self.sync_hot()?;
        for (path, _lock, _) in &stale {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).ctx("remove batch marker", path),
            }
        }
        if removed > 0 {
            tracing::warn!(
                store = %self.root().display(),
                removed,
                "removed chunk files an interrupted backup left incomplete"
            );
        }
        Ok(removed)
    }

    /// Read and verify every hot chunk modified at or after `since`; remove
    /// the ones that fail.
    fn recheck_chunks_since(&self, since: SystemTime) -> Result<u64, Error> {
        let hot = &self.inner().hot;
        let mut removed = 0;
        for (id, path) in maintenance::walk_chunks(hot)? {
            let modified = match fs::metadata(&path).and_then(|m| m.modified()) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).ctx("stat chunk", &path),
            };
            if modified < since {
                continue;
            }
            match self.read_chunk_file(&path, &id, super::Check::Id) {
                Ok(_) => {}
                Err(Error::Corrupt { .. }) => match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).ctx("remove incomplete chunk", &path),
                },
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }

    /// `syncfs` of the hot tier's file system.
    fn sync_hot(&self) -> Result<(), Error> {
        syncfs(&self.inner().hot.chunks)
    }
}

fn syncfs(dir: &Path) -> Result<(), Error> {
    let f = File::open(dir).ctx("open directory", dir)?;
    nix::unistd::syncfs(f.as_raw_fd()).map_err(|e| Error::Io {
        op: "syncfs",
        path: dir.to_path_buf(),
        source: io::Error::from(e),
    })
}

impl PutBatch {
    /// Store one chunk like [`ChunkStore::put`], durable only after
    /// [`PutBatch::commit`].
    pub fn put(&self, data: &[u8]) -> Result<PutOutcome, Error> {
        self.store.put_as(data, Durability::Deferred)
    }

    /// The store this batch writes to.
    pub fn store(&self) -> &ChunkStore {
        &self.store
    }

    /// Make every chunk put through this batch durable (one `syncfs`) and
    /// remove the marker. Indexes referencing those chunks may be written after.
    pub fn commit(self) -> Result<(), Error> {
        self.store.sync_hot()?;
        match fs::remove_file(&self.marker) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx("remove batch marker", &self.marker),
        }
    }
}
