//! Deleting weaves and what unfinished creates left, and bringing weaves back in step after weftd restarts.

use super::*;

impl Weaves {
    /// Removes weave `name`'s cgroups (off the runtime: a busy group is retried).
    async fn remove_cgroups(&self, name: &str) -> std::io::Result<()> {
        let cgroups = self.manager.host().cgroups().clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || cgroups.remove(&name, Duration::from_secs(10)))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
    }

    /// The store indexes weave `name` owns (merges it served live), under the current
    /// prefix and the old one (unless an environment is called like the old prefix).
    pub(super) async fn remove_weave_indexes(&self, name: &str) -> Result<(), ApiError> {
        let old = self
            .manager
            .catalog()
            .environment(crate::names::OLD_WEAVE_INDEXES)
            .await?
            .is_none()
            .then(|| format!("{}/{name}/", crate::names::OLD_WEAVE_INDEXES));
        let prefixes: Vec<String> = std::iter::once(crate::names::weave_index_prefix(name))
            .chain(old)
            .collect();
        let store = self.snapshots.store().clone();
        tokio::task::spawn_blocking(move || -> Result<(), weft_blockdev::store::Error> {
            for idx in store.list_indexes()? {
                if prefixes.iter().any(|p| idx.starts_with(p)) {
                    store.remove_index(&idx)?;
                }
            }
            Ok(())
        })
        .await
        .map_err(ApiError::from)?
        .map_err(ApiError::from)
    }

    /// Removes the restored bases no weave uses any more, and the `.partial` files
    /// of base restores that never finished (every restore runs under the lock).
    pub(super) async fn remove_unused_bases(&self) -> Result<(), ApiError> {
        let _bases = self.bases_lock.lock().await;
        let used = self.manager.catalog().base_snapshots_in_use().await?;
        let Ok(entries) = std::fs::read_dir(self.bases()) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let unused = match file
                .strip_prefix("snapshot-")
                .and_then(|r| r.strip_suffix(".raw"))
                .and_then(|id| id.parse::<i64>().ok())
            {
                Some(id) => !used.contains(&id),
                None => file.ends_with(".partial"),
            };
            if unused {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => info!(base = %file, "removed a weave base no weave uses"),
                    Err(err) => {
                        warn!(base = %file, error = %err, "cannot remove an unused weave base")
                    }
                }
            }
        }
        Ok(())
    }

    /// At start, before anything runs: what weave creates that died with weftd left
    /// (files, served-disk specs that would pin snapshots, block maps, sources,
    /// `.partial` restores) is removed, and so are bases no weave uses.
    pub(super) async fn remove_leftovers(&self) -> Result<(), ApiError> {
        let catalog = self.manager.catalog();
        let sources = catalog.remove_orphan_weave_sources().await?;
        if sources > 0 {
            info!(sources, "removed sources of weaves that were never made");
        }
        let weaves: Vec<String> = catalog
            .weaves(None)
            .await?
            .into_iter()
            .map(|w| w.name)
            .collect();
        let mut orphans = std::collections::BTreeSet::new();
        let data_dir = &self.manager.config().data_dir;
        for kind in ["weaves", "blk"] {
            for e in std::fs::read_dir(data_dir.join(kind))
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = e.file_name().to_string_lossy().into_owned();
                if !weaves.contains(&name) && catalog.environment(&name).await?.is_none() {
                    orphans.insert(name);
                }
            }
        }
        let store = self.snapshots.store().clone();
        let indexes = tokio::task::spawn_blocking(move || store.list_indexes())
            .await
            .map_err(ApiError::from)?
            .map_err(ApiError::from)?;
        for idx in indexes {
            if let Some(w) = idx
                .strip_prefix(&format!("{}/", crate::names::WEAVE_INDEXES))
                .and_then(|r| r.split('/').next())
            {
                if !weaves.iter().any(|x| x == w) {
                    orphans.insert(w.to_string());
                }
            }
        }
        for name in &orphans {
            warn!(weave = %name, "removing what a weave create or delete that died with weftd left");
            crate::blk::forget(self.manager.config(), name).await?;
            self.remove_weave_indexes(name).await?;
            // A create that died after starting the guest's vsock device, or a delete
            // that died after the environment row went, leaves the device, the CID,
            // the cgroups and the log: `remove` makes them in that order.
            if let Some(host) = self.manager.vsock() {
                host.forget(name).await;
            }
            if let Err(e) = self.remove_cgroups(name).await {
                warn!(weave = %name, error = %e, "cannot remove a leftover weave's cgroups");
            }
            if let Err(e) = self.manager.remove_provenance(name).await {
                warn!(weave = %name, error = %e.one_line(), "cannot remove a leftover weave's provenance log");
            }
            let dir = self.dir(name);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(dir = %dir.display(), error = %e, "cannot remove a leftover weave directory");
                }
            }
            catalog
                .audit(
                    "weftd",
                    "weave.recover",
                    Some(name),
                    Some("leftovers of an unfinished create removed"),
                    "ok",
                )
                .await?;
        }
        // Merged bases restored into a weave's own directory.
        for w in &weaves {
            for e in std::fs::read_dir(self.dir(w))
                .into_iter()
                .flatten()
                .flatten()
            {
                if e.file_name().to_string_lossy().ends_with(".partial") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        self.remove_unused_bases().await
    }

    /// After weftd starts: every weave's namespace, links and NAT rules are repaired or
    /// re-created (after a host reboot they are gone), and its cgroups re-made, so its
    /// QEMU can start again. Failures are logged and audited; they do not stop weftd.
    pub async fn recover(&self) -> Result<(), ApiError> {
        let catalog = self.manager.catalog();
        if let Err(e) = self.remove_leftovers().await {
            warn!(error = %e.one_line(), "cannot remove what unfinished weave creates left");
        }
        // Namespaces, links, NAT and host ports, with strays this weftd owns removed.
        let reconciled = self.manager.net().reconcile().await;
        for w in catalog.weaves(None).await? {
            let Some(env) = catalog.environment(&w.name).await? else {
                continue;
            };
            let Some(config) = env.config else { continue };
            let mut net = reconciled.weave(&w.name);
            if net.is_ok() {
                net = self.dhcp.start_for(catalog, &w.name, &config).await;
            }
            let groups = self
                .manager
                .host()
                .cgroups()
                .create(&w.name)
                .map_err(|e| e.to_string());
            if let Err(e) = net.and(groups) {
                warn!(weave = %w.name, error = %e, "cannot restore the weave's network or cgroups");
                catalog
                    .audit("weftd", "weave.recover", Some(&w.name), Some(&e), "failed")
                    .await?;
            }
        }
        Ok(())
    }

    /// Stops and removes a weave: QEMU, namespace and rules, cgroups, overlays, rows.
    /// Refuses anything that is not a weave (an environment goes with `weft env delete`).
    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        self.ensure(name, "delete").await?;
        self.remove(name).await
    }

    /// Refuses (nothing changed) a `weave VERB` of anything that is not a weave: an
    /// environment is told to use the `env` verb.
    pub async fn ensure(&self, name: &str, verb: &str) -> Result<(), ApiError> {
        let catalog = self.manager.catalog();
        if catalog.weave(name).await?.is_some() {
            return Ok(());
        }
        Err(match catalog.environment(name).await? {
            Some(env) => ApiError::Conflict(format!(
                "{name:?} is {} environment, not a weave: nothing was changed (`weft env {verb} {name}` acts on an environment)",
                match env.kind {
                    EnvKind::Managed => "a managed",
                    EnvKind::Attached => "an attached",
                }
            )),
            None => ApiError::Missing(format!("no weave named {name:?} (see `weft weave list`)")),
        })
    }

    /// Removes what a weave (or a create of one that failed) made under `name`.
    pub(super) async fn remove(&self, name: &str) -> Result<(), ApiError> {
        let catalog = self.manager.catalog();
        let weave = catalog.weave(name).await?;
        let mut problems = Vec::new();
        if catalog.environment(name).await?.is_some() {
            if let Err(e) = self.manager.remove(name).await {
                problems.push(e.one_line());
            }
        }
        // The rows are gone (with the environment's): what follows is found again by
        // its directory if weftd dies here (`remove_leftovers`).
        crate::testpoints::point("weave.delete").await;
        // Its thread holds the namespace: stop it before the namespace goes.
        self.dhcp.stop(name).await;
        if let Some(w) = &weave {
            let net = self.manager.net();
            if let Err(e) = net.delete_weave(name, w.net_index, &w.parent).await {
                problems.push(format!("network: {e}"));
            }
        }
        if let Err(e) = self.remove_cgroups(name).await {
            problems.push(format!("cgroups: {e}"));
        }
        // Usually gone with its environment row; this covers a weave without one.
        if let Err(e) = self.manager.remove_provenance(name).await {
            problems.push(e.one_line());
        }
        if let Err(e) = catalog.set_weave_sources(name, &[]).await {
            problems.push(format!("sources: {e}"));
        }
        // Merges it served live were stored as indexes of its own.
        if let Err(e) = self.remove_weave_indexes(name).await {
            problems.push(format!("merged indexes: {}", e.one_line()));
        }
        if let Err(e) = crate::blk::forget(self.manager.config(), name).await {
            problems.push(e.one_line());
        }
        let dir = self.dir(name);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                problems.push(format!("{}: {e}", dir.display()));
            }
        }
        // Its sources are gone: a base no other weave uses goes with it.
        if let Err(e) = self.remove_unused_bases().await {
            problems.push(format!("bases: {}", e.one_line()));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Internal(format!(
                "weave {name} removed with problems: {}",
                problems.join("; ")
            )))
        }
    }
}
