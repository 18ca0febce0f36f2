//! The pull engine against real QEMU 7.2: a full and an incremental backup of a live
//! 256 MiB qcow2 into a chunk store. The full one reads exactly the allocated bytes,
//! the incremental exactly the dirtied 64 KiB bitmap blocks, and both block maps
//! restore to the disk as it was at the backup's instant (checked against a model of
//! every write and against the export itself). Tests that start QEMU are named
//! `qemu_*` (nextest runs those serially).
//!
//! Writes go through QEMU's block layer (HMP `qemu-io` on the virtio device's
//! backend), the path a guest's writes take, so they mark the checkpoint bitmaps.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use serde_json::json;
use weft_blockdev::nbd::NbdClient;
use weft_blockdev::pull::{self, PullKind, PullStats};
use weft_blockdev::store::{BlockMap, ChunkStore, Slot, StoreConfig};
use weft_qmp::backup::{self, PullBackup, PullBackupSpec};
use weft_qmp::launch::{DiskConfig, DiskFormat, LaunchPaths, VmConfig};
use weft_qmp::process::{QemuProcess, SpawnOptions};
use weft_qmp::Qmp;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const DISK: u64 = 256 * MIB;
/// Dirty-bitmap granularity of a qcow2 with 64 KiB clusters (checked below).
const BLOCK: u64 = 64 * KIB;
const CHUNK: u32 = MIB as u32;

/// Deterministic incompressible bytes (xorshift64*).
fn noise(seed: u64, len: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len as usize + 8);
    while (out.len() as u64) < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

fn text(len: u64) -> Vec<u8> {
    b"weft pulls what the guest dirtied and nothing more. "
        .iter()
        .copied()
        .cycle()
        .take(len as usize)
        .collect()
}

/// A VM with one 256 MiB qcow2 disk, a model of the disk's content and the set of
/// 64 KiB blocks written since the last checkpoint.
struct Vm {
    dir: tempfile::TempDir,
    config: VmConfig,
    model: Vec<u8>,
    writes: u64,
    dirty: BTreeSet<u64>,
}

impl Vm {
    fn new() -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("vda.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=64k"])
            .arg(&disk)
            .arg(DISK.to_string())
            .output()
            .expect("qemu-img (is QEMU installed?)");
        assert!(out.status.success(), "{out:?}");
        let config = VmConfig {
            memory_mib: 64,
            disks: vec![DiskConfig {
                name: "vda".into(),
                path: disk,
                format: DiskFormat::Qcow2,
                read_only: false,
                backing: Vec::new(),
            }],
            ..VmConfig::default()
        };
        Vm {
            dir,
            config,
            model: vec![0; DISK as usize],
            writes: 0,
            dirty: BTreeSet::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn start(&self) -> QemuProcess {
        let paths = LaunchPaths {
            qmp_socket: self.path("qmp.sock"),
            serial_log: self.path("serial.log"),
            output_log: self.path("qemu.log"),
            pid_file: None,
        };
        weft_qmp::process::spawn(&self.config, &paths, &SpawnOptions::default())
            .await
            .expect("qemu starts")
    }

    fn spec(&self, token: &str, new: &str, since: Option<&str>) -> PullBackupSpec {
        PullBackupSpec {
            node: "vda-fmt".into(),
            new_checkpoint: new.into(),
            persistent: true,
            since: since.map(str::to_string),
            scratch: self.path(&format!("fleece-{token}.qcow2")),
            nbd_socket: self.path("nbd.sock"),
            export: "vda".into(),
            token: token.into(),
        }
    }

    /// A guest-like write of `data` (through the device's block backend, and so
    /// through the copy-before-write filter while a backup runs).
    async fn write(&mut self, qmp: &Qmp, offset: u64, data: &[u8]) {
        self.writes += 1;
        let src = self.path(&format!("write-{}.bin", self.writes));
        std::fs::write(&src, data).unwrap();
        let len = data.len() as u64;
        hmp_qemu_io(qmp, &format!("write -s {} {offset} {len}", src.display())).await;
        std::fs::remove_file(&src).unwrap();
        self.model[offset as usize..(offset + len) as usize].copy_from_slice(data);
        self.mark(offset, len);
    }

    /// A guest-like write of zeroes.
    async fn write_zeroes(&mut self, qmp: &Qmp, offset: u64, len: u64) {
        hmp_qemu_io(qmp, &format!("write -z {offset} {len}")).await;
        self.model[offset as usize..(offset + len) as usize].fill(0);
        self.mark(offset, len);
    }

    fn mark(&mut self, offset: u64, len: u64) {
        let mut b = offset / BLOCK * BLOCK;
        while b < offset + len {
            self.dirty.insert(b);
            b += BLOCK;
        }
    }
}

