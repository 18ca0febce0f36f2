//! Every VM's vsock device and the listener its DPA reaches weftd on.
//!
//! With the kernel's vhost-vsock, QEMU gets `vhost-vsock-pci,guest-cid=N` and one
//! AF_VSOCK listener on port 5150 serves all VMs, telling them apart by the peer's
//! CID. With vhost-user, weftd starts one `vhost-device-vsock` per VM before QEMU;
//! a guest connection to CID 2 port P arrives on the unix socket `<uds-path>_P`, and
//! weftd listens on `<uds-path>_5150` for that VM alone. The device process outlives
//! weftd like QEMU does (own process group, a pid file); a restarted weftd adopts it
//! and listens again. It is stopped when its VM stops or is deleted.
//!
//! The device handles the guest's virtqueues, so it is confined ([`super::confine`]):
//! it runs as its own user (by default one per VM), without capabilities, with
//! no_new_privs and a seccomp filter, in `<run_dir>/vsock/<vm>/`, a directory of
//! that user holding only the VM's three sockets; the rest of `<run_dir>/vsock` (pid
//! files, other VMs) stays root's.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, info, warn};
use weft_qmp::launch::VsockDevice;
use weft_qmp::process::{Ended, Helper, Signature, Stop};

use super::cids::CidTable;
use super::confine::{DeviceUser, Ids, Jail};
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

/// The files of one VM's vhost-user vsock device: its sockets in the VM's own
/// directory `<run_dir>/vsock/<vm>/` (mode 0700, owned by the device's user), its
/// pid file in `<run_dir>/vsock` (mode 0700, weftd's only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockPaths {
    /// The VM's directory: the device's working directory, holding its sockets.
    pub dir: PathBuf,
    /// The vhost-user socket QEMU connects to.
    pub vhost: PathBuf,
    /// The device's `--uds-path`: host-initiated connections go here.
    pub uds: PathBuf,
    /// `<uds>_5150`, where weftd accepts this VM's DPA connections.
    pub listener: PathBuf,
    /// The device process's pid.
    pub pid: PathBuf,
    /// Where weftd binds the listener before moving it into `dir` (in weftd's own
    /// directory, so that it is never chmod-ed where the device's user can swap it).
    listener_tmp: PathBuf,
}

/// The device's socket names, relative to its directory (as the device binds them).
const VHOST_NAME: &str = "vhost";
const UDS_NAME: &str = "vsock";

impl VsockPaths {
    /// The paths of `vm` under `dir`.
    pub fn new(dir: &Path, vm: &str) -> VsockPaths {
        let vm_dir = dir.join(vm);
        VsockPaths {
            vhost: vm_dir.join(VHOST_NAME),
            uds: vm_dir.join(UDS_NAME),
            listener: vm_dir.join(format!("{UDS_NAME}_{DPA_PORT}")),
            pid: dir.join(format!("{vm}.vsock.pid")),
            listener_tmp: dir.join(format!("{vm}.listen.tmp")),
            dir: vm_dir,
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

/// How device processes are confined.
#[derive(Debug, Clone)]
struct Confinement {
    user: DeviceUser,
    id_base: u32,
    seccomp: bool,
}

/// A running device process.
struct Device {
    /// Followed by a pidfd since weftd started it or found it.
    process: Helper,
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
    confinement: Confinement,
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

/// What the command line of `p`'s device process shows: the device's name, and the
/// VM's directory as its working directory (weftd makes one per VM and starts the
/// device in it), so that a recycled pid is never taken for it.
fn device_signature(p: &VsockPaths) -> Signature {
    Signature::any().containing(DEVICE_NAME).cwd(&p.dir)
}

/// Whether process `pid` listens on a unix socket it bound as `name` (the path as
/// the process gave it, here relative to its working directory), from its
/// descriptors and `/proc/net/unix`: no connection is made.
fn process_listening(pid: u32, name: &str) -> bool {
    const SO_ACCEPTCON: u32 = 0x0001_0000;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let inodes: std::collections::HashSet<String> = fds
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?;
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() >= 8
            && f[7..].join(" ") == name
            && inodes.contains(f[6])
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & SO_ACCEPTCON != 0)
    })
}

/// The ids owning `dir` (the device's, for a VM directory weftd made).
fn owner_of(dir: &Path) -> Option<Ids> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(dir).ok()?;
    Some(Ids {
        uid: m.uid(),
        gid: m.gid(),
    })
}

