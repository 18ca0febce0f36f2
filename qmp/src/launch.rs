//! Building QEMU command lines and supervising QEMU processes.
//!
//! [`VmConfig`] is plain data (serde) so that callers can store it and build the same VM
//! again later. [`command_line`] turns it into arguments; [`spawn`] starts QEMU with them,
//! waits for its QMP socket and supervises the process.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

pub use weft_api::vm::{
    Accel, BackingImage, DiskConfig, DiskFormat, NicConfig, VhostUserDisk, VmConfig, VsockDevice,
};

use crate::{Error, Qmp};

/// Checks a configuration before QEMU sees it (QEMU options are built from it).
pub trait Validate {
    /// `Ok` if QEMU may be given this configuration, else [`Error::InvalidConfig`]
    /// saying what is wrong.
    fn validate(&self) -> Result<(), Error>;
}

/// Turns [`Accel::Auto`] into `Kvm` or `Tcg` by probing `/dev/kvm` (once per process).
pub fn resolve_accel(accel: Accel) -> Accel {
    match accel {
        Accel::Auto if kvm_usable() => Accel::Kvm,
        Accel::Auto => Accel::Tcg,
        other => other,
    }
}

/// Detects the format from the file's first bytes: the qcow2 magic `QFI\xfb`, else raw.
pub fn detect_format(path: &Path) -> io::Result<DiskFormat> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path)?;
    let mut got = 0;
    while got < magic.len() {
        match f.read(&mut magic[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(if got == 4 && &magic == b"QFI\xfb" {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    })
}

/// The QEMU device id of the vsock device ([`VmConfig::vsock`]); its chardev, for
/// vhost-user, is `vsock0-chr`.
pub const VSOCK_ID: &str = "vsock0";

/// The device id of the balloon ([`VmConfig::balloon`]).
pub const BALLOON_ID: &str = "balloon0";

/// The smallest guest memory accepted.
pub const MIN_MEMORY_MIB: u64 = 16;
/// The largest vCPU count accepted.
pub const MAX_CPUS: u32 = 64;

fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn valid_machine(machine: &str) -> bool {
    !machine.is_empty()
        && machine
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `id` can name a QEMU device or backend: 1 to 32 of `A-Z a-z 0-9 _ -`
/// (QEMU ids start with a letter).
pub fn valid_device_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id.as_bytes()[0].is_ascii_alphabetic()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `name` is a valid Linux interface name that is also safe in a QEMU option
/// value: 1 to 15 bytes of printable ASCII, none of `/ : , =` or whitespace, and not
/// `.` or `..`.
pub fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b':' | b',' | b'='))
}

/// Whether `mac` is a unicast MAC address written as exactly six pairs of hex digits
/// separated by `:` (a multicast address, low bit of the first octet set, or all
/// zeros is refused).
pub fn valid_mac(mac: &str) -> bool {
    let octets: Vec<&str> = mac.split(':').collect();
    octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
        && u8::from_str_radix(octets[0], 16).is_ok_and(|b| b & 1 == 0)
        && octets.iter().any(|o| *o != "00")
}

impl Validate for NicConfig {
    /// Checks the id, tap and MAC before any of them is put into QEMU's `-netdev` and
    /// `-device` options (where a `,` would add options of the caller's choosing).
    fn validate(&self) -> Result<(), Error> {
        if !valid_device_id(&self.id) {
            return Err(Error::InvalidConfig(format!(
                "NIC id {:?} must be 1 to 32 characters of A-Z, a-z, 0-9, '_' and '-', starting with a letter",
                self.id
            )));
        }
        if !valid_ifname(&self.tap) {
            return Err(Error::InvalidConfig(format!(
                "NIC {} tap {:?} must be an interface name of 1 to 15 printable characters without '/', ':', ',', '=' or spaces",
                self.id, self.tap
            )));
        }
        if !valid_mac(&self.mac) {
            return Err(Error::InvalidConfig(format!(
                "NIC {} MAC {:?} must be six hex pairs separated by ':' (a unicast address, e.g. 52:54:00:12:34:56)",
                self.id, self.mac
            )));
        }
        Ok(())
    }
}

