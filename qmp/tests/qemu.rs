//! The client and launcher against real QEMU 7.2 (`qemu-system-x86_64` under TCG and
//! `qemu-storage-daemon`). Every test that starts QEMU is named `qemu_*` so the nextest
//! configuration can run them one at a time.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use weft_qmp::launch::{DiskConfig, DiskFormat, LaunchPaths, VmConfig};
use weft_qmp::process::{is_qemu_process, process_alive, QemuProcess, SpawnOptions};
use weft_qmp::qapi::qmp;
use weft_qmp::{Error, Qmp};

const T: Duration = Duration::from_secs(20);

struct Vm {
    dir: tempfile::TempDir,
    paths: LaunchPaths,
    config: VmConfig,
}

impl Vm {
    /// A q35 TCG VM with one sparse raw disk and no kernel: it sits in firmware.
    fn new() -> Vm {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("vda.raw");
        std::fs::File::create(&disk)
            .expect("create disk")
            .set_len(8 << 20)
            .expect("size disk");
        let paths = LaunchPaths {
            qmp_socket: dir.path().join("qmp.sock"),
            serial_log: dir.path().join("serial.log"),
            output_log: dir.path().join("qemu.log"),
            pid_file: Some(dir.path().join("qemu.pid")),
        };
        let config = VmConfig {
            memory_mib: 64,
            disks: vec![DiskConfig {
                name: "vda".into(),
                path: disk,
                format: DiskFormat::Raw,
                read_only: false,
                backing: Vec::new(),
            }],
            ..VmConfig::default()
        };
        Vm { dir, paths, config }
    }

    async fn spawn(&self) -> QemuProcess {
        self.spawn_with(&SpawnOptions::default()).await
    }

    async fn spawn_with(&self, opts: &SpawnOptions) -> QemuProcess {
        match weft_qmp::process::spawn(&self.config, &self.paths, opts).await {
            Ok(p) => p,
            Err(e) => panic!("qemu did not start: {e}"),
        }
    }
}

/// Polls `check` until it holds (true) or `timeout` passes (false).
async fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    wait_until::Wait::new("the condition", timeout)
        .until_async(|| std::future::ready(check()))
        .await
        .is_ok()
}

fn proc_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Pids of live (non-zombie) processes whose command line mentions `needle`.
fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
                && process_alive(*pid)
        })
        .collect()
}

