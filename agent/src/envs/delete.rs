//! Deleting environments: their QEMU, their files, the overlays weft put under their disks.

use super::*;

impl Manager {
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
    pub(super) async fn give_back_overlays(&self, env: &Environment) -> Result<(), ApiError> {
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
                    .map_err(|e| ApiError::qmp(format!("pausing {name:?} to commit"), e))?;
                qmp
            }
            None => {
                let dir = self.config.run_dir.join("backup");
                std::fs::create_dir_all(&dir)
                    .map_err(|e| ApiError::io(format!("cannot create {}", dir.display()), e))?;
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
                    ApiError::qmp(
                        format!("cannot open the disks of {name:?} to commit them"),
                        e,
                    )
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
}
