//! An environment's life: launching QEMU (the launch pipeline's hooks around it), watching it end, start, pause, stop, memory and vCPUs.

use super::*;

impl Manager {
    /// Launches QEMU for a managed environment and records it as running.
    pub(super) async fn launch(
        self: &Arc<Self>,
        name: &str,
        config: &VmConfig,
        socket: &Path,
    ) -> Result<(), ApiError> {
        let files = self.files(name);
        let dir = self.env_dir(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::io(format!("cannot create {}", dir.display()), e))?;
        if let Some(parent) = socket.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| ApiError::io(format!("cannot create {}", parent.display()), e))?;
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
        let placement =
            crate::placement::of(&self.catalog, self.host.cgroups().as_ref(), name).await?;
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
                    ApiError::io(
                        format!("cannot give {} to qemu_user {}", d.display(), user.spec),
                        e,
                    )
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
        let launched = match self
            .host
            .processes()
            .spawn_qemu(config, &paths, &opts)
            .await
        {
            Ok(launched) => launched,
            Err(e) => {
                self.release_hooks(name).await;
                return Err(ApiError::qmp(format!("cannot start QEMU for {name:?}"), e));
            }
        };
        let pid = launched.process.as_ref().map(QemuProcess::pid);
        if let Err(e) = self
            .catalog
            .set_state(name, EnvState::Running, pid, None)
            .await
        {
            // Dropping the process kills it: no stray QEMU for a row we could not update.
            drop(launched);
            self.release_hooks(name).await;
            return Err(e.into());
        }
        match pid {
            Some(pid) => info!(env = %name, pid, "QEMU started"),
            None => info!(env = %name, "QEMU started"),
        }
        let qmp = launched.qmp.clone();
        for hook in self.hooks() {
            hook.after_launch(&cx, config, &qmp).await;
        }
        self.install_runtime(name, qmp, launched.process.map(Arc::new), pid);
        Ok(())
    }

    /// Records a live environment and starts the task that notices its end.
    pub(super) fn install_runtime(
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
    pub(super) async fn on_exit(&self, name: &str, generation: u64, how: &str) {
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
            let qmp = recovery::connect_attached(&self.config, &env.qmp_socket).await.map_err(|e| {
                ApiError::Conflict(format!(
                    "{name:?} is attached and its owner runs it: start the VM there (e.g. `virsh start`) first; {}",
                    e.one_line()
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
                .set_state(name, EnvState::Stopped, None, Some(&e.one_line()))
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
            .map_err(|e| ApiError::qmp(format!("{command} {name:?}"), e))?;
        Ok(self.show(name).await?.0)
    }

    /// Stops an environment: QMP `quit`, then SIGKILL after the stop timeout.
    pub async fn stop(&self, name: &str) -> Result<Environment, ApiError> {
        let _op = self.lock_env(name).await;
        self.stop_locked(name).await?;
        self.release_hooks(name).await;
        Ok(self.show(name).await?.0)
    }

    pub(super) async fn stop_locked(&self, name: &str) -> Result<(), ApiError> {
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
}

/// Kills QEMU (not our child: found again after a restart) with SIGKILL and waits up
/// to `wait` until it is gone: "exited", or that it still runs.
pub(super) async fn kill_qemu(qemu: &Helper, wait: Duration) -> String {
    match qemu.stop(Stop::kill(wait)).await {
        Ended::Stuck => format!("QMP closed but pid {} still runs", qemu.pid()),
        _ => "exited".to_string(),
    }
}

/// Waits up to `timeout` until QEMU `pid` (not our child) is gone: "exited", or that
/// it still runs.
pub(super) async fn wait_qemu_gone(pid: u32, timeout: Duration) -> String {
    match Helper::find(pid, &Signature::qemu()) {
        Some(qemu) if !qemu.wait_gone(timeout).await => {
            format!("QMP closed but pid {pid} still runs")
        }
        _ => "exited".to_string(),
    }
}
