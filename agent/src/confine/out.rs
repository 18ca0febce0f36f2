//! Files written below an export directory: under a temporary name, then renamed.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};

use super::beneath::{dup, open_beneath, open_dir, walk};
use super::{io_err, refusal, ConfineError, TEMP_PREFIX};

/// Whether a file weft writes may take the place of one that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// Never: an existing entry of any kind is refused (a restore without `--force`).
    Never,
    /// A regular file is replaced; a symlink, directory or other entry is refused.
    RegularFile,
}

/// A directory opened below an export directory, without symlinks.
#[derive(Debug, Clone)]
pub struct OutDir {
    pub(super) fd: Arc<OwnedFd>,
    pub(super) path: PathBuf,
    pub(super) what: String,
}

impl OutDir {
    /// Opens `dir` as it is, as its own root (creating it if missing): for tools and
    /// tests that write where they are told; weftd's API uses [`ExportDirs::open_dir`].
    pub fn open_unconfined(dir: &Path) -> Result<OutDir, ConfineError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io_err(format!("cannot create {}", dir.display()), e))?;
        let fd = open_dir(dir).map_err(|e| io_err(format!("cannot open {}", dir.display()), e))?;
        Ok(OutDir {
            fd: Arc::new(fd),
            path: dir.to_path_buf(),
            what: "output".into(),
        })
    }

    /// The directory's path as the caller named it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory `rel` (plain names only) below this one, created (`0700`) where
    /// missing.
    pub fn subdir(&self, rel: &Path) -> Result<OutDir, ConfineError> {
        let path = self.path.join(rel);
        if !plain(rel) {
            return Err(ConfineError::Refused(format!(
                "{} {}: only plain names may follow the output directory",
                self.what,
                path.display()
            )));
        }
        let fd = dup(&self.fd).map_err(|e| io_err(format!("cannot open {}", path.display()), e))?;
        let fd = walk(fd, rel, true).map_err(|e| refusal(&self.what, &path, e))?;
        Ok(OutDir {
            fd: Arc::new(fd),
            path,
            what: self.what.clone(),
        })
    }

    /// Whether `name` may be written here under `replace`.
    fn check_target(&self, name: &OsStr, replace: Replace) -> Result<(), ConfineError> {
        let path = self.path.join(name);
        let st = match nix::sys::stat::fstatat(
            Some(self.fd.as_raw_fd()),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(io_err(format!("cannot stat {}", path.display()), e)),
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        match (replace, kind) {
            (_, SFlag::S_IFLNK) => Err(ConfineError::Refused(format!(
                "{} {} is a symlink: weft never writes through or over one",
                self.what,
                path.display()
            ))),
            (Replace::RegularFile, SFlag::S_IFREG) => Ok(()),
            (Replace::RegularFile, _) => Err(ConfineError::Refused(format!(
                "{} {} exists and is not a regular file",
                self.what,
                path.display()
            ))),
            (Replace::Never, _) => Err(ConfineError::Exists(format!(
                "{} {} exists; weft never overwrites a file (--force replaces a regular file)",
                self.what,
                path.display()
            ))),
        }
    }

    /// Starts file `name` here: a new `0600` file under a temporary name, renamed to
    /// `name` by [`Pending::commit`] and removed if it is dropped uncommitted.
    pub fn create(&self, name: &OsStr, replace: Replace) -> Result<Pending, ConfineError> {
        check_name(&self.what, &self.path, name)?;
        self.check_target(name, replace)?;
        let tmp = temp_name()?;
        let fd = open_beneath(
            self.fd.as_fd(),
            Path::new(&tmp),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| {
            io_err(
                format!("cannot create a file in {}", self.path.display()),
                e,
            )
        })?;
        Ok(Pending {
            dir: self.clone(),
            tmp,
            name: name.to_os_string(),
            replace,
            file: Arc::new(File::from(fd)),
            done: false,
        })
    }

    /// Moves `from`, a finished file in weftd's private work directory, here as `name`
    /// (`0600`): renamed when both are on one file system, else copied.
    pub fn place(&self, from: &Path, name: &OsStr, replace: Replace) -> Result<(), ConfineError> {
        check_name(&self.what, &self.path, name)?;
        self.check_target(name, replace)?;
        let what = |verb: &str| format!("cannot {verb} {}", from.display());
        let mut src = File::open(from).map_err(|e| io_err(what("open"), e))?;
        nix::sys::stat::fchmod(src.as_raw_fd(), Mode::from_bits_truncate(0o600))
            .map_err(|e| io_err(what("chmod"), e))?;
        src.sync_all().map_err(|e| io_err(what("sync"), e))?;
        let tmp = temp_name()?;
        match nix::fcntl::renameat(None, from, Some(self.fd.as_raw_fd()), Path::new(&tmp)) {
            Ok(()) => Pending {
                dir: self.clone(),
                tmp,
                name: name.to_os_string(),
                replace,
                file: Arc::new(src),
                done: false,
            }
            .commit(),
            Err(Errno::EXDEV) => {
                let pending = self.create(name, replace)?;
                io::copy(&mut src, &mut &*pending.file).map_err(|e| {
                    io_err(
                        format!(
                            "cannot copy {} to {}",
                            from.display(),
                            pending.path().display()
                        ),
                        e,
                    )
                })?;
                let _ = std::fs::remove_file(from);
                pending.commit()
            }
            Err(e) => Err(io_err(what("move"), e)),
        }
    }
}

