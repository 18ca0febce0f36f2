//! Disks served by `weft-blk` (F13): one process per disk, started by weftd before the
//! VM's QEMU and stopped (SIGTERM: it flushes its write layer) after QEMU is gone.
//!
//! Files of disk `D` of VM `V`:
//! - `<data_dir>/blk/V/D.json`: the disk spec (`weft_blockdev::blk::spec`), written
//!   by whoever makes the VM (weaves);
//! - `<data_dir>/blk/V/D.cow/`: its write layer; `<data_dir>/blk/V/D.trace`: its reads;
//!   `<data_dir>/blk/V/D.assembly`: the chunks read so far, decompressed (a cache);
//! - `<run_dir>/blk/V.D.sock` (QEMU connects, `reconnect=1`) and `V.D.pid` (`.` joins
//!   the names: no name contains it, see [`crate::names`]);
//! - `<data_dir>/environments/V/blk-D.log`: its output.
//!
//! The processes outlive weftd as QEMU does (own process group, pid files): a weftd
//! restarted while a VM runs leaves them be, and stops them when the VM stops.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use weft_qmp::launch::{VhostUserDisk, VmConfig};
use weft_qmp::process::{Ended, Helper, Signature, Stop};

use crate::config::Config;
use crate::error::ApiError;

/// Name of the backend binary (next to weftd's own, else in `PATH`).
pub const BINARY: &str = "weft-blk";
/// How long a new weft-blk may take to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long weft-blk has to flush and exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest unix socket path the kernel accepts.
const MAX_SOCKET_PATH: usize = 107;

/// The directory of `vm`'s served disks' specs, write layers and traces.
pub fn vm_dir(config: &Config, vm: &str) -> PathBuf {
    config.data_dir.join("blk").join(vm)
}

/// The spec of disk `disk` of `vm`.
pub fn spec_path(config: &Config, vm: &str, disk: &str) -> PathBuf {
    vm_dir(config, vm).join(format!("{disk}.json"))
}

/// The vhost-user socket of disk `disk` of `vm`.
pub fn socket_path(config: &Config, vm: &str, disk: &str) -> PathBuf {
    config
        .run_dir
        .join("blk")
        .join(format!("{}.sock", crate::names::join(&[vm, disk])))
}

fn pid_path(socket: &Path) -> PathBuf {
    socket.with_extension("pid")
}

/// The weft-blk binary: beside the running weftd, else `weft-blk` in `PATH`.
pub fn binary() -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(BINARY)));
    match beside {
        Some(p) if p.is_file() => Some(p),
        _ => crate::dpa::device::find_binary(Path::new(BINARY)),
    }
}

/// The weft-blk serving `socket`: the one its pid file names if that is a weft-blk
/// serving `socket` (not a recycled pid), else one found among all processes (a weftd
/// that died between starting it and writing its pid file).
fn running(socket: &Path) -> Option<Helper> {
    let serves = Signature::program(BINARY).arg(socket);
    Helper::from_pid_file(&pid_path(socket), &serves).or_else(|| Helper::search(&serves))
}

