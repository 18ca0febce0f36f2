//! Host images the API names (a disk and its backing file), and what weftd checks before
//! QEMU opens one.
//!
//! weftd never lets QEMU guess: every image reaches QEMU with its driver named and, for
//! a qcow2, its backing node named (or `null`), so QEMU opens no file an image's header
//! names. weftd reads the headers itself ([`weft_blockdev::qcow2`], bounded and fuzzed):
//!
//! - The format is the one the caller gives (`raw` or `qcow2`, whatever the file is
//!   called); without one, weftd's own reading decides (the qcow2 magic, else raw) and
//!   the result is stored, so a later start never probes. `qcow2` for a file without a
//!   qcow2 header is refused; `raw` for a qcow2 file shows its bytes to the guest as
//!   they are (QEMU follows nothing in them).
//! - A qcow2 whose header names a backing file is refused unless the caller gives that
//!   same file as the disk's `backing`, and the backing is itself a raw image or a qcow2
//!   without a backing of its own. An external data file, unknown incompatible feature
//!   bits, a corrupt mark or encryption are refused whatever the caller says.
//! - At each start, the qcow2 images of a configuration are read again: a chain that
//!   ends in a header naming a backing file is extended only through the overlays weft
//!   made itself (under its data directory's `environments/` and `weaves/`), and
//!   refused otherwise.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use weft_blockdev::qcow2::{self, Probe};
use weft_qmp::launch::{BackingImage, DiskConfig, DiskFormat, VmConfig, MAX_BACKING_CHAIN};

use crate::error::ApiError;
use crate::model::DiskRequest;

/// Checks a host path the API names as an image (a disk or a disk's backing file): an
/// absolute path to a regular file or a block device. Every host image path of a
/// request passes here before weftd reads it or QEMU opens it: this is where a
/// confinement of images to configured directories belongs.
pub fn check_host_image(what: &str, path: &Path) -> Result<(), ApiError> {
    if !path.is_absolute() {
        return Err(ApiError::BadRequest(format!(
            "{what} {} is a relative path; weftd needs absolute paths (the CLI makes them absolute for you)",
            path.display()
        )));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() || m.file_type().is_block_device() => Ok(()),
        Ok(_) => Err(ApiError::BadRequest(format!(
            "{what} {} is neither a regular file nor a block device",
            path.display()
        ))),
        Err(e) => Err(ApiError::BadRequest(format!(
            "{what} {}: {e}",
            path.display()
        ))),
    }
}

fn probe(what: &str, path: &Path) -> Result<Probe, ApiError> {
    qcow2::probe(path).map_err(|e| match &e {
        qcow2::ProbeError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            ApiError::BadRequest(format!("{what}: {} does not exist", path.display()))
        }
        _ => ApiError::BadRequest(format!("{what}: {e}")),
    })
}

fn refuse(what: &str, path: &Path, header: &qcow2::Header) -> Result<(), ApiError> {
    match header.refusal() {
        Some(why) => Err(ApiError::BadRequest(format!(
            "{what}: weftd does not open {}: {why}",
            path.display()
        ))),
        None => Ok(()),
    }
}

fn parse_format(what: &str, text: &str) -> Result<DiskFormat, ApiError> {
    match text {
        "raw" => Ok(DiskFormat::Raw),
        "qcow2" => Ok(DiskFormat::Qcow2),
        other => Err(ApiError::BadRequest(format!(
            "{what}: unknown format {other:?}; use raw or qcow2"
        ))),
    }
}

