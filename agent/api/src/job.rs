//! Long operations (snapshots, restores) and their state.

use serde::{Deserialize, Serialize};

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
