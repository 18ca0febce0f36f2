//! Types exchanged over the HTTP API. The CLI and weftd share them, and
//! `docs/openapi.json` documents them.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use weft_qmp::launch::{Accel, VmConfig};

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
        nics: Vec<weft_qmp::launch::NicConfig>,
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

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Sequence number.
    pub id: i64,
    /// RFC 3339 time.
    pub at: String,
    /// Who asked (peer user of the API socket, or weftd itself).
    pub actor: String,
    /// What was asked (`env.create`, `env.stop`, …).
    pub action: String,
    /// The object acted on.
    pub target: Option<String>,
    /// Details (JSON).
    pub detail: Option<String>,
    /// `ok` or `error: <reason>`.
    pub result: String,
    /// The entry's hash in the audit chain (hex; see `docs/audit.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

/// Error body of every failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One line saying what was wrong and what to do.
    pub error: String,
}

/// Declares a string-valued catalog enum with `as_str`/`parse`.
macro_rules! catalog_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// The catalog spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses the catalog spelling.
            pub fn parse(s: &str) -> Option<$name> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }
    };
}

catalog_enum!(
    /// Whether a snapshot can be used.
    SnapshotState {
        /// Being taken.
        Pending => "pending",
        /// Usable.
        Complete => "complete",
        /// Failed or interrupted; never usable.
        Failed => "failed",
    }
);

catalog_enum!(
    /// How a snapshot was taken.
    SnapshotKind {
        /// Every allocated extent of a disk was read.
        Full => "full",
        /// Only the extents dirtied since the parent were read.
        Incremental => "incremental",
        /// The VM configuration.
        Config => "config",
        /// The network setup (address plan, host ports, active weave).
        Net => "net",
    }
);

catalog_enum!(
    /// State of a long operation.
    JobState {
        /// Under way.
        Running => "running",
        /// Done.
        Succeeded => "succeeded",
        /// Failed or interrupted.
        Failed => "failed",
    }
);

/// One snapshot of one resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Id (what `weft restore` and `weft snapshot show` take).
    pub id: i64,
    /// Environment.
    pub env: String,
    /// `disk:<name>`, `config` or `net`.
    pub resource: String,
    /// Pending, complete or failed.
    pub state: SnapshotState,
    /// Full, incremental, config or net.
    pub kind: SnapshotKind,
    /// The instant the snapshot shows (RFC 3339).
    pub taken_at: String,
    /// When it was complete or failed.
    pub finished_at: Option<String>,
    /// Who asked.
    pub actor: String,
    /// Semantic category, e.g. "security update".
    pub category: Option<String>,
    /// Free text.
    pub note: Option<String>,
    /// The snapshot an incremental builds on.
    pub parent: Option<i64>,
    /// Disk size in bytes.
    pub size: Option<u64>,
    /// Content digest of the whole image (see docs/snapshots.md).
    pub checksum: Option<String>,
    /// The block map in the chunk store.
    pub index_name: Option<String>,
    /// QEMU checkpoint bitmap this snapshot added.
    pub checkpoint: Option<String>,
    /// Bytes read from QEMU over NBD.
    pub bytes_read: Option<u64>,
    /// Bytes this snapshot added to the store.
    pub bytes_new: Option<u64>,
    /// Bytes QEMU reported dirty (incremental) or allocated (full): what had to be read.
    pub bytes_marked: Option<u64>,
    /// Why a disk snapshot is full rather than incremental.
    pub reason: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// The VM configuration (config snapshots).
    pub config: Option<VmConfig>,
    /// The network setup (net snapshots).
    #[serde(default)]
    pub net: Option<NetSetup>,
}

/// An environment's guest address plan: the address its guest uses and the gateway
/// it expects. Every weave keeps the plan it was made with: its instant's, or the one a
/// composition's `net` rule chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestPlan {
    /// The guest's address.
    pub guest_ip: Ipv4Addr,
    /// The guest network's prefix length (1-30).
    pub guest_prefix: u8,
    /// The guest's gateway (inside a weave: the namespace side of its tap).
    pub gateway: Ipv4Addr,
}

impl Default for GuestPlan {
    /// 192.168.100.2/24 via 192.168.100.1.
    fn default() -> Self {
        GuestPlan {
            guest_ip: Ipv4Addr::new(192, 168, 100, 2),
            guest_prefix: 24,
            gateway: Ipv4Addr::new(192, 168, 100, 1),
        }
    }
}

