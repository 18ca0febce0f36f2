//! weft-blk confines itself before it serves a guest: the real binary, on a real
//! chunk store, runs without capabilities and in seccomp filter mode with
//! no_new_privs once it listens, still
//! flushes and exits cleanly on SIGTERM under the filter, and is killed (SIGSYS) when
//! it makes a forbidden system call from inside the real filter (the test-only
//! `--selftest-forbidden`). `integration/tests/weft_blk.rs` then serves a real guest
//! through it, and `integration/tests/compositions.rs` checks it as weftd spawns it.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wait_until::{wait_until, Step};

use weft_blockdev::blk::spec::DiskSpec;
use weft_blockdev::layers::LayerSpec;
use weft_blockdev::store::{BlockMap, ChunkStore, Slot, StoreConfig};

const CHUNK: usize = 64 * 1024;

/// A store holding one 1 MiB disk as index `disk`, and a read-write spec for it.
fn disk(dir: &Path) -> PathBuf {
    let root = dir.join("store");
    let store = ChunkStore::create(
        &root,
        None,
        &StoreConfig::with_chunk_size(CHUNK as u32),
        None,
    )
    .expect("store");
    let mut map = BlockMap::new(16 * CHUNK as u64, CHUNK as u32);
    map.slots[3] = Slot::Data(store.put(&vec![7u8; CHUNK]).expect("put").id);
    store.write_index("disk", &map).expect("index");
    let spec = DiskSpec {
        version: 1,
        store: root,
        key_file: None,
        layers: vec![LayerSpec {
            index: "disk".into(),
            slots: None,
        }],
        write_layer: Some(dir.join("w.cow")),
        trace: Some(dir.join("w.trace")),
        assembly: Some(dir.join("w.assembly")),
        trace_limit_mib: 1,
        cache_mib: 1,
        id: "seccomp-test".into(),
        queues: 1,
        queue_size: 16,
    };
    let path = dir.join("spec.json");
    std::fs::write(&path, serde_json::to_vec(&spec).expect("json")).expect("write spec");
    path
}

fn start(dir: &Path, spec: &Path, extra: &[&str]) -> (Child, PathBuf) {
    let socket = dir.join(format!("blk-{}.sock", extra.join("-")));
    let log = std::fs::File::create(dir.join(format!("blk-{}.log", extra.join("-")))).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_weft-blk"))
        .arg("--spec")
        .arg(spec)
        .arg("--socket")
        .arg(&socket)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn weft-blk");
    (child, socket)
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    wait_until("weft-blk to exit", Duration::from_secs(20), || {
        child.try_wait().expect("wait")
    })
    .unwrap()
}

fn status_field(pid: u32, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
}

fn log_of(dir: &Path, extra: &[&str]) -> String {
    std::fs::read_to_string(dir.join(format!("blk-{}.log", extra.join("-")))).unwrap_or_default()
}

#[test]
fn weft_blk_serves_under_its_seccomp_filter_and_forbidden_calls_kill_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = disk(dir.path());

    // As it serves: filter mode, no_new_privs, both filters (clone3 and the list).
    let (mut child, socket) = start(dir.path(), &spec, &[]);
    wait_until("weft-blk to listen", Duration::from_secs(20), || {
        if socket.exists() {
            return Step::Ready(());
        }
        match child.try_wait().expect("wait") {
            Some(st) => Step::Fail(format!("it exited ({st}): {}", log_of(dir.path(), &[]))),
            None => Step::Pending("no socket yet".into()),
        }
    })
    .unwrap();
    // The socket appears just before the filter goes on: wait for it.
    wait_until(
        "weft-blk's seccomp filter",
        Duration::from_secs(5),
        || match status_field(child.id(), "Seccomp") {
            Some(mode) if mode == "2" => Ok(()),
            other => Err(format!("Seccomp {other:?}")),
        },
    )
    .unwrap();
    assert_eq!(status_field(child.id(), "NoNewPrivs").as_deref(), Some("1"));
    // Root without capabilities: no way into root's other processes.
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(child.id(), caps).as_deref(),
            Some("0000000000000000"),
            "{caps}"
        );
    }
    assert_eq!(
        status_field(child.id(), "Seccomp_filters").as_deref(),
        Some("2")
    );
    // SIGTERM under the filter: flush, remove the socket, exit 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let status = wait_exit(&mut child);
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?}: {}",
        log_of(dir.path(), &[])
    );
    assert!(!socket.exists(), "the socket was left behind");

    // A forbidden call made from inside the real filter kills the process.
    for what in ["socket", "execve", "fork"] {
        let extra = ["--selftest-forbidden", what];
        let (mut child, _) = start(dir.path(), &spec, &extra);
        let status = wait_exit(&mut child);
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "{what}: {status:?}: {}",
            log_of(dir.path(), &extra)
        );
    }
    // Without the filter the same call goes through (the check above can fail).
    let extra = ["--seccomp", "off", "--selftest-forbidden", "socket"];
    let (mut child, _) = start(dir.path(), &spec, &extra);
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(3), "{}", log_of(dir.path(), &extra));
    assert!(log_of(dir.path(), &extra).contains("socket was not refused"));
}
