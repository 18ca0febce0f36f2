//! The provenance log as the API pages through it, and replays.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Query of `GET /v1/environments/{name}/provenance`; every parameter narrows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageQuery {
    /// Only this key (a SQLite primary key as a JSON array, a JSON pointer, a key).
    pub key: Option<String>,
    /// Only this SQLite table.
    pub table: Option<String>,
    /// Only this source (database, JSON file or key-value source in the guest).
    pub source: Option<String>,
    /// Guest time at or after (RFC 3339).
    pub from: Option<String>,
    /// Guest time at or before (RFC 3339).
    pub to: Option<String>,
    /// Only records after this sequence number (paging, following).
    pub after_seq: Option<u64>,
    /// Only the newest N sequence numbers (instead of `after_seq`).
    pub tail: Option<u64>,
    /// Most records (default: as many as `max_bytes` holds).
    pub limit: Option<usize>,
    /// Most bytes of the page's JSON (default 4 MiB, 1 KiB to 16 MiB). A record larger
    /// than that on its own comes alone on its page (a record is at most about 3 MiB of
    /// JSON: the protocol's size limits, escaped).
    pub max_bytes: Option<usize>,
}

/// Answer of `GET /v1/environments/{name}/provenance`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page {
    /// The matching records, in sequence order, as many as the page's byte budget
    /// holds.
    pub records: Vec<RecordView>,
    /// The environment's highest durable sequence number.
    pub last_seq: u64,
    /// Pass as `after_seq` for the next page; absent when nothing more matches.
    pub next_after_seq: Option<u64>,
}

/// One record as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordView {
    /// The VM whose log holds it (for a weave's lineage: its parent).
    pub vm: String,
    /// The guest's sequence number.
    pub seq: u64,
    /// The guest's clock at capture (RFC 3339).
    pub guest_time: String,
    /// The same in µs since the Unix epoch.
    pub guest_time_us: i64,
    /// weftd's clock when it received the entry (RFC 3339).
    pub host_time: String,
    /// The same in µs since the Unix epoch.
    pub host_time_us: i64,
    /// sqlite, json or kv.
    pub data_type: DataType,
    /// insert, update, delete or schema.
    pub op: Operation,
    /// The database, JSON file or key-value source in the guest.
    pub source: String,
    /// The SQLite table; empty for json and kv.
    pub collection: String,
    /// The row's primary key (JSON array), JSON pointer or key.
    pub key: String,
    /// The value before (JSON).
    pub old: Option<serde_json::Value>,
    /// The value after (JSON).
    pub new: Option<serde_json::Value>,
    /// The application transaction, for SQLite.
    pub tx: Option<u64>,
}

/// Parses an RFC 3339 instant into µs since the Unix epoch.
pub fn parse_time(what: &str, t: &str) -> Result<i64, String> {
    let ts = crate::resource::Timestamp::parse(t)
        .map_err(|e| format!("--{what} {t:?}: {e}; use e.g. 2026-11-22T10:00:00Z"))?;
    ts.micros().map_err(|e| format!("--{what} {t:?} {e}"))
}

/// A replay asked of weftd (`POST /v1/environments/{name}/replay`).
#[derive(Debug, Clone, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// The instant (guest time, RFC 3339) to rebuild, or `now`.
    pub to: String,
    /// Keep only the items changed from this instant on (RFC 3339).
    #[serde(default)]
    pub from: Option<String>,
    /// Write the state as files under this absolute directory on the host.
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// Push the state into this running weave's guest through its DPA. Only a weave
    /// of the replayed environment is accepted, unless `force` is set.
    #[serde(default)]
    pub into: Option<String>,
    /// Push into `into` even though it is not a weave of the replayed environment
    /// (recorded in the audit log as `provenance.replay.force`, target the weave).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// Start from the application state inside this disk snapshot of the environment
    /// and apply the log from shortly before it (see `base_margin_secs`) up to `to`.
    #[serde(default)]
    pub base: Option<i64>,
    /// How far before the base snapshot's instant the log is applied again (seconds;
    /// default 120): a disk snapshot lags the guest by what the guest had not yet
    /// written back, and applying an entry the base already holds changes nothing.
    #[serde(default)]
    pub base_margin_secs: Option<u64>,
}

/// What a replay did.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ReplayReport {
    /// The environment whose log was replayed.
    pub env: String,
    /// The instant rebuilt (guest time, µs since the Unix epoch).
    pub to_us: i64,
    /// Entries applied.
    pub applied: u64,
    /// Entries that could not apply.
    pub skipped: u64,
    /// Rows left out of the databases written under `out` (SQLite refused them).
    #[serde(default)]
    pub rows_skipped: u64,
    /// The last sequence number applied.
    pub last_seq: u64,
    /// Files written under `out`.
    pub files: Vec<String>,
    /// The weave the state was pushed into.
    pub into: Option<String>,
    /// Changes the weave's DPA made to reach the state.
    pub changes_made: u64,
    /// The disk snapshot the state started from.
    #[serde(default)]
    pub base: Option<i64>,
    /// Where each source was found in the base snapshot's file system (guest path →
    /// path in the file system); sources it lacks start empty.
    #[serde(default)]
    pub base_found: BTreeMap<String, String>,
    /// The log was applied on the base from this instant (µs since the Unix epoch).
    #[serde(default)]
    pub base_log_from_us: Option<i64>,
}

/// The kind of application data a change refers to (the DPA's wire protocol has the
/// same three kinds, `weft_dpa::DataType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    /// A row of a SQLite table.
    Sqlite,
    /// A value inside a JSON document.
    Json,
    /// A key of a key-value store.
    Kv,
}

impl DataType {
    /// The lower-case name used in the CLI, the API and the docs.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Sqlite => "sqlite",
            DataType::Json => "json",
            DataType::Kv => "kv",
        }
    }
}

/// What happened to an item (the DPA's wire protocol has the same four,
/// `weft_dpa::Operation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// The item was created.
    Insert,
    /// The item changed.
    Update,
    /// The item was removed.
    Delete,
    /// The definition of a SQLite table.
    Schema,
}

impl Operation {
    /// The lower-case name used in the CLI, the API and the docs.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Schema => "schema",
        }
    }
}
