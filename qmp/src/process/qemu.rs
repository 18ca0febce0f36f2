//! QEMU (and `qemu-storage-daemon`) as a supervised child: started in its own process
//! group, optionally in a network namespace and cgroups, with its output in a file;
//! ready once its QMP socket has negotiated; reaped by a task that records how it ended.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

use crate::launch::Validate;
use crate::launch::{
    command_line, kvm_probe, sandbox_args, storage_daemon_command_line, valid_run_as, Accel,
    DiskConfig, LaunchPaths, SpawnOptions, VmConfig,
};
use crate::{Error, ExitInfo, Qmp};

/// Starts `qemu-storage-daemon` (`opts.binary`, or `qemu-storage-daemon` when that is the
/// default `qemu-system-x86_64`) with `disks` and waits until its QMP monitor answers;
/// supervised like [`spawn`]. QEMU's output goes to `paths.output_log`.
pub async fn spawn_storage_daemon(
    disks: &[DiskConfig],
    paths: &LaunchPaths,
    opts: &SpawnOptions,
) -> Result<QemuProcess, Error> {
    for disk in disks {
        if !disk.path.exists() {
            return Err(Error::InvalidConfig(format!(
                "disk {} does not exist",
                disk.path.display()
            )));
        }
    }
    let mut opts = opts.clone();
    if opts.binary == SpawnOptions::default().binary {
        opts.binary = PathBuf::from("qemu-storage-daemon");
    }
    spawn_args(storage_daemon_command_line(disks, paths), paths, &opts).await
}

struct Supervision {
    exit: watch::Receiver<Option<ExitInfo>>,
    kill: Arc<Notify>,
    detached: Arc<AtomicBool>,
}

impl Supervision {
    fn exit_info(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        let r = rx.wait_for(|e| e.is_some()).await.map(|e| e.clone());
        match r {
            Ok(Some(info)) => info,
            // The supervisor is gone (runtime shutting down): nothing more to learn.
            _ => self.exit_info().unwrap_or_else(ExitInfo::unknown),
        }
    }

    async fn kill(&self) -> ExitInfo {
        self.kill.notify_one();
        self.wait().await
    }
}

/// Kills the child when the supervisor task is dropped without having reaped it (for
/// example when the runtime shuts down), unless detached.
struct ChildGuard {
    child: tokio::process::Child,
    detached: Arc<AtomicBool>,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if !self.detached.load(Ordering::SeqCst) {
            // Fails harmlessly if the child was reaped already.
            let _ = self.child.start_kill();
        }
    }
}

fn supervise(
    child: tokio::process::Child,
    detached: bool,
    qmp_socket: PathBuf,
) -> (Supervision, u32) {
    let pid = child.id().unwrap_or(0);
    let (exit_tx, exit_rx) = watch::channel(None);
    let kill = Arc::new(Notify::new());
    let detached = Arc::new(AtomicBool::new(detached));
    let mut guard = ChildGuard {
        child,
        detached: detached.clone(),
    };
    let kill_rx = kill.clone();
    let detached_flag = detached.clone();
    tokio::spawn(async move {
        let status = loop {
            tokio::select! {
                status = guard.child.wait() => break status,
                _ = kill_rx.notified() => {
                    debug!(pid, "killing qemu");
                    if let Err(e) = guard.child.start_kill() {
                        debug!(pid, error = %e, "kill failed");
                    }
                }
            }
        };
        let info = match status {
            Ok(s) => ExitInfo::from_status(s),
            Err(e) => {
                warn!(pid, error = %e, "cannot wait for qemu");
                ExitInfo::unknown()
            }
        };
        debug!(pid, status = %info, "qemu exited");
        if !detached_flag.load(Ordering::SeqCst) {
            // QEMU removes its socket when it exits cleanly, not when killed.
            let _ = std::fs::remove_file(&qmp_socket);
        }
        exit_tx.send_replace(Some(info));
    });
    (
        Supervision {
            exit: exit_rx,
            kill,
            detached,
        },
        pid,
    )
}

/// Where QEMU runs: a network namespace and a cgroup, as descriptors opened by the
/// parent so the child only needs `setns` and `write` before exec.
struct Placement {
    netns: Option<File>,
    cgroup_procs: Vec<File>,
}

