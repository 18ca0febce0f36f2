//! Environments: launching, attaching, stopping, supervising and recovering
//! the QEMU processes weftd is responsible for.
//!
//! The catalog is the record; this module keeps the live side (QMP
//! connections, child processes, monitor tasks) in step with it. Every
//! operation either completes or leaves the catalog and the host as they were.

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
struct Runtime {
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
    /// The host's side effects (the network), built by whoever made the manager.
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
enum Recovered {
    /// QEMU runs and answers; it is monitored again.
    Reattached,
    /// Nothing runs any more (the reason is recorded).
    Stopped(String),
    /// QEMU runs but its QMP socket does not answer: left alone and recorded as
    /// running, so `weft env stop` can end it.
    Unreachable(String),
}

impl Manager {
    /// A manager over `catalog`; call [`Manager::recover`] before serving.
    pub fn new(config: Config, catalog: Catalog) -> Arc<Manager> {
        Manager::with_host(config, catalog, crate::host::Host::kernel())
    }

    /// A manager whose side effects on the host go through `host`.
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

    fn lock_reserved(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
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

    fn hooks(&self) -> &[Arc<dyn LaunchHook>] {
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
            .map_err(|e| ApiError::Internal(format!("provenance task failed: {e}")))?
            .map_err(|e| {
                ApiError::Internal(one_line(&format!(
                    "cannot remove the provenance log of {name}: {e}"
                )))
            })
    }

    /// The guests' vsock devices and the DPA link, if set.
    pub fn vsock(&self) -> Option<&Arc<crate::dpa::VsockHost>> {
        self.vsock.get()
    }

    /// Ends what the launch hooks started for a VM (its QEMU is gone, or its launch
    /// failed): its vsock device and DPA listener, the weft-blk processes serving its
    /// disks (they flush on SIGTERM).
    async fn release_hooks(&self, name: &str) {
        for hook in self.hooks() {
            hook.release(name).await;
        }
    }

    /// The `net` resource, on the manager's host.
    pub fn net(&self) -> crate::net::Net {
        self.host.net(&self.catalog)
    }

    /// The catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn env_dir(&self, name: &str) -> PathBuf {
        self.config.data_dir.join("environments").join(name)
    }

    fn files(&self, name: &str) -> EnvFiles {
        let dir = self.env_dir(name);
        EnvFiles {
            serial_log: dir.join("serial.log"),
            qemu_log: dir.join("qemu.log"),
        }
    }

