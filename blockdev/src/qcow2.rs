//! The qcow2 header, read by weft itself so that QEMU never has to guess.
//!
//! An image a caller hands to weftd is untrusted: its header can name a backing file
//! (`/etc/shadow`, `json:{…}`, an NBD URL) or an external data file that QEMU would
//! open on the host's behalf. weftd reads the header with [`parse_header`] (sans-IO,
//! bounded, fuzzed as `qcow2_header`), refuses what it will not open
//! ([`Header::refusal`]), and names every node of the chain explicitly on QEMU's
//! command line. [`probe`] is the one I/O helper: it reads at most
//! [`MAX_HEADER_BYTES`] from the start of a file.
//!
//! The layout is QEMU's `docs/interop/qcow2.txt` (versions 2 and 3).

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The first four bytes of every qcow2 image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Largest cluster QEMU accepts (2 MiB); the header and its extensions lie in the
/// first cluster.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Smallest cluster QEMU accepts (512 bytes).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: usize = 1023;
/// The most bytes [`parse_header`] looks at: the largest first cluster, plus a backing
/// file name starting at its very end.
pub const MAX_HEADER_BYTES: usize = (1 << MAX_CLUSTER_BITS) + MAX_BACKING_NAME;

/// Incompatible feature bits QEMU 7.2 knows: dirty, corrupt, external data file,
/// compression type, extended L2 entries.
const KNOWN_INCOMPATIBLE: u64 = 0b1_1111;
/// Incompatible feature bit: the image was not closed cleanly (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit: QEMU found corruption and marked the image.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// What the header says, as far as weft cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Guest-visible size in bytes.
    pub size: u64,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// 0 none, 1 AES (refused by QEMU's system emulators), 2 LUKS.
    pub crypt_method: u32,
    /// Incompatible feature bits (0 for version 2).
    pub incompatible_features: u64,
    /// The backing file name the header holds, as raw bytes (QEMU treats it as a
    /// path relative to the image's directory, or a protocol string).
    pub backing_file: Option<Vec<u8>>,
    /// The backing file's format (header extension `0xe2792aca`), if recorded.
    pub backing_format: Option<Vec<u8>>,
    /// An external data file name (header extension `0x44415441`), if any.
    pub data_file: Option<Vec<u8>>,
}

/// Why bytes are not a qcow2 header weft can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Fewer bytes than the header needs.
    #[error("qcow2 header cut short: {needed} bytes needed, {got} present")]
    Truncated {
        /// Bytes the header needs.
        needed: usize,
        /// Bytes given.
        got: usize,
    },
    /// Not `QFI\xfb`.
    #[error("not a qcow2 image (no QFI\\xfb magic)")]
    Magic,
    /// Neither version 2 nor 3.
    #[error("qcow2 version {0} is not supported (2 or 3)")]
    Version(u32),
    /// Cluster size outside 512 B to 2 MiB.
    #[error("qcow2 cluster_bits {0} is outside {MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS}")]
    ClusterBits(u32),
    /// A version 3 header length below 104 or beyond the first cluster.
    #[error("qcow2 header length {0} is invalid")]
    HeaderLength(u32),
    /// The backing file name lies outside the first cluster or is too long.
    #[error("qcow2 backing file name at offset {offset} of {len} bytes is invalid")]
    BackingName {
        /// Its offset in the file.
        offset: u64,
        /// Its length.
        len: u32,
    },
    /// A header extension runs past the first cluster (or the backing file name).
    #[error("qcow2 header extension {magic:#010x} at offset {offset} overruns the header")]
    Extension {
        /// The extension's type.
        magic: u32,
        /// Where it starts.
        offset: usize,
    },
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Whether `prefix` (the first bytes of a file) starts with the qcow2 magic.
pub fn is_qcow2(prefix: &[u8]) -> bool {
    prefix.len() >= 4 && prefix[..4] == MAGIC
}

