//! A private weftd: its directories, its config, its log, its life.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use wait_until::Wait;
use weft_client::{Client, ClientError};

use crate::diag::{tail, Diagnostics, TAIL_BYTES};
use crate::paths::{bin_path, confined_dirs_toml, find_bin};
use crate::{procs, wait_until};

/// How long [`Weftd::start`] waits for the API unless told otherwise.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a drop waits after SIGTERM before SIGKILL.
const DROP_GRACE: Duration = Duration::from_secs(5);

/// When a dropped [`Weftd`] prints its failure report (its log's tail, its guests' logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOnDrop {
    /// Only while the thread panics (a failed assertion).
    Panicking,
    /// Also when [`Weftd::passed`] was not called: a test that returned an error with `?`.
    UnlessPassed,
    /// Never: the owner prints [`Weftd::report`] itself (a rig around several weftd runs).
    Never,
}

/// What a [`Weftd`] is started with. Paths default to `<dir>/data`, `<dir>/run`,
/// `<dir>/weftd.toml` and `<dir>/weftd.log`.
#[derive(Debug, Clone)]
pub struct WeftdBuilder {
    dir: PathBuf,
    data_dir: PathBuf,
    run_dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    confined: Option<String>,
    top_level: Vec<String>,
    extra: String,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    start_timeout: Duration,
    log_on_drop: LogOnDrop,
    actor: Option<String>,
    clean_on_drop: bool,
}

impl WeftdBuilder {
    /// A weftd whose files all live in `dir` (which must exist).
    pub fn new(dir: &Path) -> WeftdBuilder {
        WeftdBuilder {
            dir: dir.to_path_buf(),
            data_dir: dir.join("data"),
            run_dir: dir.join("run"),
            config_path: dir.join("weftd.toml"),
            log_path: dir.join("weftd.log"),
            confined: None,
            top_level: Vec::new(),
            extra: String::new(),
            args: Vec::new(),
            envs: Vec::new(),
            start_timeout: START_TIMEOUT,
            log_on_drop: LogOnDrop::UnlessPassed,
            actor: None,
            clean_on_drop: true,
        }
    }

    pub fn data_dir(mut self, path: &Path) -> Self {
        self.data_dir = path.to_path_buf();
        self
    }

    /// Where the config file is written (for a test that keeps its own `weftd.toml`).
    pub fn config_file(mut self, path: &Path) -> Self {
        self.config_path = path.to_path_buf();
        self
    }

    /// Host paths the API takes images from: `dirs` and where the guest assets are built;
    /// outputs go to `dirs` ([`confined_dirs_toml`]).
    pub fn confined_to(mut self, dirs: &[&Path]) -> Self {
        self.confined = Some(confined_dirs_toml(dirs));
        self
    }

    /// Exactly these `image_dirs` and `export_dirs`, nothing added.
    pub fn confined_exactly(mut self, images: &[&Path], exports: &[&Path]) -> Self {
        let list = |ps: &[&Path]| {
            ps.iter()
                .map(|p| serde_json::to_string(&p.to_string_lossy()).unwrap_or_default())
                .collect::<Vec<_>>()
                .join(", ")
        };
        self.confined = Some(format!(
            "image_dirs = [{}]\nexport_dirs = [{}]\n",
            list(images),
            list(exports)
        ));
        self
    }

    /// The weave network slots this weftd hands out (`[net] first_slot`, `last_slot`):
    /// a campaign's, clear of the test suite's.
    pub fn net_slots(mut self, first: u32, last: u32) -> Self {
        self.top_level.push(format!("net.first_slot = {first}"));
        self.top_level.push(format!("net.last_slot = {last}"));
        self
    }

    /// `[dpa] vsock`: `"vhost-user"` or `"kernel"`.
    pub fn dpa_vsock(mut self, mode: &str) -> Self {
        let quoted = serde_json::to_string(mode).unwrap_or_default();
        self.top_level.push(format!("dpa.vsock = {quoted}"));
        self
    }

    /// More TOML, written after what the other knobs set (it may start with top-level keys).
    pub fn config(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self
    }