/// Starts a weft-blk for every served disk of `vm` that has none running, and waits
/// until each listens. On failure, the ones it started are stopped again.
pub async fn prepare(config: &Config, vm: &str, vm_config: &VmConfig) -> Result<(), ApiError> {
    if vm_config.vhost_user_disks.is_empty() {
        return Ok(());
    }
    let binary = binary().ok_or_else(|| {
        ApiError::Internal(format!(
            "{vm:?} has disks served by {BINARY}, which is neither beside weftd nor in PATH"
        ))
    })?;
    let mut started = Vec::new();
    for disk in &vm_config.vhost_user_disks {
        match start_one(config, &binary, vm, disk).await {
            Ok(true) => started.push(disk.socket.clone()),
            Ok(false) => {}
            Err(e) => {
                for s in &started {
                    stop_one(s).await;
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Starts the disk's weft-blk unless one serves its socket; true when started.
async fn start_one(
    config: &Config,
    binary: &Path,
    vm: &str,
    disk: &VhostUserDisk,
) -> Result<bool, ApiError> {
    let socket = &disk.socket;
    let pid_file = pid_path(socket);
    if let Some(pid) = running(socket).map(|h| h.pid()) {
        if crate::dpa::device::unix_listening(socket) {
            return Ok(false);
        }
        // Alive but not listening: a stuck one goes.
        warn!(vm, disk = %disk.name, pid, "weft-blk does not listen; restarting it");
        stop_one(socket).await;
    }
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ApiError::BadRequest(format!(
            "the weft-blk socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter run_dir or name",
            socket.display()
        )));
    }
    let spec = spec_path(config, vm, &disk.name);
    if !spec.is_file() {
        return Err(ApiError::Internal(format!(
            "disk {} of {vm:?} is served by {BINARY} but has no spec at {}",
            disk.name,
            spec.display()
        )));
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| ApiError::io(format!("cannot create {}", dir.display()), e))?;
    }
    let log_path = config
        .data_dir
        .join("environments")
        .join(vm)
        .join(format!("blk-{}.log", disk.name));
    if let Some(dir) = log_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| ApiError::io(format!("cannot open {}", log_path.display()), e))?;
    let err = log
        .try_clone()
        .map_err(|e| ApiError::io(format!("cannot open {}", log_path.display()), e))?;
    let _ = std::fs::remove_file(socket);
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(binary)
        .arg("--spec")
        .arg(&spec)
        .arg("--socket")
        .arg(socket)
        .arg("--seccomp")
        .arg(config.blk.seccomp.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        // Its own process group: it outlives weftd as QEMU does.
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| ApiError::io(format!("cannot start {}", binary.display()), e))?;
    let pid = child.id().unwrap_or(0);
    // Dying here leaves a weft-blk with no pid file: `stop_one` finds it by its socket.
    crate::testpoints::point("blk.spawned").await;
    std::fs::write(&pid_file, format!("{pid}\n"))
        .map_err(|e| ApiError::io(format!("cannot write {}", pid_file.display()), e))?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            let _ = std::fs::remove_file(&pid_file);
            return Err(ApiError::Internal(format!(
                "{BINARY} for disk {} of {vm:?} exited at start ({status}): {}",
                disk.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("; ")
            )));
        }
        if crate::dpa::device::unix_listening(socket) {
            break;
        }
        if Instant::now() >= deadline {
            stop_one(socket).await;
            return Err(ApiError::Internal(format!(
                "{BINARY} for disk {} of {vm:?} did not listen within {}s (see {})",
                disk.name,
                READY_TIMEOUT.as_secs(),
                log_path.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Reap it when it ends, so it never lingers as a zombie of weftd.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    info!(vm, disk = %disk.name, pid, ms = t0.elapsed().as_millis() as u64, "weft-blk ready");
    Ok(true)
}

/// Stops the weft-blk serving `socket` (SIGTERM, then SIGKILL) and removes its files.
async fn stop_one(socket: &Path) {
    let pid_file = pid_path(socket);
    if let Some(blk) = running(socket) {
        let how = Stop::term_then_kill(STOP_TIMEOUT, Duration::from_secs(10));
        if blk.stop(how).await == Ended::Stuck {
            warn!(pid = blk.pid(), socket = %socket.display(), "weft-blk did not exit after SIGKILL");
        }
    }
    let _ = std::fs::remove_file(&pid_file);
    let _ = std::fs::remove_file(socket);
}

/// Every store index a served disk reads, with the VMs that read it (from the specs).
pub fn indexes_in_use(config: &Config) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let Ok(vms) = std::fs::read_dir(config.data_dir.join("blk")) else {
        return out;
    };
    for vm in vms.flatten() {
        let Ok(specs) = std::fs::read_dir(vm.path()) else {
            continue;
        };
        let name = vm.file_name().to_string_lossy().into_owned();
        for f in specs.flatten() {
            if f.path().extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(spec) = weft_blockdev::blk::spec::DiskSpec::load(&f.path()) else {
                continue;
            };
            for l in spec.layers {
                let users = out.entry(l.index).or_default();
                if !users.contains(&name) {
                    users.push(name.clone());
                }
            }
        }
    }
    for users in out.values_mut() {
        users.sort();
    }
    out
}

/// The VMs whose served disks read the store index `index`.
pub fn users_of(config: &Config, index: &str) -> Vec<String> {
    indexes_in_use(config).remove(index).unwrap_or_default()
}

/// Stops every weft-blk of `vm` (its QEMU is gone).
pub async fn release(config: &Config, vm: &str) {
    let dir = config.run_dir.join("blk");
    let prefix = crate::names::join(&[vm, ""]);
    let old_prefix = format!("{vm}-");
    // Every disk with a spec (written before its weft-blk starts), whether or not a
    // pid file was written for it.
    let mut disks: std::collections::BTreeSet<String> = std::fs::read_dir(vm_dir(config, vm))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".json")
                .map(str::to_string)
        })
        .collect();
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(disk) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".pid"))
        {
            disks.insert(disk.to_string());
        } else if let Some(disk) = name
            .strip_prefix(&old_prefix)
            .and_then(|rest| rest.strip_suffix(".pid"))
        {
            // Started by a weftd that joined names with '-' (`<vm>-<disk>.sock`),
            // ambiguous when names share a prefix: only when (vm, disk) has a spec.
            if spec_path(config, vm, disk).is_file() {
                stop_one(&dir.join(format!("{vm}-{disk}.sock"))).await;
            }
        }
    }
    for disk in &disks {
        stop_one(&socket_path(config, vm, disk)).await;
    }
}

