//! The agent's configuration file (TOML, default `/etc/weft-dpa.toml`).
//!
//! Every knob has a default that works; a file with no sources is valid (the agent then
//! only keeps its spool flowing). Sources can be added or removed while the agent runs:
//! the file is re-read when it is written (inotify) and on SIGHUP. `spool_dir`,
//! `spool_max_bytes`, `segment_bytes` and `connect` are read at start only.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Error;
use crate::proto;

/// Where the agent reads its configuration when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/weft-dpa.toml";
/// Where the spool lives when the file does not say.
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/weft-dpa";

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the durable spool (default `/var/lib/weft-dpa`). Put it on a disk
    /// that survives reboots, or sequence numbers restart and the host refuses them.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    /// The spool's bound in bytes (default 64 MiB). When it is reached the agent stops
    /// draining sources until the host acknowledges entries.
    #[serde(default = "default_spool_max")]
    pub spool_max_bytes: u64,
    /// Size at which a spool segment is sealed and a new one started (default 1 MiB).
    #[serde(default = "default_segment")]
    pub segment_bytes: u64,
    /// Where weftd listens: `vsock` (CID 2, port 5150), `vsock:CID:PORT` or
    /// `unix:/path` (default `vsock`).
    #[serde(default = "default_connect")]
    pub connect: String,
    /// How often SQLite sources are polled for commits that inotify did not report, in
    /// milliseconds (default 100).
    #[serde(default = "default_poll")]
    pub poll_interval_ms: u64,
    /// How often every source is re-read and missing watches retried, in milliseconds
    /// (default 2000; 0 turns the periodic rescan off).
    #[serde(default = "default_rescan")]
    pub rescan_interval_ms: u64,
    /// Most entries in one batch frame (default 512, at most 4096).
    #[serde(default = "default_batch")]
    pub batch_entries: usize,
    /// Most entries sent and not yet acknowledged (default 8192).
    #[serde(default = "default_in_flight")]
    pub max_in_flight: u64,
    /// With entries in flight and no ack for this long, the connection is taken for
    /// dead and made again (a host that vanished without closing it).
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_ms: u64,
    /// SQLite databases.
    #[serde(default)]
    pub sqlite: Vec<SqliteSource>,
    /// JSON documents.
    #[serde(default)]
    pub json: Vec<JsonSource>,
    /// Key-value stores.
    #[serde(default)]
    pub kv: Vec<KvSource>,
}

/// One SQLite database.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteSource {
    /// The database file (absolute). The agent waits for it to exist; it never creates it.
    pub path: PathBuf,
    /// The tables to capture; all tables when absent.
    pub tables: Option<Vec<String>>,
}

/// One JSON document.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSource {
    /// The file (absolute).
    pub path: PathBuf,
}

/// How a key-value source stores its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KvFormat {
    /// A `KEY=value` file (blank lines and `#` comments ignored).
    #[default]
    Env,
    /// A directory where each file is a key and its content the value.
    Dir,
}

/// One key-value store.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvSource {
    /// The env file or the directory (absolute).
    pub path: PathBuf,
    /// `env` (default) or `dir`.
    #[serde(default)]
    pub format: KvFormat,
}

fn default_spool_dir() -> PathBuf {
    PathBuf::from(DEFAULT_SPOOL_DIR)
}
fn default_spool_max() -> u64 {
    64 << 20
}
fn default_segment() -> u64 {
    1 << 20
}
fn default_connect() -> String {
    "vsock".into()
}
fn default_poll() -> u64 {
    100
}
fn default_rescan() -> u64 {
    2000
}
fn default_batch() -> usize {
    512
}
fn default_in_flight() -> u64 {
    8192
}
fn default_ack_timeout() -> u64 {
    60_000
}

impl Default for Config {
    fn default() -> Self {
        Config {
            spool_dir: default_spool_dir(),
            spool_max_bytes: default_spool_max(),
            segment_bytes: default_segment(),
            connect: default_connect(),
            poll_interval_ms: default_poll(),
            rescan_interval_ms: default_rescan(),
            batch_entries: default_batch(),
            max_in_flight: default_in_flight(),
            ack_timeout_ms: default_ack_timeout(),
            sqlite: Vec::new(),
            json: Vec::new(),
            kv: Vec::new(),
        }
    }
}

