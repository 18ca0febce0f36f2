//! Snapshots of an environment's resources, their retention, restores.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::net::NetSetup;
use crate::vm::VmConfig;

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
    pub keep: crate::snapshot::Keep,
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

/// Query of `GET /v1/environments/{name}/snapshots`.
#[derive(Debug, Deserialize)]
pub struct SnapshotQuery {
    /// Only this resource (`config`, `disk:vda`).
    pub resource: Option<String>,
    /// Taken at or after this RFC 3339 time.
    pub since: Option<String>,
    /// Taken at or before this RFC 3339 time.
    pub until: Option<String>,
    /// Only this category.
    pub category: Option<String>,
    /// Include pending and failed snapshots.
    #[serde(default)]
    pub all: bool,
}

/// How many snapshots to keep, per rule; a snapshot kept by any rule stays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keep {
    /// The newest N.
    #[serde(default)]
    pub last: u32,
    /// The newest of each of the newest N hours.
    #[serde(default)]
    pub hourly: u32,
    /// The newest of each of the newest N days (UTC).
    #[serde(default)]
    pub daily: u32,
    /// The newest of each of the newest N ISO weeks.
    #[serde(default)]
    pub weekly: u32,
    /// The newest of each of the newest N months.
    #[serde(default)]
    pub monthly: u32,
}

impl Keep {
    /// Whether no rule is set (a prune with no rule keeps only the newest).
    pub fn is_empty(&self) -> bool {
        *self == Keep::default()
    }
}
