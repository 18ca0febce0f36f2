//! Weaves: isolated, running branches of an environment (F5–F10).
//!
//! A weave is an environment of its own (a catalog row, a supervised QEMU) whose disks
//! are qcow2 overlays on a frozen base, and whose QEMU runs in its own network
//! namespace and cgroups. The base is
//! - **now**: one QMP `transaction` of live external snapshots (`blockdev-snapshot`) puts
//!   a new overlay under every disk of the running environment; the images below become
//!   frozen bases that the environment and the weave share. No data is copied.
//! - **a past instant or snapshot**: each disk snapshot chosen for that instant is
//!   restored once into a read-only raw base under `<data_dir>/bases/`, shared by every
//!   weave from it.
//!
//! The VM configuration is the environment's as of that instant (its newest config
//! snapshot at or before it), with the disks replaced by the weave's overlays.

mod create;
mod delete;
mod sources;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sqlx::Row;
use tracing::{info, warn};
use weft_qmp::image;
use weft_qmp::launch::{DiskFormat, VmConfig};
use weft_qmp::{backup, block};

use crate::catalog::{now, Catalog, CatalogError};
use crate::cgroups;
use crate::envs::Manager;
use crate::error::{one_line, ApiError};
use crate::model::{EnvKind, Environment, GuestPlan, Snapshot, SnapshotKind};
use crate::provenance::replay::DataPick;
use crate::snapshots::Snapshots;
pub use weft_api::weave::{CreateWeave, Source, SourceRow, Weave};

pub use crate::placement::netns_path;

/// Checks a weave name: see [`weft_api::names::check_weave_name`].
pub fn check_weave_name(name: &str) -> Result<(), ApiError> {
    weft_api::names::check_weave_name(name).map_err(ApiError::BadRequest)
}

fn weave_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Weave, CatalogError> {
    let idx: i64 = r.try_get("net_index")?;
    Ok(Weave {
        name: r.try_get("name")?,
        parent: r.try_get("parent")?,
        source: r.try_get("source")?,
        taken_at: r.try_get("taken_at")?,
        net_index: u8::try_from(idx).unwrap_or(u8::MAX),
        created_at: r.try_get("created_at")?,
        env: None,
        balloon: None,
    })
}

/// How long a composed weave's guest DPA may take to connect for reconciliation.
const RECONCILE_WAIT: Duration = Duration::from_secs(180);

/// What a weave's disk is made of.
enum DiskFrom {
    /// One disk snapshot.
    Snapshot(Box<Snapshot>),
    /// A composition's merge of disk snapshots.
    Merged(weft_blockdev::store::BlockMap),
}

/// What a composition chose beyond disks and configuration.
#[derive(Debug, Default)]
pub(super) struct Chosen {
    /// The guest address plan a rule naming `net` chose.
    net: Option<GuestPlan>,
    /// The application data `data:` rules chose, pushed into the guest (F14).
    data: Vec<DataPick>,
    /// The block maps of the weave's disks, in order, when `data` is not empty: what
    /// the chosen data is compared with.
    disks: Vec<weft_blockdev::store::BlockMap>,
}

/// A source row for a resource taken from snapshot `id`.
fn snapshot_row(resource: &str, part: &str, id: i64) -> SourceRow {
    SourceRow {
        resource: resource.into(),
        part: part.into(),
        snapshot: Some(id),
        instant: None,
        detail: None,
    }
}

