//! The pull-backup recipe against real QEMU 7.2. Guest writes are injected through
//! QEMU's block layer (HMP `qemu-io` on the device, the path a guest's writes take);
//! the NBD export is checked from outside with `qemu-io` and `qemu-img map`.

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;
use weft_qmp::backup::{self, PullBackupSpec};
use weft_qmp::launch::{DiskConfig, DiskFormat, LaunchPaths, VmConfig};
use weft_qmp::process::{QemuProcess, SpawnOptions};
use weft_qmp::Qmp;

const MIB: u64 = 1024 * 1024;

struct Vm {
    dir: tempfile::TempDir,
    config: VmConfig,
}

impl Vm {
    fn new() -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("vda.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg("64M")
            .output()
            .unwrap();
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
        Vm { dir, config }
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

    fn nbd_opts(&self, extra: &str) -> String {
        format!(
            "driver=nbd,server.type=unix,server.path={},export=vda{extra}",
            self.path("nbd.sock").display()
        )
    }
}

/// A guest-like write: through the device's block backend (and so through the
/// copy-before-write filter while a backup runs).
async fn write(qmp: &Qmp, pattern: u8, offset: u64, len: u64) {
    // The block backend belongs to the virtio device inside the PCI proxy `vda`.
    let line = format!(
        "qemu-io -d /machine/peripheral/vda/virtio-backend \"write -P {pattern:#x} {offset} {len}\""
    );
    let out = qmp
        .execute_raw("human-monitor-command", Some(json!({"command-line": line})))
        .await
        .unwrap();
    assert_eq!(out, json!(""), "qemu-io said {out}");
}

/// Reads the export with qemu-io and checks `len` bytes at `offset` are `pattern`.
fn export_has(vm: &Vm, pattern: u8, offset: u64, len: u64) -> bool {
    let out = Command::new("qemu-io")
        .args(["-r", "--image-opts", &vm.nbd_opts("")])
        .arg("-c")
        .arg(format!("read -P {pattern:#x} {offset} {len}"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    out.status.success() && !text.contains("Pattern verification failed") && !text.contains("error")
}

/// Dirty ranges of the export's dirty-bitmap context, from `qemu-img map`
/// (with `x-dirty-bitmap`, dirty ranges are reported as `"data": false`).
fn dirty_ranges(vm: &Vm, context: &str) -> Vec<(u64, u64)> {
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "--image-opts"])
        .arg(vm.nbd_opts(&format!(",x-dirty-bitmap={context}")))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

async fn names(qmp: &Qmp) -> Vec<String> {
    backup::bitmaps(qmp, "vda-fmt")
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect()
}

async fn nothing_left(qmp: &Qmp, vm: &Vm) {
    let nodes = qmp
        .execute_raw("query-named-block-nodes", Some(json!({"flat": true})))
        .await
        .unwrap();
    let weft_nodes: Vec<_> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with("weft-"))
        .map(str::to_string)
        .collect();
    assert!(weft_nodes.is_empty(), "nodes left: {weft_nodes:?}");
    let exports = qmp.execute_raw("query-block-exports", None).await.unwrap();
    assert_eq!(exports, json!([]));
    let jobs = qmp.execute_raw("query-block-jobs", None).await.unwrap();
    assert_eq!(jobs, json!([]));
    let fleeces: Vec<_> = std::fs::read_dir(vm.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("fleece-"))
        .collect();
    assert!(fleeces.is_empty(), "scratch files left");
    assert!(!vm.path("nbd.sock").exists(), "nbd socket left");
}

#[tokio::test]
async fn qemu_pull_backup_full_incremental_and_abort() {
    let vm = Vm::new();
    let p = vm.start().await;
    let qmp = p.qmp().clone();
    write(&qmp, 0xaa, 0, MIB).await;

    // Full: the export shows the disk at the instant, not later writes.
    let full = backup::start(&qmp, vm.spec("t1", "c1", None))
        .await
        .unwrap();
    assert_eq!(full.size, 64 * MIB);
    assert!(full.dirty_context.is_none());
    write(&qmp, 0xbb, 0, 64 * 1024).await;
    assert!(export_has(&vm, 0xaa, 0, MIB), "point-in-time view");
    assert!(export_has(&vm, 0x00, 2 * MIB, MIB));
    full.finish().await.unwrap();
    assert_eq!(names(&qmp).await, ["c1"]);
    nothing_left(&qmp, &vm).await;

    // Incremental: exactly what was written since c1.
    write(&qmp, 0xcc, 4 * MIB, 128 * 1024).await;
    let inc = backup::start(&qmp, vm.spec("t2", "c2", Some("c1")))
        .await
        .unwrap();
    let ctx = inc.dirty_context.clone().unwrap();
    write(&qmp, 0xdd, 8 * MIB, 64 * 1024).await; // after the instant: not in this one
    assert_eq!(
        dirty_ranges(&vm, &ctx),
        [(0, 64 * 1024), (4 * MIB, 128 * 1024)]
    );
    assert!(export_has(&vm, 0xbb, 0, 64 * 1024));
    assert!(export_has(&vm, 0xcc, 4 * MIB, 128 * 1024));
    assert!(export_has(&vm, 0x00, 8 * MIB, 64 * 1024));
    inc.finish().await.unwrap();
    assert_eq!(names(&qmp).await, ["c2"]);
    nothing_left(&qmp, &vm).await;

    // A failed backup leaves the previous checkpoint as the base.
    let failed = backup::start(&qmp, vm.spec("t3", "c3", Some("c2")))
        .await
        .unwrap();
    failed.abort().await;
    assert_eq!(names(&qmp).await, ["c2"]);
    nothing_left(&qmp, &vm).await;
    assert_eq!(
        backup::checkpoint_problem(&qmp, "vda-fmt", "c2")
            .await
            .unwrap(),
        None
    );

    // A backup that cannot be set up (unknown previous checkpoint) undoes itself.
    let err = backup::start(&qmp, vm.spec("t4", "c4", Some("nope")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    assert_eq!(names(&qmp).await, ["c2"]);
    nothing_left(&qmp, &vm).await;
    p.kill().await;
}

#[tokio::test]
async fn qemu_checkpoints_survive_a_clean_restart_but_not_a_crash() {
    let vm = Vm::new();
    let p = vm.start().await;
    let qmp = p.qmp().clone();
    let full = backup::start(&qmp, vm.spec("t1", "c1", None))
        .await
        .unwrap();
    full.finish().await.unwrap();
    write(&qmp, 0x11, MIB, 64 * 1024).await;
    qmp.execute_raw("quit", None).await.ok();
    p.wait().await;

    // Clean shutdown: the persistent bitmap is stored in the qcow2 and still records.
    let p = vm.start().await;
    let qmp = p.qmp().clone();
    assert_eq!(
        backup::checkpoint_problem(&qmp, "vda-fmt", "c1")
            .await
            .unwrap(),
        None
    );
    let inc = backup::start(&qmp, vm.spec("t2", "c2", Some("c1")))
        .await
        .unwrap();
    assert_eq!(
        dirty_ranges(&vm, inc.dirty_context.as_deref().unwrap()),
        [(MIB, 64 * 1024)]
    );
    inc.finish().await.unwrap();

    // A checkpoint added in a run that then crashes never reached the qcow2
    // (QEMU stores bitmaps when it closes the image).
    let lost = backup::start(&qmp, vm.spec("t3", "c3", Some("c2")))
        .await
        .unwrap();
    lost.finish().await.unwrap();
    p.kill().await;
    let p = vm.start().await;
    let qmp = p.qmp().clone();
    let problem = backup::checkpoint_problem(&qmp, "vda-fmt", "c3")
        .await
        .unwrap()
        .expect("a checkpoint of a crashed run is unusable");
    assert!(problem.contains("not on"), "{problem}");

    // A checkpoint loaded from the image is marked in use while QEMU runs: after a
    // crash QEMU loads it as inconsistent.
    backup::start(&qmp, vm.spec("t4", "c4", None))
        .await
        .unwrap()
        .finish()
        .await
        .unwrap();
    qmp.execute_raw("quit", None).await.ok();
    p.wait().await;
    let p = vm.start().await;
    let qmp = p.qmp().clone();
    assert_eq!(
        backup::checkpoint_problem(&qmp, "vda-fmt", "c4")
            .await
            .unwrap(),
        None
    );
    write(&qmp, 0x22, 2 * MIB, 64 * 1024).await;
    p.kill().await;
    let p = vm.start().await;
    let qmp = p.qmp().clone();
    let problem = backup::checkpoint_problem(&qmp, "vda-fmt", "c4")
        .await
        .unwrap()
        .expect("an unclean shutdown makes the checkpoint unusable");
    assert!(problem.contains("inconsistent"), "{problem}");
    p.kill().await;
}

#[tokio::test]
async fn qemu_leftovers_of_an_interrupted_backup_are_cleaned() {
    let vm = Vm::new();
    let p = vm.start().await;
    let qmp = p.qmp().clone();
    backup::start(&qmp, vm.spec("t1", "weft-c1", None))
        .await
        .unwrap()
        .finish()
        .await
        .unwrap();
    write(&qmp, 0x33, 0, 64 * 1024).await;
    // weftd dies in the middle of the next backup: nothing is torn down.
    let interrupted = backup::start(&qmp, vm.spec("t2", "weft-c2", Some("weft-c1")))
        .await
        .unwrap();
    std::mem::forget(interrupted);

    let removed = backup::clean_leftovers(&qmp, "vda-fmt", "weft-c", Some("weft-c1"))
        .await
        .unwrap();
    for what in [
        "export weft-export-t2",
        "nbd server",
        "job weft-backup-t2",
        "node weft-fleece-t2",
        "node weft-fleece-file-t2",
        "bitmap weft-tmp-t2",
        "bitmap weft-c2",
    ] {
        assert!(removed.iter().any(|r| r == what), "{what} in {removed:?}");
    }
    assert_eq!(names(&qmp).await, ["weft-c1"]);
    // The next backup works, from the last complete checkpoint.
    let _ = std::fs::remove_file(vm.path("fleece-t2.qcow2"));
    let _ = std::fs::remove_file(vm.path("nbd.sock"));
    let next = backup::start(&qmp, vm.spec("t3", "weft-c3", Some("weft-c1")))
        .await
        .unwrap();
    assert_eq!(
        dirty_ranges(&vm, next.dirty_context.as_deref().unwrap()),
        [(0, 64 * 1024)]
    );
    next.finish().await.unwrap();
    nothing_left(&qmp, &vm).await;
    p.kill().await;
}

#[tokio::test]
async fn qemu_disks_without_persistent_bitmaps_back_up_with_memory_checkpoints() {
    for (format, create_args) in [
        (DiskFormat::Qcow2, vec!["-f", "qcow2", "-o", "compat=0.10"]),
        (DiskFormat::Raw, vec!["-f", "raw"]),
    ] {
        let mut vm = Vm::new();
        let disk = vm.path("old.img");
        let out = Command::new("qemu-img")
            .arg("create")
            .arg("-q")
            .args(&create_args)
            .arg(&disk)
            .arg("64M")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        vm.config.disks[0].path = disk;
        vm.config.disks[0].format = format;
        let p = vm.start().await;
        let qmp = p.qmp().clone();
        let why = backup::persistent_bitmaps_unsupported(&qmp, "vda-fmt")
            .await
            .unwrap()
            .expect("no persistent bitmaps on this image");
        assert!(why.contains("cannot store checkpoint bitmaps"), "{why}");
        let mut spec = vm.spec("t1", "c1", None);
        spec.persistent = false;
        backup::start(&qmp, spec)
            .await
            .unwrap()
            .finish()
            .await
            .unwrap();
        write(&qmp, 0x44, 3 * MIB, 64 * 1024).await;
        let mut spec = vm.spec("t2", "c2", Some("c1"));
        spec.persistent = false;
        let inc = backup::start(&qmp, spec).await.unwrap();
        assert_eq!(
            dirty_ranges(&vm, inc.dirty_context.as_deref().unwrap()),
            [(3 * MIB, 64 * 1024)],
            "{format:?}"
        );
        inc.finish().await.unwrap();
        p.kill().await;
    }
}

#[tokio::test]
async fn qemu_overlays_are_made_by_the_storage_daemon() {
    let vm = Vm::new();
    let base = vm.config.disks[0].path.clone();
    let out = Command::new("qemu-io")
        .args(["-c", "write -P 0x77 1M 64k"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let overlay = vm.path("overlay.qcow2");
    weft_qmp::image::create_overlay(&overlay, &base, DiskFormat::Qcow2, 64 * MIB, vm.dir.path())
        .await
        .unwrap();
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&overlay)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 64 * MIB);
    assert_eq!(info["backing-filename"], base.to_str().unwrap());
    // Reads fall through to the base.
    let read = Command::new("qemu-io")
        .args(["-r", "-c", "read -P 0x77 1M 64k"])
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&read.stdout).contains("fail"),
        "{read:?}"
    );
    // An existing file is never overwritten.
    assert!(weft_qmp::image::create_overlay(
        &overlay,
        &base,
        DiskFormat::Qcow2,
        MIB,
        vm.dir.path()
    )
    .await
    .is_err());
}

#[tokio::test]
async fn qemu_the_device_root_node_follows_a_live_external_snapshot() {
    let vm = Vm::new();
    let p = vm.start().await;
    let qmp = p.qmp().clone();
    assert_eq!(
        backup::device_root_node(&qmp, "vda").await.unwrap(),
        "vda-fmt"
    );
    let top = vm.path("top.qcow2");
    weft_qmp::image::create_overlay(
        &top,
        &vm.config.disks[0].path,
        DiskFormat::Qcow2,
        64 * MIB,
        vm.dir.path(),
    )
    .await
    .unwrap();
    qmp.execute_raw(
        "blockdev-add",
        Some(json!({"driver": "qcow2", "node-name": "vda-top", "file": {"driver": "file", "filename": top.to_str().unwrap()}, "backing": null})),
    )
    .await
    .unwrap();
    qmp.execute_raw(
        "blockdev-snapshot",
        Some(json!({"node": "vda-fmt", "overlay": "vda-top"})),
    )
    .await
    .unwrap();
    assert_eq!(
        backup::device_root_node(&qmp, "vda").await.unwrap(),
        "vda-top"
    );
    assert!(backup::device_root_node(&qmp, "vdz").await.is_err());
    p.kill().await;
}