impl Placement {
    fn open(opts: &SpawnOptions) -> Result<Placement, Error> {
        let netns = opts
            .netns
            .as_ref()
            .map(|p| {
                File::open(p).map_err(|e| {
                    Error::InvalidConfig(format!(
                        "cannot open network namespace {}: {e}",
                        p.display()
                    ))
                })
            })
            .transpose()?;
        let cgroup_procs = opts
            .cgroups
            .iter()
            .map(|dir| {
                let procs = dir.join("cgroup.procs");
                OpenOptions::new().write(true).open(&procs).map_err(|e| {
                    Error::InvalidConfig(format!("cannot use cgroup {}: {e}", dir.display()))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Placement {
            netns,
            cgroup_procs,
        })
    }

    fn any(&self) -> bool {
        self.netns.is_some() || !self.cgroup_procs.is_empty()
    }

    /// Runs in the child between fork and exec.
    fn enter(&self) -> io::Result<()> {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        if let Some(ns) = &self.netns {
            // SAFETY: setns on a descriptor of /run/netns/<name>, which this struct owns;
            // CLONE_NEWNET makes the kernel check it is a network namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        for procs in &self.cgroup_procs {
            // "0" moves the writing process itself (cgroup v1 and v2).
            (&*procs).write_all(b"0")?;
        }
        Ok(())
    }
}

/// Kills QEMU when dropped while armed: [`spawn`] disarms it once it returns.
struct KillOnCancel(Option<Arc<Notify>>);

impl Drop for KillOnCancel {
    fn drop(&mut self) {
        if let Some(kill) = self.0.take() {
            kill.notify_one();
        }
    }
}

/// A running QEMU process with its QMP connection.
///
/// A tokio task reaps the process and records how it ended. Dropping a `QemuProcess`
/// kills QEMU with SIGKILL, unless it was spawned detached or [`QemuProcess::detach`] was
/// called. QEMU runs in its own process group with its output going to a file, so it
/// survives the caller being interrupted or killed.
pub struct QemuProcess {
    pid: u32,
    qmp: Qmp,
    output_log: PathBuf,
    sup: Supervision,
}

impl fmt::Debug for QemuProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuProcess")
            .field("pid", &self.pid)
            .field("exit", &self.exit_status())
            .finish()
    }
}

impl QemuProcess {
    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The QMP connection made at start.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// How QEMU ended, or `None` while it runs.
    pub fn exit_status(&self) -> Option<ExitInfo> {
        self.sup.exit_info()
    }

    /// Waits until QEMU has ended and been reaped.
    pub async fn wait(&self) -> ExitInfo {
        self.sup.wait().await
    }

    /// The last `max_bytes` of QEMU's stdout and stderr (lossy UTF-8).
    pub fn output_tail(&self, max_bytes: usize) -> String {
        read_tail(&self.output_log, max_bytes)
    }

    /// Stops supervision from killing QEMU: neither dropping this handle nor shutting
    /// down the runtime kills it any more (while this process lives, QEMU is still
    /// reaped when it exits). Takes `&self` so a handle shared with a monitor task can
    /// be detached. Returns the pid.
    pub fn detach(&self) -> u32 {
        self.sup.detached.store(true, Ordering::SeqCst);
        self.pid
    }

    /// Kills QEMU with SIGKILL and waits until it is reaped.
    pub async fn kill(&self) -> ExitInfo {
        self.sup.kill().await
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if !self.sup.detached.load(Ordering::SeqCst) {
            self.sup.kill.notify_one();
        }
    }
}

fn read_tail(path: &Path, max_bytes: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max_bytes as u64);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(max_bytes as u64).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// How much of QEMU's output an [`Error::Launch`] carries.
const LAUNCH_OUTPUT_TAIL: usize = 4096;

/// Starts QEMU for `config` and waits until its QMP socket has negotiated.
///
/// Validates `config` first. If QEMU exits while starting, the error is
/// [`Error::Launch`] with the tail of its output; a missing binary is [`Error::Spawn`].
/// On any failure QEMU is killed and reaped and the socket file removed.
pub async fn spawn(
    config: &VmConfig,
    paths: &LaunchPaths,
    opts: &SpawnOptions,
) -> Result<QemuProcess, Error> {
    config.validate()?;
    let mut config = config.clone();
    if config.accel == Accel::Kvm {
        kvm_probe().map_err(|reason| {
            Error::InvalidConfig(format!(
                "accel kvm was asked for but KVM is not usable here: {reason}; use tcg or auto"
            ))
        })?;
    }
    config.accel = crate::launch::resolve_accel(config.accel);
    if let Some(user) = &opts.run_as {
        if !valid_run_as(user) {
            return Err(Error::InvalidConfig(format!(
                "QEMU user {user:?} must be a user name or uid:gid"
            )));
        }
    }
    let mut args = command_line(&config, paths);
    args.extend(sandbox_args(opts));
    spawn_args(args, paths, opts).await
}

/// Starts a QEMU binary with `args` under supervision and waits for its QMP monitor.
async fn spawn_args(
    args: Vec<String>,
    paths: &LaunchPaths,
    opts: &SpawnOptions,
) -> Result<QemuProcess, Error> {
    match std::fs::remove_file(&paths.qmp_socket) {
        Ok(()) => debug!(path = %paths.qmp_socket.display(), "removed stale qmp socket"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::Io(e)),
    }
    let out = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&paths.output_log)?;
    let err = out.try_clone()?;

