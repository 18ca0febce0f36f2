//! An async NBD client for pulling backups out of QEMU's NBD server.
//!
//! [`NbdClient`] speaks fixed newstyle negotiation, `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_SET_META_CONTEXT` (`base:allocation`, `qemu:dirty-bitmap:<name>`) and
//! `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`, then keeps many requests in flight on one
//! connection: a writer task serializes requests, a reader task dispatches replies by
//! cookie. It reads (structured replies: data and hole chunks reassembled, with
//! coverage checked), queries block status, and can write, write zeroes and flush.
//!
//! Why by hand and not with the `nbd` crate (0.3, on the design card): that crate is
//! synchronous (`std::io::Read + Write`), its client negotiates with
//! `NBD_OPT_EXPORT_NAME` only (no `NBD_OPT_GO`, so no error messages and no block size
//! constraints), has no structured replies, no metadata contexts and no block status,
//! allows one request at a time, and keeps its protocol constants private. Block
//! status with `qemu:dirty-bitmap:*` is the whole point of this client, so nothing of
//! it fit; the wire format lives in [`proto`], written from the protocol document.
//!
//! The server is untrusted: every reply is validated against its request before
//! anything is allocated (see [`proto::ReplyState`]), a protocol violation drops the
//! connection and fails every pending request, nothing panics.

mod client;
mod conn;
mod handshake;
pub mod proto;

pub use client::NbdClient;
pub use handshake::BlockSize;
pub use proto::{Extent, NBD_STATE_DIRTY, NBD_STATE_HOLE, NBD_STATE_ZERO};

/// The largest request this client sends (the protocol's default maximum payload).
pub const MAX_REQUEST: u32 = 32 << 20;

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket operation failed.
    #[error("nbd i/o error: {context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The handshake went wrong before or outside of a refused option.
    #[error("nbd handshake failed: {0}")]
    Handshake(String),
    /// The server answered an option with an `NBD_REP_ERR_*`.
    #[error("nbd server refused {option} with {}: {message}", proto::rep_err_name(*.code))]
    OptionRefused {
        /// The option's name (`NBD_OPT_GO` …).
        option: &'static str,
        /// The reply type (bit 31 set).
        code: u32,
        /// The server's message, or a description when it sent none.
        message: String,
    },
    /// `NBD_OPT_SET_META_CONTEXT` did not select a requested context.
    #[error("nbd server did not grant meta context {0:?} (is the bitmap exported?)")]
    ContextNotGranted(String),
    /// The server failed one request.
    #[error(
        "nbd {op} at offset {offset} length {len} failed: {message} (error {errno}, {})",
        proto::errno_name(*.errno)
    )]
    Server {
        /// The command (`read`, `block status` …).
        op: &'static str,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// NBD error value.
        errno: u32,
        /// The server's message (may be empty).
        message: String,
    },
    /// The server broke the protocol; the connection is closed.
    #[error("nbd protocol violation by the server: {0}")]
    Protocol(String),
    /// The connection is gone (the peer closed it, or it was disconnected); every
    /// request pending on it fails with this.
    #[error("nbd connection closed")]
    Disconnected,
    /// The caller asked for something this connection cannot do.
    #[error("invalid nbd {op} request at offset {offset} length {len}: {reason}")]
    InvalidRequest {
        /// The command.
        op: &'static str,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Why it was refused.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
