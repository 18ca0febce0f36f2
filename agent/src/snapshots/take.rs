//! Taking snapshots: a disk's full or incremental pull over NBD (live through QMP, or offline through qemu-storage-daemon) and the VM configuration.

use super::*;
use weft_api::resource::ResourceId;

impl Snapshots {
    /// Takes snapshots of `resource` (`all`, `config` or `disk:<name>`) as a job.
    pub async fn create(
        self: &Arc<Self>,
        env_name: &str,
        resource: Option<&str>,
        category: Option<String>,
        note: Option<String>,
        actor: &str,
    ) -> Result<Job, ApiError> {
        let (env, _) = self.manager.show(env_name).await?;
        if env.kind == EnvKind::Attached {
            return Err(ApiError::Conflict(format!(
                "{env_name:?} is attached: weft does not know its disks' node names yet; snapshot a managed environment"
            )));
        }
        let config = env.config.clone().ok_or_else(|| {
            ApiError::Internal(format!("{env_name:?} has no stored configuration"))
        })?;
        let resource = resource.unwrap_or("all").to_string();
        // Disks served live by weft-blk are outside QEMU's block layer: no dirty
        // bitmap, no NBD export. Refused by name rather than left out of `all`.
        let served: Vec<&str> = config
            .vhost_user_disks
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        let served_asked = match resource.as_str() {
            "all" => served.clone(),
            r => served
                .iter()
                .copied()
                .filter(|d| ResourceId::disk_of(r).as_deref() == Some(*d))
                .collect(),
        };
        if !served_asked.is_empty() {
            return Err(ApiError::Conflict(format!(
                "{env_name:?} serves disk(s) {} live through weft-blk (a weave made with --live); \
                 snapshots of served disks are not supported yet: snapshot --resource config or net, \
                 or make the weave without --live",
                served_asked.join(", ")
            )));
        }
        let disks: Vec<DiskConfig> = match resource.as_str() {
            "all" => config.disks.clone(),
            "config" | "net" => Vec::new(),
            r => match ResourceId::disk_of(r) {
                Some(d) => vec![config
                    .disks
                    .iter()
                    .find(|c| c.name == d)
                    .cloned()
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "{env_name:?} has no disk {d:?}; its disks: {}",
                            disk_names(&config.disks)
                        ))
                    })?],
                None => {
                    return Err(ApiError::BadRequest(format!(
                        "unknown resource {r:?}: use all, config, net or disk:<name>"
                    )))
                }
            },
        };
        let with_config = matches!(resource.as_str(), "all" | "config");
        // The network setup as it is now, the request's instant.
        let net = match resource.as_str() {
            "all" | "net" => Some(self.manager.catalog().net_setup(env_name).await?),
            _ => None,
        };
        let (name, actor_owned) = (env_name.to_string(), actor.to_string());
        // One request, one instant: every resource's snapshot carries it.
        let instant = crate::catalog::now();
        self.spawn_job(
            "snapshot",
            &format!("{env_name} {resource}"),
            actor,
            move |me, progress| async move {
                let mut ids = Vec::new();
                if with_config {
                    ids.push(
                        me.manager
                            .catalog()
                            .insert_snapshot(&NewSnapshot {
                                env: &name,
                                resource: "config",
                                kind: SnapshotKind::Config,
                                actor: &actor_owned,
                                category: category.as_deref(),
                                note: note.as_deref(),
                                parent: None,
                                reason: None,
                                config: Some(&config),
                                taken_at: &instant,
                            })
                            .await?,
                    );
                }
                for disk in &disks {
                    ids.push(
                        me.snapshot_disk(
                            &name,
                            disk,
                            &Meta {
                                instant: &instant,
                                actor: &actor_owned,
                                category: category.as_deref(),
                                note: note.as_deref(),
                            },
                            &progress,
                        )
                        .await?,
                    );
                }
                if let Some(net) = &net {
                    // Last: callers take the first id of `all` for its config snapshot.
                    ids.push(
                        me.manager
                            .catalog()
                            .insert_net_snapshot(
                                net,
                                &actor_owned,
                                category.as_deref(),
                                note.as_deref(),
                                &instant,
                            )
                            .await?,
                    );
                }
                Ok(json!({ "snapshots": ids }))
            },
        )
        .await
    }

    pub(super) async fn snapshot_disk(
        &self,
        env: &str,
        disk: &DiskConfig,
        meta: &Meta<'_>,
        progress: &(AtomicU64, AtomicU64),
    ) -> Result<i64, ApiError> {
        let _lock = self.manager.lock_env(env).await;
        // A running environment is backed up through its QEMU; a stopped one through a
        // qemu-storage-daemon that opens the disk (and its bitmaps) for this snapshot.
        let (qmp, daemon) = match self.manager.live_qmp(env) {
            Some(qmp) => (qmp, None),
            None => {
                let daemon = self.open_offline(env, disk).await?;
                crate::testpoints::point("snapshot.offline").await;
                (daemon.0.qmp().clone(), Some(daemon))
            }
        };
        // The disk's top node now: after a live external snapshot (a weave from now) the
        // device sits on an overlay, and only that node sees (and tracks) new writes.
        let node = match &daemon {
            Some(_) => Ok(disk.format_node()),
            None => backup::device_root_node(&qmp, &disk.name)
                .await
                .map_err(|e| ApiError::qmp(format!("disk {}", disk.name), e)),
        };
        let result = match node {
            Ok(node) => {
                self.snapshot_disk_through(env, disk, &node, meta, progress, &qmp)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Some((daemon, paths)) = daemon {
            // quit stores the bitmaps in the image; a daemon that does not go is killed
            // (and the next snapshot is a full one).
            let _ = qmp.execute_raw("quit", None).await;
            if tokio::time::timeout(std::time::Duration::from_secs(20), daemon.wait())
                .await
                .is_err()
            {
                warn!(env, disk = %disk.name, "qemu-storage-daemon did not quit; killing it");
                daemon.kill().await;
            }
            restore::remove_launch_files(&paths);
        }
        result
    }

    /// Opens a stopped environment's disk in qemu-storage-daemon.
    pub(super) async fn open_offline(
        &self,
        env: &str,
        disk: &DiskConfig,
    ) -> Result<
        (
            weft_qmp::process::QemuProcess,
            weft_qmp::launch::LaunchPaths,
        ),
        ApiError,
    > {
        let dir = self.manager.config().run_dir.join("backup");
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::io(format!("cannot create {}", dir.display()), e))?;
        let base = crate::names::join(&[env, &disk.name, "offline"]);
        let paths = weft_qmp::launch::LaunchPaths {
            qmp_socket: dir.join(format!("{base}.qmp")),
            serial_log: dir.join(format!("{base}.serial")),
            output_log: dir.join(format!("{base}.log")),
            // It outlives a weftd that dies: the next one finds it by this file.
            pid_file: Some(dir.join(format!("{base}.pid"))),
        };
        crate::confine::check_disks(self.manager.config(), std::slice::from_ref(disk))?;
        info!(env, disk = %disk.name, "environment not running: opening its disk in qemu-storage-daemon");
        let mut disk = disk.clone();
        crate::images::pin_disk(&mut disk, &self.manager.config().data_dir)?;
        weft_qmp::process::spawn_storage_daemon(
            std::slice::from_ref(&disk),
            &paths,
            &weft_qmp::process::SpawnOptions::default(),
        )
        .await
        .map(|daemon| (daemon, paths.clone()))
        .map_err(|e| {
            restore::remove_launch_files(&paths);
            ApiError::qmp(
                format!(
                    "disk {} of stopped {env:?}: cannot open it in qemu-storage-daemon",
                    disk.name
                ),
                e,
            )
        })
    }

    pub(super) async fn snapshot_disk_through(
        &self,
        env: &str,
        disk: &DiskConfig,
        node: &str,
        meta: &Meta<'_>,
        progress: &(AtomicU64, AtomicU64),
        qmp: &weft_qmp::Qmp,
    ) -> Result<i64, ApiError> {
        let qmp = qmp.clone();
        let catalog = self.manager.catalog();
        let resource = format!("disk:{}", disk.name);
        let qemu = |e: weft_qmp::Error| ApiError::qmp(format!("disk {}", disk.name), e);

        // Incremental from the last complete snapshot's checkpoint if QEMU still has it
        // intact; otherwise a full, saying why.
        let previous = catalog.latest_snapshot(env, &resource).await?;
        let mut reason = None;
        let mut base = None;
        match &previous {
            None => reason = Some("first snapshot of this disk".to_string()),
            Some(p) => match &p.checkpoint {
                None => reason = Some(format!("snapshot {} has no checkpoint", p.id)),
                Some(cp) => match backup::checkpoint_problem(&qmp, node, cp)
                    .await
                    .map_err(qemu)?
                {
                    Some(problem) => reason = Some(problem),
                    None => base = Some((p.clone(), cp.clone())),
                },
            },
        }
        if let Some(r) = &reason {
            info!(env, disk = %disk.name, reason = %r, "full snapshot");
        }
        let removed = backup::clean_leftovers(
            &qmp,
            node,
            CHECKPOINT_PREFIX,
            base.as_ref().map(|(_, cp)| cp.as_str()),
        )
        .await
        .map_err(qemu)?;
        if !removed.is_empty() {
            warn!(env, disk = %disk.name, ?removed, "removed what an interrupted backup left in QEMU");
        }
        let parent_map = match &base {
            Some((p, _)) => {
                let name = p.index_name.clone().ok_or_else(|| {
                    ApiError::Internal(format!("snapshot {} has no block map", p.id))
                })?;
                let store = self.store.clone();
                Some(
                    blocking(move || store.read_index(&name))
                        .await?
                        .map_err(store_err)?,
                )
            }
            None => None,
        };
        let id = catalog
            .insert_snapshot(&NewSnapshot {
                env,
                resource: &resource,
                kind: if base.is_some() {
                    SnapshotKind::Incremental
                } else {
                    SnapshotKind::Full
                },
                actor: meta.actor,
                category: meta.category,
                note: meta.note,
                parent: base.as_ref().map(|(p, _)| p.id),
                reason: reason.as_deref(),
                config: None,
                taken_at: meta.instant,
            })
            .await?;
        let result = self
            .pull_disk(
                env,
                disk,
                node,
                id,
                base.map(|(_, cp)| cp),
                parent_map,
                &qmp,
                progress,
            )
            .await;
        match result {
            Ok(()) => Ok(id),
            Err(e) => {
                let message = e.one_line();
                catalog.fail_snapshot(id, &message).await?;
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn pull_disk(
        &self,
        env: &str,
        disk: &DiskConfig,
        node: &str,
        id: i64,
        since: Option<String>,
        parent: Option<BlockMap>,
        qmp: &weft_qmp::Qmp,
        progress: &(AtomicU64, AtomicU64),
    ) -> Result<(), ApiError> {
        let catalog = self.manager.catalog();
        // Until its block map is written, gc keeps what this snapshot puts.
        let _writing = self.store.begin_write();
        let resource = format!("disk:{}", disk.name);
        let checkpoint = format!("{CHECKPOINT_PREFIX}{id}");
        // A raw or qcow2 v2 image cannot store bitmaps: its checkpoint lives only as
        // long as QEMU does (a restart means a full snapshot, with that reason).
        let qemu_err = |e: weft_qmp::Error| ApiError::qmp(format!("disk {}", disk.name), e);
        let unsupported = backup::persistent_bitmaps_unsupported(qmp, node)
            .await
            .map_err(qemu_err)?;
        if let Some(why) = &unsupported {
            info!(env, disk = %disk.name, why = %why, "checkpoint kept in QEMU's memory only");
        }
        let persistent = unsupported.is_none();
        catalog.set_snapshot_checkpoint(id, &checkpoint).await?;
        let work_dir = self.manager.config().run_dir.join("backup");
        std::fs::create_dir_all(&work_dir)
            .map_err(|e| ApiError::io(format!("cannot create {}", work_dir.display()), e))?;
        let spec = PullBackupSpec {
            node: node.to_string(),
            new_checkpoint: checkpoint,
            persistent,
            since,
            scratch: work_dir.join(format!(
                "{}.fleece.qcow2",
                crate::names::join(&[env, &id.to_string()])
            )),
            nbd_socket: work_dir.join(format!(
                "{}.nbd",
                crate::names::join(&[env, &id.to_string()])
            )),
            export: disk.name.clone(),
            token: id.to_string(),
        };
        let qemu = |e: weft_qmp::Error| ApiError::qmp(format!("disk {}", disk.name), e);
        let running = backup::start(qmp, spec.clone()).await.map_err(qemu)?;
        let pulled = async {
            let mut contexts = vec!["base:allocation"];
            if let Some(c) = &running.dirty_context {
                contexts.push(c);
            }
            let nbd = NbdClient::connect_unix(&spec.nbd_socket, &spec.export, &contexts)
                .await
                .map_err(|e| ApiError::nbd(format!("disk {}", disk.name), e))?;
            let kind = match (&running.dirty_context, parent) {
                (Some(context), Some(parent)) => PullKind::Incremental {
                    context: context.clone(),
                    parent,
                },
                _ => PullKind::Full,
            };
            let report = |done: u64, total: u64| {
                progress.0.store(done, Ordering::Relaxed);
                progress.1.store(total, Ordering::Relaxed);
            };
            let (map, stats) = pull::pull(&nbd, Arc::new(self.store.clone()), &kind, &report)
                .await
                .map_err(|e| ApiError::pull(format!("disk {}", disk.name), e))?;
            let _ = nbd.disconnect().await;
            Ok::<_, ApiError>((map, stats))
        }
        .await;
        let (map, stats) = match pulled {
            Ok(v) => v,
            Err(e) => {
                running.abort().await;
                return Err(e);
            }
        };
        crate::testpoints::point("snapshot.pulled").await;
        let name = index_name(env, &resource, id);
        let digest = pull::digest_of(&map);
        let size = map.disk_size;
        let store = self.store.clone();
        let index = name.clone();
        if let Err(e) = blocking(move || store.write_index(&index, &map))
            .await?
            .map_err(store_err)
        {
            running.abort().await;
            return Err(e);
        }
        // The block map is durable: the new checkpoint becomes the base.
        running.finish().await.map_err(qemu)?;
        catalog
            .complete_snapshot(
                id,
                &Completed {
                    size,
                    checksum: &digest,
                    index_name: &name,
                    bytes_marked: stats.bytes_marked,
                    bytes_read: stats.bytes_read,
                    bytes_new: stats.bytes_stored,
                },
            )
            .await?;
        info!(env, disk = %disk.name, id, bytes_read = stats.bytes_read, bytes_new = stats.bytes_stored, "disk snapshot complete");
        Ok(())
    }
}
