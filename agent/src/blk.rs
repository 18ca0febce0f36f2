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
use weft_qmp::launch::{self, VhostUserDisk, VmConfig};

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

/// Whether `pid` is a weft-blk serving `socket` (not a recycled pid).
fn is_ours(pid: u32, socket: &Path) -> bool {
    if !launch::process_alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let has = |needle: &[u8]| cmdline.windows(needle.len()).any(|w| w == needle);
    has(BINARY.as_bytes()) && has(socket.as_os_str().as_encoded_bytes())
}

/// The weft-blk serving `socket`, found among all processes.
fn serving(socket: &Path) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| is_ours(*pid, socket))
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
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
    let pid = read_pid(&pid_file)
        .filter(|p| is_ours(*p, socket))
        // A weftd that died between starting it and writing its pid file.
        .or_else(|| serving(socket));
    if let Some(pid) = pid {
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
            .map_err(|e| ApiError::Internal(format!("cannot create {}: {e}", dir.display())))?;
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
        .map_err(|e| ApiError::Internal(format!("cannot open {}: {e}", log_path.display())))?;
    let err = log
        .try_clone()
        .map_err(|e| ApiError::Internal(format!("cannot open {}: {e}", log_path.display())))?;
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
        .map_err(|e| ApiError::Internal(format!("cannot start {}: {e}", binary.display())))?;
    let pid = child.id().unwrap_or(0);
    // Dying here leaves a weft-blk with no pid file: `stop_one` finds it by its socket.
    crate::testpoints::point("blk.spawned").await;
    std::fs::write(&pid_file, format!("{pid}\n"))
        .map_err(|e| ApiError::Internal(format!("cannot write {}: {e}", pid_file.display())))?;
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
    let pid = read_pid(&pid_file)
        .filter(|p| is_ours(*p, socket))
        // A weftd that died between starting it and writing its pid file.
        .or_else(|| serving(socket));
    if let Some(pid) = pid {
        for (sig, wait) in [
            (nix::sys::signal::Signal::SIGTERM, STOP_TIMEOUT),
            (nix::sys::signal::Signal::SIGKILL, Duration::from_secs(10)),
        ] {
            signal(pid, sig);
            let deadline = Instant::now() + wait;
            while is_ours(pid, socket) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if !is_ours(pid, socket) {
                break;
            }
        }
        if is_ours(pid, socket) {
            warn!(pid, socket = %socket.display(), "weft-blk did not exit after SIGKILL");
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
        Err(e) => Err(ApiError::Internal(format!(
            "cannot remove {}: {e}",
            dir.display()
        ))),
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
}