/// Parses a qcow2 header from the first bytes of an image (give at least the first
/// cluster, at most [`MAX_HEADER_BYTES`] are looked at). Checks what QEMU checks before
/// it follows a name: version, cluster size, header length, where the backing file
/// name lies, and that every header extension fits. Never allocates more than the
/// names it returns (at most [`MAX_BACKING_NAME`] bytes for the backing file, the
/// first cluster for the others).
pub fn parse_header(buf: &[u8]) -> Result<Header, Error> {
    let buf = &buf[..buf.len().min(MAX_HEADER_BYTES)];
    let need = |needed: usize| {
        if buf.len() < needed {
            Err(Error::Truncated {
                needed,
                got: buf.len(),
            })
        } else {
            Ok(())
        }
    };
    need(4)?;
    if !is_qcow2(buf) {
        return Err(Error::Magic);
    }
    need(72)?;
    let version = be32(buf, 4);
    if version != 2 && version != 3 {
        return Err(Error::Version(version));
    }
    let backing_offset = be64(buf, 8);
    let backing_len = be32(buf, 16);
    let cluster_bits = be32(buf, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(Error::ClusterBits(cluster_bits));
    }
    let cluster = 1usize << cluster_bits;
    let size = be64(buf, 24);
    let crypt_method = be32(buf, 32);
    let (incompatible_features, header_len) = if version == 3 {
        need(104)?;
        let len = be32(buf, 100);
        if len < 104 || len as usize > cluster {
            return Err(Error::HeaderLength(len));
        }
        (be64(buf, 72), len as usize)
    } else {
        (0, 72)
    };
    let backing_file = if backing_offset == 0 || backing_len == 0 {
        None
    } else {
        let bad = Error::BackingName {
            offset: backing_offset,
            len: backing_len,
        };
        if backing_offset > cluster as u64
            || backing_len as usize > MAX_BACKING_NAME
            || (backing_offset as usize) < header_len
        {
            return Err(bad);
        }
        let start = backing_offset as usize;
        let end = start + backing_len as usize;
        need(end)?;
        Some(buf[start..end].to_vec())
    };
    // Extensions run from the end of the header to the backing file name, or to the
    // end of the first cluster (as QEMU reads them).
    let ext_end = if backing_file.is_some() {
        backing_offset as usize
    } else {
        cluster
    };
    let mut backing_format = None;
    let mut data_file = None;
    let mut at = header_len;
    // Each extension takes at least 8 bytes, so this ends within ext_end / 8 steps.
    while at + 8 <= ext_end {
        need(at + 8)?;
        let magic = be32(buf, at);
        let len = be32(buf, at + 4) as usize;
        if magic == EXT_END {
            break;
        }
        let data = at + 8;
        if len > ext_end - data {
            return Err(Error::Extension { magic, offset: at });
        }
        need(data + len)?;
        let bytes = &buf[data..data + len];
        match magic {
            EXT_BACKING_FORMAT => backing_format = Some(bytes.to_vec()),
            EXT_DATA_FILE => data_file = Some(bytes.to_vec()),
            _ => {}
        }
        // Data is padded to a multiple of 8.
        at = data + len.div_ceil(8) * 8;
    }
    Ok(Header {
        version,
        size,
        cluster_bits,
        crypt_method,
        incompatible_features,
        backing_file,
        backing_format,
        data_file,
    })
}

impl Header {
    /// Why weft will not hand this image to QEMU at all, whatever the caller says: an
    /// external data file (a second host path the header names), incompatible feature
    /// bits QEMU 7.2 does not know, a corrupt mark, or encryption (weft gives QEMU no
    /// secrets). A backing file is not a refusal here: the caller may give it.
    pub fn refusal(&self) -> Option<String> {
        if self.data_file.is_some() || self.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Some(match &self.data_file {
                Some(name) => format!(
                    "its header names an external data file {}, which weftd does not open",
                    Lossy(name)
                ),
                None => {
                    "its header says it has an external data file, which weftd does not open".into()
                }
            });
        }
        let unknown = self.incompatible_features & !KNOWN_INCOMPATIBLE;
        if unknown != 0 {
            return Some(format!(
                "its header has incompatible feature bits {unknown:#x} that QEMU does not know"
            ));
        }
        if self.incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Some(
                "its header marks it corrupt (repair it with qemu-img check -r all)".into(),
            );
        }
        if self.crypt_method != 0 {
            return Some(format!(
                "it is encrypted (method {}), and weftd gives QEMU no secrets",
                self.crypt_method
            ));
        }
        None
    }

    /// The backing file name as text (lossy), for messages.
    pub fn backing_name(&self) -> Option<String> {
        self.backing_file.as_deref().map(|b| Lossy(b).to_string())
    }

    /// The backing file's format as recorded in the header, if it is one weft knows
    /// (`raw` or `qcow2`); `Err` with the name if the header names another.
    pub fn backing_format_name(&self) -> Result<Option<&'static str>, String> {
        match self.backing_format.as_deref() {
            None => Ok(None),
            Some(b"raw") => Ok(Some("raw")),
            Some(b"qcow2") => Ok(Some("qcow2")),
            Some(other) => Err(Lossy(other).to_string()),
        }
    }

    /// The backing file as a host path: relative names are relative to the
    /// directory of `image`, as QEMU reads them. `None` if there is none, or if the
    /// name is not a plain path (a protocol such as `json:` or `nbd:`, or NUL bytes).
    pub fn backing_path(&self, image: &Path) -> Option<PathBuf> {
        let name = self.backing_file.as_deref()?;
        if name.contains(&0) {
            return None;
        }
        let text = std::str::from_utf8(name).ok()?;
        // QEMU takes `proto:` prefixes before the first '/' as a protocol.
        if let Some(colon) = text.find(':') {
            if !text[..colon].contains('/') {
                return None;
            }
        }
        let p = Path::new(text);
        Some(if p.is_absolute() {
            p.to_path_buf()
        } else {
            image.parent().unwrap_or(Path::new("/")).join(p)
        })
    }
}

