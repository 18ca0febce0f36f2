//! A test guest under QEMU (TCG), started through `weft_qmp::launch`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use tempfile::TempDir;
use weft_qmp::launch::{Accel, DiskConfig, DiskFormat, LaunchPaths, NicConfig, VmConfig};
use weft_qmp::process::{ExitInfo, QemuProcess, SpawnOptions};
use weft_qmp::Qmp;

use crate::assets::guest_assets;
use crate::disk::make_data_disk;
use crate::serial::{failure_line, SerialLog};
use weft_rig::wait_until;
use weft_rig::Diagnostics;

/// The `name` of the guest's data disk in [`VmConfig::disks`]: the device id; its block
/// nodes are `data-file` (protocol) and `data-fmt` (format, what the device is attached to).
pub const DATA_DISK_NAME: &str = "data";
/// Size of the data disk [`Guest::boot`] creates when none is given.
const DEFAULT_DATA_DISK_MIB: u64 = 64;
/// How much of QEMU's output and of the serial log a failure report shows.
const REPORT_TAIL_BYTES: usize = 16 * 1024;
/// How long [`Guest::shutdown`] waits for QEMU to exit after `quit`.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// How to boot a [`Guest`]. `GuestOpts::default()` boots the `counter` workload on a fresh disk.
#[derive(Debug, Clone)]
pub struct GuestOpts {
    /// Guest RAM (default 256 MiB).
    pub memory_mib: u64,
    /// vCPUs (default 1; TCG runs them on host threads).
    pub cpus: u32,
    /// `weft.workload=` for the guest's init: `counter` (default) or `idle`.
    pub workload: String,
    /// The data disk (the guest's `/dev/vda`, mounted at `/data`); `None` makes a fresh
    /// 64 MiB raw ext4 image in the guest's temporary directory.
    pub data_disk: Option<PathBuf>,
    /// Format of `data_disk` (default raw; a created disk is always raw).
    pub data_disk_format: DiskFormat,
    /// More disks after the data disk (`/dev/vdb`, …).
    pub extra_disks: Vec<DiskConfig>,
    /// Disks served by a vhost-user-blk backend, after the others (memory is then shared).
    pub vhost_user_disks: Vec<weft_qmp::launch::VhostUserDisk>,
    /// Guest RAM in a shared memfd (needed by vhost-user devices).
    pub shared_memory: bool,
    /// Appended to the kernel command line after the defaults
    /// (`console=ttyS0 panic=-1 quiet weft.workload=…`), so it can override them:
    /// `weft.data=/dev/vdb`, `loglevel=7` for kernel messages on the console.
    pub extra_append: String,
    /// How long to wait for `WEFT-READY` (default 60 s).
    pub ready_timeout: Duration,
    /// Network cards (on tap devices in `netns`); use `weft.net=` in `extra_append` to
    /// give the guest its address.
    pub nics: Vec<NicConfig>,
    /// Run QEMU in this network namespace (`/run/netns/<name>`).
    pub netns: Option<PathBuf>,
    /// What else a failed boot or wait reports, besides QEMU, its vhost-user sockets and
    /// their backends, and the serial log: a test's helper processes and their logs.
    pub diagnostics: Diagnostics,
}

impl Default for GuestOpts {
    fn default() -> Self {
        Self {
            memory_mib: 256,
            cpus: 1,
            workload: "counter".into(),
            data_disk: None,
            data_disk_format: DiskFormat::Raw,
            extra_disks: Vec::new(),
            vhost_user_disks: Vec::new(),
            shared_memory: false,
            extra_append: String::new(),
            ready_timeout: Duration::from_secs(60),
            nics: Vec::new(),
            netns: None,
            diagnostics: Diagnostics::new(),
        }
    }
}

/// A booted test guest: QEMU, its QMP connection, its serial log and its temporary directory
/// (QMP socket, logs, the default data disk).
///
/// Dropping a `Guest` kills QEMU. If the thread is panicking (a failed assertion), the drop
/// first prints QEMU's output and the serial log to stderr.
pub struct Guest {
    process: Option<QemuProcess>,
    serial: SerialLog,
    data_disk: PathBuf,
    output_log: PathBuf,
    boot_time: Duration,
    /// QEMU's process and command line, the vhost-user sockets and their backends, the
    /// serial log's size and the test's own list.
    diag: Diagnostics,
    // Last: removed after QEMU is gone. `None` only once `shutdown_keep_dir` took it.
    dir: Option<TempDir>,
}

