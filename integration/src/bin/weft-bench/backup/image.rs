//! The benchmark image: deterministic content in 16 MiB stripes (random, unallocated
//! zeros, one repeated MiB, text-like), written once as raw and converted to qcow2, cached
//! by version and size.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use super::{GIB, MIB};
/// The image's content changes kind every this many MiB.
const STRIPE_MIB: u64 = 16;
/// Bump when the image generator changes, so that a cached image is rebuilt.
const IMAGE_VERSION: u32 = 1;

/// What one MiB of the image holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Content {
    /// Incompressible xorshift output, different in every MiB.
    Random,
    /// Never written: a hole in the raw file, unallocated in the qcow2.
    Zero,
    /// The same incompressible MiB, again and again (dedups, does not compress).
    Repeated,
    /// Words from a small vocabulary, different in every MiB (compresses, no dedup).
    Text,
}

fn content_of(mib: u64) -> Content {
    match (mib / STRIPE_MIB) % 6 {
        0 | 3 => Content::Random,
        1 | 4 => Content::Zero,
        2 => Content::Repeated,
        _ => Content::Text,
    }
}

/// xorshift64: fast, deterministic, incompressible enough for zstd and lz4.
pub(super) struct XorShift(u64);

impl XorShift {
    pub(super) fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(super) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for piece in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            piece.copy_from_slice(&v[..piece.len()]);
        }
    }
}

const WORDS: [&str; 48] = [
    "the",
    "virtual",
    "machine",
    "disk",
    "backup",
    "chunk",
    "store",
    "block",
    "image",
    "qemu",
    "snapshot",
    "restore",
    "guest",
    "kernel",
    "page",
    "cache",
    "write",
    "read",
    "export",
    "bitmap",
    "dirty",
    "extent",
    "index",
    "server",
    "client",
    "socket",
    "error",
    "warning",
    "info",
    "debug",
    "request",
    "response",
    "user",
    "system",
    "service",
    "started",
    "stopped",
    "network",
    "address",
    "interface",
    "packet",
    "file",
    "directory",
    "config",
    "value",
    "timeout",
    "retry",
    "success",
];

/// Fills `buf` with the content of MiB number `mib`.
fn fill_mib(mib: u64, buf: &mut [u8]) {
    match content_of(mib) {
        Content::Zero => buf.fill(0),
        Content::Random => XorShift::new(mib + 1).fill(buf),
        Content::Repeated => XorShift::new(0x5eed_b10c).fill(buf),
        Content::Text => {
            let mut rng = XorShift::new(mib + (1 << 40));
            let mut at = 0;
            while at < buf.len() {
                let r = rng.next();
                let word = WORDS[(r % WORDS.len() as u64) as usize].as_bytes();
                let sep: &[u8] = if r >> 60 == 0 { b".\n" } else { b" " };
                for piece in [word, sep] {
                    let n = piece.len().min(buf.len() - at);
                    buf[at..at + n].copy_from_slice(&piece[..n]);
                    at += n;
                }
            }
        }
    }
}

/// The benchmark image, as raw (for restic and borg) and qcow2 (for QEMU), same bytes.
pub(super) struct Image {
    pub(super) raw: PathBuf,
    pub(super) qcow2: PathBuf,
    pub(super) size: u64,
}

impl Image {
    pub(super) fn mib_of(&self, kind: Content) -> u64 {
        (0..self.size / MIB)
            .filter(|&m| content_of(m) == kind)
            .count() as u64
    }
}

/// Builds the image unless a cached one of the same version and size exists.
pub(super) fn prepare_image(dir: &Path, size_gib: u64) -> Result<Image> {
    let stem = format!("backup-image-v{IMAGE_VERSION}-{size_gib}g");
    let image = Image {
        raw: dir.join(format!("{stem}.raw")),
        qcow2: dir.join(format!("{stem}.qcow2")),
        size: size_gib * GIB,
    };
    let raw_ok = fs::metadata(&image.raw).is_ok_and(|m| m.len() == image.size);
    if !raw_ok {
        eprintln!("backup: writing {}", image.raw.display());
        let partial = dir.join(format!("{stem}.raw.partial"));
        let f = File::create(&partial)?;
        f.set_len(image.size)?;
        let mut buf = vec![0u8; MIB as usize];
        for mib in 0..image.size / MIB {
            if content_of(mib) != Content::Zero {
                fill_mib(mib, &mut buf);
                f.write_all_at(&buf, mib * MIB)?;
            }
        }
        f.sync_all()?;
        fs::rename(&partial, &image.raw)?;
        let _ = fs::remove_file(&image.qcow2);
    }
    if !image.qcow2.exists() {
        eprintln!("backup: converting to {}", image.qcow2.display());
        let partial = dir.join(format!("{stem}.qcow2.partial"));
        let out = std::process::Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&image.raw)
            .arg(&partial)
            .output()
            .context("cannot run qemu-img")?;
        ensure!(
            out.status.success(),
            "qemu-img convert failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::rename(&partial, &image.qcow2)?;
    }
    Ok(image)
}
