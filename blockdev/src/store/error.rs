//! The error type of the chunk store.

use std::io;
use std::path::{Path, PathBuf};

use super::ChunkId;

/// Errors of the chunk store. Every variant names what it was working on
/// (a path, a chunk, an index) so a log line is enough to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What the store was doing ("read chunk", "fsync directory" …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `create` found an existing store (or a non-empty directory).
    #[error("{path} already holds a chunk store (or is not empty): refusing to overwrite it")]
    AlreadyExists {
        /// The store root.
        path: PathBuf,
    },
    /// `open` found no `store.json`.
    #[error("{path} is not a chunk store (no store.json): create one first")]
    NotAStore {
        /// The store root.
        path: PathBuf,
    },
    /// `store.json` or the cold-tier marker cannot be understood.
    #[error("bad store metadata {path}: {reason}")]
    BadMetadata {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file carries a format version this build does not know.
    #[error("{path}: {what} format version {version} is not supported (this build reads up to {supported})")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Which format ("store", "chunk", "index").
        what: &'static str,
        /// The version found.
        version: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// The store configuration is invalid.
    #[error("invalid store configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// An encrypted store was opened without a key file.
    #[error("store {root} is encrypted: pass its key file")]
    KeyRequired {
        /// The store root.
        root: PathBuf,
    },
    /// The key file does not belong to this store.
    #[error("key file {key_file} does not match store {root} (fingerprint differs): pass the key file the store was created with")]
    WrongKey {
        /// The store root.
        root: PathBuf,
        /// The key file given.
        key_file: PathBuf,
    },
    /// A key file was given for a plain store.
    #[error("store {root} is not encrypted but a key file was given")]
    KeyNotExpected {
        /// The store root.
        root: PathBuf,
    },
    /// The key file is unreadable or has the wrong length.
    #[error("bad key file {path}: {reason}")]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `create` refuses to overwrite an existing key file.
    #[error("key file {path} already exists: refusing to overwrite a key (move it away or use a new path)")]
    KeyFileExists {
        /// The key file.
        path: PathBuf,
    },
    /// A chunk file fails its checks (header, authentication, decompression or id).
    #[error("chunk {id} is corrupt ({path}): {reason}")]
    Corrupt {
        /// The chunk.
        id: ChunkId,
        /// Its file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A chunk is in neither tier.
    #[error("chunk {id} is missing from store {root} (hot and cold tiers)")]
    Missing {
        /// The chunk.
        id: ChunkId,
        /// The store root.
        root: PathBuf,
    },
    /// `put` got more bytes than one chunk.
    #[error("chunk of {len} bytes exceeds the store chunk size {max}")]
    ChunkTooLarge {
        /// Bytes given.
        len: usize,
        /// The store chunk size.
        max: u32,
    },
    /// An index name is not acceptable.
    #[error("invalid index name {name:?}: {reason}")]
    InvalidIndexName {
        /// The name given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// No index of that name.
    #[error("index {name:?} not found in store {root}")]
    IndexNotFound {
        /// The index name.
        name: String,
        /// The store root.
        root: PathBuf,
    },
    /// An index file fails its checks.
    #[error("index {name:?} is corrupt ({path}): {reason}")]
    CorruptIndex {
        /// The index name.
        name: String,
        /// Its file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A block map does not fit this store (chunk size, slot count).
    #[error("block map does not fit: {reason}")]
    BadBlockMap {
        /// What is wrong.
        reason: String,
    },
    /// The store has no cold tier (or it is not mounted).
    #[error("cold tier of store {root}: {reason}")]
    ColdTier {
        /// The store root.
        root: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another gc or tier run holds the maintenance lock.
    #[error("store {root}: another gc or tier run is in progress")]
    MaintenanceBusy {
        /// The store root.
        root: PathBuf,
    },
    /// A cryptographic primitive failed unexpectedly.
    #[error("crypto failure during {op}")]
    Crypto {
        /// What was being done.
        op: &'static str,
    },
    /// zstd failed to compress (not expected with valid input).
    #[error("zstd {op} failed: {source}")]
    Zstd {
        /// "compress" or "decompress".
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A concurrent writer kept replacing the chunk under us.
    #[error("chunk {id}: gave up after repeated races with concurrent gc/tier runs")]
    Contended {
        /// The chunk.
        id: ChunkId,
    },
}

/// Attach an operation and a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, Error>;
}

impl<T> IoContext<T> for Result<T, io::Error> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, Error> {
        self.map_err(|source| Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}