impl Validate for VmConfig {
    /// Checks the configuration before QEMU sees it: disk names match `[a-z0-9_-]{1,32}`
    /// and are unique, memory is at least 16 MiB, 1 to 64 vCPUs, disk images exist and
    /// are regular files or block devices, kernel and initrd exist if given, a vsock
    /// device has a usable CID or an absolute socket path.
    fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if !valid_machine(&self.machine) {
            return bad(format!(
                "machine type {:?} must be non-empty and contain only letters, digits, '-', '_' and '.'",
                self.machine
            ));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return bad(format!(
                "memory of {} MiB is below the minimum of {MIN_MEMORY_MIB} MiB",
                self.memory_mib
            ));
        }
        // QEMU's -m takes the size in MiB with a suffix; keep it far from overflow.
        if self.memory_mib > (1 << 30) {
            return bad(format!("memory of {} MiB is too large", self.memory_mib));
        }
        if !(1..=MAX_CPUS).contains(&self.cpus) {
            return bad(format!(
                "{} vcpus is outside the range 1 to {MAX_CPUS}",
                self.cpus
            ));
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            return bad("an initrd was given without a kernel".into());
        }
        if self.append.is_some() && self.kernel.is_none() {
            return bad("a kernel command line was given without a kernel".into());
        }
        for (what, path) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if let Some(path) = path {
                match std::fs::metadata(path) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => {
                        return bad(format!("{what} {} is not a regular file", path.display()))
                    }
                    Err(e) => return bad(format!("{what} {}: {e}", path.display())),
                }
            }
        }
        match &self.vsock {
            Some(VsockDevice::Kernel { guest_cid }) if !(3..u32::MAX).contains(guest_cid) => {
                return bad(format!(
                    "vsock guest CID {guest_cid} is reserved; use 3 to {}",
                    u32::MAX - 1
                ));
            }
            Some(VsockDevice::VhostUser { socket }) if !socket.is_absolute() => {
                return bad(format!(
                    "vsock vhost-user socket {} is not an absolute path",
                    socket.display()
                ));
            }
            _ => {}
        }
        let mut seen = std::collections::HashSet::new();
        // Disk names: valid, and unique across both kinds of disk.
        let mut check_name = |name: &str| -> Result<(), Error> {
            if !valid_name(name) {
                return Err(Error::InvalidConfig(format!(
                    "disk name {name:?} must be 1 to 32 characters of a-z, 0-9, '_' and '-'"
                )));
            }
            if !seen.insert(name.to_string()) {
                return Err(Error::InvalidConfig(format!(
                    "disk name {name:?} is used twice"
                )));
            }
            Ok(())
        };
        for disk in &self.disks {
            check_name(&disk.name)?;
            check_chain(disk)?;
            match std::fs::metadata(&disk.path) {
                Ok(m) if m.is_file() || m.file_type().is_block_device() => {}
                Ok(_) => {
                    return bad(format!(
                        "disk {} image {} is neither a regular file nor a block device",
                        disk.name,
                        disk.path.display()
                    ))
                }
                Err(e) => {
                    return bad(format!(
                        "disk {} image {}: {e}",
                        disk.name,
                        disk.path.display()
                    ))
                }
            }
        }
        let (mut ids, mut taps) = (
            std::collections::HashSet::new(),
            std::collections::HashSet::new(),
        );
        for nic in &self.nics {
            nic.validate()?;
            if !ids.insert(&nic.id) {
                return bad(format!("NIC id {:?} is used twice", nic.id));
            }
            if !taps.insert(&nic.tap) {
                return bad(format!("tap {:?} is used by two NICs", nic.tap));
            }
        }
        for disk in &self.vhost_user_disks {
            check_name(&disk.name)?;
            if !disk.socket.is_absolute() {
                return bad(format!(
                    "disk {} vhost-user socket {} is not an absolute path",
                    disk.name,
                    disk.socket.display()
                ));
            }
            if !(1..=64).contains(&disk.queues) {
                return bad(format!(
                    "disk {}: {} queues is outside the range 1 to 64",
                    disk.name, disk.queues
                ));
            }
        }
        Ok(())
    }
}

/// The most images below a disk's top ([`DiskConfig::backing`]).
pub const MAX_BACKING_CHAIN: usize = 64;

/// A disk's chain: formats that can have a backing above the ones below, and a bound.
fn check_chain(disk: &DiskConfig) -> Result<(), Error> {
    let bad = |msg: String| Err(Error::InvalidConfig(msg));
    if disk.backing.len() > MAX_BACKING_CHAIN {
        return bad(format!(
            "disk {} has {} backing images; at most {MAX_BACKING_CHAIN}",
            disk.name,
            disk.backing.len()
        ));
    }
    let mut above = disk.format;
    for b in &disk.backing {
        if above == DiskFormat::Raw {
            return bad(format!(
                "disk {}: a raw image cannot have a backing image ({})",
                disk.name,
                b.path.display()
            ));
        }
        if !b.path.is_absolute() {
            return bad(format!(
                "disk {}: backing image {} is not an absolute path",
                disk.name,
                b.path.display()
            ));
        }
        above = b.format;
    }
    Ok(())
}

/// Where a QEMU process puts its sockets and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchPaths {
    /// The QMP unix socket QEMU listens on.
    pub qmp_socket: PathBuf,
    /// The file the guest's serial console is written to.
    pub serial_log: PathBuf,
    /// The file QEMU's own stdout and stderr go to.
    pub output_log: PathBuf,
    /// A pid file QEMU writes, if wanted.
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
}

/// Escapes a value for QEMU's `key=value,...` option syntax (a comma is doubled).
fn opt_escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

fn accel_name(accel: Accel) -> &'static str {
    match accel {
        Accel::Tcg => "tcg",
        Accel::Kvm => "kvm",
        // spawn() resolves Auto first; a bare command line lets QEMU fall back itself.
        Accel::Auto => "kvm:tcg",
    }
}

/// The `-blockdev` values of a disk, in JSON syntax (no escaping trouble with commas or
/// '=' in paths): a file node and a format node per image, the lowest image of the
/// chain first, the disk's own (`<name>-file`, `<name>-fmt`) last. The driver of every
/// node is named (no format probing), and every qcow2 node names its backing node, or
/// `null`, so QEMU never opens a file named by an image's header. Images below the top
/// are opened read-only (their file nodes with `auto-read-only`, so that a commit can
/// reopen them for writing). A block device needs QEMU's `host_device` driver rather
/// than `file`.
fn blockdev_json(disk: &DiskConfig) -> Vec<String> {
    let file_driver = |path: &Path| {
        let is_blk = std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        if is_blk {
            "host_device"
        } else {
            "file"
        }
    };
    let mut out = Vec::with_capacity(2 * (disk.backing.len() + 1));
    let mut below: Option<String> = None;
    for (i, b) in disk.backing.iter().enumerate().rev() {
        let (file_node, fmt_node) = (
            format!("{}-b{i}f", disk.name),
            format!("{}-b{i}", disk.name),
        );
        let file = serde_json::json!({
            "driver": file_driver(&b.path),
            "node-name": file_node,
            "filename": b.path.to_string_lossy(),
            "auto-read-only": true,
        });
        let mut fmt = serde_json::json!({
            "driver": b.format.driver(),
            "node-name": fmt_node,
            "file": file_node,
            "read-only": true,
        });
        if b.format == DiskFormat::Qcow2 {
            fmt["backing"] = below.map_or(serde_json::Value::Null, serde_json::Value::from);
        }
        out.push(file.to_string());
        out.push(fmt.to_string());
        below = Some(fmt_node);
    }
    let file = serde_json::json!({
        "driver": file_driver(&disk.path),
        "node-name": disk.file_node(),
        "filename": disk.path.to_string_lossy(),
        "read-only": disk.read_only,
    });
    let mut fmt = serde_json::json!({
        "driver": disk.format.driver(),
        "node-name": disk.format_node(),
        "file": disk.file_node(),
        "read-only": disk.read_only,
    });
    if disk.format == DiskFormat::Qcow2 {
        fmt["backing"] = below.map_or(serde_json::Value::Null, serde_json::Value::from);
    }
    out.push(file.to_string());
    out.push(fmt.to_string());
    out
}

