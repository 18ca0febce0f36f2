//! weft's side of the benchmark: a paused QEMU with the image attached, stores as weftd
//! makes them, one snapshot through the real pull-mode recipe and `pull::pull`, the CPU it
//! took, dirtying blocks through the guest's path, and a restore as weftd does it.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use serde_json::json;
use weft_blockdev::nbd::NbdClient;
use weft_blockdev::pull::{self, PullKind, PullStats};
use weft_blockdev::store::{BlockMap, ChunkStore, StoreConfig};
use weft_qmp::backup::{self as recipe, PullBackupSpec};
use weft_qmp::launch::{Accel, DiskConfig, DiskFormat, LaunchPaths, VmConfig};
use weft_qmp::process::{QemuProcess, SpawnOptions};
use weft_qmp::Qmp;

use super::image::XorShift;
use super::{DISK, ZSTD_LEVEL};
use crate::{qemu_binary, Pids, READY_TIMEOUT};
/// Size of one dirtied block for the incremental (the qcow2 bitmap granularity).
const DIRTY_BLOCK: u64 = 64 << 10;

pub(super) async fn start_vm(work: &Path, disk: &Path, pids: &mut Pids) -> Result<QemuProcess> {
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

pub(super) fn new_store(root: &Path, encrypted: bool, chunk_size: u32) -> Result<ChunkStore> {
    let config = StoreConfig {
        chunk_size,
        encrypted,
        zstd_level: ZSTD_LEVEL,
    };
    let key = encrypted.then(|| root.with_extension("key"));
    Ok(ChunkStore::create(root, None, &config, key.as_deref())?)
}

/// One weft snapshot through the real recipe, as weftd's `pull_disk` does it.
pub(super) struct WeftRun {
    /// `backup::start` until the index is written (the snapshot exists).
    pub(super) time: Duration,
    /// Of `time`: `backup::start` (fleece, bitmaps, job, NBD export over QMP).
    pub(super) setup: Duration,
    /// Of `time`: NBD connect and `pull::pull`.
    pub(super) pull: Duration,
    /// `PullBackup::finish` (teardown), not in `time`.
    pub(super) teardown: Duration,
    pub(super) map: BlockMap,
    pub(super) stats: PullStats,
    /// CPU seconds used meanwhile by the benchmark (weft's code) and by QEMU.
    pub(super) cpu: (f64, f64),
}

pub(super) async fn weft_snapshot(
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
pub(super) fn dirty_offsets(size: u64) -> Vec<u64> {
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
pub(super) async fn dirty(qmp: &Qmp, offsets: &[u64]) -> Result<()> {
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
pub(super) async fn restore_raw(store: &ChunkStore, map: &BlockMap, output: &Path) -> Result<u64> {
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
