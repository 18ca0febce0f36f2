//! Data disks for test guests (test-only: uses e2fsprogs on the host).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _};

/// Creates `path` as a sparse raw image of `size_mib` MiB formatted ext4 (no partition table).
///
/// Inode tables and the journal are initialised on the host so the guest kernel does no
/// background zeroing that would dirty blocks behind a test's back.
pub fn make_data_disk(path: &Path, size_mib: u64) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)
        .with_context(|| format!("cannot create data disk {}", path.display()))?;
    file.set_len(size_mib * 1024 * 1024)
        .with_context(|| format!("cannot size data disk {} to {size_mib} MiB", path.display()))?;
    drop(file);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(path))
    .map(drop)
}

/// Reads `file` (an absolute path inside the file system) out of a raw ext4 image with
/// `debugfs`, after `e2fsck -fy` has replayed the journal.
///
/// Only for an image no VM has open. It modifies the image (journal replay), as mounting would.
pub fn read_ext4_file(image: &Path, file: &str) -> anyhow::Result<Vec<u8>> {
    let fsck = Command::new("e2fsck")
        .arg("-fy")
        .arg(image)
        .output()
        .context("cannot run e2fsck (install e2fsprogs)")?;
    // 0: clean, 1: errors corrected (journal replayed, counts fixed).
    if !matches!(fsck.status.code(), Some(0 | 1)) {
        bail!(
            "e2fsck -fy {} failed ({}): {}{}",
            image.display(),
            fsck.status,
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
    }
    let out = run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {file}"))
        .arg(image))?;
    // debugfs exits 0 even when the file is missing; it says so on stderr.
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(line) = stderr.lines().find(|l| !l.starts_with("debugfs ")) {
        bail!(
            "debugfs cannot read {file} from {}: {line}",
            image.display()
        );
    }
    Ok(out.stdout)
}

fn run(cmd: &mut Command) -> anyhow::Result<std::process::Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Fills `buf` with deterministic, incompressible bytes (xorshift64) for `seed`.
pub fn xorshift_fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_disk_is_sparse_ext4_and_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("data.img");
        make_data_disk(&img, 16).expect("mkfs.ext4");
        assert_eq!(std::fs::metadata(&img).expect("stat").len(), 16 << 20);
        let err = read_ext4_file(&img, "/missing.txt").expect_err("no such file");
        assert!(err.to_string().contains("/missing.txt"), "{err}");
    }
}