impl Catalog {
    /// Records where each resource of `weave` came from (replacing earlier rows).
    pub async fn set_weave_sources(
        &self,
        weave: &str,
        rows: &[SourceRow],
    ) -> Result<(), CatalogError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM weave_sources WHERE weave = ?")
            .bind(weave)
            .execute(&mut *tx)
            .await?;
        for r in rows {
            sqlx::query(
                "INSERT OR REPLACE INTO weave_sources (weave, resource, part, snapshot, instant, detail)
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(weave)
            .bind(&r.resource)
            .bind(&r.part)
            .bind(r.snapshot)
            .bind(&r.instant)
            .bind(&r.detail)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The disk snapshots whose restored bases weaves use: their disks were made
    /// whole from one snapshot (a merge's base is the weave's own file).
    pub async fn base_snapshots_in_use(&self) -> Result<Vec<i64>, CatalogError> {
        let rows = sqlx::query(
            "SELECT DISTINCT snapshot FROM weave_sources
              WHERE resource LIKE 'disk:%' AND part = '' AND snapshot IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get("snapshot").map_err(Into::into))
            .collect()
    }

    /// Removes the sources of weaves that have no row (a create that died before it
    /// recorded its weave); only at start, when no create runs.
    pub async fn remove_orphan_weave_sources(&self) -> Result<u64, CatalogError> {
        let done =
            sqlx::query("DELETE FROM weave_sources WHERE weave NOT IN (SELECT name FROM weaves)")
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected())
    }

    /// Where each resource of `weave` came from.
    pub async fn weave_sources(&self, weave: &str) -> Result<Vec<SourceRow>, CatalogError> {
        let rows = sqlx::query(
            "SELECT resource, part, snapshot, instant, detail FROM weave_sources
              WHERE weave = ? ORDER BY resource, part",
        )
        .bind(weave)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SourceRow {
                    resource: r.try_get("resource")?,
                    part: r.try_get("part")?,
                    snapshot: r.try_get("snapshot")?,
                    instant: r.try_get("instant")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }
}

impl Catalog {
    /// Inserts a weave's environment row and its weave row in one transaction: a weftd
    /// that dies in between never leaves the environment without the weave (which
    /// would outlive recovery as a plain stopped environment on the weave's overlays).
    pub async fn insert_weave(
        &self,
        w: &Weave,
        env: &crate::catalog::NewEnvironment<'_>,
    ) -> Result<(), CatalogError> {
        let mut tx = self.pool.begin().await?;
        crate::catalog::insert_environment_in(&mut tx, env).await?;
        sqlx::query(
            "INSERT INTO weaves (name, parent, source, taken_at, net_index, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&w.name)
        .bind(&w.parent)
        .bind(&w.source)
        .bind(&w.taken_at)
        .bind(i64::from(w.net_index))
        .bind(&w.created_at)
        .execute(&mut *tx)
        .await?;
        crate::placement::insert_in(&mut tx, &w.name, &crate::placement::Stored::weave(&w.name))
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// One weave.
    pub async fn weave(&self, name: &str) -> Result<Option<Weave>, CatalogError> {
        let row = sqlx::query("SELECT * FROM weaves WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| weave_from_row(&r)).transpose()
    }

    /// Weaves of one environment, or all.
    pub async fn weaves(&self, parent: Option<&str>) -> Result<Vec<Weave>, CatalogError> {
        let rows = match parent {
            Some(p) => {
                sqlx::query("SELECT * FROM weaves WHERE parent = ? ORDER BY net_index")
                    .bind(p)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM weaves ORDER BY net_index")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(weave_from_row).collect()
    }

    /// Replaces an environment's stored VM configuration.
    pub async fn set_config(&self, name: &str, config: &VmConfig) -> Result<(), CatalogError> {
        let text = serde_json::to_string(config).map_err(|e| CatalogError::Corrupt {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        sqlx::query("UPDATE environments SET config = ?, updated_at = ? WHERE name = ?")
            .bind(text)
            .bind(now())
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Weaves of environments.
pub struct Weaves {
    manager: Arc<Manager>,
    snapshots: Arc<Snapshots>,
    /// The weaves' DHCP servers, one per namespace (created with it, stopped before it goes).
    dhcp: Arc<crate::dhcp::Servers>,
    /// Network slots held by creates in progress (their rows do not exist yet).
    held_slots: std::sync::Mutex<std::collections::HashSet<u8>>,
    /// Held while a weave is put on a shared base and while unused bases are removed,
    /// so that no base goes from under a weave being made.
    bases_lock: tokio::sync::Mutex<()>,
}

/// A network slot held for one create; released when dropped.
pub(super) struct SlotHold<'a> {
    held: &'a std::sync::Mutex<std::collections::HashSet<u8>>,
    index: u8,
}

impl Drop for SlotHold<'_> {
    fn drop(&mut self) {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.index);
    }
}

impl Weaves {
    /// Weaves over `manager`'s environments and `snapshots`' store.
    pub fn new(manager: Arc<Manager>, snapshots: Arc<Snapshots>) -> Arc<Weaves> {
        let dhcp = crate::dhcp::Servers::new(manager.host().dhcp().clone());
        Arc::new(Weaves {
            manager,
            snapshots,
            dhcp,
            held_slots: std::sync::Mutex::new(std::collections::HashSet::new()),
            bases_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The lowest slot of `slots` that no weave has and no create in progress holds,
    /// held for the caller.
    pub(super) async fn hold_slot(
        &self,
        slots: std::ops::RangeInclusive<u8>,
    ) -> Result<Option<SlotHold<'_>>, ApiError> {
        let used: Vec<u8> = self
            .manager
            .catalog()
            .weaves(None)
            .await?
            .iter()
            .map(|w| w.net_index)
            .collect();
        let mut held = self
            .held_slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(index) = slots
            .into_iter()
            .find(|i| !used.contains(i) && !held.contains(i))
        else {
            return Ok(None);
        };
        held.insert(index);
        Ok(Some(SlotHold {
            held: &self.held_slots,
            index,
        }))
    }

    pub(super) fn dir(&self, name: &str) -> PathBuf {
        self.manager.config().data_dir.join("weaves").join(name)
    }

    pub(super) fn bases(&self) -> PathBuf {
        self.manager.config().data_dir.join("bases")
    }

    pub(super) fn work(&self) -> PathBuf {
        self.manager.config().run_dir.join("backup")
    }

    /// A weave with its environment record.
    pub async fn show(&self, name: &str) -> Result<Weave, ApiError> {
        let mut w = self.manager.catalog().weave(name).await?.ok_or_else(|| {
            ApiError::Missing(format!("no weave named {name:?} (see `weft weave list`)"))
        })?;
        // As `weft env show` shows the same VM: with the files weftd keeps for it.
        w.env = match self.manager.show(name).await {
            Ok((env, _)) => Some(env),
            Err(ApiError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        w.balloon = crate::balloon::of_weave(&self.manager, name).await;
        Ok(w)
    }

    /// Weaves of an environment.
    pub async fn list(&self, parent: &str) -> Result<Vec<Weave>, ApiError> {
        let mut out = Vec::new();
        for mut w in self.manager.catalog().weaves(Some(parent)).await? {
            w.env = self.manager.catalog().environment(&w.name).await?;
            out.push(w);
        }
        Ok(out)
    }

    /// Routes new connections to `host_port` on the host to the weave's guest port (a
    /// host port of its environment; see [`crate::net`]).
    pub async fn route(
        &self,
        name: &str,
        host_port: u16,
        guest_port: u16,
        actor: &str,
    ) -> Result<Weave, ApiError> {
        self.manager
            .net()
            .route_weave(name, host_port, guest_port, actor)
            .await?;
        self.show(name).await
    }

    /// Makes `name` the active weave of its environment: every host port of the
    /// environment (published by it, or routed to any of its weaves) moves to it in one
    /// nftables transaction (new connections go to `name`; established ones finish
    /// where they started). `weft env activate` moves the published ones back.
    pub async fn activate(&self, name: &str, actor: &str) -> Result<serde_json::Value, ApiError> {
        self.manager.net().activate_weave(name, actor).await
    }

    /// Changes a weave's CPU and memory limits at runtime (its cgroups), and points
    /// its balloon, if it has one, at the memory limit.
    pub async fn set_limits(
        &self,
        name: &str,
        limits: &cgroups::Limits,
    ) -> Result<Weave, ApiError> {
        let mut weave = self.show(name).await?;
        if limits.memory_mib.is_some_and(|m| m < 16) {
            return Err(ApiError::BadRequest("--memory must be at least 16M".into()));
        }
        weave.balloon = crate::balloon::apply_limits(&self.manager, name, limits).await?;
        Ok(weave)
    }
}

/// The guest keeps its MAC and address plan; its taps are inside the namespace.
fn weave_taps(mut config: VmConfig) -> VmConfig {
    for (i, nic) in config.nics.iter_mut().enumerate() {
        nic.tap = format!("weft-tap{i}");
    }
    config
}