/// Whether two paths are the same file (device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// The disk a create request asks for, checked: its path, its format (given or read
/// by weftd), and its backing file (only the one the caller gives, and only if the
/// image's header names that same file).
pub fn disk_from_request(name: String, req: DiskRequest) -> Result<DiskConfig, ApiError> {
    let what = format!("disk {name}");
    check_host_image(&what, &req.path)?;
    let path = req.path;
    let found = probe(&what, &path)?;
    let format = match (req.format.as_deref(), &found) {
        (Some(text), _) => {
            let given = parse_format(&what, text)?;
            if given == DiskFormat::Qcow2 && found == Probe::Raw {
                return Err(ApiError::BadRequest(format!(
                    "{what}: format qcow2 was given but {} has no qcow2 header; give format=raw if it is a raw image",
                    path.display()
                )));
            }
            given
        }
        (None, Probe::Raw) => DiskFormat::Raw,
        (None, Probe::Qcow2(_)) => DiskFormat::Qcow2,
    };
    let header = match (&found, format) {
        (Probe::Qcow2(h), DiskFormat::Qcow2) => Some(h),
        _ => None,
    };
    if let Some(h) = header {
        refuse(&what, &path, h)?;
    }
    let named = header.and_then(|h| h.backing_file.as_ref().map(|_| h));
    let backing = match (named, req.backing) {
        (None, None) => Vec::new(),
        (None, Some(b)) => {
            return Err(ApiError::BadRequest(format!(
                "{what}: backing {} was given but {} {}; drop the backing",
                b.display(),
                path.display(),
                if format == DiskFormat::Raw {
                    "is used as a raw image, which has none"
                } else {
                    "names no backing file in its header"
                }
            )))
        }
        (Some(h), None) => {
            return Err(ApiError::BadRequest(format!(
                "{what}: the qcow2 header of {} names the backing file {}; weftd does not let QEMU open files an image names: give it as the disk's backing (--disk PATH,backing=FILE) if you trust it",
                path.display(),
                h.backing_name().unwrap_or_default()
            )))
        }
        (Some(h), Some(b)) => vec![checked_backing(&what, &path, h, &b)?],
    };
    Ok(DiskConfig {
        name,
        path,
        format,
        read_only: req.read_only,
        backing,
    })
}

/// The backing file `given` of `image` (whose header is `h`), checked: the file the
/// header names, itself raw or a qcow2 without a backing of its own.
fn checked_backing(
    what: &str,
    image: &Path,
    h: &qcow2::Header,
    given: &Path,
) -> Result<BackingImage, ApiError> {
    check_host_image(&format!("{what} backing"), given)?;
    let named = h.backing_path(image);
    if !named.as_deref().is_some_and(|n| same_file(n, given)) {
        return Err(ApiError::BadRequest(format!(
            "{what}: backing {} was given but the header of {} names {}; give the file it names",
            given.display(),
            image.display(),
            h.backing_name().unwrap_or_default()
        )));
    }
    let recorded = h.backing_format_name().map_err(|name| {
        ApiError::BadRequest(format!(
            "{what}: the header of {} says its backing file is in format {name}; weftd opens raw and qcow2 only",
            image.display()
        ))
    })?;
    let what_b = format!("{what} backing {}", given.display());
    let found = probe(&what_b, given)?;
    let format = match (recorded, &found) {
        (Some("raw"), _) => DiskFormat::Raw,
        (Some(_), Probe::Raw) => {
            return Err(ApiError::BadRequest(format!(
                "{what_b}: the header of {} says qcow2 but the file has no qcow2 header",
                image.display()
            )))
        }
        (_, Probe::Qcow2(_)) => DiskFormat::Qcow2,
        (None, Probe::Raw) => DiskFormat::Raw,
    };
    if let (DiskFormat::Qcow2, Probe::Qcow2(bh)) = (format, &found) {
        refuse(&what_b, given, bh)?;
        if let Some(name) = bh.backing_name() {
            return Err(ApiError::BadRequest(format!(
                "{what_b}: it names a backing file of its own ({name}); weftd takes a backing image only without one"
            )));
        }
    }
    Ok(BackingImage {
        path: given.to_path_buf(),
        format,
    })
}

/// Reads the qcow2 images of `config`'s disks again before QEMU starts on them: each
/// must be one weftd opens (no external data file, no unknown feature bits), and the
/// lowest qcow2 of each chain must name no backing file, unless it is an overlay weft
/// made itself (under `data_dir`'s `environments/` or `weaves/`): then the chain is
/// extended with what its header names, as weft wrote it. Configurations stored before
/// chains were recorded start this way.
pub fn pin_backing(config: &mut VmConfig, data_dir: &Path) -> Result<(), ApiError> {
    for disk in config.disks.iter_mut() {
        pin_disk(disk, data_dir)?;
    }
    Ok(())
}