/// `name` must be one plain file name.
fn check_name(what: &str, dir: &Path, name: &OsStr) -> Result<(), ConfineError> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(ConfineError::Refused(format!(
            "{what}: {:?} in {} is not a plain file name",
            name,
            dir.display()
        )));
    }
    Ok(())
}

fn plain(rel: &Path) -> bool {
    rel.components().all(|c| matches!(c, Component::Normal(_)))
}

/// `.weft-tmp-` and 16 random hex digits.
fn temp_name() -> Result<OsString, ConfineError> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| {
            io_err(
                "cannot draw a random name",
                io::Error::other("no randomness"),
            )
        })?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(OsString::from(format!("{TEMP_PREFIX}{hex}")))
}

/// A file being written under a temporary name in its final directory.
#[derive(Debug)]
pub struct Pending {
    dir: OutDir,
    tmp: OsString,
    name: OsString,
    replace: Replace,
    file: Arc<File>,
    done: bool,
}

impl Pending {
    /// The open file (read-write).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// The final path.
    pub fn path(&self) -> PathBuf {
        self.dir.path.join(&self.name)
    }

    /// The temporary file's path (for messages and crash records).
    pub fn temp_path(&self) -> PathBuf {
        self.dir.path.join(&self.tmp)
    }

    /// A path another process running as root (QEMU) can open to reach exactly this
    /// file, whatever happens to the names on the way: this process's descriptor.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.file.as_raw_fd()
        ))
    }

    /// Syncs the file, renames it into place (refusing what `replace` refuses: a name
    /// taken meanwhile, a symlink planted meanwhile) and syncs the directory.
    pub fn commit(mut self) -> Result<(), ConfineError> {
        let path = self.path();
        self.file
            .sync_all()
            .map_err(|e| io_err(format!("cannot sync {}", self.temp_path().display()), e))?;
        self.dir.check_target(&self.name, self.replace)?;
        let dirfd = Some(self.dir.fd.as_raw_fd());
        let renamed = match self.replace {
            Replace::Never => nix::fcntl::renameat2(
                dirfd,
                self.tmp.as_os_str(),
                dirfd,
                self.name.as_os_str(),
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            ),
            Replace::RegularFile => {
                nix::fcntl::renameat(dirfd, self.tmp.as_os_str(), dirfd, self.name.as_os_str())
            }
        };
        match renamed {
            Ok(()) => {}
            // Taken since the check: say what took it.
            Err(Errno::EEXIST) => {
                return Err(match self.dir.check_target(&self.name, Replace::Never) {
                    Err(e) => e,
                    Ok(()) => {
                        ConfineError::Exists(format!("{} {} exists", self.dir.what, path.display()))
                    }
                })
            }
            Err(e) => return Err(io_err(format!("cannot rename into {}", path.display()), e)),
        }
        self.done = true;
        nix::unistd::fsync(self.dir.fd.as_raw_fd())
            .map_err(|e| io_err(format!("cannot sync {}", self.dir.path.display()), e))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            let _ = nix::unistd::unlinkat(
                Some(self.dir.fd.as_raw_fd()),
                self.tmp.as_os_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// Removes a temporary file a killed weftd left (named in a crash record); only a
/// name weft gives its temporary files is removed.
pub fn remove_leftover(path: &Path) -> bool {
    let ours = path
        .file_name()
        .is_some_and(|n| n.as_bytes().starts_with(TEMP_PREFIX.as_bytes()));
    ours && path.is_absolute() && std::fs::remove_file(path).is_ok()
}