    /// A command-line argument for weftd (`--qemu-binary`, …).
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// An environment variable for weftd.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// `RUST_LOG` for weftd (else it inherits the caller's).
    pub fn rust_log(self, filter: &str) -> Self {
        self.env("RUST_LOG", filter)
    }

    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    pub fn log_on_drop(mut self, when: LogOnDrop) -> Self {
        self.log_on_drop = when;
        self
    }

    /// The actor [`Weftd::client`] names in its requests.
    pub fn actor(mut self, name: &str) -> Self {
        self.actor = Some(name.into());
        self
    }

    /// Whether a drop kills what is left running in the directory (QEMUs, helpers);
    /// on unless turned off.
    pub fn clean_on_drop(mut self, on: bool) -> Self {
        self.clean_on_drop = on;
        self
    }

    /// The weftd.toml this builder writes.
    pub fn config_text(&self) -> String {
        let mut text = self.confined.clone().unwrap_or_default();
        for line in &self.top_level {
            text += line;
            text.push('\n');
        }
        text + &self.extra
    }

    /// Writes the config; weftd is not started yet. The data and run directories are
    /// left for weftd to make, with the modes it gives them.
    pub fn build(self) -> anyhow::Result<Weftd> {
        std::fs::write(&self.config_path, self.config_text())
            .with_context(|| format!("write {}", self.config_path.display()))?;
        Ok(Weftd {
            spec: self,
            child: None,
            passed: false,
            starts: 0,
        })
    }

    /// [`WeftdBuilder::build`], then [`Weftd::start`].
    pub async fn start(self) -> anyhow::Result<Weftd> {
        let mut weftd = self.build()?;
        weftd.start().await?;
        Ok(weftd)
    }
}

/// A weftd run by a test or a benchmark.
///
/// Dropping it prints its failure report when the test failed (see [`LogOnDrop`]), stops
/// weftd (SIGTERM, then SIGKILL after 5 s) and kills any process left that names its
/// directory or works in it.
#[derive(Debug)]
pub struct Weftd {
    spec: WeftdBuilder,
    child: Option<Child>,
    passed: bool,
    starts: u32,
}

impl Weftd {
    /// Starts weftd (again) and waits until its API answers; returns how long that took.
    /// A weftd that exits meanwhile (a bad configuration) fails at once, with its log.
    pub async fn start(&mut self) -> anyhow::Result<Duration> {
        if self.alive() {
            bail!("weftd already runs (pid {:?})", self.pid());
        }
        let started = Instant::now();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log_path)
            .with_context(|| format!("open {}", self.spec.log_path.display()))?;
        let mut cmd = Command::new(find_bin("weftd")?);
        cmd.arg("--data-dir")
            .arg(&self.spec.data_dir)
            .arg("--run-dir")
            .arg(&self.spec.run_dir)
            .arg("--config")
            .arg(&self.spec.config_path)
            .args(&self.spec.args)
            .envs(self.spec.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(cmd.spawn().context("cannot start weftd")?);
        self.starts += 1;
        let client = self.client();
        let log_path = self.spec.log_path.clone();
        let child = self.child.as_mut().context("weftd")?;
        wait_until(
            self.spec.start_timeout,
            "weftd to answer on its socket",
            || {
                let client = client.clone();
                let exited = child.try_wait().map(|s| s.map(|s| s.to_string()));
                let log_path = log_path.clone();
                async move {
                    if let Some(status) = exited? {
                        bail!(
                            "weftd exited at start ({status}); its log:\n{}",
                            tail(&log_path, TAIL_BYTES).trim_end()
                        );
                    }
                    match client.get::<weft_api::env::Status>("/v1/status").await {
                        Ok(_) => Ok(Some(())),
                        Err(ClientError::Unreachable { .. }) => Ok(None),
                        // Up but refusing (a role, a config): not for the rig to judge.
                        Err(_) => Ok(Some(())),
                    }
                }
            },
        )
        .await?;
        Ok(started.elapsed())
    }

    /// The directory given to [`WeftdBuilder::new`].
    pub fn dir(&self) -> &Path {
        &self.spec.dir
    }

    pub fn data_dir(&self) -> &Path {
        &self.spec.data_dir
    }

    pub fn run_dir(&self) -> &Path {
        &self.spec.run_dir
    }

    pub fn config_path(&self) -> &Path {
        &self.spec.config_path
    }

    pub fn log_path(&self) -> &Path {
        &self.spec.log_path
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.spec.run_dir.join("weftd.sock")
    }