/// The `qemu-storage-daemon` arguments that open `disks` under the same node names
/// QEMU uses (so the backup recipe is the same) with a QMP monitor on
/// `paths.qmp_socket`. Used to back up disks of a VM that is not running.
pub fn storage_daemon_command_line(disks: &[DiskConfig], paths: &LaunchPaths) -> Vec<String> {
    let mut args = Vec::new();
    for disk in disks {
        for node in blockdev_json(disk) {
            args.push("--blockdev".to_string());
            args.push(node);
        }
    }
    args.push("--chardev".into());
    args.push(format!(
        "socket,id=qmp,path={},server=on,wait=off",
        opt_escape(&paths.qmp_socket)
    ));
    args.push("--monitor".into());
    args.push("chardev=qmp".into());
    if let Some(pid_file) = &paths.pid_file {
        args.push("--pidfile".into());
        args.push(pid_file.to_string_lossy().into_owned());
    }
    args
}

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

/// The QEMU arguments (without the binary) for `config` and `paths`.
///
/// Pure apart from one `stat` per disk (a block device needs QEMU's `host_device`
/// driver rather than `file`). `Accel::Auto` becomes `accel=kvm:tcg` here; [`spawn`]
/// resolves it by probing first.
pub fn command_line(config: &VmConfig, paths: &LaunchPaths) -> Vec<String> {
    let mut args: Vec<String> = vec!["-nodefaults".into(), "-no-user-config".into()];
    let mut push = |a: &str, b: String| {
        args.push(a.to_owned());
        args.push(b);
    };
    push(
        "-machine",
        format!("{},accel={}", config.machine, accel_name(config.accel)),
    );
    if config.accel == Accel::Kvm {
        push("-cpu", "host".into());
    }
    push("-m", format!("{}M", config.memory_mib));
    push("-smp", config.cpus.to_string());
    if config.shared_memory || config.needs_shared_memory() {
        push(
            "-object",
            format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                config.memory_mib
            ),
        );
        push("-numa", "node,memdev=mem".into());
    }
    for disk in &config.disks {
        for node in blockdev_json(disk) {
            push("-blockdev", node);
        }
        push(
            "-device",
            format!(
                "virtio-blk-pci,drive={},id={}",
                disk.format_node(),
                disk.name
            ),
        );
    }
    for disk in &config.vhost_user_disks {
        push(
            "-chardev",
            format!(
                "socket,id={}-chr,path={},reconnect=1",
                disk.name,
                opt_escape(&disk.socket)
            ),
        );
        push(
            "-device",
            format!(
                "vhost-user-blk-pci,chardev={}-chr,id={},num-queues={}",
                disk.name, disk.name, disk.queues
            ),
        );
    }
    for nic in &config.nics {
        push(
            "-netdev",
            format!(
                "tap,id={},ifname={},script=no,downscript=no",
                nic.id, nic.tap
            ),
        );
        push(
            "-device",
            format!(
                "virtio-net-pci,netdev={},id={},mac={}",
                nic.id, nic.id, nic.mac
            ),
        );
    }
    if config.balloon {
        push("-device", format!("virtio-balloon-pci,id={BALLOON_ID}"));
    }
    match &config.vsock {
        None => {}
        Some(VsockDevice::Kernel { guest_cid }) => push(
            "-device",
            format!("vhost-vsock-pci,id={VSOCK_ID},guest-cid={guest_cid}"),
        ),
        Some(VsockDevice::VhostUser { socket }) => {
            push(
                "-chardev",
                format!("socket,id={VSOCK_ID}-chr,path={}", opt_escape(socket)),
            );
            push(
                "-device",
                format!("vhost-user-vsock-pci,id={VSOCK_ID},chardev={VSOCK_ID}-chr"),
            );
        }
    }
    push(
        "-chardev",
        format!("file,id=serial0,path={}", opt_escape(&paths.serial_log)),
    );
    push("-serial", "chardev:serial0".into());
    push(
        "-chardev",
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            opt_escape(&paths.qmp_socket)
        ),
    );
    push("-mon", "chardev=qmp,mode=control".into());
    if let Some(kernel) = &config.kernel {
        push("-kernel", kernel.to_string_lossy().into_owned());
    }
    if let Some(initrd) = &config.initrd {
        push("-initrd", initrd.to_string_lossy().into_owned());
    }
    if let Some(append) = &config.append {
        push("-append", append.clone());
    }
    if let Some(pid_file) = &paths.pid_file {
        push("-pidfile", pid_file.to_string_lossy().into_owned());
    }
    push("-display", "none".into());
    push("-vga", "none".into());
    args
}

/// How to start QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnOptions {
    /// The QEMU binary; a bare name is looked up in `PATH`.
    pub binary: PathBuf,
    /// How long QEMU may take until its QMP socket answers.
    pub ready_timeout: Duration,
    /// Start detached: dropping the [`QemuProcess`] leaves QEMU running.
    pub detached: bool,
    /// Run QEMU in this network namespace (a file such as `/run/netns/<name>`).
    pub netns: Option<PathBuf>,
    /// Run QEMU in these cgroup directories (one per hierarchy: a v2 group, or v1
    /// groups of the cpu and memory controllers on hybrid hosts); they must exist.
    pub cgroups: Vec<PathBuf>,
    /// QEMU's own seccomp filter ([`sandbox_args`]): obsolete calls, privilege changes,
    /// `fork`/`exec` and resource control denied. [`spawn`] only (qemu-storage-daemon
    /// 7.2 has no `-sandbox`).
    pub sandbox: bool,
    /// Drop to this user (a name, or `uid:gid`) with QEMU's `-runas` once QEMU has
    /// opened its devices, disks and sockets and before the guest runs. [`spawn`] only.
    pub run_as: Option<String>,
}

