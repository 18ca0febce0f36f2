//! backup: disk snapshots of one image with weft, restic and borg in the same run.
//!
//! The image is built deterministically (random, unallocated zeros, one repeated block,
//! text-like data, in 16 MiB stripes) and cached under the bench directory as raw and
//! qcow2. Per round:
//!
//! 1. A fresh copy of the qcow2 is attached to a paused QEMU (`weft_qmp::launch`).
//! 2. Full snapshots, in an order rotated every round: weft into a plain store, weft into
//!    an encrypted store (both through `weft_qmp::backup` → NBD → `pull::pull` →
//!    `write_index`, as weftd does), `restic backup` and `borg create` of the raw image.
//! 3. 1 % of the disk's 64 KiB blocks are written through the guest's block backend
//!    (HMP `qemu-io`), then weft takes an incremental on top of the plain full.
//! 4. Restores of the full snapshot, alternating: weft (parallel chunk gets and
//!    `pwrite`, weftd's `restore_raw`) and `restic restore`.
//!
//! The page cache is dropped before every timed phase (when running as root). Every
//! repository and restored file lives in a per-round directory that is removed at the
//! end of the round; weft's stores (about 1.5 GiB a round) are kept in one directory
//! removed at the end of the run, see [`bench_backup`]. QEMU is killed and reaped.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde_json::json;
use weft_blockdev::nbd::{NbdClient, NBD_STATE_ZERO};
use weft_blockdev::pull::{self, PullKind, PullStats};
use weft_blockdev::store::{BlockMap, ChunkStore, StoreConfig};
use weft_qmp::backup::{self as recipe, PullBackupSpec};
use weft_qmp::launch::{Accel, DiskConfig, DiskFormat, LaunchPaths, VmConfig};
use weft_qmp::process::{QemuProcess, SpawnOptions};
use weft_qmp::Qmp;

use super::{bench_dir, drop_caches, median, min_max, qemu_binary, Pids, READY_TIMEOUT};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// weftd's default chunk size in KiB (`store.chunk_kib`).
pub(crate) const DEFAULT_CHUNK_KIB: u32 = 128;
/// weftd's zstd level (`StoreConfig::default()`).
const ZSTD_LEVEL: i32 = 3;
/// The image's content changes kind every this many MiB.
const STRIPE_MIB: u64 = 16;
/// Size of one dirtied block for the incremental (the qcow2 bitmap granularity).
const DIRTY_BLOCK: u64 = 64 << 10;
/// Bump when the image generator changes, so that a cached image is rebuilt.
const IMAGE_VERSION: u32 = 1;
/// weftd's restore parallelism (groups of adjacent chunks read at once).
const RESTORE_PARALLEL: usize = weft_blockdev::restore::PARALLEL_GROUPS;
/// The disk's device name in QEMU; its format node is `vda-fmt`.
const DISK: &str = "vda";
/// restic's repository password (restic always encrypts).
const RESTIC_PASSWORD: &str = "weft-bench";

/// What one MiB of the image holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Content {
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
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
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
struct Image {
    raw: PathBuf,
    qcow2: PathBuf,
    size: u64,
}

impl Image {
    fn mib_of(&self, kind: Content) -> u64 {
        (0..self.size / MIB)
            .filter(|&m| content_of(m) == kind)
            .count() as u64
    }
}

