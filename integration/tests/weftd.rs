//! End-to-end tests of weftd and the weft CLI against real QEMU guests.
//!
//! Each test runs its own weftd on a private data and run directory, drives it
//! through the API (the `weft` library's client) and the `weft` binary, and
//! checks the host from outside: processes in /proc, sockets and files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use weft::api::EnvironmentView;
use weft::model::{AuditEntry, CreateEnvironment, DiskRequest, EnvState};
use weft_client::{Client, ClientError};
use weft_integration::{
    bin_path, guest_assets, make_data_disk, procs, wait_until, LogOnDrop, SerialLog, WeftdBuilder,
};

const BOOT: Duration = Duration::from_secs(90);
const SHORT: Duration = Duration::from_secs(20);

/// A weftd of one test, with everything under one temporary directory.
struct Weftd {
    /// The rig prints weftd's and QEMU's logs when it drops before [`Weftd::passed`]
    /// (a panic or an error returned with `?`).
    rig: weft_rig::Weftd,
    // Last: removed once weftd and its guests are gone.
    dir: tempfile::TempDir,
}

impl Weftd {
    async fn start(extra: &[&str]) -> anyhow::Result<Weftd> {
        let dir = tempfile::Builder::new().prefix("weft-e2e").tempdir()?;
        // Images and outputs live in the test's directory (weftd confines them).
        let mut builder = WeftdBuilder::new(dir.path())
            .confined_to(&[dir.path()])
            .rust_log("weft=debug,info")
            .actor("e2e")
            .start_timeout(SHORT)
            .log_on_drop(LogOnDrop::UnlessPassed);
        for arg in extra {
            builder = builder.arg(arg);
        }
        let rig = builder.start().await?;
        Ok(Weftd { rig, dir })
    }

    fn data(&self) -> PathBuf {
        self.rig.data_dir().to_path_buf()
    }

    fn run(&self) -> PathBuf {
        self.rig.run_dir().to_path_buf()
    }

    fn socket(&self) -> PathBuf {
        self.rig.socket()
    }

    fn client(&self) -> Client {
        self.rig.client()
    }

    /// Starts weftd again and waits until its API answers.
    async fn restart(&mut self) -> anyhow::Result<()> {
        self.rig.start().await.map(drop)
    }

    /// The test reached its end: no logs on drop.
    fn passed(&mut self) {
        self.rig.passed();
    }

    fn sigkill(&mut self) {
        let _ = self.rig.sigkill();
    }

    fn sigterm(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.rig.sigterm()
    }

    /// Runs the `weft` CLI against this weftd.
    fn cli(&self, args: &[&str]) -> Output {
        self.rig.cli(args)
    }

    async fn env(&self, name: &str) -> Result<EnvironmentView, ClientError> {
        self.client().get(&format!("/v1/environments/{name}")).await
    }

    async fn env_names(&self) -> Vec<String> {
        let list: Vec<EnvironmentView> = self.client().get("/v1/environments").await.unwrap();
        list.into_iter().map(|v| v.env.name).collect()
    }

    /// Creates a managed environment booting the test guest, and waits for WEFT-READY.
    async fn create_guest(&self, name: &str) -> anyhow::Result<EnvironmentView> {
        let assets = tokio::task::spawn_blocking(guest_assets).await??;
        let disk = self.dir.path().join(format!("{name}.img"));
        make_data_disk(&disk, 64)?;
        let req = CreateEnvironment::Managed {
            name: name.into(),
            disks: vec![DiskRequest {
                path: disk,
                name: Some("vda".into()),
                format: None,
                read_only: false,
                backing: None,
            }],
            memory_mib: Some(256),
            cpus: Some(1),
            kernel: Some(assets.kernel),
            initrd: Some(assets.initrd),
            append: Some("console=ttyS0 panic=-1 weft.workload=counter".into()),
            accel: None,
            nics: Vec::new(),
            no_start: false,
        };
        let env: EnvironmentView = self.client().post("/v1/environments", &req).await?;
        let serial = env
            .env
            .files
            .as_ref()
            .context("managed environments report their files")?
            .serial_log
            .clone();
        SerialLog::new(serial).wait_for("WEFT-READY", BOOT).await?;
        Ok(env)
    }

