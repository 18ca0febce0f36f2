//! Environments: what `weft env` creates, shows and changes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::vm::{Accel, VmConfig};

/// How weftd drives an environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvKind {
    /// weftd launched QEMU and supervises it.
    Managed,
    /// Someone else (e.g. libvirt) runs QEMU; weftd only talks QMP to it.
    Attached,
}

impl EnvKind {
    /// The catalog spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EnvKind::Managed => "managed",
            EnvKind::Attached => "attached",
        }
    }
}

/// Lifecycle state of an environment as recorded in the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvState {
    /// QEMU is being launched.
    Starting,
    /// QEMU runs and answers on QMP.
    Running,
    /// No QEMU process runs for this environment.
    Stopped,
}

impl EnvState {
    /// The catalog spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EnvState::Starting => "starting",
            EnvState::Running => "running",
            EnvState::Stopped => "stopped",
        }
    }

    /// Parses the catalog spelling.
    pub fn parse(s: &str) -> Option<EnvState> {
        match s {
            "starting" => Some(EnvState::Starting),
            "running" => Some(EnvState::Running),
            "stopped" => Some(EnvState::Stopped),
            _ => None,
        }
    }
}

/// One environment as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    /// Unique name.
    pub name: String,
    /// Managed or attached.
    pub kind: EnvKind,
    /// Current state.
    pub state: EnvState,
    /// PID of QEMU when running and known.
    pub pid: Option<u32>,
    /// The QMP socket weftd talks to.
    pub qmp_socket: PathBuf,
    /// VM configuration (managed environments).
    pub config: Option<VmConfig>,
    /// How QEMU last ended, if it did.
    pub last_exit: Option<String>,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// RFC 3339 time of the last change.
    pub updated_at: String,
    /// Files weftd keeps for this environment (logs).
    pub files: Option<EnvFiles>,
}

/// Per-environment files kept by weftd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvFiles {
    /// The guest's serial console.
    pub serial_log: PathBuf,
    /// QEMU's stdout and stderr.
    pub qemu_log: PathBuf,
}

/// Disk of a new managed environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRequest {
    /// Image file (raw or qcow2; detected when `format` is absent).
    pub path: PathBuf,
    /// Device name inside weft (`vda`, `vdb`, …); assigned in order when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// `raw` or `qcow2`.
    #[serde(default)]
    pub format: Option<String>,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The backing file of a qcow2 image whose header names one: the same file, given
    /// explicitly (a raw image, or a qcow2 without a backing of its own). A qcow2 that
    /// names a backing file is refused without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<PathBuf>,
}

/// Body of `POST /v1/environments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CreateEnvironment {
    /// weftd launches and supervises QEMU.
    Managed {
        /// Unique name.
        name: String,
        /// Disks, in order.
        disks: Vec<DiskRequest>,
        /// Guest memory in MiB (default 512).
        #[serde(default)]
        memory_mib: Option<u64>,
        /// Virtual CPUs (default 1).
        #[serde(default)]
        cpus: Option<u32>,
        /// Accelerator (`tcg`, `kvm`, `auto`); weftd's `accel` setting when absent.
        #[serde(default)]
        accel: Option<Accel>,
        /// Kernel for direct boot.
        #[serde(default)]
        kernel: Option<PathBuf>,
        /// Initrd for direct boot.
        #[serde(default)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[serde(default)]
        append: Option<String>,
        /// Network cards on tap devices (weaves keep the MAC, on a tap in their namespace).
        #[serde(default, deserialize_with = "crate::strict::each")]
        nics: Vec<crate::vm::NicConfig>,
        /// Record only; do not launch QEMU now.
        #[serde(default)]
        no_start: bool,
    },
    /// QEMU runs elsewhere; weftd talks to its QMP socket.
    Attached {
        /// Unique name.
        name: String,
        /// The VM's QMP socket.
        qmp_socket: PathBuf,
    },
}

/// Body of `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// weftd's version.
    pub version: String,
    /// weftd's PID.
    pub pid: u32,
    /// Seconds since weftd started.
    pub uptime_secs: u64,
    /// Data directory.
    pub data_dir: PathBuf,
    /// API socket.
    pub socket: PathBuf,
    /// Number of environments.
    pub environments: u64,
    /// Number of running environments.
    pub running: u64,
    /// Accelerator for environments that do not choose one.
    pub default_accel: Accel,
    /// Whether KVM works on this host (QEMU's default CPU models need it to offer SSE–SSE3).
    pub kvm_usable: bool,
    /// Why KVM is not usable, when it is not.
    pub kvm_detail: Option<String>,
}

/// An environment with its live run state.
#[derive(Debug, Serialize, Deserialize)]
pub struct EnvironmentView {
    /// The catalog record.
    #[serde(flatten)]
    pub env: Environment,
    /// QEMU's run state from QMP `query-status` (`running`, `paused`, …) when connected.
    pub runstate: Option<String>,
}

/// Body of `POST /v1/environments/{name}/config`: what to change (the rest stays).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetConfig {
    /// Guest memory in MiB.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// vCPUs.
    #[serde(default)]
    pub cpus: Option<u32>,
}

/// Resource limits of a weave.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// CPU time as a percentage of one CPU (150 = one and a half CPUs); none = unlimited.
    pub cpu_percent: Option<u32>,
    /// Memory limit in MiB; none = unlimited.
    pub memory_mib: Option<u64>,
}

/// A running VM's balloon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balloon {
    /// The memory weft asked the guest to keep (the balloon target), MiB.
    pub target_mib: u64,
    /// The guest's memory now, as the balloon device reports it (`query-balloon`), MiB.
    pub actual_mib: u64,
}