impl Guest {
    /// Builds (or finds) the guest assets, starts QEMU and waits for the guest's `WEFT-READY`.
    ///
    /// Fails at once if the guest reports `WEFT-ERROR`, the kernel panics or QEMU exits;
    /// a failure prints QEMU's output and the serial log to stderr.
    pub async fn boot(opts: GuestOpts) -> anyhow::Result<Guest> {
        let assets = tokio::task::spawn_blocking(guest_assets)
            .await
            .context("guest asset builder panicked")??;
        let dir = tempfile::Builder::new()
            .prefix("weft-guest-")
            .tempdir()
            .context("cannot create the guest's temporary directory")?;
        let (data_disk, data_disk_format) = match opts.data_disk {
            Some(path) => (path, opts.data_disk_format),
            None => {
                let path = dir.path().join("data.img");
                make_data_disk(&path, DEFAULT_DATA_DISK_MIB)?;
                (path, DiskFormat::Raw)
            }
        };
        let mut disks = vec![DiskConfig {
            name: DATA_DISK_NAME.into(),
            path: data_disk.clone(),
            format: data_disk_format,
            read_only: false,
            backing: Vec::new(),
        }];
        disks.extend(opts.extra_disks);
        let mut append = format!(
            "console=ttyS0 panic=-1 quiet weft.workload={}",
            opts.workload
        );
        if !opts.extra_append.is_empty() {
            append.push(' ');
            append.push_str(&opts.extra_append);
        }
        let config = VmConfig {
            machine: "q35".into(),
            accel: Accel::Tcg,
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            shared_memory: opts.shared_memory,
            kernel: Some(assets.kernel.clone()),
            initrd: Some(assets.initrd.clone()),
            append: Some(append),
            disks,
            nics: opts.nics.clone(),
            // As before balloons existed: these guests run outside weftd.
            balloon: false,
            vsock: None,
            vhost_user_disks: opts.vhost_user_disks.clone(),
        };
        let paths = LaunchPaths {
            qmp_socket: dir.path().join("qmp.sock"),
            serial_log: dir.path().join("serial.log"),
            output_log: dir.path().join("qemu.log"),
            pid_file: None,
        };
        let spawn_opts = SpawnOptions {
            binary: qemu_binary(),
            ready_timeout: Duration::from_secs(30),
            netns: opts.netns.clone(),
            // Under QEMU's seccomp filter, as weftd runs its guests.
            sandbox: true,
            ..SpawnOptions::default()
        };
        let serial = SerialLog::new(paths.serial_log.clone());
        let command = format!(
            "{} {}",
            spawn_opts.binary.display(),
            weft_qmp::launch::command_line(&config, &paths).join(" ")
        );
        let diag = Diagnostics::new();
        for disk in &opts.vhost_user_disks {
            diag.socket(&format!("vhost-user disk {}", disk.name), &disk.socket)
                .processes_naming(
                    &format!("vhost-user backend of {}", disk.name),
                    &disk.socket,
                );
        }
        diag.file_size("guest serial log", &paths.serial_log)
            .include(&opts.diagnostics);

        let started = Instant::now();
        let process = match weft_qmp::process::spawn(&config, &paths, &spawn_opts).await {
            Ok(process) => process,
            Err(err) => {
                let output = tail(&std::fs::read_to_string(&paths.output_log).unwrap_or_default());
                eprintln!(
                    "{}\n---- QEMU command line: {command}\n{}",
                    report("QEMU did not start", &output, &serial),
                    diag.report(&format!("QEMU did not start: {err}"))
                );
                return Err(anyhow!(err).context("cannot start QEMU for the test guest"));
            }
        };
        // Before anything else: QEMU's state and threads head the report.
        let qemu_first = Diagnostics::new();
        qemu_first
            .process("QEMU", process.pid())
            .command_line("QEMU", process.pid(), &command)
            .include(&diag);
        let mut guest = Guest {
            process: Some(process),
            serial,
            data_disk,
            output_log: paths.output_log,
            boot_time: Duration::ZERO,
            diag: qemu_first,
            dir: Some(dir),
        };
        match guest.wait_ready(opts.ready_timeout).await {
            Ok(()) => {
                guest.boot_time = started.elapsed();
                Ok(guest)
            }
            Err(err) => {
                let report = guest.report(&format!("the test guest did not become ready: {err:#}"));
                let stalled = matches!(
                    err.downcast_ref::<wait_until::Error>(),
                    Some(wait_until::Error::TimedOut { .. })
                );
                // A stall carries its report (read before QEMU is killed) in the error,
                // so whatever prints the error shows it; a guest that failed says why
                // in the error already, and its logs go to stderr.
                let err = if stalled {
                    err.context(report)
                } else {
                    eprintln!("{report}");
                    err
                };
                if let Some(process) = guest.process.take() {
                    process.kill().await;
                }
                Err(err)
            }
        }
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let serial = self.serial.clone();
        let process = self.process.as_ref().context("no QEMU process")?;
        wait_until(timeout, "WEFT-READY on the guest serial console", || {
            let text = serial.contents();
            let exited = process.exit_status();
            async move {
                if text.contains("WEFT-READY") {
                    return Ok(Some(()));
                }
                if let Some(line) = failure_line(&text) {
                    bail!("guest failed: {line}");
                }
                if let Some(status) = exited {
                    bail!("QEMU exited ({status}) before the guest was ready");
                }
                Ok(None)
            }
        })
        .await
    }

