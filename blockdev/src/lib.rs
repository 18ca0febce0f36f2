//! Block-device plumbing for weft: the NBD client that pulls backups out of QEMU,
//! the deduplicating chunk store, snapshot block maps and the `weft-blk`
//! vhost-user-blk backend.
//!
//! Only the shared error type exists so far; the NBD client and chunk store
//! arrive with the incremental-snapshot work.

/// Errors raised by block-device operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a path failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (e.g. "open", "read").
        op: &'static str,
        /// The file concerned.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}
