//! Every VM's vsock device and the listener its DPA reaches weftd on.
//!
//! With the kernel's vhost-vsock, QEMU gets `vhost-vsock-pci,guest-cid=N` and one
//! AF_VSOCK listener on port 5150 serves all VMs, telling them apart by the peer's
//! CID. With vhost-user, weftd starts one `vhost-device-vsock` per VM before QEMU;
//! a guest connection to CID 2 port P arrives on the unix socket `<uds-path>_P`, and
//! weftd listens on `<uds-path>_5150` for that VM alone. The device process outlives
//! weftd like QEMU does (own process group, a pid file); a restarted weftd adopts it
//! and listens again. It is stopped when its VM stops or is deleted.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, info, warn};
use weft_qmp::launch::{self, VsockDevice};

use super::cids::CidTable;
use super::vsock::VsockListener;
use super::{DpaLink, DpaSettings, VsockMode, DPA_PORT};

/// Where the kernel's vhost-vsock device appears.
const VHOST_VSOCK_DEV: &str = "/dev/vhost-vsock";
/// Longest unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long a new `vhost-device-vsock` may take to listen.
const DEVICE_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a device process has to exit after SIGTERM before SIGKILL.
const DEVICE_STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a device process has to be gone after SIGKILL (a loaded host can take
/// seconds to tear down a process) before it is reported as stuck.
const DEVICE_KILL_TIMEOUT: Duration = Duration::from_secs(15);
/// The device's name on its process's command line (to recognise it after a restart).
const DEVICE_NAME: &str = "vhost-device-vsock";

/// The files of one VM's vhost-user vsock device, all in weftd's `<run_dir>/vsock`
/// (mode 0700: only weftd's user can reach the guests' sockets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockPaths {
    /// The vhost-user socket QEMU connects to.
    pub vhost: PathBuf,
    /// The device's `--uds-path`: host-initiated connections go here.
    pub uds: PathBuf,
    /// `<uds>_5150`, where weftd accepts this VM's DPA connections.
    pub listener: PathBuf,
    /// The device process's pid.
    pub pid: PathBuf,
}

impl VsockPaths {
    /// The paths of `vm` under `dir`.
    pub fn new(dir: &Path, vm: &str) -> VsockPaths {
        let uds = dir.join(format!("{vm}.vsock"));
        let mut listener = uds.clone().into_os_string();
        listener.push(format!("_{DPA_PORT}"));
        VsockPaths {
            vhost: dir.join(format!("{vm}.vhost")),
            listener: listener.into(),
            uds,
            pid: dir.join(format!("{vm}.vsock.pid")),
        }
    }

    fn sockets(&self) -> [&Path; 3] {
        [&self.vhost, &self.uds, &self.listener]
    }
}

/// What this weftd provides, after `auto` was resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resolved {
    Off,
    Kernel,
    VhostUser { binary: PathBuf },
}

/// A running device process.
struct Device {
    pid: u32,
    /// Set when this weftd spawned it (and reaps it): true once it exited.
    exited: Option<watch::Receiver<bool>>,
}

/// What is live for one VM.
#[derive(Default)]
struct Active {
    listener: Option<tokio::task::AbortHandle>,
    device: Option<Device>,
}

/// Gives VMs their vsock device and listens for their DPAs; see the module docs.
pub struct VsockHost {
    mode: Resolved,
    dir: PathBuf,
    cids: Option<CidTable>,
    link: DpaLink,
    active: Mutex<HashMap<String, Active>>,
    kernel_listener: Mutex<Option<tokio::task::AbortHandle>>,
}

impl std::fmt::Debug for VsockHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockHost")
            .field("mode", &self.mode)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section is one insert, remove or take.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `binary` if it names a file, else the first match in `PATH` for a bare name.
pub(crate) fn find_binary(binary: &Path) -> Option<PathBuf> {
    let executable = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if binary.components().count() > 1 {
        return executable(binary).then(|| binary.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| executable(p))
}

/// Whether a unix socket bound at `path` is listening (from `/proc/net/unix`, so
/// no connection is made: a vhost-user backend serves the first one that comes).
pub(crate) fn unix_listening(path: &Path) -> bool {
    const SO_ACCEPTCON: u32 = 0x0001_0000;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.as_os_str().to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7..].join(" ") == want
            && u32::from_str_radix(fields[3], 16).is_ok_and(|f| f & SO_ACCEPTCON != 0)
    })
}

