//! What QEMU is to run: the VM configuration ([`VmConfig`] and its parts), plain serde
//! data that callers store and build the same VM from again later, and the KVM probe
//! that resolves [`Accel::Auto`].

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The QEMU device id of the vsock device ([`VmConfig::vsock`]); its chardev, for
/// vhost-user, is `vsock0-chr`.
pub const VSOCK_ID: &str = "vsock0";

pub use weft_api::vm::{
    Accel, BackingImage, DiskConfig, DiskFormat, NicConfig, VhostUserDisk, VmConfig, VsockDevice,
};

/// Turns [`Accel::Auto`] into `Kvm` or `Tcg` by probing `/dev/kvm` (once per process).
pub fn resolve_accel(accel: Accel) -> Accel {
    match accel {
        Accel::Auto if kvm_usable() => Accel::Kvm,
        Accel::Auto => Accel::Tcg,
        other => other,
    }
}

/// Detects a disk image's format from its first bytes: the qcow2 magic `QFI\xfb`, else raw.
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

/// The device id of the balloon ([`VmConfig::balloon`]).
pub const BALLOON_ID: &str = "balloon0";

/// The smallest guest memory accepted.
pub const MIN_MEMORY_MIB: u64 = 16;
/// The largest vCPU count accepted.
pub const MAX_CPUS: u32 = 64;

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
}
