//! Weaves: isolated, running copies of an environment, and syncing volumes between them.

use serde::{Deserialize, Serialize};

use crate::env::Environment;

/// A weave as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Weave {
    /// Name (also the name of its environment row).
    pub name: String,
    /// The environment it branches from.
    pub parent: String,
    /// `now`, `snapshot N` or `at T`.
    pub source: String,
    /// The instant its disks show.
    pub taken_at: String,
    /// Its network slot (host link 10.231.<index>.0/30).
    pub net_index: u8,
    /// When it was made.
    pub created_at: String,
    /// Its environment record (state, pid, configuration).
    pub env: Option<Environment>,
    /// Its balloon while it runs with one: target (from its memory limit) and the
    /// guest's memory now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<crate::env::Balloon>,
}

/// Body of `POST /v1/environments/{name}/weaves`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateWeave {
    /// Name (1-10 characters from a-z, 0-9, '-'); `w<index>` when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Where to branch from (default: now).
    #[serde(default)]
    pub source: Option<Source>,
    /// Serve the disks live through weft-blk from the chunk store instead of
    /// restoring a base first (snapshot, instant or composition sources).
    #[serde(default)]
    pub live: bool,
    /// What the guest may open connections to (default: none).
    #[serde(default)]
    pub egress: crate::net::Egress,
}

/// Where a weave branches from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The running environment, now.
    Now,
    /// The instant of a snapshot.
    Snapshot(i64),
    /// A past instant (RFC 3339): the newest snapshot of each resource at or before it.
    At(String),
    /// A composition (`weft compose apply`): each resource as its plan chose it.
    Composition(String),
}

/// Where one resource (or one part of it) of a weave came from (F15).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRow {
    /// The resource.
    pub resource: String,
    /// The part (`slots A..B` of a merged disk), empty for the whole resource.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub part: String,
    /// The snapshot it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<i64>,
    /// Or the instant it was taken at (the running environment, the provenance log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instant: Option<String>,
    /// How.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Body of `POST /v1/weaves/{src}/sync`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// The weave (or its environment) that receives the blocks.
    pub dst: String,
    /// The volume (disk name), e.g. `vda`.
    pub volume: String,
    /// Who wins conflicting ranges; absent: conflicts refuse the sync.
    #[serde(default)]
    pub prefer: Option<Prefer>,
    /// Reset DST's guest after the copy (default true).
    #[serde(default = "yes")]
    pub reset: bool,
}

/// What a sync did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncReport {
    /// Source.
    pub src: String,
    /// Destination.
    pub dst: String,
    /// The volume.
    pub volume: String,
    /// What the two sides were compared against.
    pub base: String,
    /// Bytes SRC changed since the base.
    pub src_changed_bytes: u64,
    /// Bytes DST changed since the base.
    pub dst_changed_bytes: u64,
    /// Ranges both changed.
    pub conflicts: Vec<Range>,
    /// Bytes in those ranges.
    pub conflict_bytes: u64,
    /// Who won them.
    pub prefer: Option<Prefer>,
    /// Bytes copied into DST.
    pub copied_bytes: u64,
    /// Whether DST's guest was reset.
    pub reset: bool,
}

/// Which side wins where both changed the same blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prefer {
    /// SRC's blocks are copied over DST's.
    Src,
    /// DST keeps its blocks.
    Dst,
}

/// A byte range of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

fn yes() -> bool {
    true
}