impl Default for SpawnOptions {
    fn default() -> Self {
        SpawnOptions {
            binary: PathBuf::from("qemu-system-x86_64"),
            ready_timeout: Duration::from_secs(30),
            detached: false,
            netns: None,
            cgroups: Vec::new(),
            sandbox: false,
            run_as: None,
        }
    }
}

/// Whether `user` can be given to QEMU's `-runas`: a user name (`[a-z_][a-z0-9_-]*`,
/// at most 32 characters, optionally ending in `$`) or `uid:gid` in digits. Nothing else
/// reaches the command line.
pub fn valid_run_as(user: &str) -> bool {
    let name = |s: &str| {
        let s = s.strip_suffix('$').unwrap_or(s);
        (1..=32).contains(&s.len())
            && s.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    };
    let digits = |s: &str| (1..=10).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    match user.split_once(':') {
        Some((u, g)) => digits(u) && digits(g),
        None => name(user),
    }
}

/// The hardening arguments of `opts` (appended by [`spawn`]):
/// `-sandbox on,obsolete=deny,elevateprivileges=…,spawn=deny,resourcecontrol=deny`
/// and `-runas USER`. QEMU 7.2 installs its filter before it drops to the `-runas`
/// user, so with `run_as` the privilege changes that drop needs stay allowed
/// (`elevateprivileges=allow`); once dropped, QEMU has no capabilities, runs with
/// `no_new_privs`, and cannot execute a set-uid program (`spawn=deny`), so those calls
/// give it nothing.
pub fn sandbox_args(opts: &SpawnOptions) -> Vec<String> {
    let mut args = Vec::new();
    if opts.sandbox {
        let elevate = if opts.run_as.is_some() {
            "allow"
        } else {
            "deny"
        };
        args.push("-sandbox".to_string());
        args.push(format!(
            "on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny"
        ));
    }
    if let Some(user) = &opts.run_as {
        args.push("-runas".to_string());
        args.push(user.clone());
    }
    args
}

/// How a QEMU process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit code, if it exited.
    pub code: Option<i32>,
    /// The signal, if a signal killed it.
    pub signal: Option<i32>,
    /// When the supervisor saw it end.
    pub at: SystemTime,
}

impl ExitInfo {
    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    fn from_status(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        ExitInfo {
            code: status.code(),
            signal: status.signal(),
            at: SystemTime::now(),
        }
    }

    fn unknown() -> Self {
        ExitInfo {
            code: None,
            signal: None,
            at: SystemTime::now(),
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(sig)) => write!(f, "killed by signal {sig}"),
            (None, None) => write!(f, "unknown exit status"),
        }
    }
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
    config.accel = resolve_accel(config.accel);
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

/// Whether a process with this pid exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid_t) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid_t <= 0 {
        // 0 and negative values address process groups, not a process.
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks that the pid exists and
    // that we may signal it. pid_t is positive, so it names a single process.
    let r = unsafe { libc::kill(pid_t, 0) };
    let exists = r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !exists {
        return false;
    }
    // A zombie still has a pid but is dead; state is the field after "(comm)".
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
            None => true,
        },
        Err(_) => true,
    }
}

/// Whether `pid` is a running QEMU process: its executable (or, if that cannot be read,
/// its `argv[0]`) has a file name starting with `qemu`.
pub fn is_qemu_process(pid: u32) -> bool {
    if pid == 0 || !process_alive(pid) {
        return false;
    }
    let is_qemu = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().starts_with("qemu"))
            .unwrap_or(false)
    };
    if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
        // A replaced binary reads as "/usr/bin/qemu-system-x86_64 (deleted)".
        return is_qemu(&exe);
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
            is_qemu(Path::new(&*String::from_utf8_lossy(argv0)))
        }
        Err(_) => false,
    }
}

/// Whether KVM works on this host (see [`kvm_probe`]). Probed once per process.
pub fn kvm_usable() -> bool {
    kvm_probe().is_ok()
}

/// Probes KVM through rust-vmm's `kvm-ioctls`, once per process: `/dev/kvm` must open,
/// report the stable API, create a VM, and offer in its supported CPUID the baseline
/// features QEMU's default CPU models ask of the host (SSE, SSE2, SSE3). Nested or
/// restricted hosts can pass the first three and fail the last; stock guest kernels then
/// hang at boot, which is why TCG is the default and `Auto` only picks KVM on a pass.
/// The error says what failed.
pub fn kvm_probe() -> Result<(), String> {
    static PROBE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    PROBE.get_or_init(probe_kvm).clone()
}

