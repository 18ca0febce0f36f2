//! Environments: launching, attaching, stopping, supervising and recovering
//! the QEMU processes weftd is responsible for.
//!
//! The catalog is the record; this module keeps the live side (QMP
//! connections, child processes, monitor tasks) in step with it. Every
//! operation either completes or leaves the catalog and the host as they were.

mod create;
mod delete;
mod lifecycle;
mod recovery;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tracing::{info, warn};
use weft_qmp::launch::{self, Accel, DiskConfig, LaunchPaths, Validate, VmConfig};
use weft_qmp::process::{read_pid_file, Ended, Helper, Signature, Stop};
use weft_qmp::process::{QemuProcess, SpawnOptions};
use weft_qmp::Qmp;

use crate::catalog::{Catalog, NewEnvironment};
use crate::config::Config;
use crate::error::{one_line, ApiError};
use crate::launch::{LaunchContext, LaunchHook};
use crate::model::{CreateEnvironment, DiskRequest, EnvFiles, EnvKind, EnvState, Environment};
use crate::names::check_name;

/// Longest unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u64 = 512;

/// The live side of a running environment.
pub(super) struct Runtime {
    /// Distinguishes this run from earlier and later runs of the same environment.
    generation: u64,
    qmp: Qmp,
    /// Set when weftd launched QEMU in this run (and can reap it).
    process: Option<Arc<QemuProcess>>,
    pid: Option<u32>,
    /// The task that notices QEMU's end; aborted when weftd lets go of the
    /// environment, which also drops its QMP connection.
    monitor: tokio::task::AbortHandle,
}

/// Owner of all environments.
pub struct Manager {
    config: Config,
    catalog: Catalog,
    runtimes: std::sync::Mutex<HashMap<String, Runtime>>,
    /// One lock per environment name: changes to one environment are serialised,
    /// different environments proceed in parallel.
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    generation: AtomicU64,
    /// Guests' vsock devices and their DPAs' listeners (set once at startup).
    vsock: std::sync::OnceLock<Arc<crate::dpa::VsockHost>>,
    /// The host's side effects (network, cgroups, DHCP, QEMU launches), built by whoever
    /// made the manager.
    host: crate::host::Host,
    /// What runs around every launch (set once at startup; see [`crate::launch`]).
    hooks: std::sync::OnceLock<Vec<Arc<dyn LaunchHook>>>,
    /// The provenance log (set once at startup).
    provenance: std::sync::OnceLock<weft_provenance::log::ProvenanceLog>,
    /// Names held by creates in progress (environments, weaves, compositions'
    /// weaves): a second create of a held name is refused before it makes anything.
    reserved: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A name held for one create request; released when dropped.
pub struct NameHold {
    manager: Arc<Manager>,
    name: String,
}

impl NameHold {
    /// The held name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for NameHold {
    fn drop(&mut self) {
        self.manager.lock_reserved().remove(&self.name);
    }
}

/// What recovery found for one environment.
pub(super) enum Recovered {
    /// QEMU runs and answers; it is monitored again.
    Reattached,
    /// Nothing runs any more (the reason is recorded).
    Stopped(String),
    /// QEMU runs but its QMP socket does not answer: left alone and recorded as
    /// running, so `weft env stop` can end it.
    Unreachable(String),
}

impl Manager {
    /// A manager over `catalog` whose side effects on the host go through `host` (the
    /// daemon's [`crate::host::Host::kernel`], or test doubles); call
    /// [`Manager::recover`] before serving.
    pub fn with_host(config: Config, catalog: Catalog, host: crate::host::Host) -> Arc<Manager> {
        Arc::new(Manager {
            config,
            catalog,
            runtimes: std::sync::Mutex::new(HashMap::new()),
            locks: std::sync::Mutex::new(HashMap::new()),
            generation: AtomicU64::new(1),
            vsock: std::sync::OnceLock::new(),
            hooks: std::sync::OnceLock::new(),
            host,
            provenance: std::sync::OnceLock::new(),
            reserved: std::sync::Mutex::new(std::collections::HashSet::new()),
        })
    }