/// [`pin_backing`] for one disk.
pub fn pin_disk(disk: &mut DiskConfig, data_dir: &Path) -> Result<(), ApiError> {
    let own: Vec<PathBuf> = ["environments", "weaves"]
        .iter()
        .map(|d| canonical(&data_dir.join(d)))
        .collect();
    let made_by_weft = |p: &Path| {
        let c = canonical(p);
        own.iter().any(|d| c.starts_with(d))
    };
    {
        let what = format!("disk {}", disk.name);
        let images: Vec<(PathBuf, DiskFormat)> = std::iter::once((disk.path.clone(), disk.format))
            .chain(disk.backing.iter().map(|b| (b.path.clone(), b.format)))
            .collect();
        for (path, format) in &images {
            if *format == DiskFormat::Qcow2 {
                if let Probe::Qcow2(h) = probe(&what, path)? {
                    refuse(&what, path, &h)?;
                }
            }
        }
        let (mut path, mut format) = images.last().cloned().unwrap_or_default();
        while format == DiskFormat::Qcow2 {
            let h = match probe(&what, &path)? {
                Probe::Qcow2(h) => h,
                Probe::Raw => {
                    return Err(ApiError::BadRequest(format!(
                        "{what}: {} is configured as qcow2 but has no qcow2 header",
                        path.display()
                    )))
                }
            };
            let Some(name) = h.backing_name() else { break };
            let next = h.backing_path(&path).filter(|_| made_by_weft(&path));
            let Some(next) = next else {
                return Err(ApiError::BadRequest(format!(
                    "{what}: the qcow2 header of {} names the backing file {name}, which the environment's configuration does not give; weftd does not let QEMU open files an image names",
                    path.display()
                )));
            };
            if disk.backing.len() >= MAX_BACKING_CHAIN {
                return Err(ApiError::BadRequest(format!(
                    "{what}: its backing chain is longer than {MAX_BACKING_CHAIN} images"
                )));
            }
            let next_format = match h.backing_format_name() {
                Ok(Some(f)) => parse_format(&what, f)?,
                Ok(None) => match probe(&what, &next)? {
                    Probe::Raw => DiskFormat::Raw,
                    Probe::Qcow2(_) => DiskFormat::Qcow2,
                },
                Err(other) => {
                    return Err(ApiError::BadRequest(format!(
                        "{what}: {} names a backing file in format {other}; weftd opens raw and qcow2 only",
                        path.display()
                    )))
                }
            };
            if next_format == DiskFormat::Qcow2 {
                if let Probe::Qcow2(nh) = probe(&what, &next)? {
                    refuse(&what, &next, &nh)?;
                }
            }
            disk.backing.push(BackingImage {
                path: next.clone(),
                format: next_format,
            });
            (path, format) = (next, next_format);
        }
    }
    Ok(())
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img(args: &[&str]) {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn req(path: &Path, format: Option<&str>, backing: Option<&Path>) -> DiskRequest {
        DiskRequest {
            path: path.to_path_buf(),
            name: None,
            format: format.map(str::to_string),
            read_only: false,
            backing: backing.map(Path::to_path_buf),
        }
    }

    fn refused(r: Result<DiskConfig, ApiError>, needle: &str) {
        match r {
            Err(ApiError::BadRequest(m)) => {
                assert!(m.contains(needle), "{m:?} lacks {needle:?}");
                assert!(!m.contains('\n'), "{m:?}");
            }
            other => panic!("{other:?}, want a refusal with {needle:?}"),
        }
    }

    #[test]
    fn formats_are_the_callers_or_weftds_own_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        // A raw image named .qcow2, and a qcow2 named .raw.
        std::fs::write(p("raw.qcow2"), vec![0u8; 1 << 16]).unwrap();
        qemu_img(&["create", "-f", "qcow2", p("q.raw").to_str().unwrap(), "1M"]);
        let d = disk_from_request("vda".into(), req(&p("raw.qcow2"), None, None)).unwrap();
        assert_eq!((d.format, d.backing.len()), (DiskFormat::Raw, 0));
        let d = disk_from_request("vda".into(), req(&p("q.raw"), None, None)).unwrap();
        assert_eq!(d.format, DiskFormat::Qcow2);
        // The caller's word wins: raw shows the qcow2's bytes as they are.
        let d = disk_from_request("vda".into(), req(&p("q.raw"), Some("raw"), None)).unwrap();
        assert_eq!(d.format, DiskFormat::Raw);
        refused(
            disk_from_request("vda".into(), req(&p("raw.qcow2"), Some("qcow2"), None)),
            "has no qcow2 header",
        );
        refused(
            disk_from_request("vda".into(), req(&p("raw.qcow2"), Some("vmdk"), None)),
            "unknown format",
        );
        refused(
            disk_from_request("vda".into(), req(Path::new("rel.raw"), None, None)),
            "relative",
        );
        refused(
            disk_from_request("vda".into(), req(dir.path(), None, None)),
            "neither",
        );
    }

    #[test]
    fn backing_files_only_when_given_and_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let s = |n: &str| p(n).to_str().unwrap().to_string();
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "/etc/hostname",
            "-F",
            "raw",
            &s("h.qcow2"),
        ]);
        refused(
            disk_from_request("vda".into(), req(&p("h.qcow2"), None, None)),
            "/etc/hostname",
        );
        // As raw, nothing in the header is followed: allowed (the guest sees the bytes).
        let d = disk_from_request("vda".into(), req(&p("h.qcow2"), Some("raw"), None)).unwrap();
        assert_eq!(d.format, DiskFormat::Raw);
        // A base raw image, an overlay on it (relative name), given explicitly: allowed.
        std::fs::write(p("base.img"), vec![0u8; 1 << 20]).unwrap();
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.img",
            "-F",
            "raw",
            &s("top.qcow2"),
        ]);
        let d = disk_from_request(
            "vda".into(),
            req(&p("top.qcow2"), None, Some(&p("base.img"))),
        )
        .unwrap();
        assert_eq!(
            d.backing,
            vec![BackingImage {
                path: p("base.img"),
                format: DiskFormat::Raw
            }]
        );
        refused(
            disk_from_request("vda".into(), req(&p("top.qcow2"), None, None)),
            "base.img",
        );
        // Another file than the header names.
        std::fs::write(p("other.img"), vec![0u8; 1 << 20]).unwrap();
        refused(
            disk_from_request(
                "vda".into(),
                req(&p("top.qcow2"), None, Some(&p("other.img"))),
            ),
            "names",
        );
        // A backing given for an image without one.
        qemu_img(&["create", "-f", "qcow2", &s("plain.qcow2"), "1M"]);
        refused(
            disk_from_request(
                "vda".into(),
                req(&p("plain.qcow2"), None, Some(&p("base.img"))),
            ),
            "drop the backing",
        );
        // A backing with a backing of its own.
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            &s("top.qcow2"),
            "-F",
            "qcow2",
            &s("two.qcow2"),
        ]);
        refused(
            disk_from_request(
                "vda".into(),
                req(&p("two.qcow2"), None, Some(&p("top.qcow2"))),
            ),
            "of its own",
        );
        // An external data file is refused whatever is given.
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", s("d.raw")),
            &s("d.qcow2"),
            "1M",
        ]);
        refused(
            disk_from_request("vda".into(), req(&p("d.qcow2"), None, None)),
            "external data file",
        );
    }

    #[test]
    fn pin_backing_follows_only_weft_overlays() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let envdir = data.join("environments/e");
        std::fs::create_dir_all(&envdir).unwrap();
        let user = dir.path().join("user.img");
        std::fs::write(&user, vec![0u8; 1 << 20]).unwrap();
        let top = envdir.join("vda-1.qcow2");
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            user.to_str().unwrap(),
            "-F",
            "raw",
            top.to_str().unwrap(),
        ]);
        let disk = |path: &Path| DiskConfig {
            name: "vda".into(),
            path: path.to_path_buf(),
            format: DiskFormat::Qcow2,
            read_only: false,
            backing: Vec::new(),
        };
        // A weft overlay stored without its chain gets it from its header.
        let mut config = VmConfig {
            disks: vec![disk(&top)],
            ..VmConfig::default()
        };
        pin_backing(&mut config, &data).unwrap();
        assert_eq!(
            config.disks[0].backing,
            vec![BackingImage {
                path: user.clone(),
                format: DiskFormat::Raw
            }]
        );
        // Pinning again changes nothing.
        let before = config.clone();
        pin_backing(&mut config, &data).unwrap();
        assert_eq!(config, before);
        // The same overlay outside weft's directories is refused.
        let outside = dir.path().join("o.qcow2");
        std::fs::copy(&top, &outside).unwrap();
        let mut config = VmConfig {
            disks: vec![disk(&outside)],
            ..VmConfig::default()
        };
        match pin_backing(&mut config, &data) {
            Err(ApiError::BadRequest(m)) => assert!(m.contains("does not give"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