/// Bytes shown as text, escaping what is not printable (header names are untrusted).
struct Lossy<'a>(&'a [u8]);

impl fmt::Display for Lossy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = String::from_utf8_lossy(self.0);
        write!(f, "{:?}", text.as_ref())
    }
}

/// What [`probe`] found at the start of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No qcow2 magic: QEMU's `raw` driver shows the bytes as they are.
    Raw,
    /// A qcow2 header.
    Qcow2(Header),
}

/// Why [`probe`] could not read a file's header.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It starts with the qcow2 magic but the header is not valid.
    #[error("{path}: {source}")]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: Error,
    },
}

/// Reads the start of `path` (at most [`MAX_HEADER_BYTES`]) and says whether it is raw
/// or qcow2 (with its header). A file with the qcow2 magic but a header that does not
/// parse is an error, not "raw": QEMU would not read it as raw either when probing.
pub fn probe(path: &Path) -> Result<Probe, ProbeError> {
    let io = |source| ProbeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let mut buf = Vec::with_capacity(4096);
    f.take(MAX_HEADER_BYTES as u64)
        .read_to_end(&mut buf)
        .map_err(io)?;
    if !is_qcow2(&buf) {
        return Ok(Probe::Raw);
    }
    parse_header(&buf)
        .map(Probe::Qcow2)
        .map_err(|source| ProbeError::Header {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 3 header (cluster 64 KiB) with the given extensions and backing name.
    fn image(exts: &[(u32, &[u8])], backing: Option<&[u8]>, incompat: u64) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[72..80].copy_from_slice(&incompat.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        let mut at = 112;
        for (magic, data) in exts {
            b[at..at + 4].copy_from_slice(&magic.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
            b[at + 8..at + 8 + data.len()].copy_from_slice(data);
            at += 8 + data.len().div_ceil(8) * 8;
        }
        if let Some(name) = backing {
            let off = 1024usize;
            b[8..16].copy_from_slice(&(off as u64).to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b[off..off + name.len()].copy_from_slice(name);
        }
        b
    }

    #[test]
    fn plain_image_has_nothing_to_refuse() {
        let h = parse_header(&image(&[], None, 0)).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.cluster_bits, 16);
        assert_eq!(h.backing_file, None);
        assert_eq!(h.refusal(), None);
    }

    #[test]
    fn backing_file_and_format_are_read() {
        let img = image(&[(EXT_BACKING_FORMAT, b"raw")], Some(b"/etc/hostname"), 0);
        let h = parse_header(&img).unwrap();
        assert_eq!(h.backing_name().as_deref(), Some("\"/etc/hostname\""));
        assert_eq!(h.backing_format_name(), Ok(Some("raw")));
        assert_eq!(
            h.backing_path(Path::new("/img/a.qcow2")),
            Some(PathBuf::from("/etc/hostname"))
        );
        // A backing file alone is for the caller to give, not a refusal.
        assert_eq!(h.refusal(), None);
        let rel = parse_header(&image(&[], Some(b"base.raw"), 0)).unwrap();
        assert_eq!(
            rel.backing_path(Path::new("/img/a.qcow2")),
            Some(PathBuf::from("/img/base.raw"))
        );
        for proto in [
            &b"json:{\"file.filename\":\"/x\"}"[..],
            b"nbd:unix:/s",
            b"a\0b",
        ] {
            let h = parse_header(&image(&[], Some(proto), 0)).unwrap();
            assert_eq!(h.backing_path(Path::new("/img/a.qcow2")), None, "{proto:?}");
        }
        let odd = parse_header(&image(&[(EXT_BACKING_FORMAT, b"vmdk")], Some(b"b"), 0)).unwrap();
        assert_eq!(odd.backing_format_name(), Err("\"vmdk\"".into()));
    }

    #[test]
    fn data_files_unknown_bits_corruption_and_encryption_are_refused() {
        let ext = parse_header(&image(&[(EXT_DATA_FILE, b"/dev/sda")], None, 0)).unwrap();
        assert!(ext.refusal().unwrap().contains("/dev/sda"));
        let bit = parse_header(&image(&[], None, INCOMPAT_DATA_FILE)).unwrap();
        assert!(bit.refusal().unwrap().contains("external data file"));
        let unknown = parse_header(&image(&[], None, 1 << 9)).unwrap();
        assert!(unknown.refusal().unwrap().contains("0x200"));
        let corrupt = parse_header(&image(&[], None, INCOMPAT_CORRUPT)).unwrap();
        assert!(corrupt.refusal().unwrap().contains("corrupt"));
        let dirty = parse_header(&image(&[], None, INCOMPAT_DIRTY)).unwrap();
        assert_eq!(dirty.refusal(), None);
        let mut enc = image(&[], None, 0);
        enc[32..36].copy_from_slice(&2u32.to_be_bytes());
        assert!(parse_header(&enc)
            .unwrap()
            .refusal()
            .unwrap()
            .contains("encrypted"));
    }

    #[test]
    fn malformed_headers_are_errors() {
        assert_eq!(
            parse_header(b"QFI"),
            Err(Error::Truncated { needed: 4, got: 3 })
        );
        assert_eq!(parse_header(&[0u8; 512]), Err(Error::Magic));
        let mut v = image(&[], None, 0);
        v[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(parse_header(&v), Err(Error::Version(4)));
        let mut c = image(&[], None, 0);
        c[20..24].copy_from_slice(&22u32.to_be_bytes());
        assert_eq!(parse_header(&c), Err(Error::ClusterBits(22)));
        let mut l = image(&[], None, 0);
        l[100..104].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(parse_header(&l), Err(Error::HeaderLength(100)));
        // A name past the first cluster, or too long.
        let mut n = image(&[], Some(b"x"), 0);
        n[8..16].copy_from_slice(&(1u64 << 20).to_be_bytes());
        assert!(matches!(parse_header(&n), Err(Error::BackingName { .. })));
        let mut long = image(&[], Some(b"x"), 0);
        long[16..20].copy_from_slice(&2000u32.to_be_bytes());
        assert!(matches!(
            parse_header(&long),
            Err(Error::BackingName { .. })
        ));
        // An extension longer than the cluster.
        let mut e = image(&[(EXT_DATA_FILE, b"abc")], None, 0);
        e[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse_header(&e), Err(Error::Extension { .. })));
        // Cut short inside the backing name.
        let cut = image(&[], Some(b"/etc/hostname"), 0);
        assert!(matches!(
            parse_header(&cut[..1030]),
            Err(Error::Truncated { .. })
        ));
        // A version 2 header has no extensions area past 72 bytes but reads.
        let mut v2 = vec![0u8; 512];
        v2[..4].copy_from_slice(&MAGIC);
        v2[4..8].copy_from_slice(&2u32.to_be_bytes());
        v2[20..24].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(parse_header(&v2).unwrap().version, 2);
    }

    #[test]
    fn probe_reads_files() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a.qcow2");
        std::fs::write(&raw, [0u8; 4096]).unwrap();
        assert_eq!(probe(&raw).unwrap(), Probe::Raw);
        let q = dir.path().join("b.raw");
        std::fs::write(&q, image(&[], Some(b"/etc/hostname"), 0)).unwrap();
        match probe(&q).unwrap() {
            Probe::Qcow2(h) => assert!(h.backing_file.is_some()),
            other => panic!("{other:?}"),
        }
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03").unwrap();
        assert!(matches!(probe(&q), Err(ProbeError::Header { .. })));
        assert!(matches!(
            probe(&dir.path().join("none")),
            Err(ProbeError::Io { .. })
        ));
    }

    /// Images made by QEMU's own `qemu-img` read as QEMU reads them.
    #[test]
    fn images_made_by_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let make = |args: &[&str]| {
            let out = std::process::Command::new("qemu-img")
                .args(args)
                .output()
                .expect("qemu-img runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
        make(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "/etc/hostname",
            "-F",
            "raw",
            &p("h.qcow2"),
        ]);
        let Probe::Qcow2(h) = probe(Path::new(&p("h.qcow2"))).unwrap() else {
            panic!("not qcow2")
        };
        assert_eq!(h.backing_file.as_deref(), Some(&b"/etc/hostname"[..]));
        assert_eq!(h.backing_format_name(), Ok(Some("raw")));
        assert_eq!(h.refusal(), None);
        make(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", p("d.raw")),
            &p("d.qcow2"),
            "1M",
        ]);
        let Probe::Qcow2(d) = probe(Path::new(&p("d.qcow2"))).unwrap() else {
            panic!("not qcow2")
        };
        assert!(d.refusal().unwrap().contains("d.raw"), "{:?}", d.refusal());
        make(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            &p("v2.qcow2"),
            "1M",
        ]);
        let Probe::Qcow2(v2) = probe(Path::new(&p("v2.qcow2"))).unwrap() else {
            panic!("not qcow2")
        };
        assert_eq!((v2.version, v2.size, v2.refusal()), (2, 1 << 20, None));
        make(&["create", "-f", "raw", &p("r.qcow2"), "1M"]);
        assert_eq!(probe(Path::new(&p("r.qcow2"))).unwrap(), Probe::Raw);
    }
}