/// Stops every weft-blk of `vm` and removes its specs, write layers and traces (the VM
/// is deleted).
pub async fn forget(config: &Config, vm: &str) -> Result<(), ApiError> {
    release(config, vm).await;
    let dir = vm_dir(config, vm);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ApiError::io(format!("cannot remove {}", dir.display()), e)),
    }
}

/// weft-blk as a step of every launch: the backends of a VM's disks served from the
/// chunk store start before its QEMU and end after it.
#[derive(Debug)]
pub struct WeftBlk {
    config: Config,
}

impl WeftBlk {
    /// The hook for weftd's configuration.
    pub fn new(config: Config) -> WeftBlk {
        WeftBlk { config }
    }
}

impl crate::launch::LaunchHook for WeftBlk {
    fn prepare<'a>(
        &'a self,
        cx: &'a crate::launch::LaunchContext<'a>,
        config: &'a mut VmConfig,
    ) -> futures::future::BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move { prepare(&self.config, cx.env, config).await })
    }

    fn release<'a>(&'a self, env: &'a str) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(release(&self.config, env))
    }

    fn forget<'a>(&'a self, env: &'a str) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Err(e) = forget(&self.config, env).await {
                tracing::warn!(env, error = %e.one_line(), "cannot remove the served disks' files");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_of_different_disks_differ() {
        let config = Config::default();
        assert_ne!(
            socket_path(&config, "a-b", "c"),
            socket_path(&config, "a", "b-c")
        );
        assert_eq!(
            pid_path(&socket_path(&config, "a-b", "c")),
            config.run_dir.join("blk/a-b.c.pid")
        );
    }

    /// A stand-in for weft-blk serving `socket`: `sh` under the name `weft-blk` (a
    /// link in `dir`), or under its own name, blocked reading its stdin. Returned once
    /// it runs.
    fn stand_in(dir: &Path, socket: &Path, named_weft_blk: bool) -> std::process::Child {
        use std::io::BufRead;
        let program = if named_weft_blk {
            let link = dir.join(BINARY);
            if !link.exists() {
                std::os::unix::fs::symlink("/bin/sh", &link).expect("link");
            }
            link
        } else {
            PathBuf::from("/bin/sh")
        };
        let mut child = std::process::Command::new(program)
            .arg("-c")
            .arg("echo ready; read x")
            .arg("weft-blk-test")
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready");
        child
    }

    #[tokio::test]
    async fn stop_ends_the_weft_blk_of_its_socket_and_no_other_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vm.vda.sock");
        std::fs::write(&socket, b"").expect("socket file");
        // The pid file names a process that is not weft-blk: it is left alone.
        let mut other = stand_in(dir.path(), &socket, false);
        std::fs::write(pid_path(&socket), format!("{}\n", other.id())).expect("pid");
        assert!(running(&socket).is_none());
        stop_one(&socket).await;
        assert_eq!(other.try_wait().expect("try_wait"), None, "not signalled");
        assert!(!pid_path(&socket).exists() && !socket.exists());
        // A weft-blk serving another socket is left alone too; the one serving this
        // socket is stopped, found without a pid file.
        let elsewhere = dir.path().join("vm.vdb.sock");
        let mut neighbour = stand_in(dir.path(), &elsewhere, true);
        let mut blk = stand_in(dir.path(), &socket, true);
        assert_eq!(running(&socket).map(|h| h.pid()), Some(blk.id()));
        stop_one(&socket).await;
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(blk.wait().expect("reap").signal(), Some(libc::SIGTERM));
        assert_eq!(neighbour.try_wait().expect("try_wait"), None);
        for mut c in [other, neighbour] {
            c.kill().expect("kill");
            c.wait().expect("reap");
        }
    }
}
