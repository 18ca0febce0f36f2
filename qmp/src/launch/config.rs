//! What QEMU is to run: the VM configuration ([`VmConfig`] and its parts), plain serde
//! data that callers store and build the same VM from again later, and the KVM probe
//! that resolves [`Accel::Auto`].

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Software emulation; works everywhere.
    #[default]
    Tcg,
    /// KVM hardware virtualization.
    Kvm,
    /// KVM if [`kvm_usable`] says it works on this host, else TCG.
    Auto,
}

impl Accel {
    /// Turns `Auto` into `Kvm` or `Tcg` by probing `/dev/kvm` (once per process).
    pub fn resolve(self) -> Accel {
        match self {
            Accel::Auto if kvm_usable() => Accel::Kvm,
            Accel::Auto => Accel::Tcg,
            other => other,
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
            Accel::Auto => "auto",
        })
    }
}

/// The format of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A raw image (or a block device).
    #[default]
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl DiskFormat {
    /// Detects the format from the file's first bytes: the qcow2 magic `QFI\xfb`, else raw.
    pub fn detect(path: &Path) -> io::Result<DiskFormat> {
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

    /// The QEMU block driver name.
    pub fn driver(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The device id, e.g. `vda`. The block nodes are `<name>-file` (protocol) and
    /// `<name>-fmt` (format, attached to the device).
    pub name: String,
    /// The image file or block device.
    pub path: PathBuf,
    /// The image format.
    #[serde(default)]
    pub format: DiskFormat,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The images below `path`, top first: QEMU opens exactly these, each as a node of
    /// its own (`<name>-b<i>f` for the file, `<name>-b<i>` for the format: no longer than
    /// `<name>-file` for the first ten, as QEMU's node names are at most 31 characters), and never a file an image's
    /// header names. The lowest qcow2 of the chain (or `path` itself when this is empty)
    /// gets `"backing": null`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backing: Vec<BackingImage>,
}

/// One image of a disk's backing chain ([`DiskConfig::backing`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingImage {
    /// The image file or block device.
    pub path: PathBuf,
    /// Its format (a raw image ends the chain).
    pub format: DiskFormat,
}

impl DiskConfig {
    /// The node name of the protocol (file) node.
    pub fn file_node(&self) -> String {
        format!("{}-file", self.name)
    }

    /// The node name of the format node the device is attached to.
    pub fn format_node(&self) -> String {
        format!("{}-fmt", self.name)
    }

    /// The image below this disk's top, with its chain: what `path` becomes when the
    /// overlays above an image of the chain go (a commit). `None` if `image` is not in
    /// the chain.
    pub fn rebased_to(&self, image: &Path) -> Option<DiskConfig> {
        let i = self.backing.iter().position(|b| b.path == image)?;
        Some(DiskConfig {
            path: self.backing[i].path.clone(),
            format: self.backing[i].format,
            backing: self.backing[i + 1..].to_vec(),
            ..self.clone()
        })
    }

    /// This disk with a new top `overlay` (qcow2) over what was its top.
    pub fn under(&self, overlay: &Path) -> DiskConfig {
        let mut backing = vec![BackingImage {
            path: self.path.clone(),
            format: self.format,
        }];
        backing.extend(self.backing.iter().cloned());
        DiskConfig {
            path: overlay.to_path_buf(),
            format: DiskFormat::Qcow2,
            backing,
            ..self.clone()
        }
    }
}

/// A VM's configuration: plain data, stored by callers as JSON. Fields added later get
/// defaults so that stored configurations keep reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmConfig {
    /// The machine type, e.g. `q35`.
    pub machine: String,
    /// The accelerator.
    pub accel: Accel,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Back guest memory with a shared memfd (`share=on`) and one NUMA node on it, as
    /// vhost-user devices need.
    pub shared_memory: bool,
    /// A kernel to boot directly.
    pub kernel: Option<PathBuf>,
    /// An initrd for `kernel`.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub append: Option<String>,
    /// The disks, in order.
    pub disks: Vec<DiskConfig>,
    /// Network cards, each on a tap device that exists (or that QEMU creates) in the
    /// network namespace QEMU runs in.
    #[serde(default)]
    pub nics: Vec<NicConfig>,
    /// A virtio-balloon device (`balloon0`), through which the guest's memory can be
    /// lowered and raised at runtime (QMP `balloon`), given a guest driver. On by
    /// default, also for configurations stored before this field existed.
    pub balloon: bool,
    /// A virtio-vsock device through which the guest reaches the host (CID 2). None by
    /// default; a host agent usually decides it at each launch rather than storing it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockDevice>,
    /// Disks served by a vhost-user-blk backend (such as `weft-blk`), after
    /// [`VmConfig::disks`] in the guest's device order. Guest memory is then shared.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vhost_user_disks: Vec<VhostUserDisk>,
}

/// A disk served by a vhost-user-blk backend: `vhost-user-blk-pci` on a socket chardev
/// `<name>-chr` that reconnects when the backend restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserDisk {
    /// The device id (same rules as [`DiskConfig::name`], unique among all disks).
    pub name: String,
    /// The backend's vhost-user socket, which must be listening when QEMU starts.
    pub socket: PathBuf,
    /// Request queues (1 to 64; at most what the backend offers).
    #[serde(default = "default_vhost_queues")]
    pub queues: u16,
}

fn default_vhost_queues() -> u16 {
    1
}

/// A virtio-vsock device ([`VmConfig::vsock`]); its QEMU device id is [`VSOCK_ID`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum VsockDevice {
    /// The host kernel's vhost-vsock (`/dev/vhost-vsock`): `vhost-vsock-pci` with the
    /// guest's context id, which must be unique on the host.
    Kernel {
        /// The guest's CID, from 3 (0 to 2 are reserved, `u32::MAX` means any).
        guest_cid: u32,
    },
    /// A vhost-user backend (such as rust-vmm's `vhost-device-vsock`) listening on a
    /// unix socket: `vhost-user-vsock-pci` on a socket chardev. The backend owns the
    /// guest's CID. Guest memory is then shared (a memfd), as vhost-user needs.
    VhostUser {
        /// The backend's vhost-user socket, which must be listening when QEMU starts.
        socket: PathBuf,
    },
}

/// The QEMU device id of the vsock device ([`VmConfig::vsock`]); its chardev, for
/// vhost-user, is `vsock0-chr`.
pub const VSOCK_ID: &str = "vsock0";

/// A virtio-net card on a tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicConfig {
    /// Device id (`net0`, …); also the `-netdev` id.
    pub id: String,
    /// The tap device's name.
    pub tap: String,
    /// The guest's MAC address (`52:54:00:…`); every weave of an environment keeps it.
    pub mac: String,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            machine: "q35".into(),
            accel: Accel::Tcg,
            memory_mib: 256,
            cpus: 1,
            shared_memory: false,
            kernel: None,
            initrd: None,
            append: None,
            disks: Vec::new(),
            nics: Vec::new(),
            balloon: true,
            vsock: None,
            vhost_user_disks: Vec::new(),
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
    fn detect_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = dir.path().join("q");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03rest").expect("write");
        assert_eq!(DiskFormat::detect(&q).expect("detect"), DiskFormat::Qcow2);
        let r = dir.path().join("r");
        std::fs::write(&r, b"QFI").expect("write");
        assert_eq!(DiskFormat::detect(&r).expect("detect"), DiskFormat::Raw);
        std::fs::write(&r, [0u8; 512]).expect("write");
        assert_eq!(DiskFormat::detect(&r).expect("detect"), DiskFormat::Raw);
        assert!(DiskFormat::detect(&dir.path().join("none")).is_err());
    }
}
