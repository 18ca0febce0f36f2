//! Creating a weave: its disks assembled (qcow2 overlays over restored bases, or served live by weft-blk), its namespace and DHCP, a weave from now.

use super::*;

impl Weaves {
    /// Creates and starts a weave of `parent`.
    pub async fn create(
        self: &Arc<Self>,
        parent: &str,
        req: CreateWeave,
    ) -> Result<Weave, ApiError> {
        let catalog = self.manager.catalog();
        let env = catalog
            .environment(parent)
            .await?
            .ok_or_else(|| ApiError::NotFound(parent.to_string()))?;
        if env.kind != EnvKind::Managed || catalog.weave(parent).await?.is_some() {
            return Err(ApiError::Conflict(format!(
                "weaves branch from managed environments; {parent:?} is not one"
            )));
        }
        let slots = self.manager.config().net.slots();
        // The slot is held until its row exists, so concurrent creates take different ones.
        let slot = self.hold_slot(slots.clone()).await?.ok_or_else(|| {
            ApiError::Conflict(format!(
                "all weave network slots ({}-{}, [net] in weftd.toml) are in use",
                slots.start(),
                slots.end()
            ))
        })?;
        let index = slot.index;
        let name = req.name.clone().unwrap_or_else(|| format!("w{index}"));
        check_weave_name(&name)?;
        // The name is this request's until it returns: a concurrent create of the same
        // name is refused here, before it makes (or, failing, removes) anything.
        let _hold = self.manager.reserve(&name).await?;
        let dir = self.dir(&name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::io(format!("cannot create {}", dir.display()), e))?;
        // A weave from now gets its overlays from the environment's running QEMU.
        if let Some(user) =
            crate::qemu_user::QemuUser::of(self.manager.config().qemu_user.as_deref())
                .map_err(ApiError::BadRequest)?
        {
            user.give_dir(&self.manager.config().data_dir, &dir)
                .map_err(|e| {
                    ApiError::io(format!("cannot give {} to qemu_user", dir.display()), e)
                })?;
        }
        let made = self
            .assemble(
                &env,
                &name,
                req.source.clone().unwrap_or(Source::Now),
                req.live,
            )
            .await;
        crate::testpoints::point("weave.assembled").await;
        let (config, source, taken_at, chosen) = match made {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                let _ = catalog.set_weave_sources(&name, &[]).await;
                return Err(e);
            }
        };
        let Chosen {
            net: net_plan,
            data,
            disks,
        } = chosen;
        let weave = Weave {
            name: name.clone(),
            parent: parent.to_string(),
            source,
            taken_at,
            net_index: index,
            created_at: now(),
            env: None,
            balloon: None,
        };
        // Nothing half-created: any failure from here removes what was made.
        let result = async {
            self.manager.insert_stopped_weave(&weave, &config).await?;
            self.manager
                .host()
                .cgroups()
                .create(&name)
                .map_err(|e| ApiError::io(format!("cannot create the cgroups of {name}"), e))?;
            // Its namespace, with the guest plan of its instant (crate::net).
            self.manager
                .net()
                .create_weave(&weave, &config, net_plan, req.egress)
                .await?;
            self.dhcp
                .start_for(catalog, &name, &config)
                .await
                .map_err(|e| ApiError::Internal(one_line(&format!("DHCP of weave {name}: {e}"))))?;
            // Its data history starts with its parent's up to its instant.
            crate::provenance::service::branch_weave(&self.manager, &name, parent, &weave.taken_at)
                .await?;
            self.manager.start(&name).await
        }
        .await;
        if let Err(e) = result {
            warn!(weave = %name, error = %e.one_line(), "weave creation failed; removing what was made");
            let _ = self.remove(&name).await;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        info!(weave = %name, parent, source = %weave.source, "weave created");
        if !data.is_empty() {
            self.reconcile_later(&name, parent, data, disks);
        }
        self.show(&name).await
    }

