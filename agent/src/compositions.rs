//! Compositions in weftd: stored rules over an environment's history, their plan
//! (computed from the catalog and the chunk store, never written), their conflicts
//! and the user's resolutions. Applying one yields a weave (see `weaves.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;
use sqlx::Row;
use weft_blockdev::store::{BlockMap, ChunkStore};

use crate::catalog::{now, Catalog, CatalogError};
use crate::catalog_snapshots::SnapshotFilter;
use crate::envs::Manager;
use crate::error::{error_chain, ApiError};
use crate::model::{EnvKind, Snapshot};
use crate::snapshots::Snapshots;
pub use weft_api::composition::{
    Composition, CompositionView, CreateComposition, ResolveRequest, Take,
};
use weft_api::composition::{Conflict, Plan};
use weft_compose::{self as compose, MapSource, PlanInput};
use weft_provenance::item::{data_source_matches, Item};
use weft_provenance::log::ProvenanceLog;

/// Block maps of disk snapshots, read from the chunk store; application state of the
/// environment, replayed from its provenance log.
struct StoreMaps {
    store: ChunkStore,
    log: Option<ProvenanceLog>,
    env: String,
}

impl MapSource for StoreMaps {
    fn block_map(&self, s: &Snapshot) -> Result<BlockMap, String> {
        let name = s
            .index_name
            .as_ref()
            .ok_or_else(|| format!("snapshot {} has no block map", s.id))?;
        self.store
            .read_index(name)
            .map_err(|e| format!("snapshot {}: {e}", s.id))
    }

    fn data_items(&self, pattern: &str, at: &str) -> Result<BTreeMap<Item, Value>, String> {
        let log = self
            .log
            .as_ref()
            .ok_or("weftd has no provenance log: application data cannot be merged")?;
        let to_us = compose::instant_id(at)?;
        let (state, _) = weft_provenance::state::rebuild(log, &self.env, None, to_us)
            .map_err(|e| error_chain(&e))?;
        Ok(state.items(|src| data_source_matches(pattern, src)))
    }
}

fn from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Composition, CatalogError> {
    let rules: String = r.try_get("rules")?;
    let name: String = r.try_get("name")?;
    Ok(Composition {
        rules: serde_json::from_str(&rules).map_err(|e| CatalogError::Corrupt {
            name: name.clone(),
            reason: format!("composition rules: {e}"),
        })?,
        name,
        env: r.try_get("env")?,
        actor: r.try_get("actor")?,
        created_at: r.try_get("created_at")?,
    })
}