async fn hmp_qemu_io(qmp: &Qmp, cmd: &str) {
    // The block backend belongs to the virtio device inside the PCI proxy `vda`.
    let line = format!("qemu-io -d /machine/peripheral/vda/virtio-backend \"{cmd}\"");
    let out = qmp
        .execute_raw("human-monitor-command", Some(json!({"command-line": line})))
        .await
        .unwrap();
    assert_eq!(out, json!(""), "qemu-io {cmd}: {out}");
}

async fn connect(vm: &Vm, context: &str) -> NbdClient {
    NbdClient::connect_unix(&vm.path("nbd.sock"), "vda", &[context])
        .await
        .expect("connect to QEMU's NBD export")
}

async fn run_pull(
    nbd: &NbdClient,
    store: &Arc<ChunkStore>,
    kind: &PullKind,
) -> (BlockMap, PullStats) {
    pull::pull(nbd, Arc::clone(store), kind, &|_: u64, _: u64| {})
        .await
        .expect("pull")
}

/// Restores `map` slot by slot from the store and compares every byte with the
/// model of the disk at the backup's instant and with the export itself.
async fn check_restore(store: &ChunkStore, map: &BlockMap, model: &[u8], nbd: &NbdClient) {
    assert_eq!(map.disk_size, DISK);
    for (i, slot) in map.slots.iter().enumerate() {
        let off = map.chunk_offset(i) as usize;
        let len = map.chunk_len(i) as usize;
        let restored = match slot {
            Slot::Zero => vec![0; len],
            Slot::Data(id) => store.get(id).unwrap(),
        };
        assert_eq!(restored.len(), len, "slot {i}");
        let want = &model[off..off + len];
        assert!(
            restored == want,
            "slot {i} (offset {off}) differs from the model"
        );
        let exported = nbd.read(off as u64, len as u32).await.unwrap();
        assert!(
            restored == exported,
            "slot {i} (offset {off}) differs from the export"
        );
    }
}

/// Bytes of the 64 KiB clusters that hold data in the model (qcow2 allocates whole
/// clusters; every write here is non-zero data or an explicit zero write later).
fn allocated_clusters(writes: &[(u64, u64)]) -> u64 {
    let mut clusters = BTreeSet::new();
    for &(offset, len) in writes {
        let mut c = offset / BLOCK * BLOCK;
        while c < offset + len {
            clusters.insert(c);
            c += BLOCK;
        }
    }
    clusters.len() as u64 * BLOCK
}

