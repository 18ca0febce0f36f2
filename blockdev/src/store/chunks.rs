//! The chunk path of a store: `put` (dedup against both tiers, with the cheap header check
//! before trusting an existing file), `get` (buffered or `O_DIRECT`, waiting out a parked
//! chunk), and where a chunk is.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::access::Kind;
use super::error::{Error, IoContext};
use super::fsutil::{ensure_dir_with, write_published, Durability, Publish};
use super::{
    chunk, maintenance, Check, ChunkId, ChunkStore, PutOutcome, Tier, PARKED_WAIT, PARKED_WAITS,
    PUT_ATTEMPTS,
};

impl ChunkStore {
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
    pub(super) fn not_found(&self, id: &ChunkId) -> Error {
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
    pub(super) fn contains_settled(&self, id: &ChunkId) -> bool {
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
