//! weftd configuration: a TOML file, overridden by command-line flags.
//!
//! Every knob has a default that works on a stock host: data under
//! `/var/lib/weft`, sockets under `/run/weft`, QEMU from `PATH`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use weft_qmp::launch::Accel;

/// Where weftd looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/weft/weftd.toml";
/// Default directory for the catalog and per-environment files.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/weft";
pub use weft_api::{API_SOCKET_NAME, DEFAULT_RUN_DIR};

/// The daemon's configuration after file and flags are merged.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Catalog (`catalog.db`) and per-environment logs live here.
    pub data_dir: PathBuf,
    /// QMP sockets of managed environments live here.
    pub run_dir: PathBuf,
    /// The HTTP API socket; defaults to `<run_dir>/weftd.sock`.
    pub socket: Option<PathBuf>,
    /// The group of the API socket (0660) and its directory (0750); weftd's own
    /// group (root's) when absent.
    pub socket_group: Option<String>,
    /// The QEMU system emulator to launch.
    pub qemu_binary: PathBuf,
    /// Accelerator for environments that do not choose one: `tcg` (default, works
    /// everywhere), `kvm` (refused where KVM does not work) or `auto` (KVM when it works).
    pub accel: Accel,
    /// Seconds to wait for a newly launched QEMU to answer on QMP.
    pub qemu_start_timeout_secs: u64,
    /// Run QEMU under its own seccomp filter (`-sandbox on,obsolete=deny,
    /// elevateprivileges=deny,spawn=deny,resourcecontrol=deny`); off only for debugging.
    pub qemu_sandbox: bool,
    /// An unprivileged user QEMU drops to (`-runas`) once it has opened its devices,
    /// disks and sockets; QEMU stays root when absent.
    pub qemu_user: Option<String>,
    /// Seconds to wait for QEMU to exit after `quit` before it is killed.
    pub stop_timeout_secs: u64,
    /// Log filter in `tracing_subscriber::EnvFilter` syntax (`RUST_LOG` wins).
    pub log: String,
    /// Directories the disks, kernels and initrds of new environments must be in,
    /// besides `<data_dir>/images` (see `crate::confine`).
    pub image_dirs: Vec<PathBuf>,
    /// Directories `restore --output` and `replay --out` may write into, besides
    /// `<data_dir>/exports`.
    pub export_dirs: Vec<PathBuf>,
    /// The chunk store that holds disk snapshots.
    pub store: StoreSettings,
    /// Weave networking.
    pub net: NetSettings,
    /// The link to guests' data provenance agents (vsock devices, rate limits).
    pub dpa: crate::dpa::DpaSettings,
    /// The provenance log of guest data changes.
    pub provenance: ProvenanceSettings,
    /// Replays (what `--base` may read from a guest's disk).
    pub replay: ReplaySettings,
    /// Disks served by weft-blk.
    pub blk: BlkSettings,
    /// Who may call the API, with which role (root is always `admin`).
    pub roles: crate::roles::RolesSettings,
}

/// Disks served by weft-blk (`[blk]` in weftd.toml; see docs/weft-blk.md).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlkSettings {
    /// What a system call outside weft-blk's seccomp allow-list does: `"kill"` the
    /// process (default), `"log"` it and let it go ahead, or `"off"` (no filter).
    pub seccomp: weft_blockdev::blk::seccomp::Mode,
}

/// Replays (`[replay]` in weftd.toml; see docs/provenance.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplaySettings {
    /// Largest file `replay --base` and compose reconciliation read from a guest's
    /// disk (a database, its write-ahead log, a document), in MiB.
    pub base_max_file_mib: u64,
    /// Most MiB read from one guest disk, all files together.
    pub base_max_total_mib: u64,
    /// Most files read plus key-value directory entries listed, per guest disk.
    pub base_max_files: u64,
}

impl Default for ReplaySettings {
    fn default() -> Self {
        let d = weft_provenance::base::BaseLimits::default();
        ReplaySettings {
            base_max_file_mib: d.max_file_bytes >> 20,
            base_max_total_mib: d.max_total_bytes >> 20,
            base_max_files: d.max_files,
        }
    }
}