    /// PIDs of processes whose command line mentions this test's directory.
    fn stray_processes(&self) -> Vec<u32> {
        procs::processes_naming(self.dir.path())
            .into_iter()
            .filter(|pid| Some(*pid) != self.rig.pid())
            .collect()
    }
}

fn alive(pid: u32) -> bool {
    procs::alive(pid)
}

fn kill(pid: u32) {
    procs::kill(pid)
}

fn stderr_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// The CLI failed with exactly one line on stderr that contains `needle`.
fn assert_one_line_failure(out: &Output, code: i32, needle: &str) {
    let err = stderr_line(out);
    assert_eq!(out.status.code(), Some(code), "exit code; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line on stderr, got: {err}");
    assert!(err.starts_with("weft: "), "{err}");
    assert!(err.contains(needle), "{err:?} should mention {needle:?}");
}

async fn wait_runstate(w: &Weftd, name: &str, want: &str) -> anyhow::Result<EnvironmentView> {
    wait_until(
        SHORT,
        &format!("{name} to report QEMU runstate {want}"),
        || async {
            let v = w.env(name).await?;
            Ok((v.runstate.as_deref() == Some(want)).then_some(v))
        },
    )
    .await
}

#[tokio::test]
async fn qemu_env_lifecycle_through_the_api_leaves_nothing_behind() -> anyhow::Result<()> {
    let mut w = Weftd::start(&[]).await?;
    let created = w.create_guest("life").await?;
    assert_eq!(created.env.state, EnvState::Running);
    let pid = created
        .env
        .pid
        .context("a running managed environment has a pid")?;
    assert!(alive(pid));
    // runstate comes from QMP query-status, asked by weftd.
    let shown = wait_runstate(&w, "life", "running").await?;
    let socket = shown.env.qmp_socket.clone();
    assert!(
        socket.exists(),
        "QMP socket {} exists while running",
        socket.display()
    );

    let list = w.cli(&["env", "list"]);
    assert!(list.status.success());
    let table = String::from_utf8_lossy(&list.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("life ") && l.contains("running")),
        "{table}"
    );

    let stopped: EnvironmentView = w
        .client()
        .post("/v1/environments/life/stop", &serde_json::json!({}))
        .await?;
    assert_eq!(stopped.env.state, EnvState::Stopped);
    assert!(!alive(pid), "QEMU {pid} is gone after stop");

    w.client().delete("/v1/environments/life").await?;
    match w.env("life").await {
        Err(ClientError::Api { status, .. }) => assert_eq!(status.as_u16(), 404),
        other => bail!("deleted environment still answers: {other:?}"),
    }
    assert!(!socket.exists(), "no QMP socket left");
    assert!(
        !w.data().join("environments/life").exists(),
        "no files left"
    );
    assert!(
        w.stray_processes().is_empty(),
        "no QEMU left: {:?}",
        w.stray_processes()
    );

    let audit: Vec<AuditEntry> = w.client().get("/v1/audit?limit=10").await?;
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .map(|a| (a.action.as_str(), a.result.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("env.create", "ok"),
            ("env.stop", "ok"),
            ("env.delete", "ok")
        ]
    );
    assert!(
        audit.iter().all(|a| a.actor.starts_with("e2e")),
        "{audit:?}"
    );
    w.passed();
    Ok(())
}

