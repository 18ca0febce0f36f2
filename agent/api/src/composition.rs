//! Temporal compositions.

use serde::{Deserialize, Serialize};

/// Body of `POST /v1/compositions/{name}/apply`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyComposition {
    /// Name of the new weave (default `w<index>`).
    #[serde(default)]
    pub weave: Option<String>,
    /// Serve its disks live through weft-blk instead of restoring them first.
    #[serde(default)]
    pub live: bool,
    /// What the weave's guest may open connections to (default: none).
    #[serde(default)]
    pub egress: crate::net::Egress,
}
