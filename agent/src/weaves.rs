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
struct Chosen {
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
struct SlotHold<'a> {
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
        Arc::new(Weaves {
            manager,
            snapshots,
            dhcp: crate::dhcp::Servers::new(),
            held_slots: std::sync::Mutex::new(std::collections::HashSet::new()),
            bases_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The lowest slot of `slots` that no weave has and no create in progress holds,
    /// held for the caller.
    async fn hold_slot(
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

    fn dir(&self, name: &str) -> PathBuf {
        self.manager.config().data_dir.join("weaves").join(name)
    }

    fn bases(&self) -> PathBuf {
        self.manager.config().data_dir.join("bases")
    }

    fn work(&self) -> PathBuf {
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
            .map_err(|e| ApiError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        // A weave from now gets its overlays from the environment's running QEMU.
        if let Some(user) =
            crate::qemu_user::QemuUser::of(self.manager.config().qemu_user.as_deref())
                .map_err(ApiError::BadRequest)?
        {
            user.give_dir(&self.manager.config().data_dir, &dir)
                .map_err(|e| {
                    ApiError::Internal(format!("cannot give {} to qemu_user: {e}", dir.display()))
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
            let groups = cgroups::groups(&name);
            groups.create().map_err(|e| {
                ApiError::Internal(format!("cannot create the cgroups of {name}: {e}"))
            })?;
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
            warn!(weave = %name, error = %e, "weave creation failed; removing what was made");
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
    fn reconcile_later(
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
                            if e.to_string().contains("no DPA")
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
                    format!("not reconciled: {e}"),
                    format!("error: {}", one_line(&e.to_string())),
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
    async fn assemble(
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
                let t = humantime::parse_rfc3339_weak(&t)
                    .map(|st| humantime::format_rfc3339_micros(st).to_string())
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
                .map_err(|e| ApiError::Qemu(one_line(&format!("overlay of {}: {e}", disk.name))))?;
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
    async fn serve_live(
        &self,
        name: &str,
        mut config: VmConfig,
        froms: Vec<DiskFrom>,
    ) -> Result<VmConfig, ApiError> {
        let dir = crate::blk::vm_dir(self.manager.config(), name);
        // A fresh start: nothing from an earlier weave of this name.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::Internal(format!("cannot create {}: {e}", dir.display())))?;
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
    async fn write_specs(
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
                        .map_err(|e| ApiError::Internal(format!("index task failed: {e}")))?
                        .map_err(|e| ApiError::Internal(format!("cannot store the merge: {e}")))?;
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
            let bytes = serde_json::to_vec_pretty(&spec)
                .map_err(|e| ApiError::Internal(format!("disk spec: {e}")))?;
            std::fs::write(&path, bytes)
                .map_err(|e| ApiError::Internal(format!("cannot write {}: {e}", path.display())))?;
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
    async fn branch_now(
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
        let qemu = |e: weft_qmp::Error| ApiError::Qemu(one_line(&e.to_string()));
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
                    warn!(env = %env.name, error = %se, "cannot settle the new overlays now; recovery will");
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

    /// The configuration and restored bases as of instant `t`.
    async fn bases_at(
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
    async fn composed(
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
    async fn structured<T: serde::de::DeserializeOwned>(
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
    async fn slot_sources(
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
    async fn base_of(&self, snap: &Snapshot) -> Result<PathBuf, ApiError> {
        let dir = self.bases();
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(format!("snapshot-{}.raw", snap.id));
        if path.exists() {
            return Ok(path);
        }
        self.snapshots.restore_into(snap.id, &path).await?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).map_err(|e| {
            ApiError::Internal(format!("cannot make {} read-only: {e}", path.display()))
        })?;
        Ok(path)
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

    /// The store indexes weave `name` owns (merges it served live), under the current
    /// prefix and the old one (unless an environment is called like the old prefix).
    async fn remove_weave_indexes(&self, name: &str) -> Result<(), ApiError> {
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
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            for idx in store.list_indexes().map_err(|e| e.to_string())? {
                if prefixes.iter().any(|p| idx.starts_with(p)) {
                    store.remove_index(&idx).map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::Internal)
    }

    /// Removes the restored bases no weave uses any more, and the `.partial` files
    /// of base restores that never finished (every restore runs under the lock).
    async fn remove_unused_bases(&self) -> Result<(), ApiError> {
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
    async fn remove_leftovers(&self) -> Result<(), ApiError> {
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
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(e.to_string()))?;
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
            let groups = cgroups::groups(name);
            let removed =
                tokio::task::spawn_blocking(move || groups.remove(Duration::from_secs(10)))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            if let Err(e) = removed {
                warn!(weave = %name, error = %e, "cannot remove a leftover weave's cgroups");
            }
            if let Err(e) = self.manager.remove_provenance(name).await {
                warn!(weave = %name, error = %e, "cannot remove a leftover weave's provenance log");
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
            warn!(error = %e, "cannot remove what unfinished weave creates left");
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
            let groups = cgroups::groups(&w.name).create().map_err(|e| e.to_string());
            if let Err(e) = net.and(groups) {
                warn!(weave = %w.name, error = %e, "cannot restore the weave's network or cgroups");
                catalog
                    .audit("weftd", "weave.recover", Some(&w.name), Some(&e), "failed")
                    .await?;
            }
        }
        Ok(())
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
    async fn remove(&self, name: &str) -> Result<(), ApiError> {
        let catalog = self.manager.catalog();
        let weave = catalog.weave(name).await?;
        let mut problems = Vec::new();
        if catalog.environment(name).await?.is_some() {
            if let Err(e) = self.manager.remove(name).await {
                problems.push(e.to_string());
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
        let groups = cgroups::groups(name);
        let removed = tokio::task::spawn_blocking(move || groups.remove(Duration::from_secs(10)))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(e) = removed {
            problems.push(format!("cgroups: {e}"));
        }
        // Usually gone with its environment row; this covers a weave without one.
        if let Err(e) = self.manager.remove_provenance(name).await {
            problems.push(e.to_string());
        }
        if let Err(e) = catalog.set_weave_sources(name, &[]).await {
            problems.push(format!("sources: {e}"));
        }
        // Merges it served live were stored as indexes of its own.
        if let Err(e) = self.remove_weave_indexes(name).await {
            problems.push(format!("merged indexes: {e}"));
        }
        if let Err(e) = crate::blk::forget(self.manager.config(), name).await {
            problems.push(e.to_string());
        }
        let dir = self.dir(name);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                problems.push(format!("{}: {e}", dir.display()));
            }
        }
        // Its sources are gone: a base no other weave uses goes with it.
        if let Err(e) = self.remove_unused_bases().await {
            problems.push(format!("bases: {e}"));
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

/// The guest keeps its MAC and address plan; its taps are inside the namespace.
fn weave_taps(mut config: VmConfig) -> VmConfig {
    for (i, nic) in config.nics.iter_mut().enumerate() {
        nic.tap = format!("weft-tap{i}");
    }
    config
}