/// One host port of an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPort {
    /// Port on the host (any local address, loopback included).
    pub host_port: u16,
    /// Port of the guest.
    pub guest_port: u16,
    /// The environment's guest address for this port; its plan's address when absent.
    pub guest_ip: Option<Ipv4Addr>,
    /// Published by the environment (`weft env expose`); otherwise routed to a weave
    /// only (`weft weave route`).
    pub published: bool,
    /// Where new connections go now: the environment or one of its weaves.
    pub target: String,
}

/// The `net` resource of an environment: its address plan, its host ports and where
/// they go. A weave's setup is its plan and the ports that go to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSetup {
    /// Environment (or weave).
    pub env: String,
    /// The guest address plan.
    pub plan: GuestPlan,
    /// The weave the environment's ports go to; the environment itself when absent.
    pub active: Option<String>,
    /// Host ports, by port.
    pub ports: Vec<HostPort>,
    /// What a weave's guest may open connections to (environments run on the
    /// operator's network and have none of weft's).
    #[serde(default)]
    pub egress: Egress,
}

/// A weave's egress policy. Connections routed to the guest (host ports) and DHCP from
/// weftd work under every policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// The guest opens no connection: not to the host, other weaves or any network.
    #[default]
    None,
    /// Public addresses only: not the host's own addresses, other weaves, 10/8,
    /// 172.16/12, 192.168/16, 100.64/10, 169.254/16, fc00::/7 or fe80::/10.
    Internet,
    /// Everything, the host included.
    All,
}

impl Egress {
    /// The name the API, the CLI and the catalog use.
    pub fn as_str(&self) -> &'static str {
        self.kernel().as_str()
    }

    /// The kernel policy.
    pub fn kernel(&self) -> weft_netns::Egress {
        match self {
            Egress::None => weft_netns::Egress::None,
            Egress::Internet => weft_netns::Egress::Internet,
            Egress::All => weft_netns::Egress::All,
        }
    }
}

impl std::str::FromStr for Egress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Egress::None),
            "internet" => Ok(Egress::Internet),
            "all" => Ok(Egress::All),
            other => Err(format!(
                "egress {other:?} is not one of none, internet, all"
            )),
        }
    }
}

/// Body of `POST /v1/weaves/{name}/egress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRequest {
    /// The new policy.
    pub egress: Egress,
}

/// Body of `POST /v1/environments/{name}/expose`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposeRequest {
    /// Port of the guest.
    pub guest_port: u16,
    /// Port on the host (default: the guest port).
    #[serde(default)]
    pub host_port: Option<u16>,
    /// The guest's address (default: the environment's plan).
    #[serde(default)]
    pub guest_ip: Option<Ipv4Addr>,
}

/// Body of `POST /v1/environments/{name}/unexpose`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnexposeRequest {
    /// Port on the host.
    pub host_port: u16,
}

/// Body of `POST /v1/environments/{name}/snapshots`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// `all` (default), `config`, `net` or `disk:<name>`.
    #[serde(default)]
    pub resource: Option<String>,
    /// Semantic category.
    #[serde(default)]
    pub category: Option<String>,
    /// Free text.
    #[serde(default)]
    pub note: Option<String>,
}

/// Body of `POST /v1/environments/{name}/snapshots/prune`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    /// Only this resource; every resource when absent.
    #[serde(default)]
    pub resource: Option<String>,
    /// What to keep.
    #[serde(default, deserialize_with = "crate::strict::fields")]
    pub keep: crate::retention::Keep,
    /// Report what would be removed without removing it.
    #[serde(default)]
    pub dry_run: bool,
}

/// Body of `POST /v1/snapshots/{id}/restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// Where to write the image: inside `export_dirs`, and not existing unless `force`.
    pub output: PathBuf,
    /// `raw` (default).
    #[serde(default)]
    pub format: Option<String>,
    /// Replace a regular file at `output` (never a symlink or directory).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// A long operation with progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Id.
    pub id: i64,
    /// `snapshot`, `restore`, …
    pub kind: String,
    /// What it works on.
    pub target: String,
    /// Who asked.
    pub actor: String,
    /// Running, succeeded or failed.
    pub state: JobState,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339.
    pub finished_at: Option<String>,
    /// Bytes handled so far.
    pub done_bytes: u64,
    /// Bytes to handle (0 while unknown).
    pub total_bytes: u64,
    /// What it produced (e.g. snapshot ids).
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    pub error: Option<String>,
}
