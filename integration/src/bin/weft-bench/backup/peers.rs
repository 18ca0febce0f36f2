//! The peers, restic and borg: their repositories and environment, running them, and the
//! measures every tool's output goes through (bytes on disk, a restored image compared
//! with the original).

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use super::MIB;
/// restic's repository password (restic always encrypts).
const RESTIC_PASSWORD: &str = "weft-bench";

/// Paths and environment of one round's peers.
pub(super) struct Peers {
    pub(super) restic_repo: PathBuf,
    pub(super) restic_env: Vec<(&'static str, OsString)>,
    pub(super) borg_repo: PathBuf,
    pub(super) borg_zstd_repo: PathBuf,
    pub(super) borg_env: Vec<(&'static str, OsString)>,
}

impl Peers {
    pub(super) fn new(work: &Path) -> Peers {
        Peers {
            restic_repo: work.join("restic-repo"),
            restic_env: vec![
                ("RESTIC_PASSWORD", os(RESTIC_PASSWORD)),
                ("RESTIC_CACHE_DIR", work.join("restic-cache").into()),
            ],
            borg_repo: work.join("borg-repo"),
            borg_zstd_repo: work.join("borg-zstd-repo"),
            borg_env: vec![
                ("BORG_BASE_DIR", work.join("borg-base").into()),
                ("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", os("yes")),
                ("BORG_RELOCATED_REPO_ACCESS_IS_OK", os("yes")),
            ],
        }
    }
}
/// Sum of the sizes of all files under `path` (like `du -sb`, without directories).
pub(super) fn dir_bytes(path: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(path).with_context(|| format!("read {}", path.display()))? {
        let entry = entry?;
        let ty = entry.file_type()?;
        if ty.is_dir() {
            total += dir_bytes(&entry.path())?;
        } else if ty.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// Checks that `file` holds the same `size` bytes as `raw`.
pub(super) fn same_as(raw: &Path, size: u64, file: &Path) -> Result<()> {
    let (mut a, mut b) = (File::open(raw)?, File::open(file)?);
    ensure!(
        b.metadata()?.len() == size,
        "{} has the wrong size",
        file.display()
    );
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    for mib in 0..size / MIB {
        a.read_exact(&mut x)?;
        b.read_exact(&mut y)?;
        ensure!(x == y, "{} differs at MiB {mib}", file.display());
    }
    Ok(())
}

/// Runs a peer tool to completion and returns its wall time; fails with its output.
pub(super) async fn run_tool(
    program: &str,
    args: &[OsString],
    envs: &[(&str, OsString)],
) -> Result<Duration> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let t = Instant::now();
    let out = cmd
        .output()
        .await
        .with_context(|| format!("cannot run {program}"))?;
    let d = t.elapsed();
    ensure!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    Ok(d)
}

pub(super) async fn tool_version(program: &str, arg: &str) -> Result<String> {
    let out = tokio::process::Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| {
            format!("cannot run {program}; install it with `apt-get install -y restic borgbackup`")
        })?;
    ensure!(out.status.success(), "{program} {arg} failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(super) fn os(s: impl Into<OsString>) -> OsString {
    s.into()
}