    /// The QMP connection (capabilities already negotiated).
    pub fn qmp(&self) -> &Qmp {
        self.process().qmp()
    }

    /// The QEMU process.
    pub fn process(&self) -> &QemuProcess {
        // Only `shutdown`/`boot` take the process, and they consume or drop the guest.
        self.process
            .as_ref()
            .expect("the guest's QEMU process is present until shutdown")
    }

    pub fn serial(&self) -> &SerialLog {
        &self.serial
    }

    /// The data disk image (`/dev/vda` in the guest).
    pub fn data_disk(&self) -> &Path {
        &self.data_disk
    }

    /// The guest's temporary directory (QMP socket, logs, default data disk); removed on drop.
    pub fn dir(&self) -> &Path {
        // Only `shutdown_keep_dir` takes the directory, and it consumes the guest.
        self.dir
            .as_ref()
            .map(TempDir::path)
            .expect("the guest's directory is present")
    }

    /// Time from starting QEMU to `WEFT-READY`.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// Asks QEMU to `quit` and waits for it to exit; returns the exit status.
    ///
    /// The guest's temporary directory stays until the returned value's owner drops it:
    /// use [`Guest::shutdown_keep_dir`] to keep reading the data disk afterwards.
    pub async fn shutdown(self) -> anyhow::Result<ExitInfo> {
        self.shutdown_keep_dir().await.map(|(status, _dir)| status)
    }

    /// Like [`Guest::shutdown`], and hands over the temporary directory (with the default
    /// data disk and the logs) for inspection after QEMU is gone.
    pub async fn shutdown_keep_dir(mut self) -> anyhow::Result<(ExitInfo, TempDir)> {
        let result = self.quit_and_wait().await;
        if result.is_err() {
            eprintln!("{}", self.report("the test guest did not shut down"));
        }
        let status = result?;
        let dir = self.dir.take().context("the guest's directory is gone")?;
        Ok((status, dir))
    }

    async fn quit_and_wait(&mut self) -> anyhow::Result<ExitInfo> {
        let process = self.process.as_ref().context("no QEMU process")?;
        // QEMU may close the socket before its reply reaches us; the exit is what counts.
        let quit = process.qmp().execute_raw("quit", None).await;
        match tokio::time::timeout(EXIT_TIMEOUT, process.wait()).await {
            Ok(exit) => {
                self.process = None;
                Ok(exit)
            }
            Err(_) => Err(anyhow!(
                "QEMU did not exit within {EXIT_TIMEOUT:?} after quit (quit replied {quit:?})"
            )),
        }
    }

    /// QEMU's output and the serial log, then QEMU's process (state, wchan, threads) and
    /// command line, its vhost-user sockets and their backends, the serial log's size and
    /// what the test listed in [`GuestOpts::diagnostics`], for a failure message.
    pub fn report(&self, headline: &str) -> String {
        let output = match &self.process {
            Some(process) => process.output_tail(REPORT_TAIL_BYTES),
            None => tail(&std::fs::read_to_string(&self.output_log).unwrap_or_default()),
        };
        format!(
            "{}\n{}",
            report(headline, &output, &self.serial),
            self.diag
                .report(&format!("processes and files: {headline}"))
        )
    }

    /// What this guest's failure report lists beyond its logs; a test adds what it
    /// starts later.
    pub fn diagnostics(&self) -> &Diagnostics {
        &self.diag
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.report("test panicked with a guest running"));
        }
        // QemuProcess kills a non-detached QEMU when dropped.
        self.process = None;
    }
}

fn qemu_binary() -> PathBuf {
    std::env::var_os("WEFT_QEMU")
        .filter(|b| !b.is_empty())
        .map_or_else(|| PathBuf::from("qemu-system-x86_64"), PathBuf::from)
}

/// The last `REPORT_TAIL_BYTES` of `text`, cut at a character boundary.
fn tail(text: &str) -> String {
    let mut start = text.len().saturating_sub(REPORT_TAIL_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

fn report(headline: &str, qemu_output: &str, serial: &SerialLog) -> String {
    format!(
        "==== weft-integration: {headline}\n\
         ---- QEMU output (tail) ----\n{}\n\
         ---- guest serial log (tail) {} ----\n{}\n\
         ==== end",
        qemu_output.trim_end(),
        serial.path().display(),
        tail(&serial.contents()).trim_end(),
    )
}
