//! weftd: startup, signal handling, readiness and graceful shutdown.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::net::UnixListener;
use tracing::{info, warn};

use crate::api::{self, AppState};
use crate::catalog::Catalog;
use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::envs::Manager;

/// weftd: the weft host agent (serves the API that the `weft` CLI uses).
#[derive(Debug, Parser)]
#[command(name = "weftd", version, about)]
pub struct Flags {
    /// Configuration file (TOML). Without this flag /etc/weft/weftd.toml is read if it exists.
    #[arg(long, env = "WEFTD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (catalog, logs); overrides the file.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Runtime directory (sockets); overrides the file.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// API socket; overrides the file (default <run-dir>/weftd.sock).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// QEMU system emulator to launch; overrides the file.
    #[arg(long)]
    pub qemu_binary: Option<PathBuf>,
    /// Log filter, e.g. `info` or `weft=debug`; overrides the file (RUST_LOG wins over both).
    #[arg(long)]
    pub log: Option<String>,
}

impl Flags {
    /// Loads the file and applies the flags over it.
    pub fn resolve(&self) -> Result<Config> {
        let (path, explicit) = match &self.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let mut config = Config::load(&path, explicit)?;
        if let Some(v) = &self.data_dir {
            config.data_dir = v.clone();
        }
        if let Some(v) = &self.run_dir {
            config.run_dir = v.clone();
        }
        if let Some(v) = &self.socket {
            config.socket = Some(v.clone());
        }
        if let Some(v) = &self.qemu_binary {
            config.qemu_binary = v.clone();
        }
        if let Some(v) = &self.log {
            config.log = v.clone();
        }
        config.check()?;
        Ok(config)
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Under systemd, journald adds its own timestamps and does not render colour.
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!under_journald);
    if under_journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// Creates `path` with `mode` if it does not exist. An existing directory keeps its
/// mode: weftd may be pointed at a directory the operator set up (even `/tmp`).
fn make_dir(path: &Path, mode: u32) -> Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    // The umask (077) masked the mode.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set permissions of {}", path.display()))
}

/// Everything weftd and its children (QEMU, helpers) create is private to root
/// unless made otherwise on purpose (the API socket and its directory).
fn private_umask() {
    // SAFETY: umask only swaps the process's file creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
}

/// The group of the API socket: `socket_group` from weftd.toml, else weftd's own.
fn socket_gid(config: &Config) -> Result<nix::unistd::Gid> {
    match &config.socket_group {
        None => Ok(nix::unistd::getgid()),
        Some(name) => match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Ok(g.gid),
            Ok(None) => bail!(
                "socket_group {name:?} in weftd.toml is not a group on this host: create it or change socket_group"
            ),
            Err(e) => bail!("cannot look up socket_group {name:?}: {e}"),
        },
    }
}

/// Makes the API socket's directory 0750 with the socket's group when weftd owns it
/// (the run directory it made, or systemd's RuntimeDirectory); a directory of
/// someone else's (or a sticky one such as `/tmp`) is left as it is.
fn share_socket_dir(dir: &Path, gid: nix::unistd::Gid) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    if meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o1000 != 0 {
        return Ok(());
    }
    nix::unistd::chown(dir, None, Some(gid))
        .with_context(|| format!("cannot set the group of {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
        .with_context(|| format!("cannot set permissions of {}", dir.display()))
}

/// Holds an exclusive lock on the data directory so two daemons never share a catalog.
fn lock_data_dir(data_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let path = data_dir.join("weftd.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
            "another weftd is already using {}; stop it first",
            data_dir.display()
        ),
        Err((_, e)) => bail!("cannot lock {}: {e}", path.display()),
    }
}

/// Binds the API socket (0660, group `gid`), replacing a stale one left by a daemon
/// that died.
async fn bind_socket(path: &Path, gid: nix::unistd::Gid) -> Result<UnixListener> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!("another weftd is listening on {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    if let Some(parent) = path.parent() {
        make_dir(parent, 0o750)?;
        share_socket_dir(parent, gid)?;
    }
    // Bound under umask 077 (0700, root's only), then given to the group: there is
    // no moment at which anyone else could connect.
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    nix::unistd::chown(path, None, Some(gid))
        .with_context(|| format!("cannot set the group of {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set permissions of {}", path.display()))?;
    Ok(listener)
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        warn!(error = %e, "sd_notify failed");
    }
}

/// SIGTERM and SIGINT handlers, installed before weftd reports ready: a signal
/// that arrives any time after READY=1 must mean a graceful shutdown.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> Result<ShutdownSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM: shutting down, guests keep running"),
            _ = self.int.recv() => info!("SIGINT: shutting down, guests keep running"),
        }
    }
}

