//! Where a weave's resources come from: the bases at an instant, composed disks and data, the per-slot sources `weft weave sources` shows.

use super::*;

impl Weaves {
    /// The configuration and restored bases as of instant `t`.
    pub(super) async fn bases_at(
        &self,
        env: &Environment,
        current: &VmConfig,
        t: &str,
        pinned: Option<&Snapshot>,
        weave: &str,
    ) -> Result<(VmConfig, Vec<DiskFrom>), ApiError> {
        let all = self
            .snapshots
            .list(
                &env.name,
                &crate::catalog_snapshots::SnapshotFilter::default(),
            )
            .await?;
        let at_or_before = |resource: &str| -> Option<&Snapshot> {
            all.iter()
                .filter(|s| s.resource == resource && s.taken_at.as_str() <= t)
                .max_by(|a, b| a.taken_at.cmp(&b.taken_at).then(a.id.cmp(&b.id)))
        };
        let mut sources = Vec::new();
        let config = match at_or_before("config").and_then(|s| s.config.clone().map(|c| (s.id, c)))
        {
            Some((id, c)) => {
                sources.push(snapshot_row("config", "", id));
                c
            }
            None => {
                sources.push(SourceRow {
                    resource: "config".into(),
                    part: String::new(),
                    snapshot: None,
                    instant: Some(now()),
                    detail: Some(
                        "the environment's configuration (no config snapshot at the instant)"
                            .into(),
                    ),
                });
                current.clone()
            }
        };
        let mut bases = Vec::new();
        for disk in &config.disks {
            let resource = format!("disk:{}", disk.name);
            let snap = match pinned {
                Some(p) if p.resource == resource => p,
                _ => at_or_before(&resource).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "disk {} of {:?} has no snapshot at or before {t}",
                        disk.name, env.name
                    ))
                })?,
            };
            if snap.kind == SnapshotKind::Config {
                return Err(ApiError::Internal(format!(
                    "snapshot {} is not a disk snapshot",
                    snap.id
                )));
            }
            bases.push(DiskFrom::Snapshot(Box::new(snap.clone())));
            sources.push(snapshot_row(&resource, "", snap.id));
        }
        sources.push(SourceRow {
            resource: "net".into(),
            part: String::new(),
            snapshot: None,
            instant: Some(t.to_string()),
            detail: Some("the environment's address plan at the weave's instant".into()),
        });
        self.manager
            .catalog()
            .set_weave_sources(weave, &sources)
            .await?;
        Ok((config, bases))
    }

    /// The configuration, bases and instant of a composition's plan (refused while
    /// it has open conflicts). Records where each resource came from for the weave
    /// `weave` in `weave_sources` (F15).
    pub(super) async fn composed(
        &self,
        env: &Environment,
        current: &VmConfig,
        comp_name: &str,
        weave: &str,
    ) -> Result<(VmConfig, Vec<DiskFrom>, String, Chosen), ApiError> {
        use weft_api::composition::Origin;
        let comps = crate::compositions::Compositions::new(
            Arc::clone(&self.manager),
            Arc::clone(&self.snapshots),
        );
        let (comp, plan) = comps.plan_for_apply(comp_name).await?;
        if comp.env != env.name {
            return Err(ApiError::BadRequest(format!(
                "composition {comp_name} composes {:?}, not {:?}",
                comp.env, env.name
            )));
        }
        let mut sources: Vec<SourceRow> = Vec::new();
        let origin = |r: &str| plan.resources.iter().find(|c| c.resource == r);
        let config = self
            .structured(
                (&comps, &comp),
                ("config", "configuration"),
                origin("config").map(|c| &c.origin),
                &mut sources,
                |s| s.config,
            )
            .await?
            .unwrap_or_else(|| current.clone());
        let mut bases = Vec::new();
        for disk in &config.disks {
            let resource = format!("disk:{}", disk.name);
            match origin(&resource).map(|c| &c.origin) {
                Some(Origin::Snapshot { id, .. }) => {
                    let snap = self.snapshots.get(*id).await?;
                    sources.push(snapshot_row(&resource, "", *id));
                    bases.push(DiskFrom::Snapshot(Box::new(snap)));
                }
                Some(Origin::Merge { sides, .. }) => {
                    let merged = comps.merged(&comp, &resource, sides).await?;
                    let map = merged.map.ok_or_else(|| {
                        ApiError::Internal(format!("{resource}: the merge gave no block map"))
                    })?;
                    // Which snapshot each run of slots came from (F15, per block range).
                    let maps = self.slot_sources(sides, &map).await?;
                    for (range, id) in maps {
                        sources.push(snapshot_row(&resource, &range, id));
                    }
                    bases.push(DiskFrom::Merged(map));
                }
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "composition {comp_name}: disk {} has no snapshot to come from",
                        disk.name
                    )))
                }
            }
        }
        // The weave's instant is what its disks hold: the newest chosen disk snapshot.
        // Its provenance lineage stops there (so its log describes its disks), and the
        // data a `data:` rule chose is pushed into the guest from there (F14).
        let mut disk_times = Vec::new();
        for c in plan
            .resources
            .iter()
            .filter(|c| c.resource.starts_with("disk:"))
        {
            match &c.origin {
                Origin::Snapshot { taken_at, .. } => disk_times.push(taken_at.clone()),
                Origin::Merge { sides, .. } => {
                    for id in sides {
                        disk_times.push(self.snapshots.get(*id).await?.taken_at);
                    }
                }
                Origin::Instant { .. } | Origin::DataMerge { .. } => {}
            }
        }
        let instant = disk_times
            .into_iter()
            .max()
            .or_else(|| {
                plan.resources.iter().find_map(|c| match &c.origin {
                    Origin::Instant { at } if c.resource.starts_with("data:") => Some(at.clone()),
                    Origin::DataMerge { instants, .. } => instants.last().cloned(),
                    _ => None,
                })
            })
            .or(comp.rules.at.clone())
            .unwrap_or_else(now);
        // Application data: pushed into the guest once its DPA connects (F14).
        let mut data = Vec::new();
        for c in &plan.resources {
            match &c.origin {
                Origin::Instant { at } => {
                    sources.push(SourceRow {
                        resource: c.resource.clone(),
                        part: String::new(),
                        snapshot: None,
                        instant: Some(at.clone()),
                        detail: Some(format!("replayed from the provenance log of {}", env.name)),
                    });
                    data.push(DataPick::Instant {
                        pattern: c.resource.clone(),
                        at: at.clone(),
                    });
                }
                Origin::DataMerge { instants, base } => {
                    let merged = comps
                        .merged_data(&comp, &c.resource, instants, base)
                        .await?;
                    for at in instants {
                        sources.push(SourceRow {
                            resource: c.resource.clone(),
                            part: format!("merged key by key against {base}"),
                            snapshot: None,
                            instant: Some(at.clone()),
                            detail: Some(format!(
                                "replayed from the provenance log of {}",
                                env.name
                            )),
                        });
                    }
                    data.push(DataPick::Merged {
                        pattern: c.resource.clone(),
                        items: merged.items.unwrap_or_default(),
                    });
                }
                _ => {}
            }
        }
        // The address plan: the one a rule naming `net` chose (a snapshot or a merge),
        // else the one of the weave's instant.
        let chosen_net = origin("net").filter(|c| c.rule != "default");
        let net_plan = self
            .structured(
                (&comps, &comp),
                ("net", "network setup"),
                chosen_net.map(|c| &c.origin),
                &mut sources,
                |s| s.net,
            )
            .await?
            .map(|setup: crate::model::NetSetup| setup.plan);
        if net_plan.is_none() {
            sources.push(SourceRow {
                resource: "net".into(),
                part: String::new(),
                snapshot: None,
                instant: Some(instant.clone()),
                detail: Some("the environment's address plan at the weave's instant".into()),
            });
        }
        self.manager
            .catalog()
            .set_weave_sources(weave, &sources)
            .await?;
        let mut disks = Vec::new();
        if !data.is_empty() {
            for base in &bases {
                disks.push(match base {
                    DiskFrom::Snapshot(snap) => self.snapshots.block_map(snap.id).await?,
                    DiskFrom::Merged(map) => map.clone(),
                });
            }
        }
        Ok((
            config,
            bases,
            instant,
            Chosen {
                net: net_plan,
                data,
                disks,
            },
        ))
    }

    /// A structured resource (`config`, `net`; `what` names it in errors) as a plan
    /// chose it: the snapshot's (`of` takes it out) or the merged value, with its
    /// sources recorded; `None` when the plan chose neither.
    pub(super) async fn structured<T: serde::de::DeserializeOwned>(
        &self,
        (comps, comp): (
            &crate::compositions::Compositions,
            &crate::compositions::Composition,
        ),
        (resource, what): (&str, &str),
        origin: Option<&weft_api::composition::Origin>,
        sources: &mut Vec<SourceRow>,
        of: impl FnOnce(Snapshot) -> Option<T>,
    ) -> Result<Option<T>, ApiError> {
        use weft_api::composition::Origin;
        match origin {
            Some(Origin::Snapshot { id, .. }) => {
                sources.push(snapshot_row(resource, "", *id));
                let value = of(self.snapshots.get(*id).await?)
                    .ok_or_else(|| ApiError::Internal(format!("snapshot {id} holds no {what}")))?;
                Ok(Some(value))
            }
            Some(Origin::Merge { sides, .. }) => {
                let merged = comps.merged(comp, resource, sides).await?;
                for id in sides {
                    sources.push(snapshot_row(resource, &format!("merged from {id}"), *id));
                }
                let value =
                    serde_json::from_value(merged.value.unwrap_or_default()).map_err(|e| {
                        ApiError::BadRequest(format!("the merged {what} is not valid: {e}"))
                    })?;
                Ok(Some(value))
            }
            _ => Ok(None),
        }
    }

    /// Runs of slots of a merged map and the snapshot (of `sides`) each came from.
    pub(super) async fn slot_sources(
        &self,
        sides: &[i64],
        merged: &weft_blockdev::store::BlockMap,
    ) -> Result<Vec<(String, i64)>, ApiError> {
        let mut maps = Vec::new();
        for id in sides {
            maps.push((*id, self.snapshots.block_map(*id).await?));
        }
        let mut runs: Vec<(usize, usize, i64)> = Vec::new();
        for (i, slot) in merged.slots.iter().enumerate() {
            // The newest side holding exactly this slot.
            let Some(id) = maps
                .iter()
                .rev()
                .find(|(_, m)| m.slots.get(i) == Some(slot))
                .map(|(id, _)| *id)
            else {
                continue;
            };
            match runs.last_mut() {
                Some((_, e, who)) if *e == i && *who == id => *e = i + 1,
                _ => runs.push((i, i + 1, id)),
            }
        }
        Ok(runs
            .into_iter()
            .map(|(s, e, id)| (format!("slots {s}..{e}"), id))
            .collect())
    }

    /// The read-only raw base of a disk snapshot, restored once and shared.
    pub(super) async fn base_of(&self, snap: &Snapshot) -> Result<PathBuf, ApiError> {
        let dir = self.bases();
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::io(format!("cannot create {}", dir.display()), e))?;
        let path = dir.join(format!("snapshot-{}.raw", snap.id));
        if path.exists() {
            return Ok(path);
        }
        self.snapshots.restore_into(snap.id, &path).await?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))
            .map_err(|e| ApiError::io(format!("cannot make {} read-only", path.display()), e))?;
        Ok(path)
    }
}
