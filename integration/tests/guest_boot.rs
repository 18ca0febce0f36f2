//! The rig's own end-to-end tests: the test guest boots under QEMU, runs its workload,
//! answers QMP, and reports setup errors instead of hanging.

use std::time::{Duration, Instant};

use weft_integration::{guest_assets, read_ext4_file, Diagnostics, Guest, GuestOpts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_boots_and_runs_workload() -> anyhow::Result<()> {
    let guest = Guest::boot(GuestOpts::default()).await?;
    eprintln!(
        "guest booted to WEFT-READY in {:.2}s",
        guest.boot_time().as_secs_f64()
    );

    let manifest = std::fs::read_to_string(guest_assets()?.dir.join("manifest.txt"))?;
    assert!(
        manifest.contains("kernel-package: linux-image-6.1.0-"),
        "{manifest}"
    );
    assert!(
        manifest.contains("busybox-package: busybox-static "),
        "{manifest}"
    );

    // The counter writes a line a second to /data/counter.log and echoes every 5th.
    guest
        .serial()
        .wait_for("weft-counter: tick 5", Duration::from_secs(30))
        .await?;

    let status = guest.qmp().execute_raw("query-status", None).await?;
    assert_eq!(status["status"], "running", "{status}");
    assert_eq!(status["running"], true, "{status}");
    // It booted and runs under QEMU's seccomp filter (-sandbox on), as weftd's guests do.
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", guest.process().pid()))?;
    assert!(
        proc_status.lines().any(|l| l == "Seccomp:\t2"),
        "{proc_status}"
    );

    let disk = guest.data_disk().to_path_buf();
    let (exit, _dir) = guest.shutdown_keep_dir().await?;
    assert!(exit.success(), "QEMU exit after quit: {exit}");

    let log = String::from_utf8(read_ext4_file(&disk, "/counter.log")?)?;
    let ticks: Vec<&str> = log.lines().collect();
    assert!(ticks.len() >= 5, "counter.log: {log:?}");
    for (i, line) in ticks.iter().enumerate() {
        assert_eq!(*line, format!("tick {}", i + 1), "counter.log: {log:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_reports_missing_data_disk() -> anyhow::Result<()> {
    // Build (or find) the assets first so the timing below is the guest's alone.
    tokio::task::spawn_blocking(guest_assets).await??;
    let started = Instant::now();
    let err = Guest::boot(GuestOpts {
        extra_append: "weft.data=/dev/vdz".into(),
        ..GuestOpts::default()
    })
    .await
    .err()
    .ok_or_else(|| anyhow::anyhow!("a guest without its data disk must not become ready"))?;
    let elapsed = started.elapsed();
    eprintln!("boot failed after {:.2}s: {err:#}", elapsed.as_secs_f64());
    assert!(
        format!("{err:#}").contains("WEFT-ERROR: data disk /dev/vdz not found"),
        "{err:#}"
    );
    // The guest's error ended the wait, not its timeout.
    assert!(
        matches!(
            err.downcast_ref::<wait_until::Error>(),
            Some(wait_until::Error::Failed { .. })
        ),
        "{err:#}"
    );
    Ok(())
}

/// A namespace with a tap for the guest, made from outside with `ip` (a test may);
/// removed on drop.
struct TapNamespace {
    name: String,
}

impl TapNamespace {
    fn new() -> TapNamespace {
        let name = format!("weft-g{}", std::process::id());
        for args in [
            vec!["netns", "add", &name],
            vec![
                "-n",
                &name,
                "tuntap",
                "add",
                "dev",
                "weft-tap0",
                "mode",
                "tap",
            ],
            vec![
                "-n",
                &name,
                "addr",
                "add",
                "192.168.100.1/24",
                "dev",
                "weft-tap0",
            ],
            vec!["-n", &name, "link", "set", "weft-tap0", "up"],
        ] {
            let ok = std::process::Command::new("ip")
                .args(&args)
                .status()
                .expect("ip runs");
            assert!(ok.success(), "ip {args:?}");
        }
        TapNamespace { name }
    }
}

impl Drop for TapNamespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A boot that times out (here at once, as a stall would after minutes) says what it
/// waited for and shows QEMU's process and threads, its command line, the serial log's
/// size, and the helpers and logs the test listed: enough to tell a hung QEMU or backend
/// from a slow guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_stalled_boot_reports_qemu_its_helpers_and_the_serial_log() -> anyhow::Result<()> {
    tokio::task::spawn_blocking(guest_assets).await??;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("helper.log");
    std::fs::write(&log, "helper: listening\nhelper: last words\n")?;
    // A helper that sleeps, as a backend blocked on its socket would.
    let mut helper = std::process::Command::new("sleep").arg("600").spawn()?;
    let diagnostics = Diagnostics::new();
    diagnostics
        .process("helper", helper.id())
        .log_tail("helper log", &log);
    let result = Guest::boot(GuestOpts {
        ready_timeout: Duration::from_millis(1),
        diagnostics,
        ..GuestOpts::default()
    })
    .await;
    let _ = helper.kill();
    let _ = helper.wait();
    let err = result
        .err()
        .ok_or_else(|| anyhow::anyhow!("no guest is ready within a millisecond"))?;
    assert!(
        matches!(
            err.downcast_ref::<wait_until::Error>(),
            Some(wait_until::Error::TimedOut { .. })
        ),
        "{err:#}"
    );
    let text = format!("{err:#}");
    for needle in [
        "timed out after 1ms waiting for WEFT-READY",
        "---- QEMU: pid ",
        "alive, state ",
        "    thread ",
        "---- QEMU command line: qemu-system-x86_64 ",
        "-kernel ",
        "guest serial log ",
        " bytes",
        &format!("---- helper: pid {} (sleep): alive, state S", helper.id()),
        "helper: last words",
    ] {
        assert!(text.contains(needle), "{needle:?} is not in:\n{text}");
    }
    Ok(())
}

#[tokio::test]
async fn qemu_guest_serves_http_from_its_disk_on_its_network() {
    let ns = TapNamespace::new();
    let guest = Guest::boot(GuestOpts {
        workload: "web".into(),
        extra_append: "weft.net=192.168.100.2/24,192.168.100.1".into(),
        nics: vec![weft_qmp::launch::NicConfig {
            id: "net0".into(),
            tap: "weft-tap0".into(),
            mac: "52:54:00:00:00:02".into(),
        }],
        netns: Some(format!("/run/netns/{}", ns.name).into()),
        ..GuestOpts::default()
    })
    .await
    .expect("guest boots");
    guest
        .serial()
        .wait_for("weft-web: tick 1", Duration::from_secs(30))
        .await
        .unwrap();
    let fetch = |path: &str| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "curl", "-sf", "--max-time", "5"])
            .arg(format!("http://192.168.100.2/{path}"))
            .output()
            .expect("curl runs")
    };
    let page = fetch("now.txt");
    assert!(page.status.success(), "{page:?}");
    assert!(
        String::from_utf8_lossy(&page.stdout).starts_with("tick "),
        "{page:?}"
    );
    let index = fetch("index.html");
    assert_eq!(
        String::from_utf8_lossy(&index.stdout).trim(),
        "weft test guest"
    );
    guest.shutdown().await.unwrap();
}