/// Runs weftd until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<()> {
    private_umask();
    init_logging(&config.log);
    let mut signals = ShutdownSignals::install()?;
    let started = Instant::now();
    let gid = socket_gid(&config)?;
    let roles = crate::roles::Roles::resolve(&config.roles, &crate::roles::SystemAccounts)
        .map_err(anyhow::Error::msg)?;
    make_dir(&config.data_dir, 0o700)?;
    let _lock = lock_data_dir(&config.data_dir)?;
    make_dir(&config.run_dir, 0o700)?;
    // The directories callers' images come from and outputs go to (see crate::confine).
    make_dir(&config.images_dir(), 0o750)?;
    make_dir(&config.exports_dir(), 0o750)?;
    for (key, dirs) in [
        ("image_dirs", &config.image_dirs),
        ("export_dirs", &config.export_dirs),
    ] {
        for dir in dirs.iter().filter(|d| !d.is_dir()) {
            warn!(key, dir = %dir.display(), "a directory listed in weftd.toml does not exist; nothing in it can be used until it does");
        }
    }
    // Replays' scratch files: whatever is there was left by a weftd that died.
    let work = config.work_dir();
    if work.exists() {
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("cannot empty {}", work.display()))?;
    }
    make_dir(&work, 0o700)?;
    let catalog_path = config.catalog_path();
    let catalog = Catalog::open(&catalog_path)
        .await
        .with_context(|| format!("cannot open the catalog {}", catalog_path.display()))?;
    let socket = config.socket_path();
    // Bind before recovery: a weftd that cannot serve must not touch environments.
    // Requests that arrive meanwhile wait in the listen backlog.
    let listener = bind_socket(&socket, gid).await?;
    let store = match crate::snapshots::open_store(&config) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(anyhow::Error::msg(e.one_line()).context("cannot open the chunk store"));
        }
    };
    // The one place weftd's side effects on the host are built.
    let manager = Manager::with_host(config, catalog.clone(), crate::host::Host::kernel());
    // Guests' DPAs stream into the provenance log over vsock; without the log weftd
    // still serves, and guests get no vsock device.
    let provenance_dir = manager.config().provenance_dir();
    let provenance_options = manager.config().provenance.log_options();
    match weft_provenance::log::ProvenanceLog::open(provenance_dir, provenance_options) {
        Ok(log) => {
            manager.set_provenance(log.clone());
            let c = manager.config();
            let link = crate::dpa::DpaLink::new(std::sync::Arc::new(log), c.dpa.limits());
            let host = crate::dpa::VsockHost::new(&c.dpa, &c.data_dir, &c.run_dir, link);
            manager.set_vsock(host);
        }
        Err(e) => warn!(error = %e, "cannot open the provenance log; guests get no vsock device"),
    }
    // The launch pipeline: the vsock host first (the device joins the configuration
    // weft-blk and QEMU see), then weft-blk, then the balloon.
    let mut hooks: Vec<std::sync::Arc<dyn crate::launch::LaunchHook>> = Vec::new();
    if let Some(host) = manager.vsock() {
        hooks.push(host.clone());
    }
    hooks.push(std::sync::Arc::new(crate::blk::WeftBlk::new(
        manager.config().clone(),
    )));
    hooks.push(std::sync::Arc::new(crate::balloon::BalloonHook::new(
        manager.host().cgroups().clone(),
    )));
    manager.set_hooks(hooks);
    let snapshots = crate::snapshots::Snapshots::new(manager.clone(), store);
    let recovered = async {
        manager.recover().await?;
        crate::sync::recover(&manager).await?;
        snapshots.recover().await
    };
    if let Err(e) = recovered.await {
        let _ = std::fs::remove_file(&socket);
        return Err(anyhow::Error::msg(e.one_line()).context("cannot recover environments"));
    }
    info!(socket = %socket.display(), "weftd ready");
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("serving the API"),
    ]);
    let scheduler = tokio::spawn(crate::policies::scheduler(snapshots.clone()));
    let retention = manager
        .provenance()
        .cloned()
        .map(|log| tokio::spawn(crate::provenance::service::retention_task(log)));
    let weaves = crate::weaves::Weaves::new(manager.clone(), snapshots.clone());
    if let Err(e) = weaves.recover().await {
        warn!(error = %e.one_line(), "cannot recover weaves");
    }
    let compositions = crate::compositions::Compositions::new(manager.clone(), snapshots.clone());
    let state = AppState {
        manager: manager.clone(),
        snapshots,
        weaves,
        compositions,
        started,
        access: std::sync::Arc::new(api::Access {
            roles,
            accounts: Box::new(crate::roles::SystemAccounts),
        }),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Built here, not in the server's task: a route table axum refuses stops weftd
    // instead of leaving it "ready" with nothing answering.
    let app = api::router(state);
    let server = tokio::spawn(api::serve(listener, app, async {
        let _ = stop_rx.await;
    }));
    signals.recv().await;
    notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(());
    match tokio::time::timeout(std::time::Duration::from_secs(20), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "API server ended with an error"),
        Ok(Err(e)) => warn!(error = %e, "API server task failed"),
        Err(_) => warn!("requests still running after 20s; leaving them"),
    }
    scheduler.abort();
    if let Some(task) = retention {
        task.abort();
    }
    manager.detach_all();
    let _ = std::fs::remove_file(&socket);
    catalog.close().await;
    info!("weftd stopped");
    Ok(())
}
