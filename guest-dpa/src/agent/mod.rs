//! The guest agent: capture hooks, the durable spool and the client that streams the
//! spool to weftd. `docs/provenance-dpa.md` is the operator's reference.
//!
//! Two threads share the [`spool::Spool`]:
//! - the capture loop ([`capture`]) waits on inotify and a poll timer, drains SQLite
//!   capture tables and diffs JSON and key-value sources, and appends the resulting
//!   entries to the spool (each append is fsynced before anything depends on it);
//! - the client ([`client`]) connects to the host, resends from the host's `acked + 1`,
//!   streams new entries, trims the spool on acks and serves apply requests.

pub mod apply;
pub mod capture;
pub mod client;
pub mod config;
pub mod files;
pub use crate::jsonptr;
pub mod spool;
pub mod sqlite;
mod wake;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

pub use config::Config;

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// A file or socket operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A SQLite operation failed.
    #[error("{context}")]
    Sqlite {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The spool is damaged somewhere a crash cannot have left it.
    #[error("spool: {0}")]
    Spool(String),
    /// A change cannot be applied.
    #[error("{0}")]
    Apply(String),
    /// The protocol failed.
    #[error("protocol")]
    Proto(#[from] crate::proto::Error),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn sqlite(context: impl Into<String>, source: rusqlite::Error) -> Self {
        Error::Sqlite {
            context: context.into(),
            source,
        }
    }

    /// Whether this is SQLite's "database is busy/locked" (tried again later).
    pub fn is_busy(&self) -> bool {
        matches!(self, Error::Sqlite { source, .. } if sqlite::is_busy(source))
    }
}

/// How the binary was started: flags that override the configuration file.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The configuration file.
    pub config_path: PathBuf,
    /// Whether a missing configuration file is an error (it is when named on the
    /// command line).
    pub config_required: bool,
    /// Overrides `connect`.
    pub connect: Option<String>,
    /// Overrides `spool_dir`.
    pub spool_dir: Option<PathBuf>,
}

impl Options {
    /// Reads the configuration file and applies the overrides.
    pub fn load(&self) -> Result<Config, Error> {
        let mut config = Config::load(&self.config_path, !self.config_required)?;
        if let Some(c) = &self.connect {
            client::Endpoint::parse(c)?;
            config.connect = c.clone();
        }
        if let Some(d) = &self.spool_dir {
            if !d.is_absolute() {
                return Err(Error::Config(format!(
                    "--spool-dir {} must be an absolute path",
                    d.display()
                )));
            }
            config.spool_dir = d.clone();
        }
        Ok(config)
    }
}

/// Runs the agent until the process is killed: opens the spool, starts the client
/// thread and runs the capture loop on this thread. Returns only on a fatal error.
pub fn run(opts: Options) -> Result<(), Error> {
    let config = opts.load()?;
    let spool = Arc::new(spool::Spool::open(
        &config.spool_dir,
        config.spool_max_bytes,
        config.segment_bytes,
    )?);
    tracing::info!(
        spool = %config.spool_dir.display(),
        next_seq = spool.next_seq(),
        connect = %config.connect,
        sources = config.sqlite.len() + config.json.len() + config.kv.len(),
        "weft-dpa starting"
    );
    let shared = Arc::new(RwLock::new(config.clone()));
    let waker = wake::Waker::new()?;
    let endpoint = client::Endpoint::parse(&config.connect)?;
    {
        let spool = spool.clone();
        let shared = shared.clone();
        let waker = waker.clone();
        std::thread::Builder::new()
            .name("dpa-client".into())
            .spawn(move || client::run(endpoint, spool, shared, waker))
            .map_err(|e| Error::io("cannot start the client thread", e))?;
    }
    let mut capture = capture::Capture::new(opts, config, shared, spool, waker)?;
    capture.run()
}