impl Catalog {
    async fn composition(&self, name: &str) -> Result<Option<Composition>, CatalogError> {
        sqlx::query("SELECT * FROM compositions WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| from_row(&r))
            .transpose()
    }

    async fn compositions(&self) -> Result<Vec<Composition>, CatalogError> {
        sqlx::query("SELECT * FROM compositions ORDER BY name")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(from_row)
            .collect()
    }

    /// Stored conflicts of a composition, in resource and key order.
    pub(crate) async fn composition_conflicts(
        &self,
        name: &str,
    ) -> Result<Vec<Conflict>, CatalogError> {
        let rows = sqlx::query(
            "SELECT resource, key, side_a, side_b, resolved FROM composition_conflicts
              WHERE composition = ? ORDER BY resource, key",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Conflict {
                    resource: r.try_get("resource")?,
                    key: r.try_get("key")?,
                    sides: [r.try_get("side_a")?, r.try_get("side_b")?],
                    resolved: r.try_get("resolved")?,
                })
            })
            .collect()
    }

    /// Records conflicts a plan found that are not stored yet.
    pub(crate) async fn add_conflicts(
        &self,
        name: &str,
        conflicts: &[Conflict],
    ) -> Result<(), CatalogError> {
        let mut tx = self.pool.begin().await?;
        for c in conflicts {
            sqlx::query(
                "INSERT OR IGNORE INTO composition_conflicts (composition, resource, key, side_a, side_b)
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(name)
            .bind(&c.resource)
            .bind(&c.key)
            .bind(c.sides[0])
            .bind(c.sides[1])
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// The composition service.
pub struct Compositions {
    manager: Arc<Manager>,
    snapshots: Arc<Snapshots>,
}

impl Compositions {
    /// Compositions over `manager`'s environments and `snapshots`.
    pub fn new(manager: Arc<Manager>, snapshots: Arc<Snapshots>) -> Arc<Compositions> {
        Arc::new(Compositions { manager, snapshots })
    }

    fn catalog(&self) -> &Catalog {
        self.manager.catalog()
    }

    fn maps(&self, env: &str) -> StoreMaps {
        StoreMaps {
            store: self.snapshots.store().clone(),
            log: self.manager.provenance().cloned(),
            env: env.to_string(),
        }
    }

    /// Creates a composition after checking that its plan can be computed; the plan's
    /// conflicts are stored (open, for `prompt`).
    pub async fn create(
        &self,
        req: CreateComposition,
        actor: &str,
    ) -> Result<CompositionView, ApiError> {
        weft_api::names::check_composition_name(&req.name).map_err(ApiError::BadRequest)?;
        let rules = req
            .rules
            .checked()
            .map_err(|e| ApiError::BadRequest(format!("rules: {e}")))?;
        let env = self
            .catalog()
            .environment(&req.env)
            .await?
            .ok_or_else(|| ApiError::NotFound(req.env.clone()))?;
        if env.kind != EnvKind::Managed {
            return Err(ApiError::Conflict(format!(
                "compositions need a managed environment; {:?} is attached",
                req.env
            )));
        }
        if self.catalog().composition(&req.name).await?.is_some() {
            return Err(ApiError::Conflict(format!(
                "a composition named {:?} already exists",
                req.name
            )));
        }
        let comp = Composition {
            name: req.name.clone(),
            env: req.env.clone(),
            rules,
            actor: actor.to_string(),
            created_at: now(),
        };
        let plan = self.compute(&comp, &HashMap::new()).await?;
        let rules_json =
            serde_json::to_string(&comp.rules).map_err(|e| ApiError::json("rules", e))?;
        sqlx::query(
            "INSERT INTO compositions (name, env, rules, actor, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&comp.name)
        .bind(&comp.env)
        .bind(&rules_json)
        .bind(&comp.actor)
        .bind(&comp.created_at)
        .execute(&self.catalog().pool)
        .await
        .map_err(CatalogError::from)?;
        self.catalog()
            .add_conflicts(&comp.name, &plan.conflicts)
            .await?;
        Ok(CompositionView {
            composition: comp,
            plan,
        })
    }

    /// Every composition.
    pub async fn list(&self) -> Result<Vec<Composition>, ApiError> {
        Ok(self.catalog().compositions().await?)
    }

    /// One composition.
    pub async fn get(&self, name: &str) -> Result<Composition, ApiError> {
        self.catalog().composition(name).await?.ok_or_else(|| {
            ApiError::Missing(format!(
                "no composition named {name:?} (see `weft compose list`)"
            ))
        })
    }

    /// The recorded resolutions of a composition.
    async fn resolutions(&self, name: &str) -> Result<HashMap<(String, String), i64>, ApiError> {
        Ok(self
            .catalog()
            .composition_conflicts(name)
            .await?
            .into_iter()
            .filter_map(|c| c.resolved.map(|r| ((c.resource, c.key), r)))
            .collect())
    }

    /// The plan as of now (nothing is written).
    pub async fn plan(&self, name: &str) -> Result<CompositionView, ApiError> {
        let comp = self.get(name).await?;
        let res = self.resolutions(name).await?;
        let plan = self.compute(&comp, &res).await?;
        Ok(CompositionView {
            composition: comp,
            plan,
        })
    }

    /// The environment's resources a plan covers, its snapshots and the store.
    pub(crate) async fn inputs(
        &self,
        comp: &Composition,
    ) -> Result<(Vec<String>, Vec<Snapshot>), ApiError> {
        let env = self
            .catalog()
            .environment(&comp.env)
            .await?
            .ok_or_else(|| ApiError::NotFound(comp.env.clone()))?;
        let config = env.config.unwrap_or_default();
        let mut resources: Vec<String> = config
            .disks
            .iter()
            .map(|d| format!("disk:{}", d.name))
            .collect();
        resources.push("config".into());
        resources.push("net".into());
        // Data resources are the sources rules name (`data:*` is all of them).
        for r in &comp.rules.rules {
            for p in &r.resources {
                if p.starts_with("data:") && !resources.contains(p) {
                    resources.push(p.clone());
                }
            }
        }
        let snaps = self
            .snapshots
            .list(&comp.env, &SnapshotFilter::default())
            .await?;
        Ok((resources, snaps))
    }

    /// Computes the plan of `comp` with `resolutions` (blocking work off the runtime).
    pub(crate) async fn compute(
        &self,
        comp: &Composition,
        resolutions: &HashMap<(String, String), i64>,
    ) -> Result<Plan, ApiError> {
        let (resources, snaps) = self.inputs(comp).await?;
        let rules = comp.rules.clone();
        let res = resolutions.clone();
        let maps = self.maps(&comp.env);
        let now = now();
        tokio::task::spawn_blocking(move || {
            compose::plan(
                &rules,
                &PlanInput {
                    resources: &resources,
                    snapshots: &snaps,
                    resolutions: &res,
                    now: &now,
                },
                &maps,
            )
        })
        .await
        .map_err(|e| ApiError::task("plan task failed", e))?
        .map_err(|e| ApiError::BadRequest(format!("composition {}: {e}", comp.name)))
    }

    /// The merged block map (disks) or JSON (`config`, `net`) of a merged resource.
    pub(crate) async fn merged(
        &self,
        comp: &Composition,
        resource: &str,
        sides: &[i64],
    ) -> Result<compose::Merged, ApiError> {
        let (_, snaps) = self.inputs(comp).await?;
        let res = self.resolutions(&comp.name).await?;
        let rules = comp.rules.clone();
        let maps = self.maps(&comp.env);
        let (resource, sides) = (resource.to_string(), sides.to_vec());
        tokio::task::spawn_blocking(move || {
            compose::merge(
                &rules,
                &resource,
                &sides,
                &PlanInput {
                    resources: &[],
                    snapshots: &snaps,
                    resolutions: &res,
                    now: &now(),
                },
                &maps,
            )
        })
        .await
        .map_err(|e| ApiError::task("merge task failed", e))?
        .map_err(ApiError::BadRequest)
    }

    /// The merged application state of a `data:` resource the plan merges.
    pub(crate) async fn merged_data(
        &self,
        comp: &Composition,
        resource: &str,
        instants: &[String],
        base: &str,
    ) -> Result<compose::Merged, ApiError> {
        let res = self.resolutions(&comp.name).await?;
        let rules = comp.rules.clone();
        let maps = self.maps(&comp.env);
        let (resource, instants, base) =
            (resource.to_string(), instants.to_vec(), base.to_string());
        tokio::task::spawn_blocking(move || {
            compose::merge_data(&rules, &resource, &instants, &base, &res, &maps)
        })
        .await
        .map_err(|e| ApiError::task("merge task failed", e))?
        .map_err(ApiError::BadRequest)
    }

    /// The stored conflicts (resolved and open).
    pub async fn conflicts(&self, name: &str) -> Result<Vec<Conflict>, ApiError> {
        self.get(name).await?;
        Ok(self.catalog().composition_conflicts(name).await?)
    }

    /// Resolves one conflict, every conflict of a resource, or all open ones.
    pub async fn resolve(
        &self,
        name: &str,
        req: ResolveRequest,
        actor: &str,
    ) -> Result<Vec<Conflict>, ApiError> {
        self.get(name).await?;
        let all = self.catalog().composition_conflicts(name).await?;
        let chosen: Vec<&Conflict> = match (&req.resource, &req.key, req.all) {
            (None, None, true) => all.iter().filter(|c| c.resolved.is_none()).collect(),
            (Some(r), None, false) => all.iter().filter(|c| &c.resource == r).collect(),
            (Some(r), Some(k), false) => all
                .iter()
                .filter(|c| &c.resource == r && &c.key == k)
                .collect(),
            _ => {
                return Err(ApiError::BadRequest(
                    "name a conflict (resource and key), a resource, or all".into(),
                ))
            }
        };
        if chosen.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "no such conflict in composition {name} (see `weft compose conflicts {name}`)"
            )));
        }
        // The sides' instants, to tell the older from the newer.
        let comp = self.get(name).await?;
        let (_, snaps) = self.inputs(&comp).await?;
        let at: HashMap<i64, String> = snaps.into_iter().map(|s| (s.id, s.taken_at)).collect();
        let mut tx = self
            .catalog()
            .pool
            .begin()
            .await
            .map_err(CatalogError::from)?;
        for c in &chosen {
            let side = match &req.take {
                Take::Snapshot(id) if c.sides.contains(id) => *id,
                Take::Snapshot(id) => {
                    return Err(ApiError::BadRequest(format!(
                        "snapshot {id} is not a side of conflict {} {} (sides {} and {})",
                        c.resource, c.key, c.sides[0], c.sides[1]
                    )))
                }
                Take::Side(s) => {
                    let key = |id: i64| (at.get(&id).cloned().unwrap_or_default(), id);
                    let (older, newer) = if key(c.sides[0]) <= key(c.sides[1]) {
                        (c.sides[0], c.sides[1])
                    } else {
                        (c.sides[1], c.sides[0])
                    };
                    match s.as_str() {
                        "older" => older,
                        "newer" => newer,
                        // A `data:` conflict's side by its instant.
                        other => match compose::instant_id(other) {
                            Ok(id)
                                if c.resource.starts_with("data:") && c.sides.contains(&id) =>
                            {
                                id
                            }
                            _ => {
                                return Err(ApiError::BadRequest(format!(
                                    "take {other:?}: use older, newer, a snapshot id, or for data: a side's instant"
                                )))
                            }
                        },
                    }
                }
            };
            sqlx::query(
                "UPDATE composition_conflicts SET resolved = ?, resolved_by = ?, resolved_at = ?
                  WHERE composition = ? AND resource = ? AND key = ?",
            )
            .bind(side)
            .bind(actor)
            .bind(now())
            .bind(name)
            .bind(&c.resource)
            .bind(&c.key)
            .execute(&mut *tx)
            .await
            .map_err(CatalogError::from)?;
        }
        tx.commit().await.map_err(CatalogError::from)?;
        Ok(self.catalog().composition_conflicts(name).await?)
    }

    /// Deletes a composition (weaves made from it stay).
    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        self.get(name).await?;
        sqlx::query("DELETE FROM compositions WHERE name = ?")
            .bind(name)
            .execute(&self.catalog().pool)
            .await
            .map_err(CatalogError::from)?;
        Ok(())
    }

    /// The plan apply uses: recomputed with the recorded resolutions; conflicts it
    /// finds that are not recorded yet are recorded; refused while any is open.
    pub(crate) async fn plan_for_apply(&self, name: &str) -> Result<(Composition, Plan), ApiError> {
        let comp = self.get(name).await?;
        let res = self.resolutions(name).await?;
        let plan = self.compute(&comp, &res).await?;
        self.catalog().add_conflicts(name, &plan.conflicts).await?;
        let open: Vec<String> = plan
            .open_conflicts()
            .map(|c| {
                format!(
                    "{} {} (snapshots {} and {})",
                    c.resource, c.key, c.sides[0], c.sides[1]
                )
            })
            .collect();
        if !open.is_empty() {
            let shown = open.iter().take(10).cloned().collect::<Vec<_>>().join("; ");
            return Err(ApiError::Conflict(format!(
                "composition {name} has {} open conflict(s): {shown}{}; resolve them with `weft compose resolve {name} …`",
                open.len(),
                if open.len() > 10 { "; …" } else { "" }
            )));
        }
        Ok((comp, plan))
    }
}