#[tokio::test]
async fn qemu_env_survives_weftd_sigkill_and_is_reattached() -> anyhow::Result<()> {
    let mut w = Weftd::start(&[]).await?;
    let env = w.create_guest("keep").await?;
    let pid = env.env.pid.context("pid")?;

    w.sigkill();
    assert!(alive(pid), "QEMU outlives a SIGKILLed weftd");
    w.restart().await?;
    let shown = wait_runstate(&w, "keep", "running").await?;
    assert_eq!(shown.env.state, EnvState::Running);
    assert_eq!(shown.env.pid, Some(pid), "the same QEMU, re-attached");

    let out = w.cli(&["env", "stop", "keep"]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    wait_until(SHORT, "QEMU to exit", || async {
        Ok((!alive(pid)).then_some(()))
    })
    .await?;
    assert_eq!(w.env("keep").await?.env.state, EnvState::Stopped);
    w.passed();
    Ok(())
}

#[tokio::test]
async fn qemu_sigterm_keeps_guests_and_dead_ones_are_marked_stopped() -> anyhow::Result<()> {
    let mut w = Weftd::start(&[]).await?;
    let env = w.create_guest("term").await?;
    let pid = env.env.pid.context("pid")?;

    let status = w.sigterm()?;
    assert!(status.success(), "weftd exits 0 on SIGTERM: {status}");
    assert!(
        !w.socket().exists(),
        "the API socket is removed on shutdown"
    );
    assert!(alive(pid), "guests keep running when weftd stops");

    // QEMU dies while weftd is down: on start it is marked stopped, not re-attached.
    kill(pid);
    wait_until(SHORT, "QEMU to die", || async {
        Ok((!alive(pid)).then_some(()))
    })
    .await?;
    w.restart().await?;
    let shown = w.env("term").await?;
    assert_eq!(shown.env.state, EnvState::Stopped);
    assert!(
        shown
            .env
            .last_exit
            .as_deref()
            .unwrap_or("")
            .contains("not running"),
        "{:?}",
        shown.env.last_exit
    );
    // And it can be started again from its stored configuration.
    let out = w.cli(&["env", "start", "term"]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    wait_runstate(&w, "term", "running").await?;
    w.passed();
    Ok(())
}

#[tokio::test]
async fn qemu_attach_drives_a_qemu_started_outside_weft() -> anyhow::Result<()> {
    let mut w = Weftd::start(&[]).await?;
    let qmp = w.dir.path().join("outside.qmp");
    let mut outside = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-display",
            "none",
            "-nodefaults",
            "-m",
            "64",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_until(SHORT, "the outside QEMU's QMP socket", || async {
        Ok(qmp.exists().then_some(()))
    })
    .await?;

    let out = w.cli(&[
        "env",
        "attach",
        "outside",
        "--qmp",
        qmp.to_str().context("utf-8")?,
    ]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    let shown = wait_runstate(&w, "outside", "running").await?;
    assert_eq!(shown.env.kind, weft::model::EnvKind::Attached);

    let json = w.cli(&["--json", "env", "show", "outside"]).stdout;
    let v: serde_json::Value = serde_json::from_slice(&json)?;
    assert_eq!(v["kind"], "attached");
    assert_eq!(v["runstate"], "running");

    // Deleting an attached environment forgets it; the VM belongs to its owner.
    let out = w.cli(&["env", "delete", "outside"]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    assert!(outside.try_wait()?.is_none(), "the outside QEMU still runs");
    // weftd let go of the socket: the owner can connect again.
    let again = weft_qmp::Qmp::connect_timeout(&qmp, SHORT).await?;
    again.execute_raw("quit", None).await.ok();
    outside.wait()?;
    w.passed();
    Ok(())
}

#[tokio::test]
async fn qemu_bad_input_is_refused_in_one_line_and_leaves_nothing() -> anyhow::Result<()> {
    let mut w = Weftd::start(&[]).await?;
    let disk = w.dir.path().join("d.img");
    make_data_disk(&disk, 16)?;
    let disk_arg = disk.to_str().context("utf-8")?.to_string();
    let before = w.env_names().await;
    let rows_before: Vec<AuditEntry> = w.client().get("/v1/audit?limit=1000").await?;

    // Unknown environment.
    assert_one_line_failure(
        &w.cli(&["env", "show", "ghost"]),
        1,
        "no environment named \"ghost\"",
    );
    assert_one_line_failure(&w.cli(&["env", "stop", "ghost"]), 1, "no environment named");
    // Missing disk file.
    let missing = w.dir.path().join("missing.img");
    assert_one_line_failure(
        &w.cli(&[
            "env",
            "create",
            "m",
            "--disk",
            missing.to_str().context("utf-8")?,
        ]),
        1,
        "missing.img",
    );
    // A raw file declared qcow2: weftd reads the header itself, QEMU never sees it.
    let spec = format!("{disk_arg},format=qcow2");
    let out = w.cli(&["env", "create", "dies", "--disk", &spec, "--memory", "64M"]);
    assert_one_line_failure(&out, 1, "has no qcow2 header");
    // QEMU dying at start: more guest memory than the host can set up.
    let out = w.cli(&[
        "env", "create", "dies", "--disk", &disk_arg, "--memory", "4T",
    ]);
    assert_one_line_failure(&out, 1, "cannot start QEMU");
    // A socket that is not QMP.
    let not_qmp = w.dir.path().join("not-qmp.sock");
    let listener = std::os::unix::net::UnixListener::bind(&not_qmp)?;
    let talker = std::thread::spawn(move || {
        use std::io::Write;
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(b"220 hello, I am an SMTP server\r\n");
        }
    });
    assert_one_line_failure(
        &w.cli(&[
            "env",
            "attach",
            "nq",
            "--qmp",
            not_qmp.to_str().context("utf-8")?,
        ]),
        1,
        "does not answer as a QMP socket",
    );
    let _ = talker.join();
    // A bad flag and a bad name never reach weftd.
    assert_one_line_failure(
        &w.cli(&["env", "create", "x", "--memory", "lots"]),
        2,
        "--memory",
    );
    assert_one_line_failure(&w.cli(&["env", "frobnicate"]), 2, "frobnicate");
    assert_one_line_failure(
        &w.cli(&["env", "show", "Bad/Name"]),
        2,
        "invalid environment name",
    );
    // KVM asked for where it does not work (these machines: see `weft status`).
    if let Err(reason) = weft_qmp::launch::kvm_probe() {
        let out = w.cli(&["env", "create", "k", "--disk", &disk_arg, "--accel", "kvm"]);
        assert_one_line_failure(&out, 1, "KVM is not usable");
        assert!(stderr_line(&out).contains(&reason), "{}", stderr_line(&out));
    }
    // Duplicate name.
    let out = w.cli(&[
        "env", "create", "dup", "--disk", &disk_arg, "--memory", "64M",
    ]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    assert_one_line_failure(
        &w.cli(&["env", "create", "dup", "--disk", &disk_arg]),
        1,
        "already exists",
    );
    let out = w.cli(&["env", "delete", "dup"]);
    assert!(out.status.success(), "{}", stderr_line(&out));

    // The catalog is unchanged, nothing half-created: no row, process, socket or file.
    assert_eq!(w.env_names().await, before);
    assert!(
        w.stray_processes().is_empty(),
        "stray: {:?}",
        w.stray_processes()
    );
    let qmp_dir = w.run().join("qmp");
    let sockets: Vec<_> = std::fs::read_dir(&qmp_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(sockets.is_empty(), "sockets left: {sockets:?}");
    let env_dirs: Vec<_> = std::fs::read_dir(w.data().join("environments"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(env_dirs.is_empty(), "files left: {env_dirs:?}");
    // Every refused change is in the audit log with its reason.
    let rows: Vec<AuditEntry> = w.client().get("/v1/audit?limit=1000").await?;
    let new: Vec<_> = rows[rows_before.len()..]
        .iter()
        .map(|a| {
            (
                a.action.as_str(),
                a.target.as_deref().unwrap_or(""),
                a.result.starts_with("error"),
            )
        })
        .collect();
    assert!(new.contains(&("env.create", "dies", true)), "{new:?}");
    assert!(new.contains(&("env.create", "nq", true)), "{new:?}");
    w.passed();
    Ok(())
}

#[tokio::test]
async fn qemu_missing_binary_is_a_clear_error() -> anyhow::Result<()> {
    let mut w = Weftd::start(&["--qemu-binary", "/nonexistent/qemu-system-x86_64"]).await?;
    let disk = w.dir.path().join("d.img");
    make_data_disk(&disk, 16)?;
    let out = w.cli(&[
        "env",
        "create",
        "noq",
        "--disk",
        disk.to_str().context("utf-8")?,
    ]);
    assert_one_line_failure(&out, 1, "/nonexistent/qemu-system-x86_64");
    assert!(w.env_names().await.is_empty());
    w.passed();
    Ok(())
}

#[tokio::test]
async fn daemon_not_running_and_malformed_config_are_one_line_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = Command::new(bin_path("weft"))
        .arg("--socket")
        .arg(dir.path().join("nobody.sock"))
        .args(["env", "list"])
        .output()?;
    assert_one_line_failure(&out, 3, "cannot reach weftd");

    let config = dir.path().join("weftd.toml");
    std::fs::write(&config, "data_dir = [\n")?;
    let out = Command::new(bin_path("weftd"))
        .arg("--config")
        .arg(&config)
        .output()?;
    let err = stderr_line(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("malformed config file") && err.contains("weftd.toml"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn weftd_notifies_systemd_ready_and_stopping() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let notify_path = dir.path().join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&notify_path)?;
    let mut child = Command::new(bin_path("weftd"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(SHORT, notify.recv(&mut buf)).await??;
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // READY means the API answers.
    let status: serde_json::Value = Client::new(dir.path().join("run/weftd.sock"))
        .get("/v1/status")
        .await?;
    assert_eq!(status["environments"], 0);

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let n = tokio::time::timeout(SHORT, notify.recv(&mut buf)).await??;
    let stopping = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(child.wait()?.success());
    Ok(())
}

/// A wrapper around QEMU that runs `prelude` first and adds `extra` arguments.
fn slow_qemu(dir: &Path, prelude: &str, extra: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("slow-qemu");
    std::fs::write(
        &path,
        format!("#!/bin/sh\n{prelude}\nexec qemu-system-x86_64 \"$@\" {extra}\n"),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

#[tokio::test]
async fn qemu_a_client_hanging_up_does_not_cut_a_create_in_half() -> anyhow::Result<()> {
    let wrappers = tempfile::tempdir()?;
    // Two seconds before QEMU even starts.
    let slow = slow_qemu(wrappers.path(), "sleep 2", "")?;
    let mut w = Weftd::start(&["--qemu-binary", slow.to_str().context("utf-8")?]).await?;
    let disk = w.dir.path().join("d.img");
    make_data_disk(&disk, 16)?;
    let mut cli = Command::new(bin_path("weft"))
        .arg("--socket")
        .arg(w.socket())
        .args(["env", "create", "slow", "--memory", "64M", "--disk"])
        .arg(&disk)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // Hang up while QEMU is still starting.
    wait_until(SHORT, "the create to be recorded", || async {
        Ok(w.env("slow").await.is_ok().then_some(()))
    })
    .await?;
    cli.kill()?;
    cli.wait()?;
    // The create finishes anyway, and is recorded.
    let env = wait_until(SHORT, "the create to finish", || async {
        let v = w.env("slow").await?;
        Ok((v.env.state == EnvState::Running).then_some(v))
    })
    .await?;
    assert!(alive(env.env.pid.context("pid")?));
    let audit: Vec<AuditEntry> = w.client().get("/v1/audit").await?;
    assert!(
        audit.iter().any(|a| a.action == "env.create"
            && a.target.as_deref() == Some("slow")
            && a.result == "ok"),
        "{audit:?}"
    );
    let out = w.cli(&["env", "delete", "slow"]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    assert!(w.stray_processes().is_empty(), "{:?}", w.stray_processes());
    w.passed();
    Ok(())
}

#[tokio::test]
async fn qemu_weftd_killed_during_a_launch_leaves_no_orphan() -> anyhow::Result<()> {
    let wrappers = tempfile::tempdir()?;
    // QEMU writes its pid file first, then preallocates a 2 GiB memory backend
    // (about half a second here) before its QMP monitor answers: weftd is killed
    // in that window, after QEMU started but before weftd saw it ready. (An extra
    // backend, not `-m 2G`: guest memory may be a memfd of the configured size, for
    // the vhost-user vsock device.)
    let slow = slow_qemu(
        wrappers.path(),
        "",
        "-object memory-backend-ram,id=slow,size=2G,prealloc=on",
    )?;
    let mut w = Weftd::start(&["--qemu-binary", slow.to_str().context("utf-8")?]).await?;
    let disk = w.dir.path().join("d.img");
    make_data_disk(&disk, 16)?;
    let _cli = Command::new(bin_path("weft"))
        .arg("--socket")
        .arg(w.socket())
        .args(["env", "create", "half", "--memory", "64M", "--disk"])
        .arg(&disk)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid_file = w.data().join("environments/half/qemu.pid");
    let pid: u32 = wait_until(SHORT, "QEMU to write its pid file", || async {
        Ok(std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok()))
    })
    .await?;
    w.sigkill();
    // The starting QEMU outlived weftd (it is in its own process group) ...
    assert!(alive(pid), "QEMU {pid} survives weftd's SIGKILL");
    w.restart().await?;
    // ... and recovery ends it: nobody was told the create succeeded.
    wait_until(SHORT, "the orphan QEMU to be killed", || async {
        Ok((!alive(pid)).then_some(()))
    })
    .await?;
    let env = w.env("half").await?;
    assert_eq!(env.env.state, EnvState::Stopped);
    assert!(
        env.env
            .last_exit
            .as_deref()
            .unwrap_or("")
            .contains("was killed"),
        "{:?}",
        env.env.last_exit
    );
    // And it can start cleanly from its stored configuration.
    let out = w.cli(&["env", "start", "half"]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    let out = w.cli(&["env", "delete", "half"]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    assert!(w.stray_processes().is_empty(), "{:?}", w.stray_processes());
    w.passed();
    Ok(())
}

#[tokio::test]
async fn weftd_audit_verify_finds_an_edited_or_deleted_entry() -> anyhow::Result<()> {
    let mut w = Weftd::start(&[]).await?;
    // Refused requests are audited too: three entries without a guest.
    for name in ["nosuch1", "nosuch2", "nosuch3"] {
        let out = w.cli(&["env", "stop", name]);
        assert!(!out.status.success());
    }
    let log: Vec<AuditEntry> = w.client().get("/v1/audit?limit=100").await?;
    assert!(log.len() >= 3, "{log:?}");
    assert!(log
        .iter()
        .all(|e| e.hash.as_ref().is_some_and(|h| h.len() == 64)));
    let out = w.cli(&["audit", "verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", stderr_line(&out));
    assert!(
        stdout.contains(&format!("audit log ok: {} entries", log.len())),
        "{stdout}"
    );

    // Someone with write access to the catalog edits an entry.
    w.sigterm()?;
    let edited = log[1].id;
    {
        let db = rusqlite::Connection::open(w.data().join("catalog.db"))?;
        db.execute_batch("DROP TRIGGER audit_is_append_only_update")?;
        db.execute("UPDATE audit SET actor = 'nobody' WHERE id = ?1", [edited])?;
    }
    w.restart().await?;
    let out = w.cli(&["audit", "verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("entry {edited} was changed after it was written")),
        "{stdout}"
    );
    assert!(
        stderr_line(&out).contains("does not verify"),
        "{}",
        stderr_line(&out)
    );

    // ... or deletes the newest one (and its chain row): the head outside the
    // database still names it.
    w.sigterm()?;
    let last = log.last().map(|e| e.id).context("no entries")?;
    {
        let db = rusqlite::Connection::open(w.data().join("catalog.db"))?;
        db.execute_batch(
            "PRAGMA foreign_keys = OFF;
             DROP TRIGGER audit_is_append_only_delete;
             DROP TRIGGER audit_chain_is_append_only_delete;",
        )?;
        db.execute("DELETE FROM audit WHERE id >= ?1", [last])?;
        db.execute("DELETE FROM audit_chain WHERE id >= ?1", [last])?;
    }
    w.restart().await?;
    let v: weft::audit::AuditVerify = w.client().get("/v1/audit/verify").await?;
    assert!(!v.ok);
    assert!(
        v.problems
            .iter()
            .any(|p| p.contains("entries at the end were deleted")),
        "{v:?}"
    );
    w.passed();
    Ok(())
}
