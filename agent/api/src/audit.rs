//! The audit log as the API shows it.

use serde::{Deserialize, Serialize};

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

/// Query of `GET /v1/audit`.
#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    /// How many of the newest records to return (default 50, at most 10000).
    pub limit: Option<u32>,
}

/// The result of [`Catalog::verify_audit`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerify {
    /// True when every entry matches its hash, links to the one before, and the last
    /// one is the recorded head.
    pub ok: bool,
    /// Entries checked.
    pub entries: u64,
    /// The last entry's id and hash (hex), as the database has it.
    pub last: Option<(i64, String)>,
    /// The head recorded outside the database, if any.
    pub head: Option<(i64, String)>,
    /// What is wrong, one line each (empty when `ok`).
    pub problems: Vec<String>,
}
