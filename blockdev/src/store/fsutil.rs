//! Crash-safe file plumbing: temp file, fsync, link/rename, fsync directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::error::{Error, IoContext};

/// Suffix of temp files (in `<tier>/tmp/`).
pub(crate) const TMP_SUFFIX: &str = ".tmp";
/// Suffix of chunk files parked by gc/tier before their removal (in `<tier>/tmp/`).
pub(crate) const PARKED_SUFFIX: &str = ".parked";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Start writing `len` bytes of `f` from `offset` back to the disk without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`; `len` 0 means to the end of the file).
///
/// Nothing is durable after this call; it only lets the disk work while the caller
/// goes on computing, so that the `fsync`/`syncfs` which makes the data durable finds
/// little left to write. Without it a large host page cache holds every written byte
/// until that final sync, and the disk idles until then. Best effort: an error (e.g. a
/// file system without the call) is ignored, the final sync still does the work.
pub fn start_writeback(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: plain syscall on a file descriptor we own for the duration of the call.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// fsync a directory so that entries created or renamed in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), Error> {
    let f = File::open(dir).ctx("open directory", dir)?;
    f.sync_all().ctx("fsync directory", dir)
}

/// Create `dir` and any missing ancestors below `base`, fsyncing each parent
/// whose entries changed. `base` must exist.
pub(crate) fn ensure_dir(base: &Path, dir: &Path) -> Result<(), Error> {
    ensure_dir_with(base, dir, Durability::Now)
}

/// When a write is made durable.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Durability {
    /// Before the call returns: fsync of the file and of its directory.
    Now,
    /// Later, by a `syncfs` of the whole file system (a put batch's commit).
    Deferred,
}

/// [`ensure_dir`], fsyncing parents only with `Durability::Now`.
pub(crate) fn ensure_dir_with(base: &Path, dir: &Path, sync: Durability) -> Result<(), Error> {
    if dir.is_dir() {
        return Ok(());
    }
    let rel = dir.strip_prefix(base).unwrap_or(dir);
    let mut cur = base.to_path_buf();
    for comp in rel.components() {
        let parent = cur.clone();
        cur.push(comp);
        match fs::create_dir(&cur) {
            Ok(()) if sync == Durability::Now => fsync_dir(&parent)?,
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).ctx("create directory", &cur),
        }
    }
    Ok(())
}

/// A fresh temp file name inside `tmp_dir`.
pub(crate) fn temp_path(tmp_dir: &Path, tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    tmp_dir.join(format!(
        "{}-{}-{n}-{nanos:08x}{TMP_SUFFIX}",
        std::process::id(),
        tag
    ))
}

/// How the temp file becomes the final file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Publish {
    /// `link()`: never replaces; the first writer wins (chunks: equal ids mean equal content).
    NoReplace,
    /// `rename()`: replaces an existing file atomically (indexes).
    Replace,
}

/// Write `parts` to a temp file in `tmp_dir`, fsync it, publish it at `dest`
/// (whose directory must exist) and fsync `dest`'s directory.
/// Returns false when `Publish::NoReplace` found `dest` already there.
pub(crate) fn write_durable(
    tmp_dir: &Path,
    tag: &str,
    dest: &Path,
    parts: &[&[u8]],
    how: Publish,
) -> Result<bool, Error> {
    write_published(tmp_dir, tag, dest, parts, how, Durability::Now)
}

/// [`write_durable`] with a choice of when the file becomes durable: with
/// `Durability::Deferred` nothing is fsynced (the caller syncs the file system later
/// and must not reference the file durably before).
pub(crate) fn write_published(
    tmp_dir: &Path,
    tag: &str,
    dest: &Path,
    parts: &[&[u8]],
    how: Publish,
    sync: Durability,
) -> Result<bool, Error> {
    let tmp = temp_path(tmp_dir, tag);
    let res = write_durable_inner(&tmp, dest, parts, how, sync);
    // The temp name is always removed: after a link it is a second name of
    // the published file, after a failure it is garbage.
    if how == Publish::NoReplace || res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

fn write_durable_inner(
    tmp: &Path,
    dest: &Path,
    parts: &[&[u8]],
    how: Publish,
    sync: Durability,
) -> Result<bool, Error> {
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)
            .ctx("create temp file", tmp)?;
        for p in parts {
            f.write_all(p).ctx("write temp file", tmp)?;
        }
        match sync {
            Durability::Now => f.sync_all().ctx("fsync temp file", tmp)?,
            // The batch's syncfs will find the data already on its way.
            Durability::Deferred => start_writeback(&f, 0, 0),
        }
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    match how {
        Publish::Replace => {
            fs::rename(tmp, dest).ctx("rename into place", dest)?;
        }
        Publish::NoReplace => match fs::hard_link(tmp, dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Unsupported | io::ErrorKind::PermissionDenied
                ) =>
            {
                // File systems without hard links: rename replaces an equal chunk, harmless.
                if dest.exists() {
                    return Ok(false);
                }
                fs::rename(tmp, dest).ctx("rename into place", dest)?;
            }
            Err(e) => return Err(e).ctx("link into place", dest),
        },
    }
    if sync == Durability::Now {
        fsync_dir(dir)?;
    }
    Ok(true)
}

/// Seconds since the Unix epoch (0 before it).
pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Read a directory, treating "does not exist" as empty.
pub(crate) fn read_dir_or_empty(dir: &Path) -> Result<Vec<fs::DirEntry>, Error> {
    match fs::read_dir(dir) {
        Ok(rd) => rd.collect::<Result<Vec<_>, _>>().ctx("read directory", dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).ctx("read directory", dir),
    }
}