async fn finish(backup: PullBackup, nbd: NbdClient) {
    nbd.disconnect().await.unwrap();
    backup.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_pull_reads_allocated_then_exactly_the_dirty_blocks() {
    let mut vm = Vm::new();
    let p = vm.start().await;
    let qmp = p.qmp().clone();
    let store_dir = vm.path("store");
    let store = Arc::new(
        ChunkStore::create(&store_dir, None, &StoreConfig::with_chunk_size(CHUNK), None).unwrap(),
    );

    // Before the full backup: data in a few places, one write smaller than a cluster.
    let first: Vec<(u64, Vec<u8>)> = vec![
        (0, noise(1, 2 * MIB)),                    // slots 0, 1
        (3 * MIB + 192 * KIB, noise(2, 64 * KIB)), // slot 3
        (7 * MIB + 100 * KIB, noise(3, 4 * KIB)),  // a 4 KiB write allocates one cluster
        (20 * MIB, noise(4, MIB)),                 // slot 20, zeroed later
        (100 * MIB, text(512 * KIB)),              // compressible
        (DISK - 64 * KIB, noise(5, 64 * KIB)),     // the last cluster
    ];
    for (offset, data) in &first {
        vm.write(&qmp, *offset, data).await;
    }
    let ranges: Vec<(u64, u64)> = first.iter().map(|(o, d)| (*o, d.len() as u64)).collect();
    let allocated = allocated_clusters(&ranges);

    // Full backup.
    let full = backup::start(&qmp, vm.spec("t1", "c1", None))
        .await
        .unwrap();
    assert_eq!(full.size, DISK);
    let granularity = backup::bitmaps(&qmp, "vda-fmt")
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.name == "c1")
        .expect("checkpoint c1")
        .granularity;
    assert_eq!(granularity, BLOCK, "bitmap granularity");
    let at_full = vm.model.clone();
    vm.dirty.clear();
    // After the instant: not in this backup, dirty for the next one.
    vm.write(&qmp, 0, &noise(6, 64 * KIB)).await;

    let nbd = connect(&vm, "base:allocation").await;
    let (full_map, stats) = run_pull(&nbd, &store, &PullKind::Full).await;
    assert_eq!(stats.bytes_marked, allocated, "{stats:?}");
    assert_eq!(stats.bytes_read, allocated, "{stats:?}");
    check_restore(&store, &full_map, &at_full, &nbd).await;
    store.write_index("vda/0001", &full_map).unwrap();
    finish(full, nbd).await;

    // Dirty known blocks: two in one chunk, one straddling a chunk boundary (a
    // 64 KiB write there dirties one block on each side), sub-block writes, a
    // whole chunk zeroed, the last block, and a compressible region.
    vm.write(&qmp, 5 * MIB + 128 * KIB, &noise(7, 64 * KIB))
        .await; // slot 5 (zero before)
    vm.write(&qmp, 5 * MIB + 768 * KIB, &noise(8, 64 * KIB))
        .await; // slot 5 again
    vm.write(&qmp, MIB + 300 * KIB, &noise(9, 4 * KIB)).await; // inside one block of slot 1
    vm.write(&qmp, 12 * MIB - 32 * KIB, &noise(10, 64 * KIB))
        .await; // slots 11 and 12
    vm.write_zeroes(&qmp, 20 * MIB, MIB).await; // slot 20 becomes zero: 16 blocks
    vm.write(&qmp, DISK - 64 * KIB, &noise(11, 64 * KIB)).await; // the last block
    vm.write(&qmp, 100 * MIB + 64 * KIB, &text(64 * KIB)).await; // compressible
    let n = vm.dirty.len() as u64;
    assert_eq!(n, 1 + 2 + 1 + 2 + 16 + 1 + 1);

    // Incremental.
    let inc = backup::start(&qmp, vm.spec("t2", "c2", Some("c1")))
        .await
        .unwrap();
    let context = inc.dirty_context.clone().expect("dirty context");
    let at_inc = vm.model.clone();
    vm.write(&qmp, 50 * MIB, &noise(12, 64 * KIB)).await; // after the instant

    let nbd = connect(&vm, &context).await;
    let parent = store.read_index("vda/0001").unwrap();
    let kind = PullKind::Incremental { context, parent };
    let (inc_map, stats) = run_pull(&nbd, &store, &kind).await;
    assert_eq!(stats.bytes_marked, n * BLOCK, "{stats:?}");
    assert_eq!(stats.bytes_read, n * BLOCK, "{stats:?}");
    // Slots 0, 1, 5, 11, 12, 100 and the last one were rewritten; slot 20 is zero now.
    assert_eq!(stats.chunks_written, 7, "{stats:?}");
    assert_eq!(inc_map.slots[20], Slot::Zero);
    assert_eq!(
        inc_map.slots[3], full_map.slots[3],
        "untouched slot keeps its chunk"
    );
    check_restore(&store, &inc_map, &at_inc, &nbd).await;
    store.write_index("vda/0002", &inc_map).unwrap();
    finish(inc, nbd).await;

    // Both snapshots still restore from the store alone, and it verifies clean.
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(store.read_index("vda/0001").unwrap(), full_map);
    assert_eq!(store.read_index("vda/0002").unwrap(), inc_map);
    p.kill().await;
}