/// Removes a VM's directory and what is in it (symbolic links are removed, never
/// followed).
fn remove_dir_quietly(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(path = %dir.display(), error = %e, "cannot remove");
        }
    }
}

/// Makes a VM's directory, 0700, owned by the device's user (root's when None).
fn make_vm_dir(dir: &Path, ids: Option<Ids>) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    if let Some(i) = ids {
        std::os::unix::fs::lchown(dir, Some(i.uid), Some(i.gid))?;
    }
    Ok(())
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
            confinement: Confinement {
                user: settings.device_user.clone(),
                id_base: settings.device_id_base,
                seccomp: settings.device_seccomp,
            },
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
        let c = &self.confinement;
        let ids = c.user.ids(c.id_base, cid)?;
        // A device left from an earlier run of this VM goes first, and so does its
        // directory (whatever that device's user left in it).
        self.stop_device(&p, None).await;
        remove_dir_quietly(&p.dir);
        make_vm_dir(&p.dir, ids).map_err(|e| format!("cannot make {}: {e}", p.dir.display()))?;
        let listener = self.listen_unix(vm, &p, ids)?;
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
        // Paths relative to its directory: its user needs no access to the parents.
        let args: Vec<std::ffi::OsString> = vec![
            "--guest-cid".into(),
            cid.to_string().into(),
            "--socket".into(),
            VHOST_NAME.into(),
            "--uds-path".into(),
            UDS_NAME.into(),
        ];
        let jail = Jail::new(binary, &args, &p.dir, ids, c.seccomp)
            .map_err(|e| format!("cannot prepare {}: {e}", binary.display()))?;
        let mut cmd = tokio::process::Command::new(binary);
        cmd.args(&args)
            .current_dir(&p.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            // Its own process group: a signal aimed at weftd's group misses it, and it
            // outlives weftd as QEMU does.
            .process_group(0)
            .kill_on_drop(false);
        // SAFETY: `enter` makes only async-signal-safe system calls on memory the
        // jail prepared before the fork, as a pre_exec hook requires.
        unsafe {
            cmd.pre_exec(move || jail.enter());
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let pid = child.id().unwrap_or(0);
        // Dying here leaves a device with no pid file: `stop_device` finds it by its
        // working directory.
        crate::testpoints::point("vsock.spawned").await;
        // Followed from now on, before anything can reap it.
        let process = Helper::child(pid);
        let (exit_tx, exit_rx) = watch::channel(false);
        let log_path = log.to_owned();
        tokio::spawn(async move {
            let status = child.wait().await;
            debug!(pid, ?status, log = %log_path.display(), "vhost-device-vsock exited");
            exit_tx.send_replace(true);
        });
        if let Some(a) = lock(&self.active).get_mut(vm) {
            a.device = process.map(|process| Device { process });
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
            if process_listening(pid, VHOST_NAME) {
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
            uid = ids.map_or(0, |i| i.uid),
            seccomp = c.seccomp,
            ms = started.elapsed().as_millis() as u64,
            "vsock device ready"
        );
        Ok(VsockDevice::VhostUser { socket: p.vhost })
    }

    /// Listens for `vm`'s DPA on `p.listener`, for connections of the device's user
    /// (`ids`, root when None). Bound and given to that user in weftd's directory,
    /// then moved into the VM's: nothing is changed by path where the device's user
    /// could swap the file.
    fn listen_unix(
        &self,
        vm: &str,
        p: &VsockPaths,
        ids: Option<Ids>,
    ) -> Result<tokio::task::AbortHandle, String> {
        let peer = ids.map_or(0, |i| i.uid);
        let tmp = &p.listener_tmp;
        let task = self
            .link
            .listen_unix_for(vm, tmp, peer)
            .map_err(|e| format!("cannot listen on {}: {e}", tmp.display()))?;
        let moved = ids
            .map_or(Ok(()), |i| {
                std::os::unix::fs::lchown(tmp, Some(i.uid), Some(i.gid))
            })
            .and_then(|()| std::fs::rename(tmp, &p.listener));
        if let Err(e) = moved {
            task.abort();
            remove_quietly(tmp);
            return Err(format!("cannot listen on {}: {e}", p.listener.display()));
        }
        Ok(task)
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
        let ours = device_signature(p);
        let device = known.map(|d| d.process).or_else(|| {
            Helper::from_pid_file(&p.pid, &ours)
                // A weftd that died between starting it and writing its pid file.
                .or_else(|| Helper::search(&ours))
        });
        if let Some(device) = device {
            let how = Stop::term_then_kill(DEVICE_STOP_TIMEOUT, DEVICE_KILL_TIMEOUT);
            if device.stop(how).await == Ended::Stuck {
                warn!(
                    pid = device.pid(),
                    "{DEVICE_NAME} did not exit after SIGKILL"
                );
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
        remove_dir_quietly(&p.dir);
        remove_quietly(&p.listener_tmp);
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
        if let Some(process) = Helper::from_pid_file(&p.pid, &device_signature(&p)) {
            let pid = process.pid();
            // The directory's owner is the device's user (weftd made it so).
            let ids = owner_of(&p.dir).filter(|i| i.uid != 0);
            match self.listen_unix(vm, &p, ids) {
                Ok(listener) => {
                    lock(&self.active).insert(
                        vm.to_string(),
                        Active {
                            listener: Some(listener),
                            device: Some(Device { process }),
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
            remove_dir_quietly(&p.dir);
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

/// The vsock host as a step of every launch: a guest gets its vsock device (decided at
/// each launch, never stored with the configuration) and its DPA listener.
impl crate::launch::LaunchHook for VsockHost {
    fn prepare<'a>(
        &'a self,
        cx: &'a crate::launch::LaunchContext<'a>,
        config: &'a mut weft_qmp::launch::VmConfig,
    ) -> futures::future::BoxFuture<'a, Result<(), crate::error::ApiError>> {
        Box::pin(async move {
            config.vsock = VsockHost::prepare(self, cx.env, &cx.dir.join("vsock.log")).await;
            Ok(())
        })
    }

    fn reattach<'a>(&'a self, env: &'a str) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(VsockHost::reattach(self, env))
    }

    fn release<'a>(&'a self, env: &'a str) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(VsockHost::release(self, env))
    }

    fn forget<'a>(&'a self, env: &'a str) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(VsockHost::forget(self, env))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_device_naming() {
        let p = VsockPaths::new(Path::new("/run/weft/vsock"), "web-1");
        assert_eq!(p.dir, Path::new("/run/weft/vsock/web-1"));
        assert_eq!(p.vhost, Path::new("/run/weft/vsock/web-1/vhost"));
        assert_eq!(p.uds, Path::new("/run/weft/vsock/web-1/vsock"));
        // vhost-device-vsock connects to <uds-path>_<port> for a guest's connection.
        assert_eq!(p.listener, Path::new("/run/weft/vsock/web-1/vsock_5150"));
        // weftd's own files stay out of the device's directory.
        assert_eq!(p.pid, Path::new("/run/weft/vsock/web-1.vsock.pid"));
        assert!(!p.listener_tmp.starts_with(&p.dir));
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