/// Builds the image unless a cached one of the same version and size exists.
fn prepare_image(dir: &Path, size_gib: u64) -> Result<Image> {
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

/// Sum of the sizes of all files under `path` (like `du -sb`, without directories).
fn dir_bytes(path: &Path) -> Result<u64> {
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
fn same_as(raw: &Path, size: u64, file: &Path) -> Result<()> {
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
async fn run_tool(program: &str, args: &[OsString], envs: &[(&str, OsString)]) -> Result<Duration> {
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

async fn tool_version(program: &str, arg: &str) -> Result<String> {
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

fn os(s: impl Into<OsString>) -> OsString {
    s.into()
}

// ---------------------------------------------------------------------------------------
// weft
// ---------------------------------------------------------------------------------------

async fn start_vm(work: &Path, disk: &Path, pids: &mut Pids) -> Result<QemuProcess> {
    let config = VmConfig {
        machine: "q35".into(),
        accel: Accel::Tcg,
        memory_mib: 64,
        cpus: 1,
        disks: vec![DiskConfig {
            name: DISK.into(),
            path: disk.to_path_buf(),
            format: DiskFormat::Qcow2,
            read_only: false,
            backing: Vec::new(),
        }],
        ..VmConfig::default()
    };
    let paths = LaunchPaths {
        qmp_socket: work.join("qmp.sock"),
        serial_log: work.join("serial.log"),
        output_log: work.join("qemu.log"),
        pid_file: None,
    };
    let opts = SpawnOptions {
        binary: qemu_binary().into(),
        ready_timeout: READY_TIMEOUT,
        detached: false,
        ..SpawnOptions::default()
    };
    let p = weft_qmp::process::spawn(&config, &paths, &opts).await?;
    pids.0.push(p.pid());
    // No guest is needed (there is no bootable disk); stop the vCPU so that it costs
    // nothing. Block jobs, the NBD server and qemu-io run while the VM is paused.
    if let Err(e) = p.qmp().execute_raw("stop", None).await {
        p.kill().await;
        return Err(e.into());
    }
    Ok(p)
}

fn new_store(root: &Path, encrypted: bool, chunk_size: u32) -> Result<ChunkStore> {
    let config = StoreConfig {
        chunk_size,
        encrypted,
        zstd_level: ZSTD_LEVEL,
    };
    let key = encrypted.then(|| root.with_extension("key"));
    Ok(ChunkStore::create(root, None, &config, key.as_deref())?)
}

/// One weft snapshot through the real recipe, as weftd's `pull_disk` does it.
struct WeftRun {
    /// `backup::start` until the index is written (the snapshot exists).
    time: Duration,
    /// Of `time`: `backup::start` (fleece, bitmaps, job, NBD export over QMP).
    setup: Duration,
    /// Of `time`: NBD connect and `pull::pull`.
    pull: Duration,
    /// `PullBackup::finish` (teardown), not in `time`.
    teardown: Duration,
    map: BlockMap,
    stats: PullStats,
    /// CPU seconds used meanwhile by the benchmark (weft's code) and by QEMU.
    cpu: (f64, f64),
}

async fn weft_snapshot(
    qmp: &Qmp,
    work: &Path,
    store: &ChunkStore,
    token: &str,
    since: Option<(&str, BlockMap)>,
) -> Result<WeftRun> {
    let spec = PullBackupSpec {
        node: format!("{DISK}-fmt"),
        new_checkpoint: format!("bench-{token}"),
        persistent: true,
        since: since.as_ref().map(|(c, _)| c.to_string()),
        scratch: work.join(format!("fleece-{token}.qcow2")),
        nbd_socket: work.join(format!("nbd-{token}.sock")),
        export: DISK.into(),
        token: token.into(),
    };
    let parent = since.map(|(_, map)| map);
    let cpu_before = (cpu_secs("self"), qemu_cpu_secs());
    let t = Instant::now();
    let running = recipe::start(qmp, spec.clone()).await?;
    let setup = t.elapsed();
    let mut pull_time = Duration::ZERO;
    let pulled = async {
        let mut contexts = vec!["base:allocation"];
        if let Some(c) = &running.dirty_context {
            contexts.push(c);
        }
        let nbd = NbdClient::connect_unix(&spec.nbd_socket, &spec.export, &contexts).await?;
        let kind = match (&running.dirty_context, parent) {
            (Some(context), Some(parent)) => PullKind::Incremental {
                context: context.clone(),
                parent,
            },
            (None, None) => PullKind::Full,
            _ => bail!("incremental without a parent map or dirty context"),
        };
        let (map, stats) = pull::pull(
            &nbd,
            Arc::new(store.clone()),
            &kind,
            &|_done: u64, _total: u64| {},
        )
        .await?;
        let _ = nbd.disconnect().await;
        pull_time = t.elapsed() - setup;
        let (s, m) = (store.clone(), map.clone());
        let index = format!("bench/{token}");
        tokio::task::spawn_blocking(move || s.write_index(&index, &m)).await??;
        Ok((map, stats))
    }
    .await;
    let time = t.elapsed();
    let cpu = (
        cpu_secs("self") - cpu_before.0,
        qemu_cpu_secs() - cpu_before.1,
    );
    let (map, stats) = match pulled {
        Ok(v) => v,
        Err(e) => {
            running.abort().await;
            return Err(e);
        }
    };
    let t = Instant::now();
    running.finish().await?;
    Ok(WeftRun {
        time,
        setup,
        pull: pull_time,
        teardown: t.elapsed(),
        map,
        stats,
        cpu,
    })
}

/// User + system CPU seconds of a process (`self` or a pid) so far.
fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // utime and stime are fields 14 and 15; the name in parentheses may hold spaces.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i)?.parse::<f64>().ok())
        .sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as f64;
    ticks / hz
}

/// CPU seconds of every QEMU process running now (the benchmark runs one).
fn qemu_cpu_secs() -> f64 {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            comm.starts_with("qemu-system")
                .then(|| cpu_secs(&pid.to_string()))
        })
        .sum()
}

/// The 64 KiB blocks dirtied for the incremental: 1 % of them (rounded up), at
/// deterministic pseudo-random offsets, distinct.
fn dirty_offsets(size: u64) -> Vec<u64> {
    let blocks = size / DIRTY_BLOCK;
    let want = blocks.div_ceil(100) as usize;
    let mut rng = XorShift::new(0xd1_27);
    let mut set = BTreeSet::new();
    while set.len() < want {
        set.insert(rng.next() % blocks * DIRTY_BLOCK);
    }
    set.into_iter().collect()
}

/// Writes each block through the virtio device's block backend (the path a guest's
/// writes take), one HMP `qemu-io` per block.
async fn dirty(qmp: &Qmp, offsets: &[u64]) -> Result<()> {
    for (k, off) in offsets.iter().enumerate() {
        let pattern = (k % 255 + 1) as u8;
        let line = format!(
            "qemu-io -d /machine/peripheral/{DISK}/virtio-backend \"write -P {pattern:#x} {off} {DIRTY_BLOCK}\""
        );
        let out = qmp
            .execute_raw("human-monitor-command", Some(json!({"command-line": line})))
            .await?;
        ensure!(out == json!(""), "qemu-io said {out}");
    }
    Ok(())
}

/// Writes `map` as a sparse raw image, the way weftd restores: the file is sized,
/// `weft_blockdev::restore::restore_into_file` writes the data chunks (zero slots stay
/// holes), one fsync at the end, then renamed into place. Returns the bytes written.
async fn restore_raw(store: &ChunkStore, map: &BlockMap, output: &Path) -> Result<u64> {
    let partial = PathBuf::from(format!("{}.partial", output.display()));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)?;
    file.set_len(map.disk_size)?;
    let file = Arc::new(file);
    let written =
        weft_blockdev::restore::restore_into_file(store, map, Arc::clone(&file), &|_, _| {})
            .await?;
    file.sync_all()?;
    fs::rename(&partial, output)?;
    Ok(written)
}

// ---------------------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Full {
    Weft,
    WeftEncrypted,
    Restic,
    Borg,
    BorgZstd,
}