impl Config {
    /// Parses and checks a configuration file's text.
    pub fn parse(text: &str) -> Result<Config, Error> {
        let config: Config =
            toml::from_str(text).map_err(|e| Error::Config(e.message().to_string()))?;
        config.check()?;
        Ok(config)
    }

    /// Reads `path`. A missing file is the default configuration when `optional`.
    pub fn load(path: &Path, optional: bool) -> Result<Config, Error> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                Config::parse(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
            }
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
        }
    }

    fn check(&self) -> Result<(), Error> {
        let bad = |why: String| Err(Error::Config(why));
        if !self.spool_dir.is_absolute() {
            return bad(format!(
                "spool_dir {} must be an absolute path",
                self.spool_dir.display()
            ));
        }
        if self.segment_bytes == 0 || self.spool_max_bytes < self.segment_bytes {
            return bad("segment_bytes must be at least 1 and at most spool_max_bytes".into());
        }
        if self.batch_entries == 0 || self.batch_entries > proto::LIMITS.batch_entries {
            return bad(format!(
                "batch_entries must be between 1 and {}",
                proto::LIMITS.batch_entries
            ));
        }
        if self.max_in_flight < self.batch_entries as u64 {
            return bad("max_in_flight must be at least batch_entries".into());
        }
        if self.poll_interval_ms == 0 {
            return bad("poll_interval_ms must be at least 1".into());
        }
        if self.ack_timeout_ms < 100 {
            return bad("ack_timeout_ms must be at least 100".into());
        }
        super::client::Endpoint::parse(&self.connect)?;
        let mut seen = BTreeSet::new();
        let paths = self
            .sqlite
            .iter()
            .map(|s| &s.path)
            .chain(self.json.iter().map(|s| &s.path))
            .chain(self.kv.iter().map(|s| &s.path));
        for path in paths {
            let Some(text) = path.to_str() else {
                return bad(format!("source path {} is not UTF-8", path.display()));
            };
            if !path.is_absolute() {
                return bad(format!("source path {text} must be absolute"));
            }
            if text.len() > proto::LIMITS.name {
                return bad(format!(
                    "source path {text} is over {} bytes",
                    proto::LIMITS.name
                ));
            }
            if path.file_name().is_none() {
                return bad(format!("source path {text} names no file"));
            }
            if !seen.insert(path.clone()) {
                return bad(format!("source path {text} is configured twice"));
            }
        }
        for s in &self.sqlite {
            for t in s.tables.iter().flatten() {
                if t.starts_with("sqlite_") || t.starts_with("_weft_") {
                    return bad(format!(
                        "table {t} of {} cannot be captured",
                        s.path.display()
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn sources_parse() {
        let c = Config::parse(
            r#"
            spool_dir = "/data/spool"
            connect = "unix:/run/dpa.sock"
            [[sqlite]]
            path = "/data/app.db"
            tables = ["customers"]
            [[json]]
            path = "/data/settings.json"
            [[kv]]
            path = "/data/app.env"
            [[kv]]
            path = "/data/flags"
            format = "dir"
            "#,
        )
        .unwrap();
        assert_eq!(
            c.sqlite[0].tables.as_deref(),
            Some(&["customers".to_string()][..])
        );
        assert_eq!(c.kv[0].format, KvFormat::Env);
        assert_eq!(c.kv[1].format, KvFormat::Dir);
        assert_eq!(c.ack_timeout_ms, 60_000);
        assert_eq!(
            Config::parse("ack_timeout_ms = 2500")
                .unwrap()
                .ack_timeout_ms,
            2500
        );
    }

    #[test]
    fn mistakes_are_refused_with_a_reason() {
        for (text, why) in [
            ("[[json]]\npath = \"rel.json\"", "absolute"),
            (
                "[[json]]\npath = \"/a.json\"\n[[kv]]\npath = \"/a.json\"",
                "twice",
            ),
            ("colour = 1", "unknown field"),
            ("connect = \"tcp:1\"", "connect"),
            ("batch_entries = 100000", "batch_entries"),
            ("ack_timeout_ms = 5", "ack_timeout_ms"),
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }
}
