//! The replay engine's error: reading the log, or the scratch database of a replay
//! larger than memory.

use crate::log::ProvenanceError;

/// Why a replay failed (an entry that does not apply is no error: it is counted as
/// skipped). Each cause is kept as the source.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading the provenance log failed.
    #[error("reading the provenance log")]
    Log(#[from] ProvenanceError),
    /// The scratch database of a replay larger than memory failed (disk full?).
    #[error("the replay's scratch database {path}")]
    Scratch {
        /// The scratch database.
        path: String,
        /// The error.
        #[source]
        source: rusqlite::Error,
    },
    /// Creating the scratch directory or file failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// An error with its causes, `top: cause: cause`, for the messages that carry a cause
/// as text (a refused base, a guest connection's log error).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