    pub(super) fn lock_reserved(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        // Every update is a single insert or remove: a poisoned set is still consistent.
        self.reserved
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Holds `name` for one create request, for as long as the hold lives: refused when
    /// another request holds it or an environment (or weave) has it.
    pub async fn reserve(self: &Arc<Self>, name: &str) -> Result<NameHold, ApiError> {
        if !self.lock_reserved().insert(name.to_string()) {
            return Err(ApiError::Conflict(format!(
                "{name:?} is being created by another request; choose another name"
            )));
        }
        let hold = NameHold {
            manager: Arc::clone(self),
            name: name.to_string(),
        };
        if self.catalog.environment(name).await?.is_some() {
            return Err(ApiError::Duplicate(name.to_string()));
        }
        Ok(hold)
    }

    /// Gives every VM launched from now on a vsock device from `host`; set once,
    /// before [`Manager::recover`].
    pub fn set_vsock(&self, host: Arc<crate::dpa::VsockHost>) {
        if self.vsock.set(host).is_err() {
            warn!("the vsock host was set twice; the first one stays");
        }
    }

    /// The launch pipeline's hooks, in the order they run; set once, before
    /// [`Manager::recover`].
    pub fn set_hooks(&self, hooks: Vec<Arc<dyn LaunchHook>>) {
        if self.hooks.set(hooks).is_err() {
            warn!("the launch hooks were set twice; the first ones stay");
        }
    }

    pub(super) fn hooks(&self) -> &[Arc<dyn LaunchHook>] {
        self.hooks.get().map_or(&[], Vec::as_slice)
    }

    /// Makes the provenance log reachable (API, deletes, weaves); set once at startup.
    pub fn set_provenance(&self, log: weft_provenance::log::ProvenanceLog) {
        if self.provenance.set(log).is_err() {
            warn!("the provenance log was set twice; the first one stays");
        }
    }

    /// The provenance log, if weftd opened it.
    pub fn provenance(&self) -> Option<&weft_provenance::log::ProvenanceLog> {
        self.provenance.get()
    }

    /// Removes `name`'s provenance log (its environment or weave is gone).
    pub async fn remove_provenance(&self, name: &str) -> Result<(), ApiError> {
        let Some(log) = self.provenance.get().cloned() else {
            return Ok(());
        };
        let target = name.to_string();
        tokio::task::spawn_blocking(move || log.remove(&target))
            .await
            .map_err(|e| ApiError::task("provenance task failed", e))?
            .map_err(|e| {
                ApiError::provenance(format!("cannot remove the provenance log of {name}"), e)
            })
    }

    /// The guests' vsock devices and the DPA link, if set.
    pub fn vsock(&self) -> Option<&Arc<crate::dpa::VsockHost>> {
        self.vsock.get()
    }

    /// Ends what the launch hooks started for a VM (its QEMU is gone, or its launch
    /// failed): its vsock device and DPA listener, the weft-blk processes serving its
    /// disks (they flush on SIGTERM).
    pub(super) async fn release_hooks(&self, name: &str) {
        for hook in self.hooks() {
            hook.release(name).await;
        }
    }

    /// The `net` resource, on the manager's host.
    pub fn net(&self) -> crate::net::Net {
        self.host.net(&self.catalog)
    }

    /// The host's side effects this manager goes through.
    pub fn host(&self) -> &crate::host::Host {
        &self.host
    }

    /// The catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub(super) fn env_dir(&self, name: &str) -> PathBuf {
        self.config.data_dir.join("environments").join(name)
    }

    pub(super) fn files(&self, name: &str) -> EnvFiles {
        let dir = self.env_dir(name);
        EnvFiles {
            serial_log: dir.join("serial.log"),
            qemu_log: dir.join("qemu.log"),
        }
    }

    /// QEMU writes its pid here as it starts, before QMP answers, so a QEMU whose
    /// launch weftd did not see through can still be found.
    pub(super) fn pid_file(&self, name: &str) -> PathBuf {
        self.env_dir(name).join("qemu.pid")
    }

    /// Serialises changes to one environment.
    pub(crate) async fn lock_env(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self
                .locks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            Arc::clone(locks.entry(name.to_string()).or_default())
        };
        lock.lock_owned().await
    }

    /// A live QEMU of this environment that weftd holds no handle on: the pid in the
    /// catalog or in the pid file, if that process is QEMU serving this environment's
    /// QMP socket.
    pub(super) fn orphan_pid(&self, env: &Environment) -> Option<u32> {
        self.orphan(env).map(|qemu| qemu.pid())
    }

    /// [`Manager::orphan_pid`]'s process, followed from now on.
    pub(super) fn orphan(&self, env: &Environment) -> Option<Helper> {
        let from_file = read_pid_file(&self.pid_file(&env.name));
        [env.pid, from_file]
            .into_iter()
            .flatten()
            .find_map(|pid| Helper::find(pid, &serving(&env.qmp_socket)))
    }

    pub(super) fn qmp_socket_path(&self, name: &str) -> PathBuf {
        self.config.run_dir.join("qmp").join(format!("{name}.sock"))
    }

    /// The QMP connection of a running environment.
    pub(crate) fn live_qmp(&self, name: &str) -> Option<Qmp> {
        self.runtime_qmp(name)
    }