/// Whether `pid` is a `vhost-device-vsock` serving `vhost` (its command line names
/// both), so that a recycled pid is never taken for it.
fn is_our_device(pid: u32, vhost: &Path) -> bool {
    if !launch::process_alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let has = |needle: &[u8]| cmdline.windows(needle.len()).any(|w| w == needle);
    has(DEVICE_NAME.as_bytes()) && has(vhost.as_os_str().as_encoded_bytes())
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(path = %path.display(), error = %e, "cannot remove");
        }
    }
}

impl VsockHost {
    /// Resolves `settings.vsock` on this host and prepares `<run_dir>/vsock` and the
    /// CID table in `<data_dir>/dpa`. Never fails: what cannot work is logged and the
    /// link is off, so environments still start (without vsock).
    pub fn new(
        settings: &DpaSettings,
        data_dir: &Path,
        run_dir: &Path,
        link: DpaLink,
    ) -> Arc<VsockHost> {
        let kernel = Path::new(VHOST_VSOCK_DEV).exists();
        let binary = || find_binary(&settings.vhost_device_vsock);
        let mut mode = match settings.vsock {
            VsockMode::Off => Resolved::Off,
            VsockMode::Kernel if kernel => Resolved::Kernel,
            VsockMode::Kernel => {
                warn!("dpa.vsock = \"kernel\" but {VHOST_VSOCK_DEV} does not exist (modprobe vhost_vsock); guests get no vsock device");
                Resolved::Off
            }
            VsockMode::Auto if kernel => Resolved::Kernel,
            VsockMode::Auto | VsockMode::VhostUser => match binary() {
                Some(binary) => Resolved::VhostUser { binary },
                None => {
                    warn!(
                        binary = %settings.vhost_device_vsock.display(),
                        "neither {VHOST_VSOCK_DEV} nor {DEVICE_NAME} found (cargo install --locked vhost-device-vsock, or set dpa.vhost_device_vsock); guests get no vsock device and their DPAs cannot reach weftd"
                    );
                    Resolved::Off
                }
            },
        };
        let dir = run_dir.join("vsock");
        let cids = match CidTable::open(
            data_dir.join("dpa").join("cids.json"),
            settings.first_cid..=settings.last_cid,
        ) {
            Ok(t) => Some(t),
            Err(e) => {
                warn!(error = %e, "guests get no vsock device");
                mode = Resolved::Off;
                None
            }
        };
        if mode != Resolved::Off {
            let made = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .and_then(|()| {
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                });
            if let Err(e) = made {
                warn!(dir = %dir.display(), error = %e, "cannot create the vsock directory; guests get no vsock device");
                mode = Resolved::Off;
            }
        }
        let host = Arc::new(VsockHost {
            mode,
            dir,
            cids,
            link,
            active: Mutex::new(HashMap::new()),
            kernel_listener: Mutex::new(None),
        });
        if host.mode == Resolved::Kernel {
            if let Err(e) = host.listen_kernel() {
                warn!(port = DPA_PORT, error = %e, "cannot listen on vsock; guests' DPAs cannot reach weftd");
            }
        }
        info!(mode = ?host.mode(), "dpa vsock");
        host
    }

    /// The mode in force: `Kernel`, `VhostUser` or `Off` (never `Auto`).
    pub fn mode(&self) -> VsockMode {
        match self.mode {
            Resolved::Off => VsockMode::Off,
            Resolved::Kernel => VsockMode::Kernel,
            Resolved::VhostUser { .. } => VsockMode::VhostUser,
        }
    }

    /// The connection handler (for apply and statistics).
    pub fn link(&self) -> &DpaLink {
        &self.link
    }

    /// The CID `vm` has, if it was given one.
    pub fn cid(&self, vm: &str) -> Option<u32> {
        self.cids.as_ref()?.get(vm)
    }

    /// The files of `vm`'s vhost-user device.
    pub fn paths(&self, vm: &str) -> VsockPaths {
        VsockPaths::new(&self.dir, vm)
    }

    /// Gets `vm`'s vsock ready before its QEMU starts and returns the device to add
    /// to its configuration; `None` when the link is off or the device cannot be
    /// started (logged: the VM starts without vsock). The device's output goes to
    /// `log`. Call [`VsockHost::release`] when QEMU fails to start or stops.
    pub async fn prepare(&self, vm: &str, log: &Path) -> Option<VsockDevice> {
        let result = match &self.mode {
            Resolved::Off => return None,
            Resolved::Kernel => self.assign(vm).map(|guest_cid| {
                lock(&self.active).insert(vm.to_string(), Active::default());
                VsockDevice::Kernel { guest_cid }
            }),
            Resolved::VhostUser { binary } => self.start_device(vm, binary, log).await,
        };
        match result {
            Ok(device) => Some(device),
            Err(e) => {
                warn!(vm, error = %e, "the VM starts without a vsock device: its DPA cannot reach weftd");
                self.release(vm).await;
                None
            }
        }
    }

