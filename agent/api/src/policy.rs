//! Snapshot policies.

use serde::Deserialize;

/// Query of `GET /v1/policies`.
#[derive(Debug, Deserialize)]
pub struct PolicyQuery {
    /// Only this environment's policies.
    pub env: Option<String>,
}
