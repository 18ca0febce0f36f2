//! The daemon's error type: what failed, with its cause, and the HTTP status it maps to.
//!
//! Every operation of weftd returns [`ApiError`]. Variants that carry a cause keep it as
//! their `source`, so [`error_chain`] (and the API's one-line answer) names the OS,
//! QEMU or catalog error that was behind it.

use std::fmt::Display;

use weft_provenance::error::ReplayError;
use weft_provenance::log::ProvenanceError;

use crate::catalog::CatalogError;

/// Why an environment operation failed. Each variant maps to one HTTP status.
///
/// Variants with a `source` say what was being done in `what` (such as "cannot create
/// /x/y") and keep the library's error as the cause: [`error_chain`] gives
/// `what: cause: cause`. An empty `what` shows the cause alone. Turn an `ApiError`
/// into text with [`ApiError::one_line`] (or [`error_chain`]): its `Display` alone drops
/// the cause.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No environment has that name.
    #[error("no environment named {0:?} (see `weft env list`)")]
    NotFound(String),
    /// Something other than an environment (a snapshot, weave, job, composition, policy)
    /// does not exist; the text says what, in full.
    #[error("{0}")]
    Missing(String),
    /// The name is taken.
    #[error("an environment named {0:?} already exists")]
    Duplicate(String),
    /// The request itself is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// The environment is in a state that does not allow the operation.
    #[error("{0}")]
    Conflict(String),
    /// The caller's role does not allow the request (see `roles.rs`).
    #[error("{0}")]
    Forbidden(String),
    /// QEMU failed in a way no error value describes (the text says how).
    #[error("{0}")]
    Qemu(String),
    /// A QMP command failed, or QEMU (or qemu-storage-daemon) did not start.
    #[error("{}", what_or(what, source))]
    Qmp {
        /// What was being done.
        what: String,
        /// QEMU's answer.
        #[source]
        source: weft_qmp::Error,
    },
    /// Reading or writing through QEMU's NBD export failed.
    #[error("{}", what_or(what, source))]
    Nbd {
        /// What was being done.
        what: String,
        /// The NBD client's error.
        #[source]
        source: weft_blockdev::nbd::Error,
    },
    /// Anything else that has no error value behind it; the text says what.
    #[error("{0}")]
    Internal(String),
    /// A file-system or process operation failed.
    #[error("{}", what_or(what, source))]
    Io {
        /// What was being done, such as "cannot create /x/y".
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The catalog failed.
    #[error("{}", what_or(what, source))]
    Catalog {
        /// What was being done.
        what: String,
        /// The catalog's error.
        #[source]
        source: CatalogError,
    },
    /// A blocking task panicked or was cancelled.
    #[error("{}", what_or(what, source))]
    Task {
        /// Which task.
        what: String,
        /// Why it did not finish.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The chunk store failed.
    #[error("{}", what_or(what, source))]
    Store {
        /// What was being done.
        what: String,
        /// The store's error.
        #[source]
        source: weft_blockdev::store::Error,
    },
    /// Pulling a disk into the chunk store failed.
    #[error("{}", what_or(what, source))]
    Pull {
        /// Which disk.
        what: String,
        /// The pull's error.
        #[source]
        source: weft_blockdev::pull::Error,
    },
    /// Restoring a disk from the chunk store failed.
    #[error("{}", what_or(what, source))]
    Restore {
        /// Which output.
        what: String,
        /// The restore's error.
        #[source]
        source: weft_blockdev::restore::Error,
    },
    /// A namespace, link or firewall operation failed.
    #[error("{}", what_or(what, source))]
    Net {
        /// What was being done.
        what: String,
        /// The kernel operation's error.
        #[source]
        source: weft_netns::Error,
    },
    /// The provenance log failed.
    #[error("{}", what_or(what, source))]
    Provenance {
        /// What was being done.
        what: String,
        /// The log's error.
        #[source]
        source: ProvenanceError,
    },
    /// A replay failed (reading the log, or its scratch database).
    #[error("{}", what_or(what, source))]
    Replay {
        /// What was being done.
        what: String,
        /// The replay's error.
        #[source]
        source: ReplayError,
    },
    /// Encoding a document weft writes failed.
    #[error("{}", what_or(what, source))]
    Json {
        /// Which document.
        what: String,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
}

/// The text of a variant with a cause: what was being done, or the cause itself when
/// nothing was said (then [`error_chain`] does not repeat it).
fn what_or(what: &str, source: &dyn Display) -> String {
    if what.is_empty() {
        source.to_string()
    } else {
        what.to_string()
    }
}

impl ApiError {
    /// An OS error while doing `what` ("cannot create /x/y").
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        ApiError::Io {
            what: what.into(),
            source,
        }
    }

    /// A QMP or QEMU start error while doing `what`.
    pub fn qmp(what: impl Into<String>, source: weft_qmp::Error) -> Self {
        ApiError::Qmp {
            what: what.into(),
            source,
        }
    }

    /// An NBD error while doing `what`.
    pub fn nbd(what: impl Into<String>, source: weft_blockdev::nbd::Error) -> Self {
        ApiError::Nbd {
            what: what.into(),
            source,
        }
    }

    /// A blocking task that did not finish.
    pub fn task(what: impl Into<String>, source: tokio::task::JoinError) -> Self {
        ApiError::Task {
            what: what.into(),
            source,
        }
    }

    /// A catalog error while doing `what` (a duplicate name is no conflict here; use
    /// `From` for that).
    pub fn catalog(what: impl Into<String>, source: CatalogError) -> Self {
        ApiError::Catalog {
            what: what.into(),
            source,
        }
    }

    /// A chunk store error while doing `what`.
    pub fn store(what: impl Into<String>, source: weft_blockdev::store::Error) -> Self {
        ApiError::Store {
            what: what.into(),
            source,
        }
    }

    /// A pull error for `what` (a disk).
    pub fn pull(what: impl Into<String>, source: weft_blockdev::pull::Error) -> Self {
        ApiError::Pull {
            what: what.into(),
            source,
        }
    }

    /// A restore error for `what` (an output).
    pub fn restore(what: impl Into<String>, source: weft_blockdev::restore::Error) -> Self {
        ApiError::Restore {
            what: what.into(),
            source,
        }
    }

    /// A network operation's error while doing `what`.
    pub fn net(what: impl Into<String>, source: weft_netns::Error) -> Self {
        ApiError::Net {
            what: what.into(),
            source,
        }
    }

    /// A provenance log error while doing `what`.
    pub fn provenance(what: impl Into<String>, source: ProvenanceError) -> Self {
        ApiError::Provenance {
            what: what.into(),
            source,
        }
    }

    /// A JSON encoding error of `what`.
    pub fn json(what: impl Into<String>, source: serde_json::Error) -> Self {
        ApiError::Json {
            what: what.into(),
            source,
        }
    }

    /// The one-line text of the error with its causes: what the API answers, the
    /// audit log and job records keep, and logs show.
    pub fn one_line(&self) -> String {
        one_line(&error_chain(self))
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::Duplicate(n) => ApiError::Duplicate(n),
            source => ApiError::catalog("", source),
        }
    }
}