    fn assign(&self, vm: &str) -> Result<u32, String> {
        let cids = self.cids.as_ref().ok_or("no CID table")?;
        cids.assign(vm).map_err(|e| e.to_string())
    }

    async fn start_device(
        &self,
        vm: &str,
        binary: &Path,
        log: &Path,
    ) -> Result<VsockDevice, String> {
        let started = Instant::now();
        let cid = self.assign(vm)?;
        let p = self.paths(vm);
        if let Some(long) = p
            .sockets()
            .into_iter()
            .find(|s| s.as_os_str().len() > MAX_SOCKET_PATH)
        {
            return Err(format!(
                "the vsock socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter run_dir or VM name",
                long.display()
            ));
        }
        // A device left from an earlier run of this VM goes first.
        self.stop_device(&p, None).await;
        for s in p.sockets() {
            remove_quietly(s);
        }
        let listener = self.listen_unix(vm, &p.listener)?;
        lock(&self.active).insert(
            vm.to_string(),
            Active {
                listener: Some(listener),
                device: None,
            },
        );
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        let mut child = tokio::process::Command::new(binary)
            .arg("--guest-cid")
            .arg(cid.to_string())
            .arg("--socket")
            .arg(&p.vhost)
            .arg("--uds-path")
            .arg(&p.uds)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            // Its own process group: a signal aimed at weftd's group misses it, and it
            // outlives weftd as QEMU does.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let pid = child.id().unwrap_or(0);
        let (exit_tx, exit_rx) = watch::channel(false);
        let log_path = log.to_owned();
        tokio::spawn(async move {
            let status = child.wait().await;
            debug!(pid, ?status, log = %log_path.display(), "vhost-device-vsock exited");
            exit_tx.send_replace(true);
        });
        if let Some(a) = lock(&self.active).get_mut(vm) {
            a.device = Some(Device {
                pid,
                exited: Some(exit_rx.clone()),
            });
        }
        if let Err(e) = std::fs::write(&p.pid, format!("{pid}\n")) {
            return Err(format!("cannot write {}: {e}", p.pid.display()));
        }
        let deadline = Instant::now() + DEVICE_READY_TIMEOUT;
        loop {
            if *exit_rx.borrow() {
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                let tail: String = tail.lines().rev().take(3).collect::<Vec<_>>().join("; ");
                return Err(format!("{DEVICE_NAME} exited at start: {tail}"));
            }
            if unix_listening(&p.vhost) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{DEVICE_NAME} did not listen on {} within {}s",
                    p.vhost.display(),
                    DEVICE_READY_TIMEOUT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        info!(
            vm,
            cid,
            pid,
            ms = started.elapsed().as_millis() as u64,
            "vsock device ready"
        );
        Ok(VsockDevice::VhostUser { socket: p.vhost })
    }

    fn listen_unix(&self, vm: &str, path: &Path) -> Result<tokio::task::AbortHandle, String> {
        self.link
            .listen_unix(vm, path)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))
    }

    fn listen_kernel(self: &Arc<Self>) -> std::io::Result<()> {
        let listener = VsockListener::bind(DPA_PORT)?;
        let me = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            loop {
                let accepted = listener.accept().await;
                let Some(host) = me.upgrade() else { return };
                match accepted {
                    Ok((stream, cid)) => match host.active_vm_of_cid(cid) {
                        Some(vm) => host.link.accept(&vm, stream),
                        None => debug!(cid, "vsock connection from a CID of no running VM; closed"),
                    },
                    Err(e) => {
                        warn!(error = %e, "accept on the dpa vsock port failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        *lock(&self.kernel_listener) = Some(task.abort_handle());
        Ok(())
    }

    fn active_vm_of_cid(&self, cid: u32) -> Option<String> {
        let vm = self.cids.as_ref()?.vm_of(cid)?;
        lock(&self.active).contains_key(&vm).then_some(vm)
    }

    /// Stops `vm`'s device process (SIGTERM, then SIGKILL) if it runs: the one
    /// given, else the one its pid file names, if that is still our device.
    async fn stop_device(&self, p: &VsockPaths, known: Option<Device>) {
        let device = known.or_else(|| {
            read_pid(&p.pid)
                .filter(|pid| is_our_device(*pid, &p.vhost))
                .map(|pid| Device { pid, exited: None })
        });
        if let Some(Device { pid, exited }) = device {
            let gone = |exited: &Option<watch::Receiver<bool>>| match exited {
                Some(rx) => *rx.borrow(),
                None => !is_our_device(pid, &p.vhost),
            };
            for (sig, wait) in [
                (nix::sys::signal::Signal::SIGTERM, DEVICE_STOP_TIMEOUT),
                (nix::sys::signal::Signal::SIGKILL, DEVICE_KILL_TIMEOUT),
            ] {
                if gone(&exited) {
                    break;
                }
                signal(pid, sig);
                let deadline = Instant::now() + wait;
                while !gone(&exited) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            if !gone(&exited) {
                warn!(pid, "{DEVICE_NAME} did not exit after SIGKILL");
            }
        }
        remove_quietly(&p.pid);
    }

    /// Ends what `vm` has live (listener, connection, device process) and removes
    /// its sockets; its CID stays. For a VM that stopped or failed to start.
    pub async fn release(&self, vm: &str) {
        let active = lock(&self.active).remove(vm);
        let device = active.and_then(|a| {
            if let Some(l) = a.listener {
                l.abort();
            }
            a.device
        });
        self.link.disconnect(vm);
        let p = self.paths(vm);
        self.stop_device(&p, device).await;
        for s in p.sockets() {
            remove_quietly(s);
        }
    }

    /// [`VsockHost::release`], and gives the VM's CID back (the VM was deleted).
    pub async fn forget(&self, vm: &str) {
        self.release(vm).await;
        if let Some(cids) = &self.cids {
            if let Err(e) = cids.remove(vm) {
                warn!(vm, error = %e, "cannot give the vsock CID back");
            }
        }
        self.link.forget(vm);
    }

    /// After a weftd restart, for a VM whose QEMU still runs: adopts its device
    /// process and listens for its DPA again (kernel mode: accepts its CID again).
    pub async fn reattach(&self, vm: &str) {
        let p = self.paths(vm);
        if let Some(pid) = read_pid(&p.pid).filter(|pid| is_our_device(*pid, &p.vhost)) {
            remove_quietly(&p.listener);
            match self.listen_unix(vm, &p.listener) {
                Ok(listener) => {
                    lock(&self.active).insert(
                        vm.to_string(),
                        Active {
                            listener: Some(listener),
                            device: Some(Device { pid, exited: None }),
                        },
                    );
                    info!(vm, pid, "vsock device re-attached");
                }
                Err(e) => {
                    warn!(vm, error = %e, "vsock device runs but weftd cannot listen for its DPA")
                }
            }
            return;
        }
        if p.pid.exists() {
            warn!(
                vm,
                "the VM's vsock device is gone; its DPA can reach weftd again once the VM restarts"
            );
            remove_quietly(&p.pid);
            for s in p.sockets() {
                remove_quietly(s);
            }
            return;
        }
        if self.mode == Resolved::Kernel && self.cid(vm).is_some() {
            lock(&self.active).insert(vm.to_string(), Active::default());
        }
    }
}

impl Drop for VsockHost {
    fn drop(&mut self) {
        // Listener tasks end with the host; device processes are left to outlive
        // weftd (a restarted weftd adopts them).
        if let Some(l) = lock(&self.kernel_listener).take() {
            l.abort();
        }
        for (_, a) in lock(&self.active).drain() {
            if let Some(l) = a.listener {
                l.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_device_naming() {
        let p = VsockPaths::new(Path::new("/run/weft/vsock"), "web-1");
        assert_eq!(p.vhost, Path::new("/run/weft/vsock/web-1.vhost"));
        assert_eq!(p.uds, Path::new("/run/weft/vsock/web-1.vsock"));
        // vhost-device-vsock connects to <uds-path>_<port> for a guest's connection.
        assert_eq!(p.listener, Path::new("/run/weft/vsock/web-1.vsock_5150"));
    }

    #[test]
    fn binaries_are_found_by_path_or_name() {
        assert_eq!(
            find_binary(Path::new("/bin/sh")),
            Some(PathBuf::from("/bin/sh"))
        );
        assert!(find_binary(Path::new("sh")).is_some());
        assert_eq!(
            find_binary(Path::new("/nonexistent/vhost-device-vsock")),
            None
        );
        assert_eq!(find_binary(Path::new("no-such-binary-weft-test")), None);
    }

    #[tokio::test]
    async fn a_listening_socket_is_seen_without_connecting() {
        use tokio::net::UnixListener;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        assert!(!unix_listening(&path));
        let l = UnixListener::bind(&path).unwrap();
        assert!(unix_listening(&path));
        drop(l);
        // The file stays but nobody listens.
        assert!(!unix_listening(&path));
    }
}