    /// An API client on the socket (naming the builder's actor, if any).
    pub fn client(&self) -> Client {
        let client = Client::new(self.socket());
        match &self.spec.actor {
            Some(actor) => client.with_actor(Some(actor.clone())),
            None => client,
        }
    }

    /// How many times weftd was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// weftd's pid while it was started and not stopped through this handle.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether weftd runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL to weftd alone (QEMU and helpers run in process groups of their own),
    /// and waits for it.
    pub fn sigkill(&mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("weftd is not running")?;
        let _ = child.kill();
        Ok(child.wait()?)
    }

    /// Waits until weftd exits by itself (a crash point, a fatal error) and returns how.
    pub async fn wait_exited(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("weftd is not running")?;
        let waited = wait_until(timeout, "weftd to exit", || {
            let status = child.try_wait();
            async move { Ok(status?) }
        })
        .await;
        if waited.is_err() {
            // Still ours to stop.
            self.child = Some(child);
        }
        waited
    }

    /// SIGTERM to weftd, and waits until it exits.
    pub fn sigterm(&mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("weftd is not running")?;
        signal(&child, nix::sys::signal::Signal::SIGTERM)?;
        Ok(child.wait()?)
    }

    /// SIGTERM, then SIGKILL if weftd has not exited after `grace`; `None` if it was
    /// not running.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = signal(&child, nix::sys::signal::Signal::SIGTERM);
        let exited =
            Wait::new("weftd to exit after SIGTERM", grace).until(|| match child.try_wait() {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("it runs".to_string()),
                Err(e) => Err(e.to_string()),
            });
        match exited {
            Ok(status) => Some(status),
            Err(_) => {
                let _ = child.kill();
                child.wait().ok()
            }
        }
    }

    /// Runs the `weft` CLI against this weftd.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin_path("weft"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("weft runs")
    }

    /// The test reached its end: no report on drop.
    pub fn passed(&mut self) {
        self.passed = true;
    }

    /// What to look at when a wait on this weftd or its guests fails: weftd and its log,
    /// and for each environment and weave its QEMU (state and threads), QEMU's output and
    /// the serial log's size and tail.
    pub fn diagnostics(&self) -> Diagnostics {
        let diag = Diagnostics::new();
        if let Some(pid) = self.pid() {
            diag.process("weftd", pid);
        }
        diag.log_tail("weftd log", &self.spec.log_path);
        for kind in ["environments", "weaves"] {
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(self.spec.data_dir.join(kind))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            dirs.sort();
            for dir in dirs {
                let name = dir.file_name().unwrap_or_default().to_string_lossy();
                let label = format!("{kind}/{name}");
                if let Some(pid) = std::fs::read_to_string(dir.join("qemu.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                {
                    diag.process(&format!("{label} QEMU"), pid).command_line(
                        &format!("{label} QEMU"),
                        pid,
                        "(gone)",
                    );
                }
                diag.log_tail(&format!("{label} QEMU output"), &dir.join("qemu.log"))
                    .file_size(&format!("{label} serial log"), &dir.join("serial.log"))
                    .log_tail(&format!("{label} serial log"), &dir.join("serial.log"));
            }
        }
        diag
    }

    /// [`Weftd::diagnostics`] as they are now, under `headline`.
    pub fn report(&self, headline: &str) -> String {
        self.diagnostics().report(headline)
    }
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    nix::sys::signal::kill(pid, sig).with_context(|| format!("{sig} to weftd"))?;
    Ok(())
}

impl Drop for Weftd {
    fn drop(&mut self) {
        let failed = match self.spec.log_on_drop {
            LogOnDrop::Panicking => std::thread::panicking(),
            LogOnDrop::UnlessPassed => std::thread::panicking() || !self.passed,
            LogOnDrop::Never => false,
        };
        if failed {
            eprintln!(
                "{}",
                self.report(&format!(
                    "weftd in {} at the end of a failed test",
                    self.spec.dir.display()
                ))
            );
        }
        self.stop(DROP_GRACE);
        if self.spec.clean_on_drop {
            for pid in procs::kill_processes_in(&self.spec.dir) {
                eprintln!(
                    "weft-rig: killed process {pid} left in {}",
                    self.spec.dir.display()
                );
            }
        }
    }
}
