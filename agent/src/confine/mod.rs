//! Host paths that API callers name, confined to the directories weftd.toml lists.
//!
//! weftd runs as root; without this module a caller could make it boot a VM on any
//! host file, or write a restore over any host file. Three kinds of path are checked:
//!
//! - **Images** (the disks, kernel and initrd of `env create`) must resolve inside
//!   `image_dirs` ([`ImageDirs::resolve`]): the path is canonicalised (symlinks inside
//!   the directories are followed, `..` is refused outright) and weft records the
//!   canonical path. At every launch the recorded path is opened again beneath its
//!   directory without following any symlink ([`check_launch`]), so a file swapped for
//!   a symlink after the create is refused. QEMU is then handed the path (its `-kernel`
//!   cannot take a descriptor, and `query-block` must show the recorded path for
//!   recovery to match it), so a file swapped in the short moment between that open
//!   and QEMU's own is not caught; everything before that moment is.
//! - **Outputs** (`restore --output`, `replay --out`) are written inside `export_dirs`
//!   ([`ExportDirs`]): the export directory is opened, every directory below it with
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` relative to it (a walk with
//!   `O_NOFOLLOW` per component where the kernel lacks `openat2`), and each file is
//!   created `0600` under a random temporary name (`.weft-tmp-<random>`) in its final
//!   directory, fsynced, then renamed into place relative to the directory's
//!   descriptor ([`Pending::commit`]). A rename replaces a directory entry and never
//!   follows a symlink, so no planted symlink makes weft write outside.
//! - **Attached QMP sockets** ([`attach_socket`]) must be sockets (not symlinks to
//!   one), outside weftd's own run and data directories: a caller cannot attach to the
//!   monitor of a QEMU weft launched, or to weftd's own sockets.
//!
//! A path inside one of weftd's own directories (data, run, store, provenance) is
//! refused even when a configured directory contains it, unless that configured
//! directory is itself inside (the defaults `<data_dir>/images` and `<data_dir>/exports`).

mod beneath;
mod out;

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};

use crate::config::Config;
use beneath::{open_beneath, open_dir, walk};
pub use out::{remove_leftover, OutDir, Pending, Replace};

/// Name prefix of the temporary files weft writes before renaming them into place.
pub const TEMP_PREFIX: &str = ".weft-tmp-";

/// Why a path was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// The caller named a path weft does not use (HTTP 400).
    #[error("{0}")]
    Refused(String),
    /// The output exists and may not be replaced (HTTP 409).
    #[error("{0}")]
    Exists(String),
    /// The file system failed (HTTP 500).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl From<ConfineError> for crate::error::ApiError {
    fn from(e: ConfineError) -> Self {
        use crate::error::ApiError;
        match e {
            ConfineError::Refused(m) => ApiError::BadRequest(m),
            ConfineError::Exists(m) => ApiError::Conflict(m),
            ConfineError::Io { what, source } => ApiError::io(what, source),
        }
    }
}

fn io_err(what: impl Into<String>, source: impl Into<io::Error>) -> ConfineError {
    ConfineError::Io {
        what: what.into(),
        source: source.into(),
    }
}

/// A set of configured directories (`image_dirs` or `export_dirs`) and weftd's own.
#[derive(Debug, Clone)]
struct Dirs {
    /// The configuration key, named in refusals.
    key: &'static str,
    /// The default directory first, then the configured ones.
    roots: Vec<PathBuf>,
    /// weftd's own directories.
    reserved: Vec<PathBuf>,
}

/// A path split into the directory it lies in and the rest.
#[derive(Debug)]
struct Split {
    /// The directory (canonical).
    root: PathBuf,
    /// Below it: plain names only.
    rel: PathBuf,
}

impl Dirs {
    fn new(config: &Config, key: &'static str, default: PathBuf, extra: &[PathBuf]) -> Dirs {
        let mut roots = vec![default];
        roots.extend(extra.iter().cloned());
        let mut reserved = vec![
            config.data_dir.clone(),
            config.run_dir.clone(),
            config.store_dir(),
            config.provenance_dir(),
        ];
        reserved.extend(config.store.cold_dir.clone());
        Dirs {
            key,
            roots,
            reserved,
        }
    }

    fn listing(&self) -> String {
        let dirs: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
        format!("{} = [{}]", self.key, dirs.join(", "))
    }

    fn outside(&self, what: &str, path: &Path) -> ConfineError {
        ConfineError::Refused(format!(
            "{what} {} is not inside {}: use a path there, or add its directory to {} in weftd.toml",
            path.display(),
            self.listing(),
            self.key
        ))
    }

    /// Splits absolute `path` (without `..`) into the deepest configured directory it
    /// lies in, as configured or canonical, and the rest; refuses a path that lies in
    /// one of weftd's own directories unless the configured directory does too.
    fn split(&self, what: &str, path: &Path, reserved: bool) -> Result<Split, ConfineError> {
        let path = lexical(what, path)?;
        let mut best: Option<Split> = None;
        for root in &self.roots {
            let Ok(canonical) = std::fs::canonicalize(root) else {
                continue;
            };
            for form in [root.as_path(), canonical.as_path()] {
                let Ok(rel) = path.strip_prefix(clean(form)) else {
                    continue;
                };
                let deeper = best
                    .as_ref()
                    .is_none_or(|b| rel.components().count() < b.rel.components().count());
                if deeper {
                    best = Some(Split {
                        root: canonical.clone(),
                        rel: rel.to_path_buf(),
                    });
                }
            }
        }
        let split = best.ok_or_else(|| self.outside(what, &path))?;
        if reserved {
            let full = split.root.join(&split.rel);
            for own in &self.reserved {
                let own = std::fs::canonicalize(own).unwrap_or_else(|_| clean(own));
                if full.starts_with(&own) && !split.root.starts_with(&own) {
                    return Err(ConfineError::Refused(format!(
                        "{what} {} is inside weftd's own directory {}: use {}",
                        path.display(),
                        own.display(),
                        self.listing()
                    )));
                }
            }
        }
        Ok(split)
    }
}

/// `path` without `.` components; refused when relative or when it has `..`.
fn lexical(what: &str, path: &Path) -> Result<PathBuf, ConfineError> {
    if !path.is_absolute() {
        return Err(ConfineError::Refused(format!(
            "{what} {} is a relative path; give an absolute one",
            path.display()
        )));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(ConfineError::Refused(format!(
            "{what} {} contains `..`; name the file directly",
            path.display()
        )));
    }
    Ok(clean(path))
}

fn clean(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| *c != Component::CurDir)
        .collect()
}

/// Where the disks, kernels and initrds of new environments may come from.
#[derive(Debug, Clone)]
pub struct ImageDirs {
    dirs: Dirs,
    /// weft's own images (overlays, bases) live here; allowed at launch only.
    data_dir: PathBuf,
}

impl ImageDirs {
    /// `<data_dir>/images` and `image_dirs` of `config`.
    pub fn new(config: &Config) -> ImageDirs {
        ImageDirs {
            dirs: Dirs::new(
                config,
                "image_dirs",
                config.images_dir(),
                &config.image_dirs,
            ),
            data_dir: config.data_dir.clone(),
        }
    }

    /// The canonical path of image `path` (`what` names it in refusals: `disk`,
    /// `kernel`, `initrd`): a regular file or block device inside an image directory.
    /// Symlinks are followed only as far as they stay inside.
    pub fn resolve(&self, what: &str, path: &Path) -> Result<PathBuf, ConfineError> {
        let given = lexical(what, path)?;
        let canonical = std::fs::canonicalize(&given).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => refusal(what, &given, Errno::ENOENT),
            _ => ConfineError::Refused(format!("{what} {}: {e}", given.display())),
        })?;
        let split = self.dirs.split(what, &canonical, true).map_err(|e| {
            if canonical == given {
                return e;
            }
            ConfineError::Refused(format!(
                "{what} {} leads to {}, which is not inside {}",
                given.display(),
                canonical.display(),
                self.dirs.listing()
            ))
        })?;
        self.open_image(what, &canonical, &split)?;
        Ok(canonical)
    }

    /// Checks, as QEMU is about to open it, that image `path` of a recorded
    /// configuration is still reached without any symlink below an image directory or
    /// weft's data directory, and is a regular file or block device.
    pub fn recheck(&self, what: &str, path: &Path) -> Result<(), ConfineError> {
        let mut launch = self.dirs.clone();
        launch.roots.push(self.data_dir.clone());
        let split = launch.split(what, path, false)?;
        self.open_image(what, path, &split).map(drop)
    }

    fn open_image(&self, what: &str, path: &Path, split: &Split) -> Result<OwnedFd, ConfineError> {
        if split.rel.as_os_str().is_empty() {
            return Err(ConfineError::Refused(format!(
                "{what} {} is a directory, not a regular file or block device",
                path.display()
            )));
        }
        let root = open_dir(&split.root)
            .map_err(|e| io_err(format!("cannot open {}", split.root.display()), e))?;
        let fd = open_beneath(root.as_fd(), &split.rel, OFlag::O_PATH, Mode::empty())
            .map_err(|e| refusal(what, path, e))?;
        let st = nix::sys::stat::fstat(fd.as_raw_fd())
            .map_err(|e| io_err(format!("cannot stat {}", path.display()), e))?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFLNK {
            return Err(refusal(what, path, Errno::ELOOP));
        }
        if kind != SFlag::S_IFREG && kind != SFlag::S_IFBLK {
            return Err(ConfineError::Refused(format!(
                "{what} {} is not a regular file or block device",
                path.display()
            )));
        }
        Ok(fd)
    }
}

/// Checks every image of `vm` again just before QEMU (or a qemu-storage-daemon) is
/// started on it: see [`ImageDirs::recheck`].
pub fn check_launch(config: &Config, vm: &weft_qmp::launch::VmConfig) -> Result<(), ConfineError> {
    check_disks(config, &vm.disks)?;
    let images = ImageDirs::new(config);
    for (what, path) in [("kernel", &vm.kernel), ("initrd", &vm.initrd)] {
        if let Some(path) = path {
            images.recheck(what, path)?;
        }
    }
    Ok(())
}

/// [`check_launch`] for disks alone.
pub fn check_disks(
    config: &Config,
    disks: &[weft_qmp::launch::DiskConfig],
) -> Result<(), ConfineError> {
    let images = ImageDirs::new(config);
    for d in disks {
        images.recheck(&format!("disk {}", d.name), &d.path)?;
        for b in &d.backing {
            images.recheck(&format!("disk {} backing", d.name), &b.path)?;
        }
    }
    Ok(())
}

/// A refusal for an open that failed below a confined directory.
fn refusal(what: &str, path: &Path, e: Errno) -> ConfineError {
    let why = match e {
        Errno::ELOOP | Errno::EXDEV | Errno::ENOTDIR => {
            "a symlink (or a non-directory) is on the way; weft never follows symlinks there"
                .to_string()
        }
        Errno::ENOENT => "it does not exist".to_string(),
        e => e.desc().to_lowercase(),
    };
    ConfineError::Refused(format!("{what} {}: {why}", path.display()))
}

/// Where weft may write files callers ask for.
#[derive(Debug, Clone)]
pub struct ExportDirs {
    dirs: Dirs,
}

impl ExportDirs {
    /// `<data_dir>/exports` and `export_dirs` of `config`.
    pub fn new(config: &Config) -> ExportDirs {
        ExportDirs {
            dirs: Dirs::new(
                config,
                "export_dirs",
                config.exports_dir(),
                &config.export_dirs,
            ),
        }
    }

    /// Opens directory `dir` (the value of option `what`) inside an export directory,
    /// creating what is missing below it (`0700`) when `create` is set.
    pub fn open_dir(&self, what: &str, dir: &Path, create: bool) -> Result<OutDir, ConfineError> {
        let split = self.dirs.split(what, dir, true)?;
        let root = open_dir(&split.root)
            .map_err(|e| io_err(format!("cannot open {}", split.root.display()), e))?;
        let path = lexical(what, dir)?;
        let fd = walk(root, &split.rel, create).map_err(|e| match e {
            Errno::ENOENT => ConfineError::Refused(format!(
                "{what}: the directory {} does not exist",
                path.display()
            )),
            e => refusal(what, &path, e),
        })?;
        Ok(OutDir {
            fd: Arc::new(fd),
            path,
            what: what.to_string(),
        })
    }

    /// Starts file `path` (the value of option `what`), whose directory must exist
    /// inside an export directory.
    pub fn create(
        &self,
        what: &str,
        path: &Path,
        replace: Replace,
    ) -> Result<Pending, ConfineError> {
        let path = lexical(what, path)?;
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(ConfineError::Refused(format!(
                "{what} {} names no file",
                path.display()
            )));
        };
        self.open_dir(what, dir, false)?.create(name, replace)
    }
}

/// Opens the QMP socket `path` that `env attach` names, for a connection through
/// `/proc/self/fd/N`: it must be a unix socket itself (not a symlink to one), outside
/// weftd's run and data directories. Returns the descriptor (`O_PATH`) and the
/// socket's real path.
pub fn attach_socket(config: &Config, path: &Path) -> Result<(OwnedFd, PathBuf), ConfineError> {
    let what = "QMP socket";
    let path = lexical(what, path)?;
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(ConfineError::Refused(format!(
            "{what} {} names no file",
            path.display()
        )));
    };
    let dir = open_dir(parent)
        .map_err(|e| ConfineError::Refused(format!("{what} {}: {e}", path.display())))?;
    // Where the directory really is, read off the descriptor: a name on the way that
    // changes after this cannot move the socket into weftd's directories.
    let real_dir = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .map_err(|e| io_err(format!("cannot resolve {}", parent.display()), e))?;
    let real = real_dir.join(name);
    for own in [&config.run_dir, &config.data_dir] {
        let own = std::fs::canonicalize(own).unwrap_or_else(|_| clean(own));
        if real.starts_with(&own) {
            return Err(ConfineError::Refused(format!(
                "{what} {} is inside weftd's own directory {}: weft attaches only to VMs it does not run",
                path.display(),
                own.display()
            )));
        }
    }
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ConfineError::Refused(format!("{what} {}: {}", path.display(), e.desc())))?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = nix::sys::stat::fstat(fd.as_raw_fd())
        .map_err(|e| io_err(format!("cannot stat {}", path.display()), e))?;
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFSOCK => Ok((fd, real)),
        SFlag::S_IFLNK => Err(ConfineError::Refused(format!(
            "{what} {} is a symlink; give the socket's own path",
            path.display()
        ))),
        _ => Err(ConfineError::Refused(format!(
            "{} is not a unix socket; pass the path of the VM's QMP socket (-qmp unix:PATH,server=on,wait=off)",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::io::Write as _;
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::beneath::FORCE_WALK;
    use super::*;

    struct Scene {
        _tmp: tempfile::TempDir,
        config: Config,
        images: PathBuf,
        exports: PathBuf,
        outside: PathBuf,
    }

    fn scene() -> Scene {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        let (images, exports, outside) = (root.join("img"), root.join("exp"), root.join("outside"));
        for d in [&images, &exports, &outside] {
            std::fs::create_dir_all(d).unwrap();
        }
        let config = Config {
            data_dir: root.join("data"),
            run_dir: root.join("run"),
            image_dirs: vec![images.clone()],
            export_dirs: vec![exports.clone()],
            ..Config::default()
        };
        std::fs::create_dir_all(config.images_dir()).unwrap();
        std::fs::create_dir_all(config.exports_dir()).unwrap();
        Scene {
            _tmp: tmp,
            config,
            images,
            exports,
            outside,
        }
    }

    fn refused(r: Result<impl std::fmt::Debug, ConfineError>, want: &str) {
        match r {
            Err(ConfineError::Refused(m)) => {
                assert!(m.contains(want), "{m:?} lacks {want:?}");
                assert_eq!(m.lines().count(), 1, "{m:?}");
            }
            other => panic!("expected a refusal with {want:?}, got {other:?}"),
        }
    }

    #[test]
    fn images_resolve_inside_their_directories_only() {
        let s = scene();
        let d = ImageDirs::new(&s.config);
        let disk = s.images.join("a.img");
        std::fs::write(&disk, b"x").unwrap();
        assert_eq!(d.resolve("disk", &disk).unwrap(), disk);
        let default = s.config.images_dir().join("b.img");
        std::fs::write(&default, b"x").unwrap();
        assert_eq!(d.resolve("disk", &default).unwrap(), default);
        // A symlink inside that stays inside resolves to its target.
        symlink(&disk, s.images.join("link.img")).unwrap();
        assert_eq!(d.resolve("disk", &s.images.join("link.img")).unwrap(), disk);

        let secret = s.outside.join("secret");
        std::fs::write(&secret, b"s").unwrap();
        refused(d.resolve("kernel", &secret), "image_dirs = [");
        symlink(&secret, s.images.join("escape.img")).unwrap();
        refused(d.resolve("disk", &s.images.join("escape.img")), "leads to");
        let dotdot = s.images.join("../outside/secret");
        refused(d.resolve("initrd", &dotdot), "`..`");
        refused(d.resolve("disk", Path::new("rel.img")), "relative");
        refused(d.resolve("disk", &s.images.join("none.img")), "none.img");
        refused(d.resolve("disk", &s.images), "not a regular file");
        std::fs::create_dir_all(s.images.join("d")).unwrap();
        refused(d.resolve("disk", &s.images.join("d")), "not a regular file");
        // weftd's own files are not images, even when an image dir contains them.
        let wide = Config {
            image_dirs: vec![s.config.data_dir.parent().unwrap().to_path_buf()],
            ..s.config.clone()
        };
        std::fs::create_dir_all(&wide.data_dir).unwrap();
        std::fs::write(wide.data_dir.join("catalog.db"), b"c").unwrap();
        refused(
            ImageDirs::new(&wide).resolve("disk", &wide.data_dir.join("catalog.db")),
            "weftd's own directory",
        );
    }

    #[test]
    fn launch_refuses_a_file_swapped_for_a_symlink() {
        let s = scene();
        let d = ImageDirs::new(&s.config);
        let disk = s.images.join("a.img");
        std::fs::write(&disk, b"x").unwrap();
        d.recheck("disk vda", &disk).unwrap();
        // weft's own overlays live in the data directory.
        let overlay = s.config.data_dir.join("weaves/w/vda.qcow2");
        std::fs::create_dir_all(overlay.parent().unwrap()).unwrap();
        std::fs::write(&overlay, b"o").unwrap();
        d.recheck("disk vda", &overlay).unwrap();
        std::fs::remove_file(&disk).unwrap();
        symlink(s.outside.join("secret"), &disk).unwrap();
        refused(d.recheck("disk vda", &disk), "symlink");
        for walk in [false, true] {
            FORCE_WALK.with(|f| f.set(walk));
            refused(d.recheck("disk vda", &disk), "symlink");
            std::fs::create_dir_all(s.outside.join("dir")).unwrap();
            std::fs::write(s.outside.join("dir/x.img"), b"x").unwrap();
            let sub = s.images.join(format!("sub{walk}"));
            symlink(s.outside.join("dir"), &sub).unwrap();
            refused(d.recheck("disk vda", &sub.join("x.img")), "symlink");
        }
        FORCE_WALK.with(|f| f.set(false));
    }

    #[test]
    fn outputs_never_follow_symlinks_and_are_private() {
        let s = scene();
        let e = ExportDirs::new(&s.config);
        let victim = s.outside.join("victim");
        symlink(&victim, s.exports.join("out.img")).unwrap();
        symlink(&s.outside, s.exports.join("sub")).unwrap();
        for walk in [false, true] {
            FORCE_WALK.with(|f| f.set(walk));
            refused(
                e.create("--output", &s.exports.join("out.img"), Replace::RegularFile),
                "symlink",
            );
            refused(
                e.create("--output", &s.exports.join("out.img"), Replace::Never),
                "symlink",
            );
            refused(
                e.create("--output", &s.exports.join("sub/x.img"), Replace::Never),
                "symlink",
            );
            refused(
                e.open_dir("--out", &s.exports.join("sub/deeper"), true),
                "symlink",
            );
            refused(
                e.create("--output", &s.exports.join("../outside/x"), Replace::Never),
                "`..`",
            );
            refused(
                e.create("--output", &s.outside.join("x"), Replace::Never),
                "export_dirs = [",
            );
        }
        FORCE_WALK.with(|f| f.set(false));
        assert_eq!(std::fs::read_dir(&s.outside).unwrap().count(), 0);
        assert!(!victim.exists());

        // A file written here: 0600, under a temporary name until committed.
        let p = e
            .create("--output", &s.exports.join("ok.img"), Replace::Never)
            .unwrap();
        (&**p.file()).write_all(b"restored").unwrap();
        assert!(p.temp_path().exists() && !s.exports.join("ok.img").exists());
        p.commit().unwrap();
        let meta = std::fs::metadata(s.exports.join("ok.img")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read(s.exports.join("ok.img")).unwrap(),
            b"restored"
        );
        // Taken: refused unless a regular file may be replaced.
        assert!(matches!(
            e.create("--output", &s.exports.join("ok.img"), Replace::Never),
            Err(ConfineError::Exists(_))
        ));
        let p = e
            .create("--output", &s.exports.join("ok.img"), Replace::RegularFile)
            .unwrap();
        (&**p.file()).write_all(b"again").unwrap();
        p.commit().unwrap();
        assert_eq!(std::fs::read(s.exports.join("ok.img")).unwrap(), b"again");
        // Dropped uncommitted: nothing left.
        drop(
            e.create("--output", &s.exports.join("gone.img"), Replace::Never)
                .unwrap(),
        );
        let names: Vec<_> = std::fs::read_dir(&s.exports)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn a_symlink_planted_before_the_rename_is_replaced_not_followed() {
        let s = scene();
        let e = ExportDirs::new(&s.config);
        let p = e
            .create("--out", &s.exports.join("a.json"), Replace::RegularFile)
            .unwrap();
        (&**p.file()).write_all(b"{}").unwrap();
        // Planted after the check at create: commit checks again and refuses.
        symlink(s.outside.join("victim"), s.exports.join("a.json")).unwrap();
        refused(p.commit(), "symlink");
        assert!(!s.outside.join("victim").exists());
        assert_eq!(std::fs::read_dir(&s.exports).unwrap().count(), 1);
    }

    #[test]
    fn directories_are_made_below_the_export_dir_and_files_placed_in_them() {
        let s = scene();
        let out = ExportDirs::new(&s.config)
            .open_dir("--out", &s.config.exports_dir().join("r/1"), true)
            .unwrap();
        let sub = out.subdir(Path::new("data/app")).unwrap();
        let built = s.config.data_dir.join("built.db");
        std::fs::write(&built, b"db").unwrap();
        sub.place(&built, OsStr::new("app.db"), Replace::RegularFile)
            .unwrap();
        let placed = s.config.exports_dir().join("r/1/data/app/app.db");
        assert_eq!(std::fs::read(&placed).unwrap(), b"db");
        assert_eq!(
            std::fs::metadata(&placed).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!built.exists());
        refused(out.subdir(Path::new("../x")), "plain names");
        symlink(&s.outside, s.config.exports_dir().join("r/1/data/link")).unwrap();
        refused(out.subdir(Path::new("data/link/x")), "symlink");
        // The data directory's other files are weftd's own.
        refused(
            ExportDirs::new(&Config {
                export_dirs: vec![s.config.data_dir.parent().unwrap().to_path_buf()],
                ..s.config.clone()
            })
            .create(
                "--output",
                &s.config.data_dir.join("catalog.db"),
                Replace::RegularFile,
            ),
            "weftd's own directory",
        );
    }

    #[test]
    fn attach_takes_only_a_socket_outside_weftds_directories() {
        let s = scene();
        std::fs::create_dir_all(&s.config.run_dir).unwrap();
        let outside = s.outside.join("vm.qmp");
        let _l1 = std::os::unix::net::UnixListener::bind(&outside).unwrap();
        let inside = s.config.run_dir.join("vm.qmp");
        let _l2 = std::os::unix::net::UnixListener::bind(&inside).unwrap();
        let (_fd, real) = attach_socket(&s.config, &outside).unwrap();
        assert_eq!(real, outside);
        refused(attach_socket(&s.config, &inside), "weftd's own directory");
        let link = s.outside.join("link.qmp");
        symlink(&inside, &link).unwrap();
        refused(attach_socket(&s.config, &link), "symlink");
        std::fs::write(s.outside.join("file"), b"").unwrap();
        refused(
            attach_socket(&s.config, &s.outside.join("file")),
            "not a unix socket",
        );
        // A directory symlink on the way into the run directory is seen through.
        symlink(&s.config.run_dir, s.outside.join("runlink")).unwrap();
        refused(
            attach_socket(&s.config, &s.outside.join("runlink/vm.qmp")),
            "weftd's own directory",
        );
    }
}
