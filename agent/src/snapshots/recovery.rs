//! What a weftd that died mid-snapshot left behind: interrupted jobs, scratch images, block maps no snapshot records.

use super::*;

impl Snapshots {
    /// After a restart: jobs and snapshots that were under way are marked failed and
    /// the block maps of failed snapshots removed, so nothing partial is visible.
    pub async fn recover(&self) -> Result<(), ApiError> {
        let catalog = self.manager.catalog();
        let reason = "weftd stopped while it ran";
        // Storage daemons of snapshots and restores that died with weftd.
        let run_dir = &self.manager.config().run_dir;
        for dir in [run_dir.join("backup"), run_dir.join("restore")] {
            for ended in crate::leftovers::clear_work_dir(&dir).await {
                warn!(%ended, "ended what an interrupted snapshot or restore left running");
                catalog
                    .audit("weftd", "snapshot.recover", None, Some(&ended), "ended")
                    .await?;
            }
        }
        let jobs = catalog.fail_running_jobs(reason).await?;
        let mut interrupted = std::collections::BTreeSet::new();
        for s in catalog.fail_pending_snapshots(reason).await? {
            if let Some(name) = &s.index_name {
                let _ = self.store.remove_index(name);
            }
            if let Some(disk) = weft_api::resource::ResourceId::disk_of(&s.resource) {
                interrupted.insert((s.env.clone(), disk));
            }
            catalog
                .audit(
                    "weftd",
                    "snapshot.recover",
                    Some(&s.env),
                    Some(&format!("snapshot {} of {}", s.id, s.resource)),
                    "marked failed",
                )
                .await?;
        }
        if jobs > 0 {
            info!(jobs, "jobs interrupted by a restart marked failed");
        }
        for (env, disk) in interrupted {
            self.clean_interrupted_backup(&env, &disk).await;
        }
        // Not a reason to refuse to start: the next start tries again.
        if let Err(e) = self.remove_orphan_indexes().await {
            warn!(error = %e.one_line(), "cannot remove block maps that no snapshot lists");
        }
        Ok(())
    }

    /// Removes what a snapshot of a running environment that died with weftd left in
    /// its QEMU (backup job, NBD export, fleece nodes, temporary bitmaps): until then
    /// the disk is busy for anything else, a weave from now among them. The checkpoint
    /// of the last complete snapshot stays. Failures are logged: the next snapshot
    /// cleans again.
    pub(super) async fn clean_interrupted_backup(&self, env: &str, disk: &str) {
        let Some(qmp) = self.manager.live_qmp(env) else {
            return;
        };
        let catalog = self.manager.catalog();
        let keep = match catalog.latest_snapshot(env, &format!("disk:{disk}")).await {
            Ok(s) => s.and_then(|s| s.checkpoint),
            Err(e) => {
                warn!(env, disk, error = %e, "cannot read the disk's last snapshot; its QEMU is cleaned at its next snapshot");
                return;
            }
        };
        let cleaned = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            let mut removed = Vec::new();
            // The device's top node is the backup's filter while the job runs; once the
            // job is gone the bitmaps are on the node below: a second pass finds it.
            for pass in 0..2 {
                let node = backup::device_root_node(&qmp, disk).await?;
                match backup::clean_leftovers(&qmp, &node, CHECKPOINT_PREFIX, keep.as_deref()).await
                {
                    Ok(r) => {
                        removed.extend(r);
                        break;
                    }
                    // The filter went with the job: what the first pass removed
                    // before it failed on the filter's node.
                    Err(_) if pass == 0 => {
                        removed.push("the backup job, its export and fleece nodes".into())
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(removed)
        })
        .await;
        match cleaned {
            Ok(Ok(removed)) if removed.is_empty() => {}
            Ok(Ok(removed)) => {
                let detail = format!("disk {disk}: {}", removed.join(", "));
                warn!(env, %detail, "removed what an interrupted snapshot left in QEMU");
                let _ = catalog
                    .audit(
                        "weftd",
                        "snapshot.recover",
                        Some(env),
                        Some(&detail),
                        "ended",
                    )
                    .await;
            }
            Ok(Err(e)) => {
                warn!(env, disk, error = %e, "cannot clean what an interrupted snapshot left in QEMU")
            }
            Err(_) => {
                warn!(
                    env,
                    disk, "QEMU did not answer while cleaning an interrupted snapshot"
                )
            }
        }
    }

    /// Removes snapshot block maps that no complete snapshot lists: written by a
    /// snapshot that died before it completed, or left by a `snapshot delete` that
    /// died after it removed the row.
    pub(super) async fn remove_orphan_indexes(&self) -> Result<(), ApiError> {
        let listed: std::collections::HashSet<String> = self
            .manager
            .catalog()
            .live_index_names()
            .await?
            .into_iter()
            .collect();
        // An index under the weaves' old prefix belongs to a weave, not to an
        // environment called `weaves`, when a weave of that name exists.
        let weaves: std::collections::HashSet<String> = self
            .manager
            .catalog()
            .weaves(None)
            .await?
            .into_iter()
            .map(|w| w.name)
            .collect();
        let store = self.store.clone();
        let removed = blocking(
            move || -> Result<Vec<String>, weft_blockdev::store::Error> {
                let mut removed = Vec::new();
                for name in store.list_indexes()? {
                    let weave_owned = name
                        .strip_prefix(&format!("{}/", crate::names::OLD_WEAVE_INDEXES))
                        .and_then(|r| r.split('/').next())
                        .is_some_and(|w| weaves.contains(w));
                    if crate::leftovers::is_snapshot_index(&name)
                        && !weave_owned
                        && !listed.contains(&name)
                    {
                        store.remove_index(&name)?;
                        removed.push(name);
                    }
                }
                Ok(removed)
            },
        )
        .await?
        .map_err(store_err)?;
        for name in removed {
            warn!(index = %name, "removed a block map that no snapshot lists");
        }
        Ok(())
    }
}