    let mut cmd = tokio::process::Command::new(&opts.binary);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        // Own process group: a Ctrl-C or group kill aimed at the caller misses QEMU.
        .process_group(0)
        .kill_on_drop(false);
    let placement = Placement::open(opts)?;
    if placement.any() {
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (setns, write) on descriptors opened by the
        // parent, which stay valid for the child's copy of the descriptor table; it
        // allocates nothing and takes no locks.
        unsafe {
            cmd.pre_exec(move || placement.enter());
        }
    }
    debug!(binary = %opts.binary.display(), ?args, "starting qemu");
    let child = cmd.spawn().map_err(|source| Error::Spawn {
        binary: opts.binary.clone(),
        source,
    })?;
    let (sup, pid) = supervise(child, opts.detached, paths.qmp_socket.clone());
    // If the caller drops this future before QEMU is ready (a cancelled request),
    // QEMU must not live on unsupervised and unrecorded.
    let mut cancel_guard = KillOnCancel(Some(sup.kill.clone()));

    let fail = |sup: Supervision, e: Error| async move {
        // Killing is idempotent; wait until QEMU is reaped so nothing is left behind.
        sup.detached.store(false, Ordering::SeqCst);
        sup.kill().await;
        let _ = std::fs::remove_file(&paths.qmp_socket);
        e
    };
    let ready = wait_ready(&sup, paths, opts.ready_timeout).await;
    cancel_guard.0 = None;
    match ready {
        Ok(qmp) => Ok(QemuProcess {
            pid,
            qmp,
            output_log: paths.output_log.clone(),
            sup,
        }),
        Err(e) => Err(fail(sup, e).await),
    }
}

/// Polls for the QMP socket until `timeout`, giving up early if QEMU exits.
async fn wait_ready(
    sup: &Supervision,
    paths: &LaunchPaths,
    timeout: Duration,
) -> Result<Qmp, Error> {
    let start = Instant::now();
    let mut exit = sup.exit.clone();
    let launch_error = |info: ExitInfo| Error::Launch {
        status: info,
        output: read_tail(&paths.output_log, LAUNCH_OUTPUT_TAIL)
            .trim_end()
            .to_owned(),
    };
    loop {
        if let Some(info) = sup.exit_info() {
            return Err(launch_error(info));
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(Error::timeout(
                format!("qmp socket {}", paths.qmp_socket.display()),
                timeout,
            ));
        }
        if paths.qmp_socket.exists() {
            match Qmp::connect_timeout(&paths.qmp_socket, timeout - elapsed).await {
                Ok(qmp) => return Ok(qmp),
                // Socket file present but not listening yet, or QEMU died meanwhile.
                Err(Error::Io(e)) => debug!(error = %e, "qmp socket not ready"),
                Err(e) => {
                    if let Some(info) = sup.exit_info() {
                        return Err(launch_error(info));
                    }
                    return Err(e);
                }
            }
        }
        // Poll with a short period, but wake at once if QEMU exits.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = exit.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_info_display() {
        let mut e = ExitInfo::unknown();
        assert_eq!(e.to_string(), "unknown exit status");
        e.signal = Some(9);
        assert_eq!(e.to_string(), "killed by signal 9");
        e.code = Some(1);
        assert_eq!(e.to_string(), "exit code 1");
        assert!(!e.success());
    }

    #[test]
    fn read_tail_takes_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("out");
        std::fs::write(&p, b"0123456789").expect("write");
        assert_eq!(read_tail(&p, 4), "6789");
        assert_eq!(read_tail(&p, 100), "0123456789");
        assert_eq!(read_tail(&dir.path().join("none"), 4), "");
    }
}
