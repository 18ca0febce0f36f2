//! The vhost-user vsock device's life cycle with the real `vhost-device-vsock`
//! (installed by `make tools`): started before QEMU would be, found listening,
//! left running when weftd goes away and adopted by the next weftd, stopped with
//! nothing left behind. No guest here: `integration/tests/dpa_vsock.rs` boots one.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use weft::dpa::{DpaLink, DpaSettings, LinkLimits, VsockHost, VsockMode};
use weft_dpa::proto::{encode, Decoder, Hello, Message, PROTOCOL_VERSION};
use weft_provenance::log::{LogOptions, ProvenanceLog};
use weft_qmp::launch::VsockDevice;
use weft_qmp::process::process_alive;

fn settings(mode: VsockMode) -> DpaSettings {
    DpaSettings {
        vsock: mode,
        first_cid: 40,
        last_cid: 49,
        ..DpaSettings::default()
    }
}

fn link(dir: &Path) -> DpaLink {
    let log = ProvenanceLog::open(dir.join("provenance"), LogOptions::default()).expect("log");
    DpaLink::new(Arc::new(log), LinkLimits::default())
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

/// Says hello on the VM's DPA socket, as the device does for a guest connection.
async fn hello_on(path: &Path) -> u64 {
    let mut s = UnixStream::connect(path).await.expect("connect");
    s.write_all(&encode(&Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        capabilities: vec![],
        agent: "device-test".into(),
    })))
    .await
    .expect("write");
    let mut d = Decoder::new();
    let mut buf = [0u8; 256];
    loop {
        if let Some(m) = d.next_message().expect("decode") {
            match m {
                Message::Welcome(w) => return w.acked,
                other => panic!("want welcome, got {other:?}"),
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert!(n > 0, "closed before welcome");
        d.feed(&buf[..n]);
    }
}

/// On a failure, prints what the devices logged, what is left in the vsock
/// directory and which device processes still run, so that a failure on a loaded CI
/// machine can be understood from its output alone.
fn report_on_panic(dir: &Path) {
    let dir = dir.to_owned();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        for log in ["vsock.log", "vsock2.log"] {
            let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
            eprintln!("--- {log}:\n{text}");
        }
        let left: Vec<_> = std::fs::read_dir(dir.join("run/vsock"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        eprintln!("--- run/vsock holds {left:?}");
        let needle = dir.display().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            if let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() {
                let cmd = cmdline(pid);
                if cmd.contains(&needle) {
                    let stat =
                        std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    eprintln!("--- process {pid}: {cmd} | {stat}");
                }
            }
        }
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_starts_outlives_weftd_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    report_on_panic(dir.path());
    let (data, run) = (dir.path().join("data"), dir.path().join("run"));
    let host = VsockHost::new(
        &settings(VsockMode::VhostUser),
        &data,
        &run,
        link(dir.path()),
    );
    assert_eq!(
        host.mode(),
        VsockMode::VhostUser,
        "vhost-device-vsock is not installed: run `make tools` (cargo install --locked vhost-device-vsock)"
    );
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let device = host.prepare("vm1", &dir.path().join("vsock.log")).await;
        times.push(started.elapsed());
        assert!(
            device.is_some(),
            "{}",
            std::fs::read_to_string(dir.path().join("vsock.log")).unwrap_or_default()
        );
        host.release("vm1").await;
    }
    times.sort();
    eprintln!(
        "vhost-device-vsock start to listening: median {:?} (of {times:?})",
        times[2]
    );

    let device = host.prepare("vm1", &dir.path().join("vsock.log")).await;
    let p = host.paths("vm1");
    assert_eq!(
        device,
        Some(VsockDevice::VhostUser {
            socket: p.vhost.clone()
        })
    );
    assert_eq!(host.cid("vm1"), Some(40));
    let pid: u32 = std::fs::read_to_string(&p.pid)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let cmd = cmdline(pid);
    assert!(cmd.contains("--guest-cid 40"), "{cmd}");
    assert!(cmd.contains("--uds-path vsock"), "{cmd}");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd"),
        p.dir
    );
    assert_eq!(hello_on(&p.listener).await, 0);
    let mode = std::fs::metadata(run.join("vsock"))
        .expect("dir")
        .permissions();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(mode.mode() & 0o777, 0o700);
    // Its directory and weftd's listener in it are the device's user's
    // (`the_device_runs_as_its_vms_user_without_privileges` checks the process).
    let want = weft::dpa::DEFAULT_DEVICE_ID_BASE + 40;
    let m = std::fs::metadata(&p.dir).expect("vm dir");
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (want, want, 0o700));
    let m = std::fs::symlink_metadata(&p.listener).expect("listener");
    assert_eq!(
        m.uid(),
        want,
        "the device's user must reach weftd's listener"
    );

    // weftd goes away: the device stays; the next weftd adopts it and listens again.
    drop(host);
    assert!(process_alive(pid), "the device must outlive weftd");
    let host = VsockHost::new(
        &settings(VsockMode::VhostUser),
        &data,
        &run,
        link(dir.path()),
    );
    host.reattach("vm1").await;
    assert_eq!(hello_on(&p.listener).await, 0);
    assert_eq!(host.cid("vm1"), Some(40), "the CID survives the restart");
    // A second VM gets the next CID.
    assert!(host
        .prepare("vm2", &dir.path().join("vsock2.log"))
        .await
        .is_some());
    assert_eq!(host.cid("vm2"), Some(41));

    // The VM stops: the device ends (though this weftd did not spawn it) and its
    // files go.
    host.release("vm1").await;
    assert!(!process_alive(pid), "device pid {pid} still runs");
    for f in [&p.vhost, &p.uds, &p.listener, &p.pid] {
        assert!(!f.exists(), "{} left behind", f.display());
    }
    // Deleting gives the CID back.
    host.forget("vm1").await;
    assert_eq!(host.cid("vm1"), None);
    host.forget("vm2").await;
    let left: Vec<_> = std::fs::read_dir(run.join("vsock"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The device as weftd starts it runs as the VM's own user (2000000000 + CID by
/// default), without capabilities, with no_new_privs and in seccomp filter mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_runs_as_its_vms_user_without_privileges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, run) = (dir.path().join("data"), dir.path().join("run"));
    let host = VsockHost::new(
        &DpaSettings {
            first_cid: 50,
            last_cid: 59,
            ..settings(VsockMode::VhostUser)
        },
        &data,
        &run,
        link(dir.path()),
    );
    let log = dir.path().join("vsock.log");
    assert!(
        host.prepare("vm1", &log).await.is_some(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let pid: u32 = std::fs::read_to_string(host.paths("vm1").pid)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    host.forget("vm1").await;
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let want = (2_000_000_000u32 + 50).to_string();
    assert_eq!(field("Uid"), vec![want.clone(); 4], "{status}");
    assert_eq!(field("Gid"), vec![want; 4], "{status}");
    assert!(field("Groups").is_empty(), "{status}");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(field(caps), ["0000000000000000"], "{caps}: {status}");
    }
    assert_eq!(field("NoNewPrivs"), ["1"], "{status}");
    assert_eq!(field("Seccomp"), ["2"], "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_binary_vms_start_without_vsock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = VsockHost::new(
        &DpaSettings {
            vhost_device_vsock: dir.path().join("no-such-binary"),
            ..settings(VsockMode::VhostUser)
        },
        &dir.path().join("data"),
        &dir.path().join("run"),
        link(dir.path()),
    );
    assert_eq!(host.mode(), VsockMode::Off);
    assert_eq!(host.prepare("vm1", &dir.path().join("log")).await, None);
    let off = VsockHost::new(
        &settings(VsockMode::Off),
        &dir.path().join("data"),
        &dir.path().join("run"),
        link(dir.path()),
    );
    assert_eq!(off.prepare("vm1", &dir.path().join("log")).await, None);
}