impl ReplaySettings {
    /// The limits a base reads within.
    pub fn base_limits(&self) -> weft_provenance::base::BaseLimits {
        weft_provenance::base::BaseLimits {
            max_file_bytes: self.base_max_file_mib.saturating_mul(1 << 20),
            max_total_bytes: self.base_max_total_mib.saturating_mul(1 << 20),
            max_files: self.base_max_files,
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.base_max_file_mib == 0 || self.base_max_total_mib == 0 || self.base_max_files == 0 {
            return Err(
                "replay.base_max_file_mib, base_max_total_mib and base_max_files must be at least 1"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The provenance log (`[provenance]` in weftd.toml; see docs/provenance.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProvenanceSettings {
    /// Where the per-VM logs live (default `<data_dir>/provenance`).
    pub dir: Option<PathBuf>,
    /// A segment is sealed (made immutable, indexed) at this size, in MiB.
    pub segment_mib: u64,
    /// Most MiB one VM's log may take; beyond it the VM's changes wait (0: no quota).
    pub quota_mib: u64,
    /// Sealed segments older than this many days are dropped (0: kept regardless of age).
    pub retain_days: u64,
    /// The oldest sealed segments are dropped while a VM's log is over this many MiB
    /// (0: no size limit).
    pub retain_mib: u64,
    /// Decoded blocks kept in the read cache.
    pub cache_blocks: usize,
    /// zstd level of new blocks, 1 (fastest) to 19 (smallest).
    pub compression_level: i32,
}

impl Default for ProvenanceSettings {
    fn default() -> Self {
        ProvenanceSettings {
            dir: None,
            segment_mib: 64,
            quota_mib: 1024,
            retain_days: 0,
            retain_mib: 0,
            cache_blocks: 256,
            compression_level: 3,
        }
    }
}

impl ProvenanceSettings {
    /// The log's options.
    pub fn log_options(&self) -> weft_provenance::log::LogOptions {
        const MIB: u64 = 1 << 20;
        weft_provenance::log::LogOptions {
            segment_bytes: self.segment_mib.saturating_mul(MIB),
            quota_bytes: self.quota_mib.saturating_mul(MIB),
            retain_us: (self.retain_days > 0).then(|| {
                i64::try_from(self.retain_days.saturating_mul(86_400_000_000)).unwrap_or(i64::MAX)
            }),
            retain_bytes: self.retain_mib.saturating_mul(MIB),
            cache_blocks: self.cache_blocks,
            compression_level: self.compression_level,
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.segment_mib == 0 || !(1..=19).contains(&self.compression_level) {
            return Err("provenance.segment_mib must be at least 1 and provenance.compression_level in 1..=19".into());
        }
        if self.quota_mib > 0 && self.quota_mib < self.segment_mib {
            return Err(format!(
                "provenance.quota_mib ({}) is below provenance.segment_mib ({}): raise the quota or make segments smaller",
                self.quota_mib, self.segment_mib
            ));
        }
        Ok(())
    }
}

/// Weave networking (`[net]` in weftd.toml).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetSettings {
    /// First weave network slot this weftd hands out (host link `wh<slot>`,
    /// 10.231.<slot>.0/30). Several weftds on one host need disjoint ranges.
    pub first_slot: u8,
    /// Last weave network slot this weftd hands out.
    pub last_slot: u8,
}

impl Default for NetSettings {
    fn default() -> Self {
        NetSettings {
            first_slot: 0,
            last_slot: 255,
        }
    }
}

impl NetSettings {
    /// The slots this weftd hands out.
    pub fn slots(&self) -> std::ops::RangeInclusive<u8> {
        self.first_slot..=self.last_slot
    }
}

/// Where and how snapshots are stored (`[store]` in weftd.toml).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// Hot tier (default `<data_dir>/store`).
    pub dir: Option<PathBuf>,
    /// Cold tier, possibly on another file system; none by default.
    pub cold_dir: Option<PathBuf>,
    /// Encrypt chunks with AES-256-GCM (only when the store is created).
    pub encrypt: bool,
    /// The store's key (default `<data_dir>/store.key`, created 0600 with the store).
    pub key_file: Option<PathBuf>,
    /// Chunk size in KiB, a power of two from 64 to 65536 (only when the store is created).
    /// 128 by default: twice QEMU's dirty-bitmap granularity, so an incremental
    /// re-stores little more than what changed (see docs/benchmarks.md).
    pub chunk_kib: u32,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            dir: None,
            cold_dir: None,
            encrypt: false,
            key_file: None,
            chunk_kib: 128,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: DEFAULT_DATA_DIR.into(),
            run_dir: DEFAULT_RUN_DIR.into(),
            socket: None,
            socket_group: None,
            qemu_binary: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            qemu_start_timeout_secs: 30,
            qemu_sandbox: true,
            qemu_user: None,
            stop_timeout_secs: 15,
            log: "info".into(),
            image_dirs: Vec::new(),
            export_dirs: Vec::new(),
            store: StoreSettings::default(),
            net: NetSettings::default(),
            dpa: crate::dpa::DpaSettings::default(),
            provenance: ProvenanceSettings::default(),
            replay: ReplaySettings::default(),
            blk: BlkSettings::default(),
            roles: crate::roles::RolesSettings::default(),
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named with `--config` could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("malformed config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads the configuration file.
    ///
    /// With `explicit == false` a missing file at the default location means
    /// "all defaults"; a file that is named explicitly must exist.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        Self::parse(&text, path)
    }

    /// Parses configuration text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        config.check()?;
        Ok(config)
    }

    /// Checks values that TOML types alone cannot.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() || self.run_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "data_dir and run_dir must not be empty".into(),
            ));
        }
        if self.qemu_start_timeout_secs == 0 || self.stop_timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "timeouts must be at least one second".into(),
            ));
        }
        if self.net.first_slot > self.net.last_slot {
            return Err(ConfigError::Invalid(format!(
                "net.first_slot ({}) is after net.last_slot ({})",
                self.net.first_slot, self.net.last_slot
            )));
        }
        for (key, dirs) in [
            ("image_dirs", &self.image_dirs),
            ("export_dirs", &self.export_dirs),
        ] {
            if let Some(d) = dirs.iter().find(|d| !d.is_absolute()) {
                return Err(ConfigError::Invalid(format!(
                    "{key}: {} is not an absolute path",
                    d.display()
                )));
            }
        }
        if let Some(user) = &self.qemu_user {
            crate::qemu_user::QemuUser::resolve(user).map_err(ConfigError::Invalid)?;
        }
        self.dpa.check().map_err(ConfigError::Invalid)?;
        self.provenance.check().map_err(ConfigError::Invalid)?;
        self.replay.check().map_err(ConfigError::Invalid)?;
        self.roles.check().map_err(ConfigError::Invalid)?;
        Ok(())
    }

    /// The provenance log's directory.
    pub fn provenance_dir(&self) -> PathBuf {
        self.provenance
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("provenance"))
    }

    /// The API socket path.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.run_dir.join(API_SOCKET_NAME))
    }

    /// The chunk store's hot tier.
    pub fn store_dir(&self) -> PathBuf {
        self.store
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("store"))
    }

    /// The chunk store's key file (used when the store is encrypted).
    pub fn key_file(&self) -> PathBuf {
        self.store
            .key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("store.key"))
    }

    /// The image directory that always exists (`<data_dir>/images`).
    pub fn images_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }

    /// The export directory that always exists (`<data_dir>/exports`).
    pub fn exports_dir(&self) -> PathBuf {
        self.data_dir.join("exports")
    }

    /// weftd's private scratch directory on the data file system (replays build their
    /// SQLite files here before moving them into an export directory); emptied at start.
    pub fn work_dir(&self) -> PathBuf {
        self.data_dir.join("work")
    }

    /// The SQLite catalog file.
    pub fn catalog_path(&self) -> PathBuf {
        self.data_dir.join("catalog.db")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("x.toml")).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.socket_path(), Path::new("/run/weft/weftd.sock"));
        assert_eq!(c.catalog_path(), Path::new("/var/lib/weft/catalog.db"));
    }

    #[test]
    fn values_are_read() {
        let c = Config::parse(
            "data_dir = \"/srv/weft\"\nrun_dir = \"/tmp/w\"\nqemu_binary = \"/opt/qemu\"\naccel = \"auto\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.data_dir, Path::new("/srv/weft"));
        assert_eq!(c.socket_path(), Path::new("/tmp/w/weftd.sock"));
        assert_eq!(c.qemu_binary, Path::new("/opt/qemu"));
        assert_eq!(c.accel, Accel::Auto);
        assert!(Config::parse("accel = \"hvf\"", Path::new("a.toml")).is_err());
        let c = Config::parse("socket_group = \"weft\"", Path::new("a.toml")).unwrap();
        assert_eq!(c.socket_group.as_deref(), Some("weft"));
    }

    #[test]
    fn malformed_and_unknown_keys_are_rejected_with_the_path() {
        let e = Config::parse("data_dir = ", Path::new("/etc/weft/weftd.toml")).unwrap_err();
        assert!(e.to_string().contains("/etc/weft/weftd.toml"), "{e}");
        let e = Config::parse("dta_dir = \"/x\"", Path::new("a.toml")).unwrap_err();
        assert!(e.to_string().contains("dta_dir"), "{e}");
        let e = Config::parse("stop_timeout_secs = 0", Path::new("a.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid(_)));
        let e =
            Config::parse("[net]\nfirst_slot = 9\nlast_slot = 8", Path::new("a.toml")).unwrap_err();
        assert!(e.to_string().contains("first_slot"), "{e}");
        let c = Config::parse(
            "[net]\nfirst_slot = 220\nlast_slot = 229",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(c.net.slots(), 220..=229);
        let c = Config::parse(
            "[replay]\nbase_max_file_mib = 8\nbase_max_files = 20",
            Path::new("a.toml"),
        )
        .unwrap();
        let l = c.replay.base_limits();
        assert_eq!(
            (l.max_file_bytes, l.max_total_bytes, l.max_files),
            (8 << 20, 1 << 30, 20)
        );
        let e = Config::parse("[replay]\nbase_max_files = 0", Path::new("a.toml")).unwrap_err();
        assert!(e.to_string().contains("base_max_files"), "{e}");
    }

    #[test]
    fn roles_are_read_and_their_names_checked() {
        let c = Config::parse(
            "[roles]\nadmin = [\"@wheel\", \"alice\"]\noperator = [\"@weft-operators\"]\nreader = [\"@weft\"]\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(c.roles.admin, ["@wheel", "alice"]);
        assert_eq!(c.roles.operator, ["@weft-operators"]);
        assert_eq!(c.roles.reader, ["@weft"]);
        let e = Config::parse("[roles]\nreader = [\"@\"]", Path::new("a.toml")).unwrap_err();
        assert!(e.to_string().contains("roles.reader"), "{e}");
        let e = Config::parse("[roles]\nowner = [\"bob\"]", Path::new("a.toml")).unwrap_err();
        assert!(e.to_string().contains("owner"), "{e}");
        let e = Config::parse("[roles]\nreader = \"bob\"", Path::new("a.toml")).unwrap_err();
        assert!(e.to_string().contains("a.toml"), "{e}");
    }

    #[test]
    fn image_and_export_dirs_are_read_and_must_be_absolute() {
        let c = Config::parse(
            "data_dir = \"/srv/weft\"\nimage_dirs = [\"/srv/images\", \"/boot\"]\nexport_dirs = [\"/srv/restore\"]\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(
            c.image_dirs,
            vec![PathBuf::from("/srv/images"), PathBuf::from("/boot")]
        );
        assert_eq!(c.export_dirs, vec![PathBuf::from("/srv/restore")]);
        assert_eq!(c.images_dir(), Path::new("/srv/weft/images"));
        assert_eq!(c.exports_dir(), Path::new("/srv/weft/exports"));
        let d = Config::default();
        assert!(d.image_dirs.is_empty() && d.export_dirs.is_empty());
        let e = Config::parse("export_dirs = [\"out\"]", Path::new("a.toml")).unwrap_err();
        assert!(
            e.to_string().contains("export_dirs") && e.to_string().contains("absolute"),
            "{e}"
        );
        let e = Config::parse("image_dirs = \"/srv/images\"", Path::new("a.toml")).unwrap_err();
        assert!(e.to_string().contains("image_dirs"), "{e}");
    }

    #[test]
    fn qemu_sandbox_and_user_are_read() {
        let c = Config::parse("", Path::new("a.toml")).unwrap();
        assert!(c.qemu_sandbox);
        assert_eq!(c.qemu_user, None);
        let c = Config::parse(
            "qemu_sandbox = false\nqemu_user = \"nobody\"",
            Path::new("a.toml"),
        )
        .unwrap();
        assert!(!c.qemu_sandbox);
        assert_eq!(c.qemu_user.as_deref(), Some("nobody"));
        let c = Config::parse("qemu_user = \"65534:65534\"", Path::new("a.toml")).unwrap();
        assert_eq!(c.qemu_user.as_deref(), Some("65534:65534"));
        for bad in [
            "qemu_user = \"no-such-user-here\"",
            "qemu_user = \"a,b\"",
            "qemu_user = \"root\"",
            "qemu_user = \"0:0\"",
            "qemu_sandbox = \"yes\"",
        ] {
            let e = Config::parse(bad, Path::new("a.toml")).unwrap_err();
            assert!(e.to_string().contains("qemu_"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_shipped_example_parses_to_the_defaults() {
        let example = include_str!("../../systemd/weftd.toml.example");
        let c = Config::parse(example, Path::new("weftd.toml.example")).unwrap();
        assert_eq!(c, Config::default(), "the example documents the defaults");
    }

    #[test]
    fn missing_default_file_is_fine_but_missing_explicit_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("none.toml");
        assert_eq!(Config::load(&p, false).unwrap(), Config::default());
        assert!(matches!(
            Config::load(&p, true),
            Err(ConfigError::Read { .. })
        ));
    }
}