    /// QEMU writes its pid here as it starts, before QMP answers, so a QEMU whose
    /// launch weftd did not see through can still be found.
    fn pid_file(&self, name: &str) -> PathBuf {
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
    fn orphan_pid(&self, env: &Environment) -> Option<u32> {
        self.orphan(env).map(|qemu| qemu.pid())
    }

    /// [`Manager::orphan_pid`]'s process, followed from now on.
    fn orphan(&self, env: &Environment) -> Option<Helper> {
        let from_file = read_pid_file(&self.pid_file(&env.name));
        [env.pid, from_file]
            .into_iter()
            .flatten()
            .find_map(|pid| Helper::find(pid, &serving(&env.qmp_socket)))
    }

    fn qmp_socket_path(&self, name: &str) -> PathBuf {
        self.config.run_dir.join("qmp").join(format!("{name}.sock"))
    }

    /// The QMP connection of a running environment.
    pub(crate) fn live_qmp(&self, name: &str) -> Option<Qmp> {
        self.runtime_qmp(name)
    }

    fn runtime_qmp(&self, name: &str) -> Option<Qmp> {
        self.lock_runtimes().get(name).map(|r| r.qmp.clone())
    }

    fn lock_runtimes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Runtime>> {
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

    /// Creates an environment (and launches it unless asked not to).
    pub async fn create(self: &Arc<Self>, req: CreateEnvironment) -> Result<Environment, ApiError> {
        let (CreateEnvironment::Managed { name, .. } | CreateEnvironment::Attached { name, .. }) =
            &req;
        check_name(name)?;
        let _hold = self.reserve(name).await?;
        let _op = self.lock_env(name).await;
        match req {
            CreateEnvironment::Managed {
                name,
                disks,
                memory_mib,
                cpus,
                accel,
                kernel,
                initrd,
                append,
                nics,
                no_start,
            } => {
                check_name(&name)?;
                if self.catalog.environment(&name).await?.is_some() {
                    return Err(ApiError::Duplicate(name));
                }
                // Images come from image_dirs; the canonical path is what is recorded.
                let images = crate::confine::ImageDirs::new(&self.config);
                let disks = disks
                    .into_iter()
                    .map(|mut d| {
                        d.path = images.resolve("disk", &d.path)?;
                        if let Some(b) = &d.backing {
                            d.backing = Some(images.resolve("disk backing", b)?);
                        }
                        Ok(d)
                    })
                    .collect::<Result<Vec<_>, crate::confine::ConfineError>>()?;
                let kernel = kernel.map(|k| images.resolve("kernel", &k)).transpose()?;
                let initrd = initrd.map(|i| images.resolve("initrd", &i)).transpose()?;
                let mut config = vm_config(disks, memory_mib, cpus, kernel, initrd, append)?;
                config.nics = nics;
                config
                    .validate()
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                config.accel = accel.unwrap_or(self.config.accel);
                if config.accel == Accel::Kvm {
                    launch::kvm_probe().map_err(|reason| {
                        ApiError::BadRequest(format!(
                            "--accel kvm: KVM is not usable on this host: {reason}; use --accel tcg or auto"
                        ))
                    })?;
                }
                let socket = self.qmp_socket_path(&name);
                check_socket_path(&socket)?;
                self.catalog
                    .insert_environment(&NewEnvironment {
                        name: &name,
                        kind: EnvKind::Managed,
                        config: Some(&config),
                        qmp_socket: &socket,
                        state: if no_start {
                            EnvState::Stopped
                        } else {
                            EnvState::Starting
                        },
                        pid: None,
                    })
                    .await?;
                if !no_start {
                    if let Err(e) = self.launch(&name, &config, &socket).await {
                        // Nothing half-created: the row and the files go.
                        if let Err(de) = self.catalog.delete_environment(&name).await {
                            warn!(env = %name, error = %de, "could not remove the row of a failed create");
                        }
                        remove_dir_quietly(&self.env_dir(&name));
                        return Err(e);
                    }
                }
                Ok(self.show(&name).await?.0)
            }
            CreateEnvironment::Attached { name, qmp_socket } => {
                check_name(&name)?;
                if self.catalog.environment(&name).await?.is_some() {
                    return Err(ApiError::Duplicate(name));
                }
                let qmp_socket = self.check_attachable(&qmp_socket).await?;
                let qmp = connect_attached(&self.config, &qmp_socket).await?;
                self.catalog
                    .insert_environment(&NewEnvironment {
                        name: &name,
                        kind: EnvKind::Attached,
                        config: None,
                        qmp_socket: &qmp_socket,
                        state: EnvState::Running,
                        pid: None,
                    })
                    .await?;
                self.install_runtime(&name, qmp, None, None);
                Ok(self.show(&name).await?.0)
            }
        }
    }

    /// Records a weave and its managed environment, stopped, with a complete VM
    /// configuration, in one transaction.
    pub(crate) async fn insert_stopped_weave(
        &self,
        weave: &weft_api::weave::Weave,
        config: &VmConfig,
    ) -> Result<(), ApiError> {
        let name = weave.name.as_str();
        let _op = self.lock_env(name).await;
        config
            .validate()
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let socket = self.qmp_socket_path(name);
        check_socket_path(&socket)?;
        self.catalog
            .insert_weave(
                weave,
                &NewEnvironment {
                    name,
                    kind: EnvKind::Managed,
                    config: Some(config),
                    qmp_socket: &socket,
                    state: EnvState::Stopped,
                    pid: None,
                },
            )
            .await?;
        Ok(())
    }

    /// Launches QEMU for a managed environment and records it as running.
    async fn launch(
        self: &Arc<Self>,
        name: &str,
        config: &VmConfig,
        socket: &Path,
    ) -> Result<(), ApiError> {
        let files = self.files(name);
        let dir = self.env_dir(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        if let Some(parent) = socket.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                ApiError::Internal(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        // Never start a second QEMU beside one that survived an earlier weftd
        // (the launcher replaces the socket file, which would orphan it for good).
        if let Some(pid) =
            read_pid_file(&self.pid_file(name)).filter(|pid| serving(socket).matches(*pid))
        {
            return Err(ApiError::Conflict(format!(
                "QEMU pid {pid} from an earlier run of {name:?} still runs; end it with `weft env stop {name}`"
            )));
        }
        let paths = LaunchPaths {
            qmp_socket: socket.to_owned(),
            serial_log: files.serial_log,
            output_log: files.qemu_log,
            pid_file: Some(self.pid_file(name)),
        };
        // A weave's QEMU runs in its network namespace and cgroups.
        let placement = crate::placement::of(&self.catalog, name).await;
        let weave = placement.is_weave();
        let qemu_user = crate::qemu_user::QemuUser::of(self.config.qemu_user.as_deref())
            .map_err(ApiError::BadRequest)?;
        if let Some(user) = &qemu_user {
            // Where the running QEMU makes files for weftd once it is that user: the
            // environment's new overlays, backup scratch images and NBD sockets, sync
            // layers.
            let (data, run) = (&self.config.data_dir, &self.config.run_dir);
            for (root, d) in [
                (data, dir.clone()),
                (run, run.join("backup")),
                (run, run.join("sync")),
            ] {
                user.give_dir(root, &d).map_err(|e| {
                    ApiError::Internal(format!(
                        "cannot give {} to qemu_user {}: {e}",
                        d.display(),
                        user.spec
                    ))
                })?;
            }
        }
        let opts = SpawnOptions {
            binary: self.config.qemu_binary.clone(),
            ready_timeout: Duration::from_secs(self.config.qemu_start_timeout_secs),
            detached: false,
            netns: placement.netns.clone(),
            cgroups: placement.cgroups.clone(),
            sandbox: self.config.qemu_sandbox,
            run_as: qemu_user.map(|u| u.spec),
        };
        // The vsock device is decided at each launch (never stored with the config).
        let mut config = config.clone();
        crate::images::pin_backing(&mut config, &self.config.data_dir)?;
        let cx = LaunchContext {
            env: name,
            dir: &dir,
            placement: &placement,
        };
        for hook in self.hooks() {
            if let Err(e) = hook.prepare(&cx, &mut config).await {
                self.release_hooks(name).await;
                return Err(e);
            }
        }
        // Checked again as QEMU is about to open them: a file may have been swapped.
        if let Err(e) = crate::confine::check_launch(&self.config, &config) {
            self.release_hooks(name).await;
            return Err(e.into());
        }
        if !weave {
            // The taps QEMU is about to create in the root namespace are weft's; taps
            // that exist already are not (weft changes no setting of theirs).
            let taps: Vec<String> = config.nics.iter().map(|n| n.tap.clone()).collect();
            if let Err(e) = self.net().claim_taps(name, &taps).await {
                self.release_hooks(name).await;
                return Err(e);
            }
        }
        let config = &config;
        let process = match weft_qmp::process::spawn(config, &paths, &opts).await {
            Ok(process) => process,
            Err(e) => {
                self.release_hooks(name).await;
                return Err(ApiError::Qemu(one_line(&format!(
                    "cannot start QEMU for {name:?}: {e}"
                ))));
            }
        };
        let pid = process.pid();
        if let Err(e) = self
            .catalog
            .set_state(name, EnvState::Running, Some(pid), None)
            .await
        {
            // Dropping the process kills it: no stray QEMU for a row we could not update.
            drop(process);
            self.release_hooks(name).await;
            return Err(e.into());
        }
        info!(env = %name, pid, "QEMU started");
        let qmp = process.qmp().clone();
        for hook in self.hooks() {
            hook.after_launch(&cx, config, &qmp).await;
        }
        self.install_runtime(name, qmp, Some(Arc::new(process)), Some(pid));
        Ok(())
    }

    /// Records a live environment and starts the task that notices its end.
    fn install_runtime(
        self: &Arc<Self>,
        name: &str,
        qmp: Qmp,
        process: Option<Arc<QemuProcess>>,
        pid: Option<u32>,
    ) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let me = Arc::clone(self);
        let owned_name = name.to_string();
        let watched = qmp.clone();
        let watched_process = process.clone();
        let monitor = tokio::spawn(async move {
            let how = match &watched_process {
                Some(p) => p.wait().await.to_string(),
                None => {
                    watched.closed().await;
                    match pid {
                        Some(pid) => wait_qemu_gone(pid, Duration::from_secs(10)).await,
                        None => "QMP connection closed".to_string(),
                    }
                }
            };
            me.on_exit(&owned_name, generation, &how).await;
        })
        .abort_handle();
        let runtime = Runtime {
            generation,
            qmp,
            process,
            pid,
            monitor,
        };
        self.lock_runtimes().insert(name.to_string(), runtime);
    }

    /// Called by the monitor task when QEMU (or its QMP connection) went away.
    async fn on_exit(&self, name: &str, generation: u64, how: &str) {
        // Under the environment's lock, so a stop, start or delete of the same
        // environment either finished before (and the generation no longer
        // matches) or starts after this record.
        let _op = self.lock_env(name).await;
        {
            let mut runtimes = self.lock_runtimes();
            match runtimes.get(name) {
                Some(r) if r.generation == generation => {
                    runtimes.remove(name);
                }
                // Stopped on request or replaced: whoever did that records it.
                _ => return,
            }
        }
        info!(env = %name, how, "environment stopped on its own");
        self.release_hooks(name).await;
        if let Err(e) = self
            .catalog
            .set_state(name, EnvState::Stopped, None, Some(how))
            .await
        {
            warn!(env = %name, error = %e, "cannot record that the environment stopped");
        }
        let _ = self
            .catalog
            .audit("weftd", "env.exited", Some(name), Some(how), "ok")
            .await;
    }

    /// The catalog row of `name`, or NotFound.
    async fn row(&self, name: &str) -> Result<Environment, ApiError> {
        self.catalog
            .environment(name)
            .await?
            .ok_or_else(|| ApiError::NotFound(name.to_string()))
    }

    /// Changes a managed environment's memory and vCPUs in its stored configuration;
    /// a running QEMU keeps its own until it is started again. The change is checked
    /// as a whole configuration before it is stored.
    pub async fn set_resources(
        &self,
        name: &str,
        memory_mib: Option<u64>,
        cpus: Option<u32>,
    ) -> Result<Environment, ApiError> {
        let _op = self.lock_env(name).await;
        let env = self.row(name).await?;
        let Some(mut config) = env.config.clone().filter(|_| env.kind == EnvKind::Managed) else {
            return Err(ApiError::Conflict(format!(
                "{name:?} is attached: its owner configures its VM"
            )));
        };
        if memory_mib.is_none() && cpus.is_none() {
            return Err(ApiError::BadRequest("give --memory, --cpus or both".into()));
        }
        if let Some(m) = memory_mib {
            config.memory_mib = m;
        }
        if let Some(c) = cpus {
            config.cpus = c;
        }
        config
            .validate()
            .map_err(|e| ApiError::BadRequest(one_line(&e.to_string())))?;
        self.catalog.set_config(name, &config).await?;
        self.row(name).await
    }

    /// Starts a stopped managed environment.
    /// For an attached environment, connects to its QMP socket again (its owner
    /// starts the VM itself).
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<Environment, ApiError> {
        let _op = self.lock_env(name).await;
        let env = self.row(name).await?;
        if env.state != EnvState::Stopped || self.lock_runtimes().contains_key(name) {
            return Err(ApiError::Conflict(format!("{name:?} is already running")));
        }
        if env.kind == EnvKind::Attached {
            let qmp = connect_attached(&self.config, &env.qmp_socket).await.map_err(|e| {
                ApiError::Conflict(format!(
                    "{name:?} is attached and its owner runs it: start the VM there (e.g. `virsh start`) first; {e}"
                ))
            })?;
            self.catalog
                .set_state(name, EnvState::Running, None, None)
                .await?;
            self.install_runtime(name, qmp, None, None);
            return Ok(self.show(name).await?.0);
        }
        // Overlays left pending (a switch whose record failed) are settled first, so
        // QEMU starts on the image that holds the newest writes.
        if self.orphan_pid(&env).is_none() {
            crate::overlays::settle(&self.catalog, name, None).await?;
        }
        let config = self.row(name).await?.config.ok_or_else(|| {
            ApiError::Internal(format!("{name:?} has no stored VM configuration"))
        })?;
        config
            .validate()
            .map_err(|e| ApiError::BadRequest(format!("cannot start {name:?}: {e}")))?;
        self.catalog
            .set_state(name, EnvState::Starting, None, None)
            .await?;
        if let Err(e) = self.launch(name, &config, &env.qmp_socket).await {
            let _ = self
                .catalog
                .set_state(name, EnvState::Stopped, None, Some(&e.to_string()))
                .await;
            return Err(e);
        }
        Ok(self.show(name).await?.0)
    }

    /// Pauses (`stop`) or resumes (`cont`) a running environment's vCPUs. QEMU drains
    /// and flushes every disk when it pauses, so a paused VM's images are consistent on
    /// disk (e.g. for `qemu-img -U` readers).
    pub async fn pause(&self, name: &str, pause: bool) -> Result<Environment, ApiError> {
        let _op = self.lock_env(name).await;
        if self.catalog.environment(name).await?.is_none() {
            return Err(ApiError::NotFound(name.to_string()));
        }
        let qmp = self
            .runtime_qmp(name)
            .ok_or_else(|| ApiError::Conflict(format!("{name:?} is not running")))?;
        let command = if pause { "stop" } else { "cont" };
        qmp.execute_raw(command, None)
            .await
            .map_err(|e| ApiError::Qemu(format!("{command} {name:?}: {e}")))?;
        Ok(self.show(name).await?.0)
    }

    /// Stops an environment: QMP `quit`, then SIGKILL after the stop timeout.
    pub async fn stop(&self, name: &str) -> Result<Environment, ApiError> {
        let _op = self.lock_env(name).await;
        self.stop_locked(name).await?;
        self.release_hooks(name).await;
        Ok(self.show(name).await?.0)
    }

    async fn stop_locked(&self, name: &str) -> Result<(), ApiError> {
        let env = self.row(name).await?;
        let runtime = self.lock_runtimes().remove(name);
        let Some(runtime) = runtime else {
            // A QEMU weftd cannot reach over QMP (left by a crash, or its monitor hangs).
            if env.kind == EnvKind::Managed {
                if let Some(qemu) = self.orphan(&env) {
                    let pid = qemu.pid();
                    let gone = kill_qemu(&qemu, Duration::from_secs(5)).await;
                    let how =
                        format!("killed QEMU pid {pid}, which did not answer on QMP ({gone})");
                    let _ = std::fs::remove_file(&env.qmp_socket);
                    let _ = std::fs::remove_file(self.pid_file(name));
                    self.catalog
                        .set_state(name, EnvState::Stopped, None, Some(&how))
                        .await?;
                    return Ok(());
                }
            }
            if env.state == EnvState::Stopped {
                return Err(ApiError::Conflict(format!("{name:?} is not running")));
            }
            // Recorded as running but nothing live: make the record true.
            self.catalog
                .set_state(name, EnvState::Stopped, None, Some("not running"))
                .await?;
            return Ok(());
        };
        // This stop records the outcome itself; the monitor has nothing to add.
        runtime.monitor.abort();
        let timeout = Duration::from_secs(self.config.stop_timeout_secs);
        // A QEMU whose monitor hangs (stopped process, stuck main loop) never
        // answers: give it the stop timeout, then kill it below.
        match tokio::time::timeout(timeout, runtime.qmp.execute_raw("quit", None)).await {
            Ok(Ok(_)) | Ok(Err(weft_qmp::Error::Closed)) => {}
            Ok(Err(e)) => warn!(env = %name, error = %e, "quit failed; QEMU will be killed"),
            Err(_) => warn!(env = %name, "quit not answered; QEMU will be killed"),
        }
        let how = match (&runtime.process, runtime.pid) {
            (Some(process), _) => match tokio::time::timeout(timeout, process.wait()).await {
                Ok(exit) => format!("stopped on request ({exit})"),
                Err(_) => {
                    process.kill().await;
                    format!("killed after not quitting within {}s", timeout.as_secs())
                }
            },
            (None, Some(pid)) => {
                if tokio::time::timeout(timeout, runtime.qmp.closed())
                    .await
                    .is_err()
                    || weft_qmp::process::process_alive(pid)
                {
                    match Helper::find(pid, &Signature::qemu()) {
                        Some(qemu) if !qemu.wait_gone(Duration::from_secs(3)).await => {
                            // Waits, so an immediate start does not race the dying QEMU
                            // for its images.
                            kill_qemu(&qemu, Duration::from_secs(5)).await;
                            format!("killed after not quitting within {}s", timeout.as_secs())
                        }
                        _ => "stopped on request (exited)".to_string(),
                    }
                } else {
                    "stopped on request".to_string()
                }
            }
            (None, None) => {
                let _ = tokio::time::timeout(timeout, runtime.qmp.closed()).await;
                "stopped on request".to_string()
            }
        };
        if env.kind == EnvKind::Managed {
            let _ = std::fs::remove_file(&env.qmp_socket);
            let _ = std::fs::remove_file(self.pid_file(name));
        }
        self.catalog
            .set_state(name, EnvState::Stopped, None, Some(&how))
            .await?;
        info!(env = %name, how, "environment stopped");
        Ok(())
    }

    /// Deletes an environment: stops it if weftd launched it, forgets it if attached.
    /// Disk images are the operator's and are never removed: the overlays weft put
    /// under them (weaves from now) are committed down into them first, so every
    /// write the guest made stays. Refused for a weave (`weft weave delete`) and while
    /// weaves branch from it.
    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        if let Some(w) = self.catalog.weave(name).await? {
            return Err(ApiError::Conflict(format!(
                "{name:?} is a weave of {:?}, not an environment: delete it with `weft weave delete {name}`",
                w.parent
            )));
        }
        self.remove(name).await
    }

    /// Deletes an environment row of either kind (a weave's too, for its own teardown).
    pub(crate) async fn remove(&self, name: &str) -> Result<(), ApiError> {
        let _op = self.lock_env(name).await;
        let env = self.row(name).await?;
        let weaves = self.catalog.weaves(Some(name)).await?;
        if !weaves.is_empty() {
            let names: Vec<&str> = weaves.iter().map(|w| w.name.as_str()).collect();
            return Err(ApiError::Conflict(format!(
                "{name:?} has weaves that branch from it and may read its images ({}): delete them first (`weft weave delete {}`), then delete {name} again (its overlays are then committed into its images)",
                names.join(", "),
                names[0]
            )));
        }
        match env.kind {
            EnvKind::Managed => {
                self.give_back_overlays(&env).await?;
                if self.lock_runtimes().contains_key(name) || self.orphan_pid(&env).is_some() {
                    self.stop_locked(name).await?;
                }
                for hook in self.hooks() {
                    hook.forget(name).await;
                }
                remove_dir_quietly(&self.env_dir(name));
                let _ = std::fs::remove_file(&env.qmp_socket);
            }
            EnvKind::Attached => {
                // Closing our QMP connection leaves the VM to its owner.
                if let Some(runtime) = self.lock_runtimes().remove(name) {
                    runtime.monitor.abort();
                }
            }
        }
        self.catalog.delete_environment(name).await?;
        // Its data history goes with it.
        self.remove_provenance(name).await?;
        Ok(())
    }

    /// Commits the overlays weft put under `env`'s disks down into the images the user
    /// gave, and makes the configuration name those images again, disk by disk. A
    /// running QEMU commits with its vCPUs paused (nothing is written behind the
    /// commit, so the overlay and the image agree at every instant); a stopped
    /// environment's disks are opened in a qemu-storage-daemon. An overlay file is
    /// removed only after its disk is committed and the catalog says so; on failure a
    /// running environment is resumed and keeps running.
    async fn give_back_overlays(&self, env: &Environment) -> Result<(), ApiError> {
        let name = env.name.as_str();
        let mut live = self.runtime_qmp(name);
        if live.is_none() && self.orphan_pid(env).is_some() {
            // A QEMU that does not answer may still write: it goes first.
            self.stop_locked(name).await?;
        }
        crate::overlays::settle(&self.catalog, name, live.as_ref()).await?;
        let overlays = self.catalog.env_overlays(name).await?;
        if overlays.is_empty() {
            return Ok(());
        }
        if live.is_some() && self.config.qemu_user.is_some() {
            // A QEMU that dropped to qemu_user cannot reopen the user's image for
            // writing: it stops (the environment is being deleted), and the commit
            // runs in a qemu-storage-daemon, as for a stopped environment.
            self.stop_locked(name).await?;
            live = None;
        }
        let config = self.row(name).await?.config.ok_or_else(|| {
            ApiError::Internal(format!("{name:?} has no stored VM configuration"))
        })?;
        let mut disks: Vec<DiskConfig> = config
            .disks
            .iter()
            .filter(|d| overlays.iter().any(|o| o.disk == d.name))
            .cloned()
            .collect();
        for disk in disks.iter_mut() {
            crate::images::pin_disk(disk, &self.config.data_dir)?;
        }
        let mut daemon = None;
        let mut resume = false;
        let qmp = match live {
            Some(qmp) => {
                // Resumed on failure only if it ran (a VM its user paused stays paused).
                resume = query_runstate(&qmp).await.as_deref() == Some("running");
                qmp.execute_raw("stop", None)
                    .await
                    .map_err(|e| ApiError::Qemu(format!("pausing {name:?} to commit: {e}")))?;
                qmp
            }
            None => {
                let dir = self.config.run_dir.join("backup");
                std::fs::create_dir_all(&dir).map_err(|e| {
                    ApiError::Internal(format!("cannot create {}: {e}", dir.display()))
                })?;
                let base = crate::names::join(&[name, "commit"]);
                let paths = LaunchPaths {
                    qmp_socket: dir.join(format!("{base}.qmp")),
                    serial_log: dir.join(format!("{base}.serial")),
                    output_log: dir.join(format!("{base}.log")),
                    // Found and ended by the next weftd's recovery if this one dies.
                    pid_file: Some(dir.join(format!("{base}.pid"))),
                };
                crate::confine::check_disks(&self.config, &disks)?;
                let process = weft_qmp::process::spawn_storage_daemon(
                    &disks,
                    &paths,
                    &SpawnOptions::default(),
                )
                .await
                .map_err(|e| {
                    ApiError::Qemu(one_line(&format!(
                        "cannot open the disks of {name:?} to commit them: {e}"
                    )))
                })?;
                let qmp = process.qmp().clone();
                daemon = Some(process);
                qmp
            }
        };
        let mut committed = config.clone();
        let result = async {
            for disk in &disks {
                let mine: Vec<PathBuf> = overlays
                    .iter()
                    .filter(|o| o.disk == disk.name)
                    .map(|o| o.path.clone())
                    .collect();
                let (origin, format) =
                    crate::overlays::origin_of(&self.catalog, name, disk).await?;
                let root = match daemon {
                    Some(_) => disk.format_node(),
                    None => crate::overlays::device_root(&qmp, &disk.name).await?,
                };
                let job = format!("weft-commit-{}", disk.name);
                crate::overlays::commit_down(&qmp, &root, &origin, format, &job).await?;
                // The user's image holds everything now: the configuration names it
                // before any overlay file goes.
                if let Some(d) = committed.disks.iter_mut().find(|d| d.name == disk.name) {
                    // What lies below the user's image stays below it.
                    *d = disk.rebased_to(&origin).unwrap_or_else(|| DiskConfig {
                        path: origin.clone(),
                        format,
                        backing: Vec::new(),
                        ..disk.clone()
                    });
                }
                self.catalog
                    .forget_overlays(name, &mine, Some(&committed))
                    .await?;
                for p in &mine {
                    let _ = std::fs::remove_file(p);
                }
                info!(env = %name, disk = %disk.name, origin = %origin.display(), "overlays committed into the disk's image");
            }
            Ok::<(), ApiError>(())
        }
        .await;
        match daemon {
            Some(process) => {
                let _ = qmp.execute_raw("quit", None).await;
                if tokio::time::timeout(Duration::from_secs(20), process.wait())
                    .await
                    .is_err()
                {
                    warn!(env = %name, "qemu-storage-daemon did not quit; killing it");
                    process.kill().await;
                }
            }
            None if result.is_err() && resume => {
                let _ = qmp.execute_raw("cont", None).await;
            }
            None => {}
        }
        result
    }

    /// Brings the live side in step with the catalog after weftd starts:
    /// environments whose QEMU still runs are re-attached through their QMP
    /// sockets, dead ones are marked stopped. Runs before the API is served.
    pub async fn recover(self: &Arc<Self>) -> Result<(), ApiError> {
        for env in self.catalog.environments().await? {
            if env.state == EnvState::Stopped {
                // A vsock device left by a weftd that died before ending it.
                if env.kind == EnvKind::Managed {
                    self.release_hooks(&env.name).await;
                    self.settle_overlays(&env.name, None).await;
                }
                continue;
            }
            let (detail, result) = match self.reattach(&env).await {
                Recovered::Reattached => {
                    if env.kind == EnvKind::Managed {
                        for hook in self.hooks() {
                            hook.reattach(&env.name).await;
                        }
                    }
                    ("re-attached".to_string(), "ok")
                }
                Recovered::Stopped(reason) => {
                    if env.kind == EnvKind::Managed {
                        self.release_hooks(&env.name).await;
                    }
                    self.catalog
                        .set_state(&env.name, EnvState::Stopped, None, Some(&reason))
                        .await?;
                    (reason, "marked stopped")
                }
                Recovered::Unreachable(reason) => {
                    warn!(env = %env.name, %reason, "QEMU runs but does not answer on QMP");
                    // Its guest still runs: its DPA may still stream.
                    if env.kind == EnvKind::Managed {
                        for hook in self.hooks() {
                            hook.reattach(&env.name).await;
                        }
                    }
                    (reason, "unreachable")
                }
            };
            // Overlays a weave from now was switching to when weftd stopped: settled
            // against what QEMU runs on (nothing to ask while QEMU may run unanswering).
            if env.kind == EnvKind::Managed && result != "unreachable" {
                let qmp = self.runtime_qmp(&env.name);
                self.settle_overlays(&env.name, qmp.as_ref()).await;
            }
            info!(env = %env.name, %detail, result, "recovered");
            self.catalog
                .audit(
                    "weftd",
                    "env.recover",
                    Some(&env.name),
                    Some(&detail),
                    result,
                )
                .await?;
        }
        Ok(())
    }

    /// Settles `name`'s pending overlays ([`crate::overlays::settle`]); what it did is
    /// audited, a failure logged and audited (recovery goes on).
    async fn settle_overlays(&self, name: &str, qmp: Option<&Qmp>) {
        let (detail, result) = match crate::overlays::settle(&self.catalog, name, qmp).await {
            Ok(done) if done.is_empty() => return,
            Ok(done) => (done.join("; "), "ok"),
            Err(e) => {
                warn!(env = %name, error = %e, "cannot settle the environment's overlays");
                (e.to_string(), "failed")
            }
        };
        let _ = self
            .catalog
            .audit("weftd", "env.overlays", Some(name), Some(&detail), result)
            .await;
    }

    async fn reattach(self: &Arc<Self>, env: &Environment) -> Recovered {
        let live = match env.kind {
            EnvKind::Managed => match self.orphan(env) {
                None if env.state == EnvState::Starting => {
                    return Recovered::Stopped("weftd stopped while QEMU was starting".into())
                }
                None => {
                    return Recovered::Stopped("QEMU exited while weftd was not running".into())
                }
                Some(qemu) if env.state == EnvState::Starting => {
                    // Nobody was told this launch succeeded: undo it.
                    let pid = qemu.pid();
                    let gone = kill_qemu(&qemu, Duration::from_secs(5)).await;
                    let _ = std::fs::remove_file(&env.qmp_socket);
                    let _ = std::fs::remove_file(self.pid_file(&env.name));
                    return Recovered::Stopped(format!(
                        "weftd stopped while QEMU was starting; QEMU pid {pid} was killed ({gone})"
                    ));
                }
                Some(qemu) => Some(qemu.pid()),
            },
            EnvKind::Attached => None,
        };
        let connected = match env.kind {
            // An attached socket is checked again, as at attach.
            EnvKind::Attached => connect_attached(&self.config, &env.qmp_socket)
                .await
                .map_err(|e| e.to_string()),
            EnvKind::Managed => Qmp::connect_timeout(&env.qmp_socket, Duration::from_secs(5))
                .await
                .map_err(|e| e.to_string()),
        };
        let qmp = match connected {
            Ok(qmp) => qmp,
            Err(e) => {
                let reason = format!(
                    "QMP socket {} did not answer after restart: {e}",
                    env.qmp_socket.display()
                );
                return match live {
                    Some(pid) => Recovered::Unreachable(format!(
                        "{reason}; QEMU pid {pid} still runs (`weft env stop {}` ends it)",
                        env.name
                    )),
                    None => Recovered::Stopped(reason),
                };
            }
        };
        if let Err(e) = self
            .catalog
            .set_state(&env.name, EnvState::Running, live, None)
            .await
        {
            return Recovered::Unreachable(format!("cannot record the re-attach: {e}"));
        }
        self.install_runtime(&env.name, qmp, None, live);
        Recovered::Reattached
    }

    /// Refuses QMP sockets weftd must not attach to: relative paths, sockets of the
    /// environments weftd launches, and sockets another environment already uses.
    /// The real path of the QMP socket an attach names: a socket outside weftd's own
    /// directories (see [`crate::confine::attach_socket`]) no environment uses yet.
    async fn check_attachable(&self, socket: &Path) -> Result<PathBuf, ApiError> {
        let (_, real) = crate::confine::attach_socket(&self.config, socket)?;
        check_socket_path(&real)?;
        if let Some(other) = self
            .catalog
            .environments()
            .await?
            .into_iter()
            .find(|e| e.qmp_socket == real || e.qmp_socket == socket)
        {
            return Err(ApiError::Conflict(format!(
                "environment {:?} already uses the QMP socket {}",
                other.name,
                socket.display()
            )));
        }
        Ok(real)
    }

    /// Lets every QEMU launched by this weftd outlive it (graceful shutdown).
    pub fn detach_all(&self) {
        for (name, runtime) in self.lock_runtimes().drain() {
            runtime.monitor.abort();
            if let Some(process) = runtime.process {
                let pid = process.detach();
                info!(env = %name, pid, "leaving QEMU running");
            }
        }
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

async fn connect_attached(config: &Config, socket: &Path) -> Result<Qmp, ApiError> {
    // Connected through the descriptor of the socket that was checked, so a name
    // swapped after the check cannot redirect the connection.
    let (fd, _) = crate::confine::attach_socket(config, socket)?;
    let via = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    Qmp::connect_timeout(&via, Duration::from_secs(5))
        .await
        .map_err(|e| {
            ApiError::BadRequest(format!(
                "{} does not answer as a QMP socket: {e}",
                socket.display()
            ))
        })
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

/// Kills QEMU (not our child: found again after a restart) with SIGKILL and waits up
/// to `wait` until it is gone: "exited", or that it still runs.
async fn kill_qemu(qemu: &Helper, wait: Duration) -> String {
    match qemu.stop(Stop::kill(wait)).await {
        Ended::Stuck => format!("QMP closed but pid {} still runs", qemu.pid()),
        _ => "exited".to_string(),
    }
}

/// Waits up to `timeout` until QEMU `pid` (not our child) is gone: "exited", or that
/// it still runs.
async fn wait_qemu_gone(pid: u32, timeout: Duration) -> String {
    match Helper::find(pid, &Signature::qemu()) {
        Some(qemu) if !qemu.wait_gone(timeout).await => {
            format!("QMP closed but pid {pid} still runs")
        }
        _ => "exited".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("web-1").is_ok());
        assert!(check_name("a").is_ok());
        for bad in ["", "-x", "Web", "a/b", "a b", &"x".repeat(33)] {
            assert!(
                matches!(check_name(bad), Err(ApiError::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn a_name_is_held_by_one_create_at_a_time() {
        let catalog = Catalog::open_in_memory().await.unwrap();
        let manager = Manager::new(Config::default(), catalog.clone());
        let first = manager.reserve("web").await.unwrap();
        assert_eq!(first.name(), "web");
        let again = manager.reserve("web").await.err().unwrap();
        assert!(matches!(again, ApiError::Conflict(_)), "{again}");
        // Other names are free; the name is free again once the hold is gone.
        let other = manager.reserve("db").await.unwrap();
        drop(first);
        let second = manager.reserve("web").await.unwrap();
        drop((second, other));
        // A name an environment has is refused, and not left held.
        let config = VmConfig::default();
        catalog
            .insert_environment(&NewEnvironment {
                name: "web",
                kind: EnvKind::Managed,
                config: Some(&config),
                qmp_socket: Path::new("/run/web.sock"),
                state: EnvState::Stopped,
                pid: None,
            })
            .await
            .unwrap();
        for _ in 0..2 {
            let taken = manager.reserve("web").await.err().unwrap();
            assert!(matches!(taken, ApiError::Duplicate(_)), "{taken}");
        }
    }

    #[test]
    fn disk_names_default_in_order() {
        assert_eq!(default_disk_name(0).unwrap(), "vda");
        assert_eq!(default_disk_name(2).unwrap(), "vdc");
        assert!(default_disk_name(26).is_err());
    }

    fn disk(path: &Path) -> DiskRequest {
        DiskRequest {
            path: path.to_owned(),
            name: None,
            format: None,
            read_only: false,
            backing: None,
        }
    }

    #[test]
    fn vm_config_rejects_missing_disks_and_relative_paths() {
        let e = vm_config(vec![], None, None, None, None, None).unwrap_err();
        assert!(e.to_string().contains("--disk"), "{e}");
        let rel = disk(Path::new("disk.img"));
        let e = vm_config(vec![rel], None, None, None, None, None).unwrap_err();
        assert!(e.to_string().contains("relative"), "{e}");
        let missing = disk(Path::new("/nonexistent/disk.img"));
        let e = vm_config(vec![missing], None, None, None, None, None).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
    }

    #[test]
    fn vm_config_fills_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let disk_path = dir.path().join("d.img");
        std::fs::write(&disk_path, vec![0u8; 4096]).unwrap();
        let c = vm_config(vec![disk(&disk_path)], None, Some(2), None, None, None).unwrap();
        assert_eq!(c.memory_mib, DEFAULT_MEMORY_MIB);
        assert_eq!(c.cpus, 2);
        assert_eq!(c.disks[0].name, "vda");
        assert_eq!(c.disks[0].format, weft_qmp::launch::DiskFormat::Raw);
        assert_eq!(c.disks[0].path, disk_path);
    }
}