#[tokio::test]
async fn qemu_query_status_and_version() {
    let vm = Vm::new();
    let p = vm.spawn().await;
    let q = p.qmp();
    assert_eq!((q.version().0, q.version().1), (7, 2));
    assert!(is_qemu_process(p.pid()), "pid {} is not qemu", p.pid());
    assert!(process_alive(p.pid()));
    let pid_file = std::fs::read_to_string(vm.paths.pid_file.as_ref().expect("pid file"))
        .expect("pid file written");
    assert_eq!(pid_file.trim(), p.pid().to_string());

    let status = q.execute(qmp::query_status {}).await.expect("query-status");
    assert!(status.running);
    assert_eq!(status.status, qmp::RunState::running);
    let version = q
        .execute(qmp::query_version {})
        .await
        .expect("query-version");
    assert_eq!((version.qemu.major, version.qemu.minor), (7, 2));
    assert_eq!(
        (
            version.qemu.major as u32,
            version.qemu.minor as u32,
            version.qemu.micro as u32
        ),
        q.version()
    );

    // The disk is attached with the node names the launcher promises.
    let nodes = q
        .execute_raw("query-named-block-nodes", Some(json!({"flat": true})))
        .await
        .expect("query-named-block-nodes");
    let names: Vec<&str> = nodes
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .collect();
    assert!(
        names.contains(&"vda-file") && names.contains(&"vda-fmt"),
        "{names:?}"
    );

    // A QMP error from real QEMU keeps its class and text.
    match q.execute_raw("no-such-command", None).await {
        Err(Error::Qmp { class, desc }) => {
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("want Error::Qmp, got {other:?}"),
    }
    p.kill().await;
}

#[tokio::test]
async fn qemu_concurrent_commands() {
    let vm = Vm::new();
    let p = vm.spawn().await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let q = p.qmp().clone();
            tokio::spawn(async move {
                for j in 0..20 {
                    match (i + j) % 3 {
                        0 => {
                            let s = q.execute(qmp::query_status {}).await.expect("status");
                            assert!(s.running);
                        }
                        1 => {
                            let v = q.execute(qmp::query_version {}).await.expect("version");
                            assert_eq!(v.qemu.major, 7);
                        }
                        _ => {
                            let n = q
                                .execute_raw("query-named-block-nodes", None)
                                .await
                                .expect("nodes");
                            assert!(n.as_array().is_some_and(|a| !a.is_empty()));
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(T, t)
            .await
            .expect("task finished in time")
            .expect("task succeeded");
    }
    p.kill().await;
}

#[tokio::test]
async fn qemu_stop_cont_events() {
    let vm = Vm::new();
    let p = vm.spawn().await;
    let q = p.qmp();
    let stopped = q.wait_event(T, |e| e.name == "STOP");
    q.execute(qmp::stop {}).await.expect("stop");
    let e = stopped.await.expect("STOP event");
    assert!(e.timestamp.0 > 0);
    let s = q.execute(qmp::query_status {}).await.expect("status");
    assert!(!s.running);
    assert_eq!(s.status, qmp::RunState::paused);

    let resumed = q.wait_event(T, |e| e.name == "RESUME");
    q.execute(qmp::cont {}).await.expect("cont");
    resumed.await.expect("RESUME event");
    assert!(
        q.execute(qmp::query_status {})
            .await
            .expect("status")
            .running
    );
    p.kill().await;
}

#[tokio::test]
async fn qemu_quit_closes_and_records_exit() {
    let vm = Vm::new();
    let p = vm.spawn().await;
    let q = p.qmp().clone();
    assert!(p.exit_status().is_none());
    let shutdown = q.wait_event(T, |e| e.name == "SHUTDOWN");
    q.execute(qmp::quit {}).await.expect("quit");
    let e = shutdown.await.expect("SHUTDOWN event");
    assert_eq!(e.data_str("reason"), Some("host-qmp-quit"));
    tokio::time::timeout(T, q.closed())
        .await
        .expect("connection closed");
    let info = tokio::time::timeout(T, p.wait()).await.expect("exited");
    assert_eq!(info.code, Some(0), "{info}");
    assert!(info.success());
    assert_eq!(p.exit_status(), Some(info));
    assert!(matches!(
        q.execute(qmp::query_status {}).await,
        Err(Error::Closed)
    ));
    assert!(!vm.paths.qmp_socket.exists());
}

#[tokio::test]
async fn qemu_kill_records_signal_and_cleans_up() {
    let vm = Vm::new();
    let p = vm.spawn().await;
    let pid = p.pid();
    let info = tokio::time::timeout(T, p.kill()).await.expect("killed");
    assert_eq!(info.signal, Some(libc::SIGKILL), "{info}");
    assert_eq!(info.code, None);
    assert!(!proc_exists(pid), "pid {pid} not reaped");
    assert!(!vm.paths.qmp_socket.exists(), "socket left behind");
    tokio::time::timeout(T, p.qmp().closed())
        .await
        .expect("qmp closed");
}

#[tokio::test]
async fn qemu_runs_in_its_own_process_group() {
    let vm = Vm::new();
    let p = vm.spawn().await;
    let pid = libc::pid_t::try_from(p.pid()).expect("pid fits");
    // SAFETY: getpgid only reads the process group of a pid; no memory is involved.
    let pgid = unsafe { libc::getpgid(pid) };
    assert_eq!(pgid, pid, "qemu should lead its own process group");
    // SAFETY: as above, for our own process (pid 0).
    let own = unsafe { libc::getpgid(0) };
    assert_ne!(pgid, own);
    // Output goes to a file, not a pipe.
    let fd1 = std::fs::read_link(format!("/proc/{pid}/fd/1")).expect("stdout link");
    assert_eq!(fd1, vm.paths.output_log);
    p.kill().await;
}

#[tokio::test]
async fn qemu_drop_kills_the_process() {
    let vm = Vm::new();
    let p = vm.spawn().await;
    let pid = p.pid();
    assert!(proc_exists(pid));
    assert_eq!(processes_mentioning(vm.dir.path()), vec![pid]);
    drop(p);
    assert!(
        wait_until(T, || !proc_exists(pid)).await,
        "pid {pid} still exists after drop"
    );
    assert!(wait_until(T, || !vm.paths.qmp_socket.exists()).await);
}

#[tokio::test]
async fn qemu_detach_leaves_it_running() {
    let vm = Vm::new();
    let p = vm.spawn().await;
    let pid = p.detach();
    // Dropping the handle closes its QMP connection (QEMU serves one client) but
    // must not kill a detached QEMU.
    drop(p);
    // Give a wrongful kill every chance to happen.
    // sleep-ok: that nothing happens in this time is what is tested
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(process_alive(pid), "detached qemu {pid} was killed");
    assert!(is_qemu_process(pid));
    // The daemon's recovery path: reconnect to the socket of a running QEMU.
    let q = Qmp::connect(&vm.paths.qmp_socket).await.expect("reconnect");
    assert!(
        q.execute(qmp::query_status {})
            .await
            .expect("status")
            .running
    );
    let pid_t = libc::pid_t::try_from(pid).expect("pid fits");
    // SAFETY: kill only sends a signal; pid is the positive pid of the QEMU we started.
    assert_eq!(unsafe { libc::kill(pid_t, libc::SIGKILL) }, 0);
    assert!(wait_until(T, || !process_alive(pid)).await);
    tokio::time::timeout(T, q.closed())
        .await
        .expect("qmp closed");
}

#[tokio::test]
async fn qemu_spawn_detached_survives_drop() {
    let vm = Vm::new();
    let p = vm
        .spawn_with(&SpawnOptions {
            detached: true,
            ..SpawnOptions::default()
        })
        .await;
    let pid = p.pid();
    drop(p);
    // sleep-ok: a wrongful kill would come in this time; that none does is what is tested
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(process_alive(pid), "detached qemu {pid} was killed");
    let pid_t = libc::pid_t::try_from(pid).expect("pid fits");
    // SAFETY: kill only sends a signal; pid is the positive pid of the QEMU we started.
    assert_eq!(unsafe { libc::kill(pid_t, libc::SIGKILL) }, 0);
    assert!(wait_until(T, || !process_alive(pid)).await);
}

#[tokio::test]
async fn qemu_start_failure_reports_qemu_output() {
    let mut vm = Vm::new();
    // The raw file is not a qcow2 image: QEMU exits while opening it.
    vm.config.disks[0].format = DiskFormat::Qcow2;
    match weft_qmp::process::spawn(&vm.config, &vm.paths, &SpawnOptions::default()).await {
        Err(Error::Launch { status, output }) => {
            assert_eq!(status.code, Some(1), "{status}");
            assert!(output.contains("qcow2"), "{output}");
            let msg = Error::Launch { status, output }.to_string();
            assert!(
                msg.starts_with("qemu exited during start (exit code 1): "),
                "{msg}"
            );
        }
        Err(e) => panic!("want Error::Launch, got {e}"),
        Ok(p) => panic!("qemu {} started on a bad image", p.pid()),
    }
    assert!(!vm.paths.qmp_socket.exists(), "socket left behind");
    assert_eq!(
        processes_mentioning(vm.dir.path()),
        Vec::<u32>::new(),
        "qemu left running"
    );
}

#[tokio::test]
async fn qemu_ready_timeout_kills_and_cleans_up() {
    let vm = Vm::new();
    let opts = SpawnOptions {
        ready_timeout: Duration::from_millis(1),
        ..SpawnOptions::default()
    };
    match weft_qmp::process::spawn(&vm.config, &vm.paths, &opts).await {
        Err(Error::Timeout { what, .. }) => assert!(what.contains("qmp socket"), "{what}"),
        Err(e) => panic!("want Error::Timeout, got {e}"),
        Ok(p) => panic!("qemu {} was ready within 1 ms", p.pid()),
    }
    assert_eq!(
        processes_mentioning(vm.dir.path()),
        Vec::<u32>::new(),
        "qemu left running"
    );
    assert!(!vm.paths.qmp_socket.exists(), "socket left behind");
}

#[tokio::test]
async fn missing_binary_is_a_clear_error() {
    let vm = Vm::new();
    let opts = SpawnOptions {
        binary: PathBuf::from("/nonexistent/qemu-system-x86_64"),
        ..SpawnOptions::default()
    };
    match weft_qmp::process::spawn(&vm.config, &vm.paths, &opts).await {
        Err(e @ Error::Spawn { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("/nonexistent/qemu-system-x86_64"), "{msg}");
        }
        other => panic!("want Error::Spawn, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_config_is_rejected_before_starting() {
    let mut vm = Vm::new();
    vm.config.disks[0].path = vm.dir.path().join("missing.raw");
    match weft_qmp::process::spawn(&vm.config, &vm.paths, &SpawnOptions::default()).await {
        Err(Error::InvalidConfig(msg)) => assert!(msg.contains("missing.raw"), "{msg}"),
        other => panic!("want InvalidConfig, got {other:?}"),
    }
    assert!(!vm.paths.output_log.exists(), "qemu was started");
}

/// `qemu-storage-daemon` with a QMP monitor and one file node; killed on drop.
struct StorageDaemon {
    child: tokio::process::Child,
    socket: PathBuf,
}

impl StorageDaemon {
    async fn start(dir: &Path, image: &Path) -> StorageDaemon {
        let socket = dir.join("qsd.sock");
        let child = tokio::process::Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=m",
                socket.display()
            ))
            .args(["--monitor", "chardev=m"])
            .arg("--blockdev")
            .arg(
                json!({"driver": "file", "node-name": "target-file", "filename": image})
                    .to_string(),
            )
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("qemu-storage-daemon starts");
        assert!(
            wait_until(T, || socket.exists()).await,
            "qemu-storage-daemon socket did not appear"
        );
        StorageDaemon { child, socket }
    }
}

#[tokio::test]
async fn qemu_storage_daemon_blockdev_create_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("new.qcow2");
    std::fs::File::create(&image).expect("create image");
    let mut qsd = StorageDaemon::start(dir.path(), &image).await;
    let q = Qmp::connect(&qsd.socket).await.expect("connect to qsd");
    assert_eq!(q.version().0, 7);

    let nodes = q
        .execute_raw("query-named-block-nodes", None)
        .await
        .expect("query-named-block-nodes");
    assert!(
        nodes
            .as_array()
            .expect("array")
            .iter()
            .any(|n| n["node-name"] == "target-file"),
        "{nodes}"
    );

    // A job that succeeds: format the file as qcow2.
    let done = q.wait_job("create-ok", T);
    q.execute_raw(
        "blockdev-create",
        Some(json!({"job-id": "create-ok",
                    "options": {"driver": "qcow2", "file": "target-file", "size": 64 << 20}})),
    )
    .await
    .expect("blockdev-create");
    done.await.expect("job succeeded");
    assert_eq!(
        weft_qmp::launch::detect_format(&image).expect("detect"),
        DiskFormat::Qcow2
    );
    // wait_job dismissed it.
    let jobs = q.execute_raw("query-jobs", None).await.expect("query-jobs");
    assert_eq!(jobs, json!([]));

    // A job that fails while running: QEMU's error text comes back.
    let done = q.wait_job("create-bad", T);
    q.execute_raw(
        "blockdev-create",
        Some(json!({"job-id": "create-bad",
                    "options": {"driver": "qcow2", "file": "target-file", "size": 64 << 20,
                                "cluster-size": 1000}})),
    )
    .await
    .expect("blockdev-create accepted");
    match done.await {
        Err(Error::Job { id, desc }) => {
            assert_eq!(id, "create-bad");
            assert!(desc.contains("luster size"), "{desc}");
        }
        other => panic!("want Error::Job, got {other:?}"),
    }
    assert!(matches!(
        q.wait_job("never-created", T).await,
        Err(Error::NoSuchJob(_))
    ));

    let exited = q.wait_event(T, |e| e.name == "SHUTDOWN");
    q.execute(qmp::quit {}).await.expect("quit");
    // qsd sends no SHUTDOWN event; the connection just closes.
    tokio::time::timeout(T, q.closed())
        .await
        .expect("closed after quit");
    assert!(matches!(exited.await, Err(Error::Closed)));
    let status = tokio::time::timeout(T, qsd.child.wait())
        .await
        .expect("qsd exited")
        .expect("wait");
    assert!(status.success(), "{status}");
}

/// A network namespace and a cgroup made from outside (tests may use `ip`), removed on drop.
struct Place {
    netns: String,
    cgroup: PathBuf,
}

impl Drop for Place {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

#[tokio::test]
async fn qemu_runs_in_the_given_network_namespace_and_cgroup() {
    let name = format!("weft-t{}", std::process::id());
    let ok = std::process::Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .expect("ip runs");
    assert!(ok.success());
    // The pids controller exists as a v1 hierarchy or in the v2 tree on every host here.
    let base = ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists())
        .expect("a cgroup hierarchy");
    let place = Place {
        netns: name.clone(),
        cgroup: base.join(&name),
    };
    std::fs::create_dir_all(&place.cgroup).unwrap();

    let vm = Vm::new();
    let p = vm
        .spawn_with(&SpawnOptions {
            netns: Some(PathBuf::from(format!("/run/netns/{name}"))),
            cgroups: vec![place.cgroup.clone()],
            ..SpawnOptions::default()
        })
        .await;
    use std::os::unix::fs::MetadataExt;
    let ns_of = |path: &str| std::fs::metadata(path).unwrap().ino();
    assert_eq!(
        ns_of(&format!("/proc/{}/ns/net", p.pid())),
        ns_of(&format!("/run/netns/{name}")),
        "QEMU is in the namespace"
    );
    assert_ne!(
        ns_of(&format!("/proc/{}/ns/net", p.pid())),
        ns_of("/proc/self/ns/net")
    );
    let procs = std::fs::read_to_string(place.cgroup.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l.trim() == p.pid().to_string()),
        "QEMU is in the cgroup: {procs}"
    );
    p.kill().await;

    // A namespace that does not exist is a clear error before anything starts.
    let err = weft_qmp::process::spawn(
        &vm.config,
        &vm.paths,
        &SpawnOptions {
            netns: Some(PathBuf::from("/run/netns/weft-nope")),
            ..SpawnOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("weft-nope"), "{err}");
    drop(place);
}