    pub(super) fn runtime_qmp(&self, name: &str) -> Option<Qmp> {
        self.lock_runtimes().get(name).map(|r| r.qmp.clone())
    }

    pub(super) fn lock_runtimes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Runtime>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every update is a single insert or remove), so poisoning is ignored.
        self.runtimes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One environment, with its live QMP run state when it runs.
    pub async fn show(&self, name: &str) -> Result<(Environment, Option<String>), ApiError> {
        let mut env = self.row(name).await?;
        if env.kind == EnvKind::Managed {
            env.files = Some(self.files(name));
        }
        let runstate = match self.runtime_qmp(name) {
            Some(qmp) => query_runstate(&qmp).await,
            None => None,
        };
        Ok((env, runstate))
    }

    /// All environments.
    pub async fn list(&self) -> Result<Vec<(Environment, Option<String>)>, ApiError> {
        let envs = self.catalog.environments().await?;
        // Asked concurrently: one hung QEMU must not make the whole list wait per guest.
        let runstates = futures::future::join_all(envs.iter().map(|env| {
            let qmp = self.runtime_qmp(&env.name);
            async move {
                match qmp {
                    Some(qmp) => query_runstate(&qmp).await,
                    None => None,
                }
            }
        }))
        .await;
        Ok(envs.into_iter().zip(runstates).collect())
    }

    /// The catalog row of `name`, or NotFound.
    pub(super) async fn row(&self, name: &str) -> Result<Environment, ApiError> {
        self.catalog
            .environment(name)
            .await?
            .ok_or_else(|| ApiError::NotFound(name.to_string()))
    }

    /// Number of environments and of running ones.
    pub async fn counts(&self) -> Result<(u64, u64), ApiError> {
        let all = self.catalog.environments().await?;
        let running = all.iter().filter(|e| e.state == EnvState::Running).count();
        Ok((all.len() as u64, running as u64))
    }
}

async fn query_runstate(qmp: &Qmp) -> Option<String> {
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        qmp.execute_raw("query-status", None),
    )
    .await
    .ok()?
    .ok()?;
    reply.get("status")?.as_str().map(str::to_string)
}

/// A QEMU process serving `socket` (its command line names it), so a recycled pid is
/// never taken for our QEMU.
fn serving(socket: &Path) -> Signature {
    Signature::qemu().containing(socket)
}

fn check_socket_path(path: &Path) -> Result<(), ApiError> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ApiError::BadRequest(format!(
            "the QMP socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter run_dir or environment name",
            path.display()
        )));
    }
    Ok(())
}

/// Builds and validates the VM configuration of a new managed environment.
fn vm_config(
    disks: Vec<DiskRequest>,
    memory_mib: Option<u64>,
    cpus: Option<u32>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    append: Option<String>,
) -> Result<VmConfig, ApiError> {
    if disks.is_empty() && kernel.is_none() {
        return Err(ApiError::BadRequest(
            "an environment needs at least one --disk (or a --kernel to boot)".into(),
        ));
    }
    if initrd.is_some() && kernel.is_none() || append.is_some() && kernel.is_none() {
        return Err(ApiError::BadRequest(
            "--initrd and --append need --kernel".into(),
        ));
    }
    let mut out = Vec::with_capacity(disks.len());
    for (i, d) in disks.into_iter().enumerate() {
        let name = match d.name.clone() {
            Some(n) => n,
            None => default_disk_name(i)?,
        };
        out.push(crate::images::disk_from_request(name, d)?);
    }
    let config = VmConfig {
        memory_mib: memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
        cpus: cpus.unwrap_or(1),
        kernel: kernel.as_deref().map(absolute).transpose()?,
        initrd: initrd.as_deref().map(absolute).transpose()?,
        append,
        disks: out,
        ..VmConfig::default()
    };
    config
        .validate()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(config)
}

fn default_disk_name(index: usize) -> Result<String, ApiError> {
    let letter = u8::try_from(index)
        .ok()
        .filter(|i| *i < 26)
        .ok_or_else(|| ApiError::BadRequest("at most 26 disks".into()))?;
    Ok(format!("vd{}", char::from(b'a' + letter)))
}

fn absolute(path: &Path) -> Result<PathBuf, ApiError> {
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    Err(ApiError::BadRequest(format!(
        "{} is a relative path; weftd needs absolute paths (the CLI makes them absolute for you)",
        path.display()
    )))
}

fn remove_dir_quietly(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(dir = %dir.display(), error = %e, "cannot remove directory");
        }
    }
}

#[cfg(test)]
mod tests;