fn probe_kvm() -> Result<(), String> {
    use kvm_ioctls::Kvm;

    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(format!("/dev/kvm reports API version {version}, not 12"));
    }
    kvm.create_vm()
        .map_err(|e| format!("KVM cannot create a VM: {e}"))?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM cannot report its CPUID: {e}"))?;
    let leaf1 = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 1 && e.index == 0)
        .ok_or("KVM offers no CPUID leaf 1")?;
    let missing: Vec<&str> = [
        (leaf1.edx & (1 << 25) != 0, "sse"),
        (leaf1.edx & (1 << 26) != 0, "sse2"),
        (leaf1.ecx & 1 != 0, "sse3"),
    ]
    .iter()
    .filter(|(present, _)| !present)
    .map(|(_, name)| *name)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "KVM does not offer the CPU features guests need ({}); nested virtualization without them hangs guests",
            missing.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> LaunchPaths {
        LaunchPaths {
            qmp_socket: "/run/weft/vm1/qmp.sock".into(),
            serial_log: "/var/log/weft/vm,1/serial.log".into(),
            output_log: "/var/log/weft/vm1/qemu.log".into(),
            pid_file: Some("/run/weft/vm1/qemu.pid".into()),
        }
    }

    fn has_pair(args: &[String], a: &str, b: &str) -> bool {
        args.windows(2).any(|w| w[0] == a && w[1] == b)
    }

    #[test]
    fn command_line_basics() {
        let cfg = VmConfig {
            memory_mib: 512,
            cpus: 2,
            ..VmConfig::default()
        };
        let args = command_line(&cfg, &paths());
        assert!(has_pair(&args, "-machine", "q35,accel=tcg"), "{args:?}");
        assert!(has_pair(&args, "-m", "512M"));
        assert!(has_pair(&args, "-smp", "2"));
        assert!(has_pair(&args, "-display", "none"));
        assert!(has_pair(&args, "-vga", "none"));
        assert!(args.iter().any(|a| a == "-nodefaults"));
        assert!(args.iter().any(|a| a == "-no-user-config"));
        assert!(has_pair(
            &args,
            "-chardev",
            "socket,id=qmp,path=/run/weft/vm1/qmp.sock,server=on,wait=off"
        ));
        assert!(has_pair(&args, "-mon", "chardev=qmp,mode=control"));
        // Commas in option values are doubled.
        assert!(has_pair(
            &args,
            "-chardev",
            "file,id=serial0,path=/var/log/weft/vm,,1/serial.log"
        ));
        assert!(has_pair(&args, "-serial", "chardev:serial0"));
        assert!(has_pair(&args, "-pidfile", "/run/weft/vm1/qemu.pid"));
        assert!(has_pair(&args, "-device", "virtio-balloon-pci,id=balloon0"));
        let no_balloon = VmConfig {
            balloon: false,
            ..cfg.clone()
        };
        assert!(!command_line(&no_balloon, &paths())
            .iter()
            .any(|a| a.contains("virtio-balloon")));
        for absent in [
            "-kernel",
            "-initrd",
            "-append",
            "-object",
            "-numa",
            "-blockdev",
            "-netdev",
            "-cpu",
        ] {
            assert!(!args.iter().any(|a| a == absent), "{absent} in {args:?}");
        }
    }

    #[test]
    fn command_line_nics() {
        let config = VmConfig {
            nics: vec![NicConfig {
                id: "net0".into(),
                tap: "weft-tap0".into(),
                mac: "52:54:00:12:34:56".into(),
            }],
            ..VmConfig::default()
        };
        let paths = LaunchPaths {
            qmp_socket: "/run/q.sock".into(),
            serial_log: "/tmp/s.log".into(),
            output_log: "/tmp/o.log".into(),
            pid_file: None,
        };
        let args = command_line(&config, &paths);
        let joined = args.join(" ");
        assert!(
            joined.contains("-netdev tap,id=net0,ifname=weft-tap0,script=no,downscript=no"),
            "{joined}"
        );
        assert!(
            joined.contains("-device virtio-net-pci,netdev=net0,id=net0,mac=52:54:00:12:34:56"),
            "{joined}"
        );
        // Configs stored before NICs existed still read.
        let old: VmConfig = serde_json::from_str(r#"{"memory_mib": 64, "disks": []}"#).unwrap();
        assert!(old.nics.is_empty());
        // ... and get the balloon device.
        assert!(old.balloon);
    }

    #[test]
    fn nic_validation_refuses_qemu_option_injection() {
        let nic = |id: &str, tap: &str, mac: &str| NicConfig {
            id: id.into(),
            tap: tap.into(),
            mac: mac.into(),
        };
        nic("net0", "weft-tap0", "52:54:00:12:34:56")
            .validate()
            .expect("valid");
        nic("Net_1-a", "tap.x@1", "02:AB:cd:00:00:01")
            .validate()
            .expect("valid");
        for mac in [
            "52:54:00:12:34:56,romfile=/etc/hostname",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52-54-00-12-34-56",
            "52:54:00:12:34:5g",
            "525:4:00:12:34:56",
            "+2:54:00:12:34:56",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
            "",
        ] {
            assert!(
                nic("net0", "tap0", mac).validate().is_err(),
                "MAC {mac:?} was accepted"
            );
        }
        for tap in [
            "",
            ".",
            "..",
            "a/b",
            "tap0,script=/x",
            "tap=1",
            "tap 0",
            "tap\t0",
            "eth0:1",
            "sixteen-bytes-xx",
            "tāp",
        ] {
            assert!(
                nic("net0", tap, "52:54:00:12:34:56").validate().is_err(),
                "tap {tap:?} was accepted"
            );
        }
        for id in [
            "",
            "0net",
            "net0,romfile=/x",
            "net.0",
            "n e t",
            &"n".repeat(33),
        ] {
            assert!(
                nic(id, "tap0", "52:54:00:12:34:56").validate().is_err(),
                "id {id:?} was accepted"
            );
        }
        // Twice the same id or tap in one configuration.
        let twice = |a: NicConfig, b: NicConfig| VmConfig {
            nics: vec![a, b],
            ..VmConfig::default()
        };
        let mac = "52:54:00:12:34:56";
        assert!(twice(nic("net0", "t0", mac), nic("net0", "t1", mac))
            .validate()
            .is_err());
        assert!(twice(nic("net0", "t0", mac), nic("net1", "t0", mac))
            .validate()
            .is_err());
        twice(nic("net0", "t0", mac), nic("net1", "t1", mac))
            .validate()
            .expect("valid");
        let bad = VmConfig {
            nics: vec![nic(
                "net0",
                "tap0",
                "52:54:00:12:34:56,romfile=/etc/hostname",
            )],
            ..VmConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn command_line_vhost_user_disks() {
        let config = VmConfig {
            vhost_user_disks: vec![VhostUserDisk {
                name: "vdb".into(),
                socket: "/run/weft/blk/w1,vdb.sock".into(),
                queues: 2,
            }],
            ..VmConfig::default()
        };
        config.validate().unwrap();
        let args = command_line(&config, &paths());
        assert!(has_pair(
            &args,
            "-chardev",
            "socket,id=vdb-chr,path=/run/weft/blk/w1,,vdb.sock,reconnect=1"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "vhost-user-blk-pci,chardev=vdb-chr,id=vdb,num-queues=2"
        ));
        // vhost-user needs guest memory in a shared memfd.
        assert!(
            args.iter().any(|a| a.starts_with("memory-backend-memfd")),
            "{args:?}"
        );
        let bad = |d: VhostUserDisk| {
            VmConfig {
                vhost_user_disks: vec![d],
                ..VmConfig::default()
            }
            .validate()
            .unwrap_err()
            .to_string()
        };
        let d = config.vhost_user_disks[0].clone();
        assert!(bad(VhostUserDisk {
            socket: "rel.sock".into(),
            ..d.clone()
        })
        .contains("absolute"));
        assert!(bad(VhostUserDisk {
            queues: 0,
            ..d.clone()
        })
        .contains("queues"));
        assert!(bad(VhostUserDisk {
            name: "A B".into(),
            ..d
        })
        .contains("disk name"));
        // Stored configurations without the field still read.
        let old: VmConfig = serde_json::from_str(r#"{"memory_mib": 64}"#).unwrap();
        assert!(old.vhost_user_disks.is_empty());
    }

    #[test]
    fn command_line_vsock() {
        let none = command_line(&VmConfig::default(), &paths());
        assert!(!none.iter().any(|a| a.contains("vsock")), "{none:?}");
        let kernel = VmConfig {
            vsock: Some(VsockDevice::Kernel { guest_cid: 42 }),
            ..VmConfig::default()
        };
        let args = command_line(&kernel, &paths());
        assert!(has_pair(
            &args,
            "-device",
            "vhost-vsock-pci,id=vsock0,guest-cid=42"
        ));
        // The kernel device reads guest memory itself: no memfd needed.
        assert!(!args.iter().any(|a| a == "-numa"), "{args:?}");
        let user = VmConfig {
            vsock: Some(VsockDevice::VhostUser {
                socket: "/run/weft/vsock/a,b.vhost".into(),
            }),
            ..VmConfig::default()
        };
        let args = command_line(&user, &paths());
        assert!(has_pair(
            &args,
            "-chardev",
            "socket,id=vsock0-chr,path=/run/weft/vsock/a,,b.vhost"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "vhost-user-vsock-pci,id=vsock0,chardev=vsock0-chr"
        ));
        // vhost-user needs shared guest memory even when the config did not ask for it.
        assert!(has_pair(
            &args,
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on"
        ));
        assert!(has_pair(&args, "-numa", "node,memdev=mem"));

        user.validate().expect("valid");
        kernel.validate().expect("valid");
        for cid in [0, 2, u32::MAX] {
            let bad = VmConfig {
                vsock: Some(VsockDevice::Kernel { guest_cid: cid }),
                ..VmConfig::default()
            };
            assert!(matches!(bad.validate(), Err(Error::InvalidConfig(m)) if m.contains("CID")));
        }
        let relative = VmConfig {
            vsock: Some(VsockDevice::VhostUser {
                socket: "vsock.sock".into(),
            }),
            ..VmConfig::default()
        };
        assert!(relative.validate().is_err());

        // Stored without the field: no device; with it, it round-trips; absent is not written.
        let old: VmConfig = serde_json::from_str(r#"{"memory_mib": 64}"#).expect("reads");
        assert_eq!(old.vsock, None);
        assert!(!serde_json::to_string(&old).expect("ser").contains("vsock"));
        let json = serde_json::to_string(&user).expect("ser");
        assert!(json.contains(r#""kind":"vhost-user""#), "{json}");
        assert_eq!(serde_json::from_str::<VmConfig>(&json).expect("de"), user);
    }

    #[test]
    fn command_line_accel() {
        let mut cfg = VmConfig {
            accel: Accel::Kvm,
            ..VmConfig::default()
        };
        let args = command_line(&cfg, &paths());
        assert!(has_pair(&args, "-machine", "q35,accel=kvm"));
        assert!(has_pair(&args, "-cpu", "host"));
        cfg.accel = Accel::Auto;
        assert!(has_pair(
            &command_line(&cfg, &paths()),
            "-machine",
            "q35,accel=kvm:tcg"
        ));
        assert_ne!(resolve_accel(Accel::Auto), Accel::Auto);
    }

    #[test]
    fn command_line_shared_memory_kernel_and_disks() {
        let cfg = VmConfig {
            memory_mib: 1024,
            shared_memory: true,
            kernel: Some("/boot/vmlinuz".into()),
            initrd: Some("/boot/initrd.img".into()),
            append: Some("console=ttyS0 quiet".into()),
            disks: vec![
                DiskConfig {
                    name: "vda".into(),
                    path: "/images/a,b.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    read_only: false,
                    backing: Vec::new(),
                },
                DiskConfig {
                    name: "vdb".into(),
                    path: "/images/data.raw".into(),
                    format: DiskFormat::Raw,
                    read_only: true,
                    backing: Vec::new(),
                },
            ],
            ..VmConfig::default()
        };
        let args = command_line(&cfg, &paths());
        assert!(has_pair(
            &args,
            "-object",
            "memory-backend-memfd,id=mem,size=1024M,share=on"
        ));
        assert!(has_pair(&args, "-numa", "node,memdev=mem"));
        assert!(has_pair(&args, "-kernel", "/boot/vmlinuz"));
        assert!(has_pair(&args, "-initrd", "/boot/initrd.img"));
        assert!(has_pair(&args, "-append", "console=ttyS0 quiet"));
        assert!(has_pair(
            &args,
            "-device",
            "virtio-blk-pci,drive=vda-fmt,id=vda"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "virtio-blk-pci,drive=vdb-fmt,id=vdb"
        ));
        let blockdevs: Vec<serde_json::Value> = args
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).expect("blockdev is json"))
            .collect();
        assert_eq!(
            blockdevs,
            vec![
                serde_json::json!({"driver": "file", "node-name": "vda-file", "filename": "/images/a,b.qcow2", "read-only": false}),
                serde_json::json!({"driver": "qcow2", "node-name": "vda-fmt", "file": "vda-file", "read-only": false, "backing": null}),
                serde_json::json!({"driver": "file", "node-name": "vdb-file", "filename": "/images/data.raw", "read-only": true}),
                serde_json::json!({"driver": "raw", "node-name": "vdb-fmt", "file": "vdb-file", "read-only": true}),
            ]
        );
        // Disk nodes come before the devices that use them.
        let pos = |s: &str| args.iter().position(|a| a == s).expect("present");
        assert!(pos("-blockdev") < pos("-device"));
    }

    /// Every node of a chain is named, lowest first; each qcow2 names its backing node
    /// or null, so QEMU opens nothing an image's header names.
    #[test]
    fn command_line_pins_backing_chains() {
        let top = DiskConfig {
            name: "vda".into(),
            path: "/d/top.qcow2".into(),
            format: DiskFormat::Qcow2,
            read_only: false,
            backing: vec![
                BackingImage {
                    path: "/d/mid.qcow2".into(),
                    format: DiskFormat::Qcow2,
                },
                BackingImage {
                    path: "/img/base.raw".into(),
                    format: DiskFormat::Raw,
                },
            ],
        };
        let cfg = VmConfig {
            disks: vec![top.clone()],
            ..VmConfig::default()
        };
        let nodes: Vec<serde_json::Value> = command_line(&cfg, &paths())
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).expect("json"))
            .collect();
        assert_eq!(
            nodes,
            vec![
                serde_json::json!({"driver": "file", "node-name": "vda-b1f", "filename": "/img/base.raw", "auto-read-only": true}),
                serde_json::json!({"driver": "raw", "node-name": "vda-b1", "file": "vda-b1f", "read-only": true}),
                serde_json::json!({"driver": "file", "node-name": "vda-b0f", "filename": "/d/mid.qcow2", "auto-read-only": true}),
                serde_json::json!({"driver": "qcow2", "node-name": "vda-b0", "file": "vda-b0f", "read-only": true, "backing": "vda-b1"}),
                serde_json::json!({"driver": "file", "node-name": "vda-file", "filename": "/d/top.qcow2", "read-only": false}),
                serde_json::json!({"driver": "qcow2", "node-name": "vda-fmt", "file": "vda-file", "read-only": false, "backing": "vda-b0"}),
            ]
        );
        // The storage daemon opens the same nodes.
        let daemon = storage_daemon_command_line(std::slice::from_ref(&top), &paths());
        assert_eq!(daemon.iter().filter(|a| *a == "--blockdev").count(), 6);
        // Rebasing after a commit keeps what lies below; a new top goes over all.
        let committed = top.rebased_to(Path::new("/d/mid.qcow2")).expect("in chain");
        assert_eq!(committed.path, Path::new("/d/mid.qcow2"));
        assert_eq!(committed.backing, top.backing[1..].to_vec());
        assert!(top.rebased_to(Path::new("/elsewhere")).is_none());
        let over = top.under(Path::new("/d/new.qcow2"));
        assert_eq!(over.backing.len(), 3);
        assert_eq!(over.backing[0].path, Path::new("/d/top.qcow2"));
        // A raw image cannot have a backing; chains are bounded and absolute.
        let bad = |d: DiskConfig| check_chain(&d).unwrap_err().to_string();
        let raw_top = DiskConfig {
            format: DiskFormat::Raw,
            ..top.clone()
        };
        assert!(bad(raw_top).contains("raw image cannot"));
        let mut relative = top.clone();
        relative.backing[0].path = "mid.qcow2".into();
        assert!(bad(relative).contains("absolute"));
        let mut long = top.clone();
        long.backing = vec![top.backing[0].clone(); MAX_BACKING_CHAIN + 1];
        assert!(bad(long).contains("at most"));
        // Stored without the field: no chain, and it is not written when empty.
        let old: DiskConfig = serde_json::from_str(r#"{"name":"vda","path":"/x"}"#).expect("reads");
        assert!(old.backing.is_empty());
        assert!(!serde_json::to_string(&old)
            .expect("ser")
            .contains("backing"));
    }

    fn disk_file(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        File::create(&p)
            .expect("create")
            .set_len(1 << 20)
            .expect("set_len");
        p
    }

    #[test]
    fn validate_accepts_good_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = VmConfig {
            disks: vec![
                DiskConfig {
                    name: "vda".into(),
                    path: disk_file(dir.path(), "a.raw"),
                    format: DiskFormat::Raw,
                    read_only: false,
                    backing: Vec::new(),
                },
                DiskConfig {
                    name: "data_1-x".into(),
                    path: disk_file(dir.path(), "b.raw"),
                    format: DiskFormat::Raw,
                    read_only: true,
                    backing: Vec::new(),
                },
            ],
            ..VmConfig::default()
        };
        cfg.validate().expect("valid");
        VmConfig::default().validate().expect("default is valid");
    }

    #[test]
    fn validate_rejects_bad_configs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = disk_file(dir.path(), "a.raw");
        let disk = |name: &str, path: &Path| DiskConfig {
            name: name.into(),
            path: path.to_owned(),
            format: DiskFormat::Raw,
            read_only: false,
            backing: Vec::new(),
        };
        let cases: Vec<(&str, VmConfig)> = vec![
            (
                "memory",
                VmConfig {
                    memory_mib: 15,
                    ..VmConfig::default()
                },
            ),
            (
                "vcpus",
                VmConfig {
                    cpus: 0,
                    ..VmConfig::default()
                },
            ),
            (
                "vcpus",
                VmConfig {
                    cpus: 65,
                    ..VmConfig::default()
                },
            ),
            (
                "machine",
                VmConfig {
                    machine: "q35,accel=kvm".into(),
                    ..VmConfig::default()
                },
            ),
            (
                "machine",
                VmConfig {
                    machine: String::new(),
                    ..VmConfig::default()
                },
            ),
            (
                "disk name",
                VmConfig {
                    disks: vec![disk("VDA", &good)],
                    ..VmConfig::default()
                },
            ),
            (
                "disk name",
                VmConfig {
                    disks: vec![disk("", &good)],
                    ..VmConfig::default()
                },
            ),
            (
                "disk name",
                VmConfig {
                    disks: vec![disk(&"a".repeat(33), &good)],
                    ..VmConfig::default()
                },
            ),
            (
                "disk name",
                VmConfig {
                    disks: vec![disk("a,b", &good)],
                    ..VmConfig::default()
                },
            ),
            (
                "used twice",
                VmConfig {
                    disks: vec![disk("vda", &good), disk("vda", &good)],
                    ..VmConfig::default()
                },
            ),
            (
                "missing.raw",
                VmConfig {
                    disks: vec![disk("vda", &dir.path().join("missing.raw"))],
                    ..VmConfig::default()
                },
            ),
            (
                "neither",
                VmConfig {
                    disks: vec![disk("vda", dir.path())],
                    ..VmConfig::default()
                },
            ),
            (
                "kernel",
                VmConfig {
                    kernel: Some(dir.path().join("nokernel")),
                    ..VmConfig::default()
                },
            ),
            (
                "initrd",
                VmConfig {
                    kernel: Some(good.clone()),
                    initrd: Some(dir.path().join("noinitrd")),
                    ..VmConfig::default()
                },
            ),
            (
                "without a kernel",
                VmConfig {
                    initrd: Some(good.clone()),
                    ..VmConfig::default()
                },
            ),
            (
                "without a kernel",
                VmConfig {
                    append: Some("quiet".into()),
                    ..VmConfig::default()
                },
            ),
        ];
        for (needle, cfg) in cases {
            match cfg.validate() {
                Err(Error::InvalidConfig(msg)) => {
                    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}")
                }
                other => panic!("{cfg:?} gave {other:?}, want InvalidConfig({needle})"),
            }
        }
        // The longest allowed name is fine.
        VmConfig {
            disks: vec![disk(&"a".repeat(32), &good)],
            ..VmConfig::default()
        }
        .validate()
        .expect("32-character name");
    }

    #[test]
    fn serde_round_trip_and_defaults() {
        let cfg = VmConfig {
            accel: Accel::Auto,
            shared_memory: true,
            kernel: Some("/k".into()),
            append: Some("console=ttyS0".into()),
            disks: vec![DiskConfig {
                name: "vda".into(),
                path: "/d.qcow2".into(),
                format: DiskFormat::Qcow2,
                read_only: true,
                backing: Vec::new(),
            }],
            ..VmConfig::default()
        };
        let json = serde_json::to_string(&cfg).expect("serializes");
        assert!(json.contains(r#""accel":"auto""#), "{json}");
        assert!(json.contains(r#""format":"qcow2""#), "{json}");
        let back: VmConfig = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, cfg);

        // Older or partial configs read with defaults; unknown fields are ignored.
        let old: VmConfig = serde_json::from_str(
            r#"{"memory_mib": 64, "disks": [{"name": "vda", "path": "/x"}], "from_the_future": 1}"#,
        )
        .expect("deserializes");
        assert_eq!(old.memory_mib, 64);
        assert_eq!(old.machine, "q35");
        assert_eq!(old.accel, Accel::Tcg);
        assert_eq!(old.cpus, 1);
        assert_eq!(old.disks[0].format, DiskFormat::Raw);
        assert!(!old.disks[0].read_only);

        let p = paths();
        let back: LaunchPaths =
            serde_json::from_str(&serde_json::to_string(&p).expect("ser")).expect("de");
        assert_eq!(back, p);
    }

    #[test]
    fn formats_are_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = dir.path().join("q");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03rest").expect("write");
        assert_eq!(detect_format(&q).expect("detect"), DiskFormat::Qcow2);
        let r = dir.path().join("r");
        std::fs::write(&r, b"QFI").expect("write");
        assert_eq!(detect_format(&r).expect("detect"), DiskFormat::Raw);
        std::fs::write(&r, [0u8; 512]).expect("write");
        assert_eq!(detect_format(&r).expect("detect"), DiskFormat::Raw);
        assert!(detect_format(&dir.path().join("none")).is_err());
    }

    #[test]
    fn sandbox_and_run_as_arguments() {
        assert!(sandbox_args(&SpawnOptions::default()).is_empty());
        let sandboxed = SpawnOptions {
            sandbox: true,
            ..SpawnOptions::default()
        };
        assert_eq!(
            sandbox_args(&sandboxed),
            vec![
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ]
        );
        let dropped = SpawnOptions {
            run_as: Some("weft-qemu".into()),
            ..sandboxed
        };
        assert_eq!(
            sandbox_args(&dropped),
            vec![
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
                "-runas",
                "weft-qemu"
            ]
        );
        for ok in ["weft-qemu", "qemu", "_q1", "107:107", "machine$"] {
            assert!(valid_run_as(ok), "{ok}");
        }
        for bad in [
            "",
            "Qemu",
            "a,b",
            "1:",
            ":1",
            "-x",
            "a b",
            "root:0",
            &"a".repeat(33),
        ] {
            assert!(!valid_run_as(bad), "{bad}");
        }
    }

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
    fn process_helpers() {
        let me = std::process::id();
        assert!(process_alive(me));
        assert!(!process_alive(0));
        assert!(!process_alive(u32::MAX));
        // The test binary is not QEMU.
        assert!(!is_qemu_process(me));
        assert!(!is_qemu_process(0));
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
