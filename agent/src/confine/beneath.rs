//! Opening below a directory descriptor without following symlinks: `openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, or where the kernel lacks it (before 5.6) a
//! walk of `openat(O_NOFOLLOW)` per component.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag};

/// Opens directory `path` (following symlinks: it is configured, or checked after).
pub(super) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: open returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn dup(fd: &OwnedFd) -> io::Result<OwnedFd> {
    fd.try_clone()
}

/// Opens `rel` (plain names) below `dir`, never following a symlink nor leaving `dir`.
pub(super) fn open_beneath(
    dir: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    if force_walk() {
        return open_walk(dir, rel, flags, mode);
    }
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(mode)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    match nix::fcntl::openat2(dir.as_raw_fd(), rel, how) {
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(Errno::ENOSYS) => open_walk(dir, rel, flags, mode),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
thread_local! {
    /// Tests take the walk that kernels without `openat2` (before 5.6) take.
    pub(super) static FORCE_WALK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(test)]
fn force_walk() -> bool {
    FORCE_WALK.with(|f| f.get())
}

#[cfg(not(test))]
fn force_walk() -> bool {
    false
}

/// [`open_beneath`] without `openat2`: one `openat(O_NOFOLLOW)` per component.
fn open_walk(dir: BorrowedFd<'_>, rel: &Path, flags: OFlag, mode: Mode) -> Result<OwnedFd, Errno> {
    let parts: Vec<&OsStr> = rel
        .components()
        .map(|c| match c {
            Component::Normal(p) => Ok(p),
            _ => Err(Errno::EXDEV),
        })
        .collect::<Result<_, _>>()?;
    let Some((last, dirs)) = parts.split_last() else {
        return nix::fcntl::openat(Some(dir.as_raw_fd()), ".", flags | OFlag::O_CLOEXEC, mode)
            // SAFETY: openat returned a new descriptor that nothing else owns.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    };
    let mut cur: Option<OwnedFd> = None;
    for part in dirs {
        let at = cur.as_ref().map_or(dir.as_raw_fd(), |f| f.as_raw_fd());
        let fd = nix::fcntl::openat(
            Some(at),
            *part,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        cur = Some(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let at = cur.as_ref().map_or(dir.as_raw_fd(), |f| f.as_raw_fd());
    let fd = nix::fcntl::openat(
        Some(at),
        *last,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        mode,
    )?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // O_PATH | O_NOFOLLOW opens a symlink itself; openat2 refuses it (ELOOP).
    if flags.contains(OFlag::O_PATH) {
        let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK {
            return Err(Errno::ELOOP);
        }
    }
    Ok(fd)
}

/// Opens directory `rel` below `root`, creating missing components (`0700`) when
/// `create` is set.
pub(super) fn walk(root: OwnedFd, rel: &Path, create: bool) -> Result<OwnedFd, Errno> {
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
    if rel.as_os_str().is_empty() {
        return Ok(root);
    }
    if !create {
        return open_beneath(root.as_fd(), rel, dir_flags, Mode::empty());
    }
    let mut cur = root;
    for part in rel.components() {
        let Component::Normal(part) = part else {
            return Err(Errno::EXDEV);
        };
        let next = match open_beneath(cur.as_fd(), Path::new(part), dir_flags, Mode::empty()) {
            Err(Errno::ENOENT) => {
                match nix::sys::stat::mkdirat(
                    Some(cur.as_raw_fd()),
                    part,
                    Mode::from_bits_truncate(0o700),
                ) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e),
                }
                open_beneath(cur.as_fd(), Path::new(part), dir_flags, Mode::empty())?
            }
            other => other?,
        };
        cur = next;
    }
    Ok(cur)
}