const FULLS: [Full; 5] = [
    Full::Weft,
    Full::WeftEncrypted,
    Full::Restic,
    Full::Borg,
    Full::BorgZstd,
];

impl Full {
    fn name(self) -> &'static str {
        match self {
            Full::Weft => "weft, plain store",
            Full::WeftEncrypted => "weft, encrypted store (AES-256-GCM)",
            Full::Restic => "restic backup (AES-256 + Poly1305, zstd auto)",
            Full::Borg => "borg create (--encryption=none, lz4)",
            Full::BorgZstd => "borg create (--encryption=none, -C zstd,3: weft's compressor)",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Restore {
    Weft,
    Restic,
}

/// Every figure of every round.
#[derive(Default)]
struct Results {
    /// Per `FULLS` entry: seconds and stored bytes.
    full_s: [Vec<f64>; 5],
    stored: [Vec<f64>; 5],
    weft_read: Vec<f64>,
    teardown_s: Vec<f64>,
    full_setup_s: Vec<f64>,
    full_pull_s: Vec<f64>,
    inc_s: Vec<f64>,
    inc_setup_s: Vec<f64>,
    inc_pull_s: Vec<f64>,
    inc_marked: Vec<f64>,
    inc_read: Vec<f64>,
    inc_chunks: Vec<f64>,
    inc_stored: Vec<f64>,
    inc_teardown_s: Vec<f64>,
    dirty_s: Vec<f64>,
    /// weft, restic: seconds and bytes written.
    restore_s: [Vec<f64>; 2],
    restore_written: [Vec<f64>; 2],
}

/// Paths and environment of one round's peers.
struct Peers {
    restic_repo: PathBuf,
    restic_env: Vec<(&'static str, OsString)>,
    borg_repo: PathBuf,
    borg_zstd_repo: PathBuf,
    borg_env: Vec<(&'static str, OsString)>,
}

impl Peers {
    fn new(work: &Path) -> Peers {
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

pub(crate) async fn bench_backup(
    size_gib: u64,
    chunk_kib: u32,
    rounds: usize,
    breakdown: bool,
    pids: &mut Pids,
) -> Result<()> {
    let chunk_size = chunk_kib
        .checked_mul(1024)
        .context("--chunk-kib is too large")?;
    let restic = tool_version("restic", "version").await?;
    let borg = tool_version("borg", "--version").await?;
    let qemu_img = tool_version("qemu-img", "--version").await?;
    let qemu_img = qemu_img.lines().next().unwrap_or_default().to_string();
    let base = bench_dir()?;
    let image = {
        let base = base.clone();
        tokio::task::spawn_blocking(move || prepare_image(&base, size_gib)).await??
    };
    let dropped = drop_caches();
    let offsets = dirty_offsets(image.size);
    eprintln!(
        "backup: {} ({} GiB: {} MiB random, {} MiB zero, {} MiB one repeated MiB, {} MiB text)",
        image.qcow2.display(),
        size_gib,
        image.mib_of(Content::Random),
        image.mib_of(Content::Zero),
        image.mib_of(Content::Repeated),
        image.mib_of(Content::Text),
    );
    eprintln!(
        "backup: {restic}; {borg}; {qemu_img}; {rounds} rounds; weft chunks of {chunk_kib} KiB; page cache {}",
        if dropped {
            "dropped before every timed phase"
        } else {
            "NOT dropped (not root)"
        }
    );

    // weft's stores are removed at the end of the run, not of each round. The file
    // systems these benchmarks run on may have no journal, and then ext4 does not hand
    // out an inode freed less than a minute ago (`recently_deleted` in `ialloc.c`): each
    // new file scans past them. Deleting a round's 16,400 chunk files made every chunk
    // file of the next round pay that scan (13 % of weft's CPU time in a profile, and
    // round 0 used 3.4 CPU seconds where later rounds used 4.7); the peers, which write a
    // few large files, did not pay it. A store that is not being cleaned up is what a
    // backup writes to in steady state.
    let stores = tempfile::Builder::new()
        .prefix("backup-stores-")
        .tempdir_in(&base)?;
    let mut res = Results::default();
    for round in 0..rounds {
        let work = tempfile::Builder::new()
            .prefix("backup-round-")
            .tempdir_in(&base)?;
        let disk = work.path().join("vda.qcow2");
        fs::copy(&image.qcow2, &disk)?;
        let vm = start_vm(work.path(), &disk, pids).await?;
        let r = one_round(
            round,
            chunk_size,
            &image,
            vm.qmp(),
            work.path(),
            &stores.path().join(format!("round-{round}")),
            &offsets,
            dropped,
            &mut res,
        )
        .await;
        vm.kill().await;
        r?;
        drop(work);
    }

    print_results(
        &image, chunk_size, rounds, &offsets, &restic, &borg, dropped, &res,
    );
    if breakdown {
        let work = tempfile::Builder::new()
            .prefix("backup-breakdown-")
            .tempdir_in(&base)?;
        let disk = work.path().join("vda.qcow2");
        fs::copy(&image.qcow2, &disk)?;
        let vm = start_vm(work.path(), &disk, pids).await?;
        let r = run_breakdown(&image, chunk_size, vm.qmp(), work.path()).await;
        vm.kill().await;
        r?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn one_round(
    round: usize,
    chunk_size: u32,
    image: &Image,
    qmp: &Qmp,
    work: &Path,
    stores: &Path,
    offsets: &[u64],
    dropped: bool,
    res: &mut Results,
) -> Result<()> {
    let peers = Peers::new(work);
    fs::create_dir_all(stores)?;
    let plain = new_store(&stores.join("weft-plain"), false, chunk_size)?;
    let encrypted = new_store(&stores.join("weft-encrypted"), true, chunk_size)?;
    run_tool(
        "restic",
        &[os("init"), os("--repo"), peers.restic_repo.clone().into()],
        &peers.restic_env,
    )
    .await?;
    for repo in [&peers.borg_repo, &peers.borg_zstd_repo] {
        run_tool(
            "borg",
            &[os("init"), os("--encryption=none"), repo.clone().into()],
            &peers.borg_env,
        )
        .await?;
    }
    let cache = |what: &str| {
        if dropped {
            ensure!(drop_caches(), "cannot drop the page cache before {what}");
        }
        Ok(())
    };

    // Fulls, the order rotated each round.
    let mut plain_full = None;
    for k in 0..FULLS.len() {
        let i = (k + round) % FULLS.len();
        let who = FULLS[i];
        cache(who.name())?;
        let (secs, stored) = match who {
            Full::Weft | Full::WeftEncrypted => {
                let (store, token) = if who == Full::Weft {
                    (&plain, format!("r{round}-full"))
                } else {
                    (&encrypted, format!("r{round}-full-enc"))
                };
                let run = weft_snapshot(qmp, work, store, &token, None).await?;
                let stored = dir_bytes(store.root())?;
                let s = {
                    let store = store.clone();
                    tokio::task::spawn_blocking(move || store.stats()).await??
                };
                eprintln!(
                    "  round {round} {}: {:.2} s (setup {:.0} ms, pull {:.2} s of which commit {:.2} s; CPU s: weft {:.2}, QEMU {:.2}), read {:.0} MiB, stored {:.1} MiB (chunk files {:.1} MiB in {} chunks, {} new of {} written), teardown {:.0} ms",
                    who.name(),
                    run.time.as_secs_f64(),
                    run.setup.as_secs_f64() * 1e3,
                    run.pull.as_secs_f64(),
                    run.stats.commit_time.as_secs_f64(),
                    run.cpu.0,
                    run.cpu.1,
                    run.stats.bytes_read as f64 / MIB as f64,
                    stored as f64 / MIB as f64,
                    s.hot_bytes as f64 / MIB as f64,
                    s.hot_chunks,
                    run.stats.chunks_new,
                    run.stats.chunks_written,
                    run.teardown.as_secs_f64() * 1e3,
                );
                if who == Full::Weft {
                    res.weft_read.push(run.stats.bytes_read as f64);
                    res.teardown_s.push(run.teardown.as_secs_f64());
                    res.full_setup_s.push(run.setup.as_secs_f64());
                    res.full_pull_s.push(run.pull.as_secs_f64());
                    plain_full = Some((token, run.map.clone()));
                }
                (run.time.as_secs_f64(), stored)
            }
            Full::Restic => {
                let d = run_tool(
                    "restic",
                    &[
                        os("backup"),
                        os("--quiet"),
                        os("--repo"),
                        peers.restic_repo.clone().into(),
                        image.raw.clone().into(),
                    ],
                    &peers.restic_env,
                )
                .await?;
                let stored = dir_bytes(&peers.restic_repo)?;
                eprintln!(
                    "  round {round} {}: {:.2} s, stored {:.1} MiB",
                    who.name(),
                    d.as_secs_f64(),
                    stored as f64 / MIB as f64
                );
                (d.as_secs_f64(), stored)
            }
            Full::Borg | Full::BorgZstd => {
                let (repo, compression) = if who == Full::Borg {
                    (&peers.borg_repo, "lz4")
                } else {
                    (&peers.borg_zstd_repo, "zstd,3")
                };
                let archive = format!("{}::full", repo.display());
                let d = run_tool(
                    "borg",
                    &[
                        os("create"),
                        os("--compression"),
                        os(compression),
                        os(archive),
                        image.raw.clone().into(),
                    ],
                    &peers.borg_env,
                )
                .await?;
                let stored = dir_bytes(repo)?;
                eprintln!(
                    "  round {round} {}: {:.2} s, stored {:.1} MiB",
                    who.name(),
                    d.as_secs_f64(),
                    stored as f64 / MIB as f64
                );
                (d.as_secs_f64(), stored)
            }
        };
        res.full_s[i].push(secs);
        res.stored[i].push(stored as f64);
    }
    let (full_token, full_map) = plain_full.context("no plain full")?;

    // Incremental: 1 % of the 64 KiB blocks dirtied through the guest's path.
    let t = Instant::now();
    dirty(qmp, offsets).await?;
    res.dirty_s.push(t.elapsed().as_secs_f64());
    cache("the incremental")?;
    let before = dir_bytes(plain.root())?;
    let checkpoint = format!("bench-{full_token}");
    let inc = weft_snapshot(
        qmp,
        work,
        &plain,
        &format!("r{round}-inc"),
        Some((&checkpoint, full_map.clone())),
    )
    .await?;
    let added = dir_bytes(plain.root())?.saturating_sub(before);
    eprintln!(
        "  round {round} weft incremental: {:.3} s (setup {:.0} ms, pull {:.3} s of which parent check {:.3} s and commit {:.3} s; CPU s: weft {:.2}, QEMU {:.2}), marked {:.1} MiB, read {:.1} MiB, {} chunks written ({} new), +{:.1} MiB stored, teardown {:.0} ms",
        inc.time.as_secs_f64(),
        inc.setup.as_secs_f64() * 1e3,
        inc.pull.as_secs_f64(),
        inc.stats.check_time.as_secs_f64(),
        inc.stats.commit_time.as_secs_f64(),
        inc.cpu.0,
        inc.cpu.1,
        inc.stats.bytes_marked as f64 / MIB as f64,
        inc.stats.bytes_read as f64 / MIB as f64,
        inc.stats.chunks_written,
        inc.stats.chunks_new,
        added as f64 / MIB as f64,
        inc.teardown.as_secs_f64() * 1e3,
    );
    res.inc_s.push(inc.time.as_secs_f64());
    res.inc_setup_s.push(inc.setup.as_secs_f64());
    res.inc_pull_s.push(inc.pull.as_secs_f64());
    res.inc_marked.push(inc.stats.bytes_marked as f64);
    res.inc_read.push(inc.stats.bytes_read as f64);
    res.inc_chunks.push(inc.stats.chunks_written as f64);
    res.inc_stored.push(added as f64);
    res.inc_teardown_s.push(inc.teardown.as_secs_f64());

    // Restores of the full snapshot, alternating who goes first.
    let order = if round % 2 == 1 {
        [Restore::Restic, Restore::Weft]
    } else {
        [Restore::Weft, Restore::Restic]
    };
    for who in order {
        cache("a restore")?;
        let (i, secs, written, output) = match who {
            Restore::Weft => {
                let output = work.join("weft-restored.raw");
                let t = Instant::now();
                let written = restore_raw(&plain, &full_map, &output).await?;
                (0, t.elapsed().as_secs_f64(), written, output)
            }
            Restore::Restic => {
                let target = work.join("restic-restored");
                let t = Instant::now();
                run_tool(
                    "restic",
                    &[
                        os("restore"),
                        os("latest"),
                        os("--quiet"),
                        os("--repo"),
                        peers.restic_repo.clone().into(),
                        os("--target"),
                        target.clone().into(),
                    ],
                    &peers.restic_env,
                )
                .await?;
                // weft's restore ends with an fsync of the image; so does this one.
                let output = target.join(image.raw.strip_prefix("/").unwrap_or(&image.raw));
                File::open(&output)
                    .with_context(|| format!("restic restored no {}", output.display()))?
                    .sync_all()?;
                let secs = t.elapsed().as_secs_f64();
                // restic 0.14 has no sparse restore: it writes every byte.
                (1, secs, image.size, output)
            }
        };
        eprintln!(
            "  round {round} restore {}: {secs:.2} s ({:.0} MiB/s), {:.0} MiB written",
            if i == 0 { "weft" } else { "restic" },
            image.size as f64 / MIB as f64 / secs,
            written as f64 / MIB as f64
        );
        res.restore_s[i].push(secs);
        res.restore_written[i].push(written as f64);
        if round == 0 {
            // Not timed: the restored image is the image.
            let (raw, size, out) = (image.raw.clone(), image.size, output.clone());
            tokio::task::spawn_blocking(move || same_as(&raw, size, &out)).await??;
        }
        fs::remove_file(&output)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn print_results(
    image: &Image,
    chunk_size: u32,
    rounds: usize,
    offsets: &[u64],
    restic: &str,
    borg: &str,
    dropped: bool,
    res: &Results,
) {
    let mib = |b: f64| b / MIB as f64;
    let size = image.size as f64;
    println!();
    println!(
        "### backup: full snapshot of a {} GiB image ({rounds} rounds, median; weft chunks of {} KiB; page cache {})",
        image.size / GIB,
        chunk_size / 1024,
        if dropped {
            "dropped before each"
        } else {
            "not dropped"
        }
    );
    println!();
    println!(
        "Image: {} MiB random, {} MiB zero (unallocated), {} MiB one repeated MiB, {} MiB text. {restic}; {borg}.",
        image.mib_of(Content::Random),
        image.mib_of(Content::Zero),
        image.mib_of(Content::Repeated),
        image.mib_of(Content::Text),
    );
    println!();
    println!(
        "| tool | s (median) | min | max | MiB/s (image / time) | stored MiB | stored / image |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, who) in FULLS.iter().enumerate() {
        let (lo, hi) = min_max(&res.full_s[i]);
        let m = median(&res.full_s[i]);
        let stored = median(&res.stored[i]);
        println!(
            "| {} | {m:.2} | {lo:.2} | {hi:.2} | {:.0} | {:.1} | {:.3} |",
            who.name(),
            mib(size) / m,
            mib(stored),
            stored / size
        );
    }
    println!();
    println!(
        "weft plain: `backup::start` {:.0} ms, NBD connect + `pull::pull` {:.2} s (median); read {:.0} MiB over NBD (allocated extents only); QMP teardown after the index was written: {:.0} ms (not in the time).",
        median(&res.full_setup_s) * 1e3,
        median(&res.full_pull_s),
        mib(median(&res.weft_read)),
        median(&res.teardown_s) * 1e3
    );

    println!();
    println!(
        "### backup: incremental after writing {} blocks of 64 KiB (1 %) through the guest's block backend",
        offsets.len()
    );
    println!();
    println!("| what | median | min | max |");
    println!("| --- | ---: | ---: | ---: |");
    let row = |name: &str, xs: &[f64], scale: f64, digits: usize| {
        let (lo, hi) = min_max(xs);
        println!(
            "| {name} | {:.*} | {:.*} | {:.*} |",
            digits,
            median(xs) * scale,
            digits,
            lo * scale,
            digits,
            hi * scale
        );
    };
    row("incremental time (s)", &res.inc_s, 1.0, 3);
    row(
        "of which `backup::start` over QMP (s)",
        &res.inc_setup_s,
        1.0,
        3,
    );
    row(
        "of which NBD connect + `pull::pull` (s)",
        &res.inc_pull_s,
        1.0,
        3,
    );
    row(
        "of which `write_index` (s)",
        &res.inc_s
            .iter()
            .zip(&res.inc_setup_s)
            .zip(&res.inc_pull_s)
            .map(|((t, s), p)| t - s - p)
            .collect::<Vec<_>>(),
        1.0,
        3,
    );
    row("MiB marked dirty", &res.inc_marked, 1.0 / MIB as f64, 2);
    row("MiB read over NBD", &res.inc_read, 1.0 / MIB as f64, 2);
    row("chunks written", &res.inc_chunks, 1.0, 0);
    row(
        "MiB added to the store",
        &res.inc_stored,
        1.0 / MIB as f64,
        2,
    );
    row("teardown (s, not in the time)", &res.inc_teardown_s, 1.0, 3);
    row("dirtying, HMP qemu-io (s, not timed)", &res.dirty_s, 1.0, 2);

    println!();
    println!("### backup: restore of the full snapshot to a raw file (ends with fsync)");
    println!();
    println!("| tool | s (median) | min | max | MiB/s (image / time) | MiB written |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let weft_restore = format!(
        "weft (weftd's restore: {RESTORE_PARALLEL} groups of ≤ 1 MiB in flight, gets + O_DIRECT pwrite, zero chunks skipped)"
    );
    for (i, name) in [weft_restore.as_str(), "restic restore (writes every byte)"]
        .iter()
        .enumerate()
    {
        let (lo, hi) = min_max(&res.restore_s[i]);
        let m = median(&res.restore_s[i]);
        println!(
            "| {name} | {m:.2} | {lo:.2} | {hi:.2} | {:.0} | {:.0} |",
            mib(size) / m,
            mib(median(&res.restore_written[i]))
        );
    }

    let full = |i: usize| median(&res.full_s[i]);
    let yes = |ok: bool| if ok { "met" } else { "**missed**" };
    let tput = full(2) / full(0);
    let tput_enc = full(2) / full(1);
    let stored = median(&res.stored[0]) / median(&res.stored[3]);
    let inc = median(&res.inc_s) / full(0);
    let restore = median(&res.restore_s[1]) / median(&res.restore_s[0]);
    println!();
    println!("| ratio (from the medians) | value | goal | |");
    println!("| --- | ---: | --- | --- |");
    println!(
        "| full throughput, weft plain / restic | **{tput:.2}** | ≥ 2 | {} |",
        yes(tput >= 2.0)
    );
    println!("| full throughput, weft encrypted / restic | {tput_enc:.2} | (both encrypt) | |");
    println!(
        "| stored size, weft plain / borg | **{stored:.3}** | ≤ 1 | {} |",
        yes(stored <= 1.0)
    );
    println!(
        "| stored size, weft plain / borg with zstd,3 | {:.3} | (same compressor) | |",
        median(&res.stored[0]) / median(&res.stored[4])
    );
    println!(
        "| stored size, weft plain / restic | {:.3} | | |",
        median(&res.stored[0]) / median(&res.stored[2])
    );
    println!(
        "| time, weft incremental / weft full | **{inc:.3}** | ≤ 0.05 | {} |",
        yes(inc <= 0.05)
    );
    println!(
        "| restore throughput, weft / restic | **{restore:.2}** | ≥ 2 | {} |",
        yes(restore >= 2.0)
    );
}

// ---------------------------------------------------------------------------------------
// --breakdown: where a weft full spends its time (one pass each, not interleaved)
// ---------------------------------------------------------------------------------------

async fn run_breakdown(image: &Image, chunk_size: u32, qmp: &Qmp, work: &Path) -> Result<()> {
    let mib = |b: u64| b as f64 / MIB as f64;
    println!();
    println!(
        "### backup --breakdown: the stages of a weft full, each alone (one pass, {} KiB chunks)",
        chunk_size / 1024
    );
    println!();
    println!("| stage | s | MiB | MiB/s |");
    println!("| --- | ---: | ---: | ---: |");

    // 1. NBD only: the export's allocated extents read 8 chunks at a time, discarded.
    drop_caches();
    let spec = PullBackupSpec {
        node: format!("{DISK}-fmt"),
        new_checkpoint: "bench-breakdown".into(),
        persistent: true,
        since: None,
        scratch: work.join("fleece-breakdown.qcow2"),
        nbd_socket: work.join("nbd-breakdown.sock"),
        export: DISK.into(),
        token: "breakdown".into(),
    };
    let running = recipe::start(qmp, spec.clone()).await?;
    let read = async {
        let client =
            NbdClient::connect_unix(&spec.nbd_socket, &spec.export, &["base:allocation"]).await?;
        let nbd = &client;
        let t = Instant::now();
        let extents = nbd.block_status_all("base:allocation").await?;
        let mut pieces = Vec::new();
        for e in extents.iter().filter(|e| e.flags & NBD_STATE_ZERO == 0) {
            let mut at = e.offset;
            while at < e.offset + e.length {
                let n = (e.offset + e.length - at).min(u64::from(chunk_size));
                pieces.push((at, n));
                at += n;
            }
        }
        let bytes = stream::iter(pieces)
            .map(|(at, n)| async move {
                let mut buf = vec![0u8; n as usize];
                let mut done = 0;
                while done < n {
                    let k = (n - done).min(u64::from(nbd.max_request()));
                    nbd.read_into(at + done, &mut buf[done as usize..(done + k) as usize])
                        .await?;
                    done += k;
                }
                Ok::<u64, anyhow::Error>(n)
            })
            .buffer_unordered(8)
            .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
            .await?;
        let d = t.elapsed();
        let _ = client.disconnect().await;
        Ok::<_, anyhow::Error>((d, bytes))
    }
    .await;
    running.abort().await;
    let (d, bytes) = read?;
    println!(
        "| NBD read of the allocated extents (8 chunk-sized reads in flight, discarded) | {:.2} | {:.0} | {:.0} |",
        d.as_secs_f64(),
        mib(bytes),
        mib(bytes) / d.as_secs_f64()
    );

    // The non-zero chunks of the image, in memory.
    let chunks: Arc<Vec<Vec<u8>>> = {
        let raw = image.raw.clone();
        let size = image.size;
        Arc::new(
            tokio::task::spawn_blocking(move || -> Result<Vec<Vec<u8>>> {
                let f = File::open(raw)?;
                let mut out = Vec::new();
                for i in 0..size / u64::from(chunk_size) {
                    let mut buf = vec![0u8; chunk_size as usize];
                    f.read_exact_at(&mut buf, i * u64::from(chunk_size))?;
                    if buf.iter().any(|b| *b != 0) {
                        out.push(buf);
                    }
                }
                Ok(out)
            })
            .await??,
        )
    };
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();

    // 2. Single-threaded CPU costs per chunk.
    let c = Arc::clone(&chunks);
    let (sha, zstd_s, zstd_out) = tokio::task::spawn_blocking(move || -> Result<_> {
        let t = Instant::now();
        for chunk in c.iter() {
            std::hint::black_box(ring::digest::digest(&ring::digest::SHA256, chunk));
        }
        let sha = t.elapsed();
        let t = Instant::now();
        let mut out = 0u64;
        for chunk in c.iter() {
            out += zstd::bulk::compress(chunk, ZSTD_LEVEL)?.len() as u64;
        }
        Ok((sha, t.elapsed(), out))
    })
    .await??;
    println!(
        "| SHA-256 of every chunk (1 thread) | {:.2} | {:.0} | {:.0} |",
        sha.as_secs_f64(),
        mib(total),
        mib(total) / sha.as_secs_f64()
    );
    println!(
        "| zstd -{ZSTD_LEVEL} of every chunk (1 thread; {:.0} MiB out) | {:.2} | {:.0} | {:.0} |",
        mib(zstd_out),
        zstd_s.as_secs_f64(),
        mib(total),
        mib(total) / zstd_s.as_secs_f64()
    );

    // 3. ChunkStore::put from memory, 8 at a time through one put batch made durable
    //    by one syncfs, as pull does: on this disk, and on tmpfs (where syncing costs
    //    nothing) to separate the disk's share.
    let shm = tempfile::Builder::new()
        .prefix("weft-bench-")
        .tempdir_in("/dev/shm")
        .ok();
    let mut targets = vec![("disk", work.join("put-store"))];
    if let Some(shm) = &shm {
        targets.push(("tmpfs, fsync free", shm.path().join("put-store")));
    }
    for (where_, root) in targets {
        let store = new_store(&root, false, chunk_size)?;
        drop_caches();
        let t = Instant::now();
        let batch = Arc::new(store.batch()?);
        let ids: Vec<_> = stream::iter(0..chunks.len())
            .map(|i| {
                let (batch, chunks) = (Arc::clone(&batch), Arc::clone(&chunks));
                async move {
                    Ok::<_, anyhow::Error>(
                        tokio::task::spawn_blocking(move || batch.put(&chunks[i])).await??,
                    )
                }
            })
            .buffer_unordered(8)
            .try_collect()
            .await?;
        let Ok(batch) = Arc::try_unwrap(batch) else {
            bail!("the put batch is still shared")
        };
        batch.commit()?;
        let d = t.elapsed();
        println!(
            "| ChunkStore::put from memory, 8 in flight, one batch + syncfs ({where_}) | {:.2} | {:.0} | {:.0} |",
            d.as_secs_f64(),
            mib(total),
            mib(total) / d.as_secs_f64()
        );
        if where_ == "disk" {
            // The two halves of a restore: gets (read, decrypt, decompress, verify)...
            drop_caches();
            let t = Instant::now();
            let got = stream::iter(ids)
                .map(|o| {
                    let store = store.clone();
                    async move {
                        let n = tokio::task::spawn_blocking(move || store.get(&o.id)).await??;
                        Ok::<_, anyhow::Error>(n.len() as u64)
                    }
                })
                .buffer_unordered(RESTORE_PARALLEL)
                .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
                .await?;
            let d = t.elapsed();
            println!(
                "| ChunkStore::get, {RESTORE_PARALLEL} in flight, cold cache (distinct chunks) | {:.2} | {:.0} | {:.0} |",
                d.as_secs_f64(),
                mib(got),
                mib(got) / d.as_secs_f64()
            );
            // ... and writing the image: pwrite from memory + fsync, no store at all.
            let out = work.join("pwrite.raw");
            let f = Arc::new(File::create(&out)?);
            f.set_len(image.size)?;
            let t = Instant::now();
            stream::iter(0..chunks.len())
                .map(|i| {
                    let (f, chunks) = (Arc::clone(&f), Arc::clone(&chunks));
                    async move {
                        tokio::task::spawn_blocking(move || {
                            let at = i as u64 * u64::from(chunk_size);
                            f.write_all_at(&chunks[i], at)?;
                            // As the restore does: write-back starts at once.
                            weft_blockdev::store::start_writeback(&f, at, chunks[i].len() as u64);
                            Ok::<_, std::io::Error>(())
                        })
                        .await??;
                        Ok::<_, anyhow::Error>(())
                    }
                })
                .buffer_unordered(RESTORE_PARALLEL)
                .try_collect::<Vec<()>>()
                .await?;
            f.sync_all()?;
            let d = t.elapsed();
            println!(
                "| pwrite from memory, {RESTORE_PARALLEL} in flight, write-back started per write, + fsync (no store) | {:.2} | {:.0} | {:.0} |",
                d.as_secs_f64(),
                mib(total),
                mib(total) / d.as_secs_f64()
            );
            fs::remove_file(&out)?;
        }
        drop(store);
        fs::remove_dir_all(&root)?;
    }
    Ok(())
}
