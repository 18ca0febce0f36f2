//! The wire protocol between the guest data provenance agent (DPA) and weftd.
//!
//! Only the protocol version and the change vocabulary exist so far; framing,
//! the spool and the vsock client arrive with data provenance (F22–F24).

use serde::{Deserialize, Serialize};

/// Version of the DPA wire protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 1;

/// The kind of application data a change refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    /// A row of a SQLite table.
    Row,
    /// A key inside a JSON document.
    JsonKey,
    /// A key of a key-value store.
    KvKey,
    /// A whole file.
    File,
}

/// What happened to the item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// The item was created.
    Insert,
    /// The item changed.
    Update,
    /// The item was removed.
    Delete,
}

/// Errors of the DPA protocol.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer speaks a protocol version this build does not understand.
    #[error("unsupported dpa protocol version {0}")]
    Version(u16),
}