impl From<weft_qmp::Error> for ApiError {
    fn from(e: weft_qmp::Error) -> Self {
        ApiError::qmp("", e)
    }
}

impl From<weft_blockdev::store::Error> for ApiError {
    fn from(e: weft_blockdev::store::Error) -> Self {
        ApiError::store("", e)
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::task("", e)
    }
}

impl From<ReplayError> for ApiError {
    fn from(e: ReplayError) -> Self {
        ApiError::Replay {
            what: String::new(),
            source: e,
        }
    }
}

/// An error with its causes, `top: cause: cause` (library errors keep the OS error,
/// such as a full disk, in their source). A cause whose text ends the text already
/// (a library message that shows its source, `"{op} {path}: {source}"`) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let cause = s.to_string();
        if !text.ends_with(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = s.source();
    }
    text
}

/// Joins the lines of a message (QEMU's output can span several) into one.
pub fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_names_the_os_error() {
        let e = weft_provenance::log::ProvenanceError::Io {
            op: "write",
            path: "/d/provenance/web/seg-1.log".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let text = error_chain(&e);
        assert!(
            text.starts_with("cannot write /d/provenance/web/seg-1.log: No space left on device"),
            "{text}"
        );
    }

    #[test]
    fn a_library_message_that_shows_its_cause_does_not_repeat_it() {
        let e = ApiError::store(
            "snapshot 3",
            weft_blockdev::store::Error::Io {
                op: "write chunk",
                path: "/s/chunks/ab".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            },
        );
        assert_eq!(
            error_chain(&e),
            "snapshot 3: write chunk /s/chunks/ab: No space left on device (os error 28)"
        );
    }

    #[test]
    fn a_cause_without_context_is_the_whole_text() {
        let e = ApiError::from(weft_qmp::Error::Io(std::io::Error::from_raw_os_error(
            libc::EPIPE,
        )));
        assert_eq!(e.one_line(), "i/o error: Broken pipe (os error 32)");
        assert_eq!(e.to_string(), "i/o error: Broken pipe (os error 32)");
    }

    #[test]
    fn the_one_line_text_reaches_the_os_error_below_a_library_error() {
        // netns shows only what it did; the OS error is its source.
        let e = ApiError::net(
            "weave w1",
            weft_netns::Error::Os {
                op: "create namespace weft-w1".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            },
        );
        assert_eq!(e.to_string(), "weave w1");
        assert_eq!(
            e.one_line(),
            "weave w1: cannot create namespace weft-w1: No space left on device (os error 28)"
        );
    }
}
