//! The daemon's error type: what failed, with its cause, and the HTTP status it maps to.
//!
//! Every operation of weftd returns [`ApiError`]. Variants that carry a cause keep it as
//! their `source`, so [`error_chain`] (and the API's one-line answer) names the OS,
//! QEMU or catalog error that was behind it.

use crate::catalog::CatalogError;

/// Why an environment operation failed. Each variant maps to one HTTP status.
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
    /// QEMU or its QMP socket failed.
    #[error("{0}")]
    Qemu(String),
    /// Anything else (catalog, file system).
    #[error("{0}")]
    Internal(String),
    /// The caller's role does not allow the request (see `roles.rs`).
    #[error("{0}")]
    Forbidden(String),
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::Duplicate(n) => ApiError::Duplicate(n),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// An error with its causes, `top: cause: cause` (library errors keep the OS error,
/// such as a full disk, in their source).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
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
}
