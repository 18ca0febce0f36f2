//! The chunk store: tiering and garbage collection requests.

use serde::{Deserialize, Serialize};

/// Body of `POST /v1/store/tier` (every field optional; defaults in the store's docs).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TierRequest {
    /// Move a chunk to the cold tier after this many seconds without a read.
    pub cold_after_secs: Option<u64>,
    /// A chunk read at least this often counts as frequently read …
    pub frequent_reads: Option<u32>,
    /// … and goes cold only after this many seconds without a read.
    pub frequent_cold_after_secs: Option<u64>,
    /// Move a cold chunk back after this many reads from the cold tier.
    pub promote_after_cold_reads: Option<u32>,
}

/// Body of `POST /v1/store/gc`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    /// Keep unreferenced chunks younger than this many seconds (default 24 h 5 min):
    /// it must exceed the longest backup, which may be writing chunks not yet in an index.
    pub grace_secs: Option<u64>,
}
