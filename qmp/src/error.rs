//! The crate's error type.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Everything that can go wrong while talking to QEMU or starting it.
///
/// Messages are lowercase without a trailing period; causes are chained with `#[source]`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on the QMP socket or on a file the launcher needs.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),

    /// The peer sent something that is not valid QMP: malformed JSON, an unexpected
    /// message, a line longer than the limit, or a reply of the wrong shape.
    #[error("qmp protocol error: {0}")]
    Protocol(String),

    /// QEMU answered a command with an error reply. `class` and `desc` are QEMU's own
    /// (e.g. `GenericError`, `DeviceNotFound`).
    #[error("qemu error ({class}): {desc}")]
    Qmp {
        /// QEMU's error class, e.g. `GenericError`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },

    /// The QMP connection is closed; pending and new commands fail with this.
    #[error("qmp connection closed")]
    Closed,

    /// Something did not happen within its deadline.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// How long the wait lasted.
        after: Duration,
    },

    /// The peer on the socket is not a QMP server (it sent no valid greeting).
    #[error("peer is not a qmp server: {detail}")]
    NotQmp {
        /// What the peer sent instead, or why it was rejected.
        detail: String,
    },

    /// A job that was waited for does not exist (never created, or already dismissed).
    #[error("no such job: {0}")]
    NoSuchJob(String),

    /// A QEMU job concluded with an error.
    #[error("job {id} failed: {desc}")]
    Job {
        /// The job id.
        id: String,
        /// QEMU's error text for the job.
        desc: String,
    },

    /// A block job ended without completing (failed, cancelled, or stopped on an error).
    #[error("block job {job} did not complete: {outcome}")]
    BlockJob {
        /// The job id.
        job: String,
        /// How it ended.
        outcome: BlockJobOutcome,
    },

    /// A [`VmConfig`](crate::launch::VmConfig) was rejected before QEMU was started.
    #[error("invalid vm configuration: {0}")]
    InvalidConfig(String),

    /// The QEMU binary could not be started at all (missing, not executable).
    #[error("cannot start {}: {source}", binary.display())]
    Spawn {
        /// The binary that was to be executed.
        binary: PathBuf,
        /// Why executing it failed.
        #[source]
        source: io::Error,
    },

    /// QEMU exited while starting; `output` is the tail of its stdout and stderr.
    #[error("qemu exited during start ({status}): {output}")]
    Launch {
        /// How QEMU exited.
        status: ExitInfo,
        /// The tail of QEMU's combined stdout and stderr.
        output: String,
    },
}

impl Error {
    pub(crate) fn protocol(msg: impl Into<String>) -> Self {
        Error::Protocol(msg.into())
    }

    pub(crate) fn timeout(what: impl Into<String>, after: Duration) -> Self {
        Error::Timeout {
            what: what.into(),
            after,
        }
    }
}

/// How a QEMU process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit code, if it exited.
    pub code: Option<i32>,
    /// The signal, if a signal killed it.
    pub signal: Option<i32>,
    /// When the supervisor saw it end.
    pub at: SystemTime,
}

impl ExitInfo {
    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    pub(crate) fn from_status(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        ExitInfo {
            code: status.code(),
            signal: status.signal(),
            at: SystemTime::now(),
        }
    }

    pub(crate) fn unknown() -> Self {
        ExitInfo {
            code: None,
            signal: None,
            at: SystemTime::now(),
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(sig)) => write!(f, "killed by signal {sig}"),
            (None, None) => write!(f, "unknown exit status"),
        }
    }
}

/// How a block job ended, as reported by [`Qmp::wait_block_job`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockJobOutcome {
    /// `BLOCK_JOB_COMPLETED` without an error.
    Completed {
        /// The job type, e.g. `backup`.
        job_type: String,
        /// Bytes done.
        offset: u64,
        /// Bytes to do.
        len: u64,
    },
    /// `BLOCK_JOB_COMPLETED` with an error.
    Failed {
        /// The job type.
        job_type: String,
        /// QEMU's error text.
        error: String,
    },
    /// `BLOCK_JOB_CANCELLED`.
    Cancelled {
        /// The job type.
        job_type: String,
        /// Bytes done when it was cancelled.
        offset: u64,
        /// Bytes to do.
        len: u64,
    },
    /// `BLOCK_JOB_ERROR` with action `stop`: the job is paused and waits for the caller
    /// to resume or cancel it.
    Stopped {
        /// The failed operation, `read` or `write`.
        operation: String,
    },
}

impl std::fmt::Display for BlockJobOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockJobOutcome::Completed { job_type, .. } => write!(f, "completed ({job_type})"),
            BlockJobOutcome::Failed { job_type, error } => {
                write!(f, "failed ({job_type}): {error}")
            }
            BlockJobOutcome::Cancelled {
                job_type,
                offset,
                len,
            } => write!(f, "cancelled ({job_type}) at {offset} of {len} bytes"),
            BlockJobOutcome::Stopped { operation } => write!(f, "stopped on a {operation} error"),
        }
    }
}
