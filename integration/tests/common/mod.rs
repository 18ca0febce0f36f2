//! The weftd test rig shared by the end-to-end test files: a private weftd, the `weft`
//! CLI against it, guests booted as environments, snapshots at a known instant.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use weft::model::{Job, JobState, Snapshot};
use weft_client::Client;
use weft_integration::procs as weft_rig_procs;
use weft_integration::{
    bin_path, guest_assets, make_data_disk, wait_until, Diagnostics, LogOnDrop, SerialLog, Weftd,
    WeftdBuilder,
};

pub const MIB: u64 = 1024 * 1024;
pub const BOOT: Duration = Duration::from_secs(90);
pub const JOB: Duration = Duration::from_secs(120);

pub struct Rig {
    pub dir: tempfile::TempDir,
    /// The last weftd started (kept after it was killed: its report names its guests).
    pub weftd: Option<Weftd>,
    pub config: Option<PathBuf>,
    pub dump_logs: bool,
}

impl Rig {
    pub fn new() -> anyhow::Result<Rig> {
        Ok(Rig {
            dir: tempfile::Builder::new().prefix("weft-snap").tempdir()?,
            weftd: None,
            config: None,
            dump_logs: true,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("run/weftd.sock")
    }

    pub fn client(&self) -> Client {
        Client::new(self.socket())
    }

    pub fn weft(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin_path("weft"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("weft runs")
    }

    pub fn weft_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.weft(args);
        ensure!(
            out.status.success(),
            "weft {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub async fn start_weftd(&mut self) -> anyhow::Result<()> {
        self.start_weftd_with(&[]).await
    }

    /// Starts weftd with `vars` in its environment and waits until it answers; a weftd
    /// that exits at start (a bad configuration) fails the test at once.
    pub async fn start_weftd_with(&mut self, vars: &[(&str, String)]) -> anyhow::Result<()> {
        // The test's own config (if any) after the rig's confined directories: images
        // and outputs live in the rig's directory, the guest in the asset cache.
        let own = match &self.config {
            Some(c) => std::fs::read_to_string(c)?,
            None => String::new(),
        };
        let mut builder = WeftdBuilder::new(self.dir.path())
            .config_file(&self.path("weftd.rig.toml"))
            .confined_to(&[self.dir.path()])
            .config(&own)
            // The rig reports and cleans up itself: a restart keeps the guests running.
            .log_on_drop(LogOnDrop::Never)
            .clean_on_drop(false);
        for (k, v) in vars {
            builder = builder.env(k, v);
        }
        // A handle of an earlier run (killed, or exited at a crash point) is replaced.
        self.weftd = None;
        self.weftd = Some(builder.start().await?);
        Ok(())
    }

    /// The running weftd.
    pub fn weftd(&mut self) -> anyhow::Result<&mut Weftd> {
        self.weftd.as_mut().context("weftd was not started")
    }

    pub fn kill_weftd(&mut self) {
        if let Some(w) = &mut self.weftd {
            let _ = w.sigkill();
        }
    }

    /// What to report when a wait on this rig's weftd or guests fails.
    pub fn diagnostics(&self) -> Diagnostics {
        match &self.weftd {
            Some(w) => w.diagnostics(),
            None => Diagnostics::new(),
        }
    }

    /// Creates and boots an environment on `disks` (the first is the guest's data disk)
    /// with the counter workload.
    pub async fn boot(&self, name: &str, disks: &[&Path]) -> anyhow::Result<()> {
        self.boot_with(name, disks, "weft.workload=counter", &[])
            .await
    }

    /// Creates and boots an environment: `append` is added to the kernel command line,
    /// `extra` to `weft env create`.
    pub async fn boot_with(
        &self,
        name: &str,
        disks: &[&Path],
        append: &str,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let assets = tokio::task::spawn_blocking(guest_assets).await??;
        let mut args = vec![
            "env".to_string(),
            "create".into(),
            name.into(),
            "--memory".into(),
            "256M".into(),
        ];
        for d in disks {
            args.push("--disk".into());
            args.push(d.to_str().context("utf-8")?.into());
        }
        let append = format!("console=ttyS0 panic=-1 {append}");
        for (flag, value) in [
            ("--kernel", assets.kernel.to_str().context("utf-8")?),
            ("--initrd", assets.initrd.to_str().context("utf-8")?),
            ("--append", append.as_str()),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.weft_ok(&args)?;
        self.serial(name)
            .wait_for_diagnosed("WEFT-READY", BOOT, &self.diagnostics())
            .await
    }

    pub fn serial(&self, env: &str) -> SerialLog {
        SerialLog::new(self.path(&format!("data/environments/{env}/serial.log")))
    }

    /// Waits until the guest's counter has advanced by `n` ticks past what the serial log shows now.
    pub async fn ticks(&self, env: &str, n: u32) -> anyhow::Result<()> {
        let serial = self.serial(env);
        let last = |text: &str| {
            text.lines()
                .filter_map(|l| {
                    let l = l.trim();
                    l.strip_prefix("weft-counter: tick ")
                        .or_else(|| l.strip_prefix("weft-web: tick "))
                })
                .filter_map(|t| t.trim().parse::<u32>().ok())
                .max()
                .unwrap_or(0)
        };
        let from = last(&serial.contents());
        // The counter echoes every fifth tick on the console.
        let target = from + n.max(5);
        wait_until(
            Duration::from_secs(60),
            "the guest's counter to advance",
            || {
                let text = serial.contents();
                async move { Ok((last(&text) >= target).then_some(())) }
            },
        )
        .await
    }

    /// Pauses the VM, copies `image` as it is now, takes a snapshot of `resource`,
    /// resumes; returns the snapshot and the reference copy.
    pub async fn snapshot_at_instant(
        &self,
        env: &str,
        image: &Path,
        resource: &str,
        label: &str,
    ) -> anyhow::Result<(Snapshot, PathBuf)> {
        self.weft_ok(&["env", "pause", env])?;
        let reference = self.path(&format!("ref-{label}.raw"));
        let out = Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(image)
            .arg(&reference)
            .output()?;
        ensure!(out.status.success(), "qemu-img convert: {out:?}");
        let snapshot = self.snapshot(env, resource).await;
        self.weft_ok(&["env", "resume", env])?;
        Ok((snapshot?, reference))
    }

    pub async fn snapshot(&self, env: &str, resource: &str) -> anyhow::Result<Snapshot> {
        let job: Job = self
            .client()
            .post(
                &format!("/v1/environments/{env}/snapshots"),
                &serde_json::json!({"resource": resource, "category": "test"}),
            )
            .await?;
        let job = self.wait_job(job.id).await?;
        let id = job
            .result
            .as_ref()
            .and_then(|r| r["snapshots"][0].as_i64())
            .context("snapshot id")?;
        Ok(self.client().get(&format!("/v1/snapshots/{id}")).await?)
    }

    pub async fn wait_job(&self, id: i64) -> anyhow::Result<Job> {
        let client = self.client();
        let job: Job = wait_until(JOB, &format!("job {id}"), || {
            let client = client.clone();
            async move {
                let job: Job = client.get(&format!("/v1/jobs/{id}")).await?;
                Ok((job.state != JobState::Running).then_some(job))
            }
        })
        .await?;
        if job.state != JobState::Succeeded {
            bail!("job {id} failed: {:?}", job.error);
        }
        Ok(job)
    }

    /// Restores `snapshot` and compares it with `reference`.
    pub async fn restore_matches(&self, snapshot: i64, reference: &Path) -> anyhow::Result<()> {
        let out = self.path(&format!("restored-{snapshot}.raw"));
        self.weft_ok(&[
            "restore",
            &snapshot.to_string(),
            "--output",
            out.to_str().context("utf-8")?,
        ])?;
        let cmp = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(reference)
            .arg(&out)
            .output()?;
        ensure!(
            cmp.status.success(),
            "restore of snapshot {snapshot} differs from the disk at its instant: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
        Ok(())
    }

    pub fn passed(&mut self) {
        self.dump_logs = false;
    }

    /// The `-m` and `-smp` arguments `env`'s QEMU runs with.
    pub fn qemu_memory_cpus(&self, env: &str) -> anyhow::Result<(String, String)> {
        let out = self.weft_ok(&["--json", "env", "show", env])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let pid = v["pid"].as_u64().context("no QEMU pid")?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .cloned()
                .unwrap_or_default()
        };
        Ok((after("-m"), after("-smp")))
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if self.dump_logs || std::thread::panicking() {
            eprintln!(
                "{}",
                self.diagnostics()
                    .report("weftd and its guests at the end of a failed test")
            );
        }
        self.kill_weftd();
        // Whatever QEMU (or helper) this test started mentions its directory, or works
        // in it (vhost-device-vsock is given paths relative to its own directory).
        weft_rig_procs::kill_processes_in(self.dir.path());
    }
}

/// A 64 MiB ext4 data disk as qcow2 (bitmaps persist in qcow2).
pub fn qcow2_data_disk(rig: &Rig, name: &str) -> anyhow::Result<PathBuf> {
    let raw = rig.path(&format!("{name}.raw"));
    make_data_disk(&raw, 64)?;
    let qcow2 = rig.path(&format!("{name}.qcow2"));
    let out = Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .output()?;
    ensure!(out.status.success(), "{out:?}");
    std::fs::remove_file(raw)?;
    Ok(qcow2)
}

/// GET http://127.0.0.1:<port>/<path> from the host.
pub fn http(port: u16, path: &str) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}/{path}"))
        .output()?;
    ensure!(out.status.success(), "GET :{port}/{path} failed: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
