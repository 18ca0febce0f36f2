//! A VM's configuration: plain data that weftd stores in its catalog, shows in the API
//! and hands to `weft-qmp`, which builds QEMU's command line from it (and checks it
//! first: `weft_qmp::launch::Validate`).

use std::fmt;
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
    /// KVM if it works on this host (`weft_qmp::launch::resolve_accel` probes `/dev/kvm`), else TCG.
    Auto,
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

impl DiskFormat {
    /// The QEMU block driver name.
    pub fn driver(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
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

/// A virtio-vsock device ([`VmConfig::vsock`]); its QEMU device id is `vsock0`.
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

impl VmConfig {
    /// Whether a device needs guest memory shared with another process (vhost-user):
    /// then the command line shares it even if [`VmConfig::shared_memory`] is off.
    pub fn needs_shared_memory(&self) -> bool {
        matches!(self.vsock, Some(VsockDevice::VhostUser { .. }))
            || !self.vhost_user_disks.is_empty()
    }
}