    /// State reconciliation (F14): when a composed weave's plan took application data
    /// from an instant (or merged several), push that state into its guest through the
    /// DPA once the guest's DPA connects (in the background: the guest is still
    /// booting), and record what had to change — what the files on its disks (`disks`,
    /// read from the chunk store) held differently — in its sources and the audit log.
    /// Disks whose file systems cannot be read are compared through the weave's log.
    pub(super) fn reconcile_later(
        &self,
        weave: &str,
        parent: &str,
        picks: Vec<DataPick>,
        disks: Vec<weft_blockdev::store::BlockMap>,
    ) {
        let catalog = self.manager.catalog().clone();
        let manager = Arc::clone(&self.manager);
        let store = self.snapshots.store().clone();
        let (weave, parent) = (weave.to_string(), parent.to_string());
        tokio::spawn(async move {
            let what = picks
                .iter()
                .map(|p| match p {
                    DataPick::Instant { pattern, at } => format!("{pattern} at {at}"),
                    DataPick::Merged { pattern, items } => {
                        format!("{pattern} merged key by key, {} items", items.len())
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            let deadline = std::time::Instant::now() + RECONCILE_WAIT;
            let outcome = async {
                let (chosen, applied) =
                    crate::provenance::replay::chosen_items(&manager, &parent, &picks).await?;
                let (holds, seen) =
                    match crate::provenance::replay::disk_state(&manager, &store, &parent, disks).await {
                        Ok((state, found)) => (
                            Some(state),
                            format!("; {} source(s) read from its disks", found.len()),
                        ),
                        Err(e) => {
                            warn!(weave = %weave, error = %e, "the weave's disks cannot be read; comparing with its log");
                            (
                                None,
                                format!("; its disks cannot be read ({}), compared with its log", one_line(&e)),
                            )
                        }
                    };
                loop {
                    let pushed =
                        crate::provenance::replay::push_state(&manager, &weave, holds.as_ref(), |current| {
                            weft_provenance::item::with_chosen(current, &chosen)
                        })
                        .await;
                    match pushed {
                        Ok(made) => break Ok((applied, made, seen)),
                        Err(e)
                            if e.one_line().contains("no DPA")
                                && std::time::Instant::now() < deadline =>
                        {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(e) => break Err(e),
                    }
                }
            }
            .await;
            let (detail, result) = match &outcome {
                Ok((applied, made, seen)) => (
                    format!(
                        "reconciled: {made} item(s) in the guest differed from its disk and were changed ({what}{}{seen})",
                        if *applied > 0 {
                            format!("; {applied} log entries of {parent} replayed")
                        } else {
                            String::new()
                        }
                    ),
                    "ok".to_string(),
                ),
                Err(e) => (
                    format!("not reconciled: {}", e.one_line()),
                    format!("error: {}", e.one_line()),
                ),
            };
            info!(weave = %weave, detail, "composition data reconciliation");
            if let Ok(mut rows) = catalog.weave_sources(&weave).await {
                for r in rows.iter_mut().filter(|r| r.resource.starts_with("data:")) {
                    r.detail = Some(detail.clone());
                }
                let _ = catalog.set_weave_sources(&weave, &rows).await;
            }
            let _ = catalog
                .audit(
                    "weftd",
                    "compose.reconcile",
                    Some(&weave),
                    Some(&detail),
                    &result,
                )
                .await;
        });
    }

    /// Builds the weave's disks and configuration; returns (config, source text,
    /// instant, the address plan a composition's `net` rule chose).
    pub(super) async fn assemble(
        &self,
        env: &Environment,
        name: &str,
        source: Source,
        live: bool,
    ) -> Result<(VmConfig, String, String, Chosen), ApiError> {
        if live && source == Source::Now {
            return Err(ApiError::BadRequest(
                "--live serves history through weft-blk: give --snapshot, --at or a composition (a weave from now shares the running disks already)".into(),
            ));
        }
        let current = env
            .config
            .clone()
            .ok_or_else(|| ApiError::Internal(format!("{:?} has no configuration", env.name)))?;
        let dir = self.dir(name);
        let (mut config, overlays_from, source_text, instant, chosen) = match source {
            Source::Now => {
                // The environment's QEMU made the weave's overlays with its own new tops.
                let mut config = current.clone();
                config.disks = self.branch_now(env, &current, &dir).await?;
                let at = now();
                let rows: Vec<SourceRow> = config
                    .disks
                    .iter()
                    .map(|d| format!("disk:{}", d.name))
                    .chain(["config".to_string(), "net".to_string()])
                    .map(|resource| SourceRow {
                        resource,
                        part: String::new(),
                        snapshot: None,
                        instant: Some(at.clone()),
                        detail: Some(format!("the running environment {}", env.name)),
                    })
                    .collect();
                self.manager
                    .catalog()
                    .set_weave_sources(name, &rows)
                    .await?;
                return Ok((
                    weave_taps(config),
                    "now".to_string(),
                    now(),
                    Chosen::default(),
                ));
            }
            Source::Snapshot(id) => {
                let s = self.snapshots.get(id).await?;
                if s.env != env.name {
                    return Err(ApiError::BadRequest(format!(
                        "snapshot {id} belongs to {:?}, not {:?}",
                        s.env, env.name
                    )));
                }
                let (config, bases) = self
                    .bases_at(env, &current, &s.taken_at, Some(&s), name)
                    .await?;
                (
                    config,
                    bases,
                    format!("snapshot {id}"),
                    s.taken_at.clone(),
                    Chosen::default(),
                )
            }
            Source::At(t) => {
                let t = weft_api::resource::Timestamp::parse(&t)
                    .map(|ts| ts.canonical())
                    .map_err(|e| ApiError::BadRequest(format!("--at {t:?}: {e}")))?;
                let (config, bases) = self.bases_at(env, &current, &t, None, name).await?;
                (config, bases, format!("at {t}"), t, Chosen::default())
            }
            Source::Composition(comp) => {
                let (config, bases, instant, net) =
                    self.composed(env, &current, &comp, name).await?;
                (config, bases, format!("composition {comp}"), instant, net)
            }
        };
        if live {
            config = self.serve_live(name, config, overlays_from).await?;
            return Ok((weave_taps(config), source_text, instant, chosen));
        }
        // Materialised: a base per disk (restored once; a merge's is the weave's own),
        // and the weave's own overlay on it. Its sources, recorded above, keep the
        // bases it uses from being removed once the lock is released.
        let _bases = self.bases_lock.lock().await;
        for (disk, from) in config.disks.iter_mut().zip(overlays_from) {
            let (base, size) = match from {
                DiskFrom::Snapshot(snap) => (self.base_of(&snap).await?, snap.size.unwrap_or(0)),
                DiskFrom::Merged(map) => {
                    let path = dir.join(format!("{}.merged.raw", disk.name));
                    let _ = std::fs::remove_file(&path);
                    self.snapshots.restore_map_into(&map, &path).await?;
                    (path, map.disk_size)
                }
            };
            let overlay = dir.join(format!("{}.qcow2", disk.name));
            image::create_overlay(&overlay, &base, DiskFormat::Raw, size, &self.work())
                .await
                .map_err(|e| ApiError::qmp(format!("overlay of {}", disk.name), e))?;
            // The overlay on its raw base, and nothing that the configuration of the
            // instant had below its disks.
            disk.path = base;
            disk.format = DiskFormat::Raw;
            disk.backing.clear();
            *disk = disk.under(&overlay);
        }
        Ok((weave_taps(config), source_text, instant, chosen))
    }

    /// Serves every disk of `config` through weft-blk: writes each disk's spec (its
    /// snapshot's block map, or the merge's stored as an index of the weave's own, and
    /// a fresh write layer) and moves it from `disks` to `vhost_user_disks`. Nothing
    /// is restored: the weave starts as fast from any point in history as from now.
    pub(super) async fn serve_live(
        &self,
        name: &str,
        mut config: VmConfig,
        froms: Vec<DiskFrom>,
    ) -> Result<VmConfig, ApiError> {
        let dir = crate::blk::vm_dir(self.manager.config(), name);
        // A fresh start: nothing from an earlier weave of this name.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::io(format!("cannot create {}", dir.display()), e))?;
        let made = self.write_specs(name, &config, froms).await;
        match made {
            Ok(served) => {
                config.disks.clear();
                config.vhost_user_disks = served;
                Ok(config)
            }
            Err(e) => {
                // No spec may stay behind: it would pin its snapshot as served.
                let _ = std::fs::remove_dir_all(&dir);
                let _ = self.remove_weave_indexes(name).await;
                Err(e)
            }
        }
    }

    /// The specs of `serve_live`, one per disk.
    pub(super) async fn write_specs(
        &self,
        name: &str,
        config: &VmConfig,
        froms: Vec<DiskFrom>,
    ) -> Result<Vec<weft_qmp::launch::VhostUserDisk>, ApiError> {
        let settings = self.manager.config();
        let store = self.snapshots.store().clone();
        let dir = crate::blk::vm_dir(settings, name);
        let mut served = Vec::new();
        for (disk, from) in config.disks.iter().zip(froms) {
            let index = match from {
                DiskFrom::Snapshot(snap) => snap.index_name.clone().ok_or_else(|| {
                    ApiError::Internal(format!("snapshot {} has no block map", snap.id))
                })?,
                DiskFrom::Merged(map) => {
                    let index = format!("{}{}", crate::names::weave_index_prefix(name), disk.name);
                    let (st, idx) = (store.clone(), index.clone());
                    tokio::task::spawn_blocking(move || st.write_index(&idx, &map))
                        .await
                        .map_err(|e| ApiError::task("index task failed", e))?
                        .map_err(|e| ApiError::store("cannot store the merge", e))?;
                    index
                }
            };
            let spec = weft_blockdev::blk::spec::DiskSpec {
                version: weft_blockdev::blk::spec::SPEC_VERSION,
                store: store.root().to_path_buf(),
                key_file: store.is_encrypted().then(|| settings.key_file()),
                layers: vec![weft_blockdev::layers::LayerSpec { index, slots: None }],
                write_layer: Some(dir.join(format!("{}.cow", disk.name))),
                trace: Some(dir.join(format!("{}.trace", disk.name))),
                assembly: Some(dir.join(format!("{}.assembly", disk.name))),
                trace_limit_mib: 64,
                cache_mib: 64,
                id: format!("weft-{name}-{}", disk.name),
                queues: 1,
                queue_size: 256,
            };
            let path = crate::blk::spec_path(settings, name, &disk.name);
            let bytes =
                serde_json::to_vec_pretty(&spec).map_err(|e| ApiError::json("disk spec", e))?;
            std::fs::write(&path, bytes)
                .map_err(|e| ApiError::io(format!("cannot write {}", path.display()), e))?;
            served.push(weft_qmp::launch::VhostUserDisk {
                name: disk.name.clone(),
                socket: crate::blk::socket_path(settings, name, &disk.name),
                queues: 1,
            });
        }
        Ok(served)
    }

    /// Live external snapshots of every disk of a running environment, in one
    /// transaction, and the weave's overlay of each disk (in `weave_dir`) on the
    /// now-frozen base; returns the weave's disks (its overlays, with their chains).
    pub(super) async fn branch_now(
        &self,
        env: &Environment,
        config: &VmConfig,
        weave_dir: &Path,
    ) -> Result<Vec<weft_qmp::launch::DiskConfig>, ApiError> {
        let _lock = self.manager.lock_env(&env.name).await;
        let qmp = self.manager.live_qmp(&env.name).ok_or_else(|| {
            ApiError::Conflict(format!(
                "{:?} is not running: branch from a snapshot (--snapshot ID or --at TIME) instead",
                env.name
            ))
        })?;
        let qemu = |e: weft_qmp::Error| ApiError::qmp("", e);
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let env_dir = self
            .manager
            .config()
            .data_dir
            .join("environments")
            .join(&env.name);
        let mut switches: Vec<(String, String)> = Vec::new();
        let mut bases = Vec::new();
        let mut added: Vec<(String, PathBuf)> = Vec::new();
        let mut pending = Vec::new();
        let mut new_config = config.clone();
        // Complete chains (a configuration stored before they were recorded has none):
        // the new tops and the weave's overlays record everything below them.
        crate::images::pin_backing(&mut new_config, &self.manager.config().data_dir)?;
        let catalog = self.manager.catalog();
        let prepared = async {
            for disk in new_config.disks.iter_mut() {
                let root = backup::device_root_node(&qmp, &disk.name)
                    .await
                    .map_err(qemu)?;
                let size = backup::node_size(&qmp, &root).await.map_err(qemu)?;
                let top = env_dir.join(format!("{}-{stamp}.qcow2", disk.name));
                // The environment's QEMU makes both overlays itself (no daemon to start):
                // its new top, and the weave's own overlay on the same soon-frozen base.
                image::create_overlay_in(&qmp, &top, &disk.path, disk.format, size)
                    .await
                    .map_err(qemu)?;
                added.push((String::new(), top.clone()));
                let mine = weave_dir.join(format!("{}.qcow2", disk.name));
                image::create_overlay_in(&qmp, &mine, &disk.path, disk.format, size)
                    .await
                    .map_err(qemu)?;
                let node = format!("{}-t{stamp}", disk.name);
                if top.to_str().is_none() {
                    return Err(ApiError::Internal("path is not UTF-8".into()));
                }
                block::open_qcow2(&qmp, &node, &top).await.map_err(qemu)?;
                if let Some(last) = added.last_mut() {
                    last.0.clone_from(&node);
                }
                switches.push((root, node));
                bases.push(disk.under(&mine));
                let (origin, origin_format) =
                    crate::overlays::origin_of(catalog, &env.name, disk).await?;
                pending.push(crate::overlays::Overlay {
                    env: env.name.clone(),
                    disk: disk.name.clone(),
                    path: top.clone(),
                    below: disk.path.clone(),
                    origin,
                    origin_format,
                    active: false,
                });
                *disk = disk.under(&top);
            }
            // Recorded before QEMU switches: a crash from here on finds them (recovery
            // settles them against query-block), and `env delete` commits them down.
            catalog.record_pending_overlays(&pending).await?;
            let pairs: Vec<(&str, &str)> = switches
                .iter()
                .map(|(root, node)| (root.as_str(), node.as_str()))
                .collect();
            block::snapshot(&qmp, &pairs).await.map_err(qemu)
        }
        .await;
        if let Err(e) = prepared {
            // Nodes QEMU did not switch to go (one it runs on refuses blockdev-del);
            // then the rows are settled against query-block: an overlay QEMU runs on
            // (the answer was lost, not the switch) is kept, the others removed.
            for (node, _) in added.iter().rev() {
                if !node.is_empty() {
                    let _ = block::delete_node(&qmp, node).await;
                }
            }
            let settled = match crate::overlays::settle(catalog, &env.name, Some(&qmp)).await {
                Ok(_) => catalog
                    .env_overlays(&env.name)
                    .await
                    .map_err(ApiError::from),
                Err(se) => Err(se),
            };
            match settled {
                // What is still recorded is what QEMU runs on.
                Ok(kept) => {
                    for (_, file) in &added {
                        if !kept.iter().any(|o| o.path == *file) {
                            let _ = std::fs::remove_file(file);
                        }
                    }
                }
                Err(se) => {
                    warn!(env = %env.name, error = %se.one_line(), "cannot settle the new overlays now; recovery will");
                }
            }
            return Err(e);
        }
        // The environment now writes to the new overlays: they and the configuration
        // that names them are recorded together.
        let tops: Vec<PathBuf> = pending.iter().map(|o| o.path.clone()).collect();
        catalog
            .activate_overlays(&env.name, &new_config, &tops)
            .await?;
        Ok(bases)
    }
}
