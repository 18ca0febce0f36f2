//! Snapshots of environment resources, restores, and the jobs that run them.
//!
//! A disk snapshot of a running environment follows the pull-mode recipe of
//! [`weft_qmp::backup`]: QEMU exports a point-in-time view of the disk over NBD, the
//! [`weft_blockdev::pull`] engine reads what changed (or everything allocated) into the
//! chunk store, the block map is written once its chunks are durable, and only then
//! does the catalog row become `complete`. Whatever fails on the way, the row ends
//! `failed`, QEMU is cleaned up and the previous checkpoint stays the base.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::stream::{self, StreamExt, TryStreamExt};
use serde_json::json;
use tracing::{info, warn};
use weft_blockdev::nbd::NbdClient;
use weft_blockdev::pull::{self, PullKind};
use weft_blockdev::store::{BlockMap, ChunkStore, StoreConfig};
use weft_qmp::backup::{self, PullBackupSpec};
use weft_qmp::export::{self, Export};
use weft_qmp::launch::DiskConfig;

use crate::catalog_snapshots::{Completed, NewSnapshot, SnapshotFilter};
use crate::config::Config;
use crate::envs::Manager;
use crate::error::{one_line, ApiError};
use crate::model::{EnvKind, Job, JobState, Snapshot, SnapshotKind, SnapshotState};
use crate::retention::{self, Keep};

/// Prefix of the checkpoint bitmaps weft adds to disks.
pub const CHECKPOINT_PREFIX: &str = "weft-c";

/// What every snapshot of one request records.
struct Meta<'a> {
    /// The request's instant.
    instant: &'a str,
    /// Who asked.
    actor: &'a str,
    /// Semantic category.
    category: Option<&'a str>,
    /// Free text.
    note: Option<&'a str>,
}

/// Progress of running jobs, by id (finished jobs are read from the catalog).
#[derive(Default)]
struct Progress {
    running: Mutex<HashMap<i64, Arc<(AtomicU64, AtomicU64)>>>,
    /// Jobs that ended while the catalog could not record it (a full disk): shown as
    /// they ended, not as the catalog's `running`, until the record is written.
    unrecorded: Mutex<HashMap<i64, Job>>,
}

/// How often a job's end that could not be recorded is tried again.
const RECORD_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Snapshots, restores and jobs.
pub struct Snapshots {
    manager: Arc<Manager>,
    store: ChunkStore,
    progress: Progress,
}

/// Opens the chunk store named by the configuration, creating it on first use.
pub fn open_store(config: &Config) -> Result<ChunkStore, ApiError> {
    let dir = config.store_dir();
    let key = config.store.encrypt.then(|| config.key_file());
    let internal = |e: weft_blockdev::store::Error| ApiError::Internal(e.to_string());
    if dir.join("store.json").exists() {
        // An existing store decides for itself whether it is encrypted.
        let key_file = config.key_file();
        let key = key.or_else(|| key_file.exists().then_some(key_file));
        return ChunkStore::open(&dir, key.as_deref()).map_err(internal);
    }
    let chunk_size = config
        .store
        .chunk_kib
        .checked_mul(1024)
        .ok_or_else(|| ApiError::BadRequest("store.chunk_kib is too large".into()))?;
    let store_config = StoreConfig {
        chunk_size,
        encrypted: config.store.encrypt,
        ..StoreConfig::default()
    };
    ChunkStore::create(
        &dir,
        config.store.cold_dir.as_deref(),
        &store_config,
        key.as_deref(),
    )
    .map_err(internal)
}

/// The block map name of a disk snapshot.
fn index_name(env: &str, resource: &str, id: i64) -> String {
    format!("{env}/{}/{id:010}", resource.replace(':', "-"))
}

impl Snapshots {
    /// Snapshots over `manager`'s environments, stored in `store`.
    pub fn new(manager: Arc<Manager>, store: ChunkStore) -> Arc<Snapshots> {
        Arc::new(Snapshots {
            manager,
            store,
            progress: Progress::default(),
        })
    }

    /// The catalog.
    pub fn catalog(&self) -> &crate::catalog::Catalog {
        self.manager.catalog()
    }

    /// The chunk store.
    pub fn store(&self) -> &ChunkStore {
        &self.store
    }

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
            if let Some(disk) = s.resource.strip_prefix("disk:") {
                interrupted.insert((s.env.clone(), disk.to_string()));
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
            warn!(error = %e, "cannot remove block maps that no snapshot lists");
        }
        Ok(())
    }

    /// Removes what a snapshot of a running environment that died with weftd left in
    /// its QEMU (backup job, NBD export, fleece nodes, temporary bitmaps): until then
    /// the disk is busy for anything else, a weave from now among them. The checkpoint
    /// of the last complete snapshot stays. Failures are logged: the next snapshot
    /// cleans again.
    async fn clean_interrupted_backup(&self, env: &str, disk: &str) {
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
    async fn remove_orphan_indexes(&self) -> Result<(), ApiError> {
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

    /// One job, with live progress while it runs.
    pub async fn job(&self, id: i64) -> Result<Job, ApiError> {
        let mut job = self
            .manager
            .catalog()
            .job(id)
            .await?
            .ok_or_else(|| ApiError::Missing(format!("no job {id} (see `weft job list`)")))?;
        if job.state == JobState::Running {
            if let Some(ended) = self.lock_unrecorded().get(&id) {
                return Ok(ended.clone());
            }
            if let Some(p) = self.lock_progress().get(&id) {
                job.done_bytes = p.0.load(Ordering::Relaxed);
                job.total_bytes = p.1.load(Ordering::Relaxed);
            }
        }
        Ok(job)
    }

    /// The newest `limit` jobs, as [`Snapshots::job`] shows each.
    pub async fn jobs(&self, limit: u32) -> Result<Vec<Job>, ApiError> {
        let mut jobs = self.manager.catalog().jobs(limit).await?;
        let unrecorded = self.lock_unrecorded();
        for job in jobs.iter_mut().filter(|j| j.state == JobState::Running) {
            if let Some(ended) = unrecorded.get(&job.id) {
                *job = ended.clone();
            }
        }
        Ok(jobs)
    }

    fn lock_unrecorded(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Job>> {
        self.progress
            .unrecorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn lock_progress(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<i64, Arc<(AtomicU64, AtomicU64)>>> {
        self.progress
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `work` as a job and returns at once; the job records its outcome.
    async fn spawn_job<F, Fut>(
        self: &Arc<Self>,
        kind: &str,
        target: &str,
        actor: &str,
        work: F,
    ) -> Result<Job, ApiError>
    where
        F: FnOnce(Arc<Snapshots>, Arc<(AtomicU64, AtomicU64)>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<serde_json::Value, ApiError>> + Send + 'static,
    {
        let catalog = self.manager.catalog().clone();
        let id = catalog.insert_job(kind, target, actor).await?;
        let progress = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        self.lock_progress().insert(id, Arc::clone(&progress));
        let me = Arc::clone(self);
        let (kind, target) = (kind.to_string(), target.to_string());
        tokio::spawn(async move {
            let outcome = work(Arc::clone(&me), Arc::clone(&progress)).await;
            let (done, total) = (
                progress.0.load(Ordering::Relaxed),
                progress.1.load(Ordering::Relaxed),
            );
            let message = outcome.as_ref().err().map(|e| one_line(&e.to_string()));
            let ended = match &outcome {
                Ok(v) => Ok(v),
                Err(_) => Err(message.as_deref().unwrap_or("failed")),
            };
            match &message {
                None => info!(job = id, %kind, %target, "job succeeded"),
                Some(m) => warn!(job = id, %kind, %target, error = %m, "job failed"),
            }
            if let Err(e) = catalog.finish_job(id, ended, done, total).await {
                // Callers following the job must still see it end: keep its end here
                // and write it once the catalog can take it.
                warn!(job = id, error = %e, "cannot record the end of a job yet; retrying every {}s", RECORD_RETRY.as_secs());
                if let Ok(Some(mut job)) = catalog.job(id).await {
                    job.state = if ended.is_ok() {
                        JobState::Succeeded
                    } else {
                        JobState::Failed
                    };
                    job.finished_at = Some(crate::catalog::now());
                    job.result = ended.ok().cloned();
                    job.error = ended.err().map(str::to_string);
                    job.done_bytes = done;
                    job.total_bytes = total;
                    me.lock_unrecorded().insert(id, job);
                }
                me.lock_progress().remove(&id);
                while catalog.finish_job(id, ended, done, total).await.is_err() {
                    tokio::time::sleep(RECORD_RETRY).await;
                }
                info!(job = id, "the end of the job is recorded");
                me.lock_unrecorded().remove(&id);
            }
            me.lock_progress().remove(&id);
        });
        self.job(id).await
    }

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
            r => r
                .strip_prefix("disk:")
                .filter(|d| served.contains(d))
                .into_iter()
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
            r => match r.strip_prefix("disk:") {
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

    async fn snapshot_disk(
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
                .map_err(|e| ApiError::Qemu(format!("disk {}: {e}", disk.name))),
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
            remove_launch_files(&paths);
        }
        result
    }

    /// Opens a stopped environment's disk in qemu-storage-daemon.
    async fn open_offline(
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
            .map_err(|e| ApiError::Internal(format!("cannot create {}: {e}", dir.display())))?;
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
            remove_launch_files(&paths);
            ApiError::Qemu(one_line(&format!(
                "disk {} of stopped {env:?}: cannot open it in qemu-storage-daemon: {e}",
                disk.name
            )))
        })
    }

    async fn snapshot_disk_through(
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
        let qemu = |e: weft_qmp::Error| ApiError::Qemu(format!("disk {}: {e}", disk.name));

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
                let message = one_line(&e.to_string());
                catalog.fail_snapshot(id, &message).await?;
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn pull_disk(
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
        let qemu_err = |e: weft_qmp::Error| ApiError::Qemu(format!("disk {}: {e}", disk.name));
        let unsupported = backup::persistent_bitmaps_unsupported(qmp, node)
            .await
            .map_err(qemu_err)?;
        if let Some(why) = &unsupported {
            info!(env, disk = %disk.name, why = %why, "checkpoint kept in QEMU's memory only");
        }
        let persistent = unsupported.is_none();
        catalog.set_snapshot_checkpoint(id, &checkpoint).await?;
        let work_dir = self.manager.config().run_dir.join("backup");
        std::fs::create_dir_all(&work_dir).map_err(|e| {
            ApiError::Internal(format!("cannot create {}: {e}", work_dir.display()))
        })?;
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
        let qemu = |e: weft_qmp::Error| ApiError::Qemu(format!("disk {}: {e}", disk.name));
        let running = backup::start(qmp, spec.clone()).await.map_err(qemu)?;
        let pulled = async {
            let mut contexts = vec!["base:allocation"];
            if let Some(c) = &running.dirty_context {
                contexts.push(c);
            }
            let nbd = NbdClient::connect_unix(&spec.nbd_socket, &spec.export, &contexts)
                .await
                .map_err(|e| ApiError::Qemu(format!("disk {}: {e}", disk.name)))?;
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
                .map_err(|e| ApiError::Internal(format!("disk {}: {e}", disk.name)))?;
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

    /// Snapshots of an environment.
    pub async fn list(
        &self,
        env: &str,
        filter: &SnapshotFilter,
    ) -> Result<Vec<Snapshot>, ApiError> {
        Ok(self.manager.catalog().snapshots(env, filter).await?)
    }

    /// One snapshot.
    pub async fn get(&self, id: i64) -> Result<Snapshot, ApiError> {
        self.manager.catalog().snapshot(id).await?.ok_or_else(|| {
            ApiError::Missing(format!("no snapshot {id} (see `weft snapshot list ENV`)"))
        })
    }

    /// Deletes a snapshot that no other snapshot builds on; its chunks go at the next gc.
    pub async fn delete(&self, id: i64) -> Result<(), ApiError> {
        let s = self.get(id).await?;
        if s.state == SnapshotState::Pending {
            return Err(ApiError::Conflict(format!(
                "snapshot {id} is still being taken"
            )));
        }
        if let Some(name) = &s.index_name {
            let users = crate::blk::users_of(self.manager.config(), name);
            if !users.is_empty() {
                return Err(ApiError::Conflict(format!(
                    "snapshot {id} is served live to {}; delete {} first",
                    users.join(", "),
                    if users.len() == 1 {
                        "that weave"
                    } else {
                        "those weaves"
                    }
                )));
            }
        }
        // The row goes first: a crash between the two steps leaves a block map that
        // nothing lists (recovery removes it), never a listed snapshot without one.
        self.manager.catalog().delete_snapshot(id).await?;
        if let Some(name) = s.index_name {
            crate::testpoints::point("snapshot.delete").await;
            let store = self.store.clone();
            let index = name.clone();
            match blocking(move || store.remove_index(&index)).await? {
                Ok(()) | Err(weft_blockdev::store::Error::IndexNotFound { .. }) => {}
                Err(e) => {
                    warn!(snapshot = id, index = %name, error = %e,
                        "snapshot deleted but its block map stays until the next start of weftd");
                }
            }
        }
        Ok(())
    }

    /// Applies a retention rule to the complete snapshots of `env` (one resource, or each
    /// resource); returns the ids kept and removed per resource. With `dry_run` nothing
    /// is removed.
    pub async fn prune(
        &self,
        env: &str,
        resource: Option<&str>,
        rule: &Keep,
        dry_run: bool,
    ) -> Result<serde_json::Value, ApiError> {
        let all = self.list(env, &SnapshotFilter::default()).await?;
        if all.is_empty() && self.manager.catalog().environment(env).await?.is_none() {
            return Err(ApiError::NotFound(env.to_string()));
        }
        let mut resources: Vec<&str> = all.iter().map(|s| s.resource.as_str()).collect();
        resources.sort_unstable();
        resources.dedup();
        if let Some(r) = resource {
            resources.retain(|x| *x == r);
        }
        let in_use = crate::blk::indexes_in_use(self.manager.config());
        let mut report = serde_json::Map::new();
        for r in resources {
            let of_r: Vec<(i64, String)> = all
                .iter()
                .filter(|s| s.resource == r)
                .map(|s| (s.id, s.taken_at.clone()))
                .collect();
            let mut kept = retention::keep(&of_r, rule);
            // A snapshot served live to a weave stays until the weave goes.
            for s in all.iter().filter(|s| s.resource == r) {
                if s.index_name
                    .as_ref()
                    .is_some_and(|i| in_use.contains_key(i))
                {
                    kept.insert(s.id);
                }
            }
            let mut removed = Vec::new();
            for (id, _) in &of_r {
                if !kept.contains(id) {
                    if !dry_run {
                        self.delete(*id).await?;
                    }
                    removed.push(*id);
                }
            }
            let mut kept: Vec<i64> = kept.into_iter().collect();
            kept.sort_unstable();
            report.insert(r.to_string(), json!({"kept": kept, "removed": removed}));
        }
        Ok(json!({"env": env, "dry_run": dry_run, "resources": report}))
    }

    /// Reads every chunk of a snapshot back and checks its digest.
    pub async fn verify(&self, id: i64) -> Result<serde_json::Value, ApiError> {
        let s = self.get(id).await?;
        let Some(name) = s.index_name.clone() else {
            return Ok(
                json!({"snapshot": id, "ok": true, "detail": "nothing stored (config snapshot)"}),
            );
        };
        let store = self.store.clone();
        let map = blocking(move || store.read_index(&name))
            .await?
            .map_err(store_err)?;
        let ids: Vec<_> = map.data_ids().copied().collect();
        let store = self.store.clone();
        let bad: Vec<String> = blocking(move || {
            ids.iter()
                .filter_map(|id| store.get(id).err().map(|e| e.to_string()))
                .collect::<Vec<_>>()
        })
        .await?;
        let digest_ok = Some(pull::digest_of(&map)) == s.checksum;
        Ok(
            json!({"snapshot": id, "ok": bad.is_empty() && digest_ok, "chunks": map.data_ids().count(), "bad_chunks": bad, "digest_ok": digest_ok}),
        )
    }

    /// The block map of a disk snapshot, checked against its recorded checksum.
    pub async fn block_map(&self, id: i64) -> Result<BlockMap, ApiError> {
        let s = self.get(id).await?;
        let name = s
            .index_name
            .clone()
            .ok_or_else(|| ApiError::BadRequest(format!("snapshot {id} has no disk")))?;
        let store = self.store.clone();
        let map = blocking(move || store.read_index(&name))
            .await?
            .map_err(store_err)?;
        if Some(pull::digest_of(&map)) != s.checksum {
            return Err(ApiError::Internal(format!(
                "the block map of snapshot {id} does not match its recorded checksum"
            )));
        }
        Ok(map)
    }

    /// Restores a disk snapshot into a new raw image at `output` and waits for it (used
    /// for the shared bases of weaves).
    pub async fn restore_into(&self, id: i64, output: &Path) -> Result<(), ApiError> {
        let map = self.block_map(id).await?;
        let progress = (AtomicU64::new(0), AtomicU64::new(0));
        restore_raw(&self.store, &map, output, &progress)
            .await
            .map(drop)
    }

    /// Restores a block map (e.g. a composition's merge of disk snapshots) into a new
    /// raw image at `output` and waits for it.
    pub async fn restore_map_into(&self, map: &BlockMap, output: &Path) -> Result<(), ApiError> {
        let progress = (AtomicU64::new(0), AtomicU64::new(0));
        restore_raw(&self.store, map, output, &progress)
            .await
            .map(drop)
    }

    /// Restores a disk snapshot into a new image at `output` as a job. `output` must be
    /// inside `export_dirs` (see [`crate::confine`]); an existing file there is refused
    /// unless `force` is set, and then only a regular file is replaced.
    pub async fn restore(
        self: &Arc<Self>,
        id: i64,
        output: &Path,
        format: Option<&str>,
        force: bool,
        actor: &str,
    ) -> Result<Job, ApiError> {
        let s = self.get(id).await?;
        if s.state != SnapshotState::Complete {
            return Err(ApiError::Conflict(format!(
                "snapshot {id} is {}, not complete",
                s.state.as_str()
            )));
        }
        let Some(name) = s.index_name.clone() else {
            return Err(ApiError::BadRequest(format!(
                "snapshot {id} is a {} snapshot: it has no disk to restore",
                s.resource
            )));
        };
        let qcow2 = match format.unwrap_or("raw") {
            "raw" => false,
            "qcow2" => true,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown format {other:?}: use raw or qcow2"
                )))
            }
        };
        let replace = if force {
            crate::confine::Replace::RegularFile
        } else {
            crate::confine::Replace::Never
        };
        // The file is made (0600, under a temporary name) before the job starts, so a
        // refused path is the request's answer.
        let pending = crate::confine::ExportDirs::new(self.manager.config())
            .create("--output", output, replace)?;
        let output = pending.path();
        let checksum = s.checksum.clone();
        self.spawn_job(
            "restore",
            &format!("snapshot {id}"),
            actor,
            move |me, progress| async move {
                let store = me.store.clone();
                let map = blocking(move || store.read_index(&name))
                    .await?
                    .map_err(store_err)?;
                if Some(pull::digest_of(&map)) != checksum {
                    return Err(ApiError::Internal(format!(
                        "the block map of snapshot {id} does not match its recorded checksum"
                    )));
                }
                let work = me.manager.config().run_dir.join("restore");
                // Names the temporary file for the next weftd, should this one die
                // before it is renamed (see crate::leftovers).
                let record = crate::leftovers::record_output(&work, id, &pending.temp_path())?;
                let written = if qcow2 {
                    restore_qcow2(&me.store, &map, &pending.proc_path(), &work, id, &progress).await
                } else {
                    let file = Arc::clone(pending.file());
                    file.set_len(map.disk_size).map_err(|e| {
                        ApiError::Internal(format!("cannot size {}: {e}", output.display()))
                    })?;
                    crate::testpoints::point("restore.partial").await;
                    restore_raw_file(&me.store, &map, file, &progress, &pending.temp_path()).await
                };
                let written = match written {
                    Ok(n) => blocking(move || pending.commit())
                        .await?
                        .map(|()| n)
                        .map_err(ApiError::from),
                    Err(e) => Err(e),
                };
                let _ = std::fs::remove_file(&record);
                let written = written?;
                Ok(json!({"output": output, "bytes": map.disk_size, "bytes_written": written}))
            },
        )
        .await
    }
}

/// Writes `map` as a qcow2 image at `target`, a path QEMU opens (for a restore, the
/// weftd descriptor of the file made in the export directory). QEMU writes the format:
/// a qemu-storage-daemon creates the image, exports it writable over NBD, and only the
/// data chunks are written (zero chunks stay unallocated).
async fn restore_qcow2(
    store: &ChunkStore,
    map: &BlockMap,
    target: &Path,
    work: &Path,
    id: i64,
    progress: &(AtomicU64, AtomicU64),
) -> Result<u64, ApiError> {
    std::fs::create_dir_all(work)
        .map_err(|e| ApiError::Internal(format!("cannot create {}: {e}", work.display())))?;
    let paths = weft_qmp::launch::LaunchPaths {
        qmp_socket: work.join(format!("{id}.qmp")),
        serial_log: work.join(format!("{id}.serial")),
        output_log: work.join(format!("{id}.log")),
        pid_file: Some(work.join(format!("{id}.pid"))),
    };
    let nbd_socket = work.join(format!("{id}.nbd"));
    let daemon = weft_qmp::process::spawn_storage_daemon(
        &[],
        &paths,
        &weft_qmp::process::SpawnOptions::default(),
    )
    .await
    .map_err(|e| ApiError::Qemu(one_line(&format!("cannot start qemu-storage-daemon: {e}"))))?;
    let qmp = daemon.qmp().clone();
    let written = async {
        let qemu = |e: weft_qmp::Error| ApiError::Qemu(one_line(&format!("qcow2 restore: {e}")));
        backup::create_file_node(&qmp, target, "out-file")
            .await
            .map_err(qemu)?;
        backup::create_qcow2_node(&qmp, "out-file", "out", map.disk_size, None)
            .await
            .map_err(qemu)?;
        if nbd_socket.to_str().is_none() {
            return Err(ApiError::Internal("socket path is not UTF-8".into()));
        }
        export::start_server(&qmp, &nbd_socket)
            .await
            .map_err(qemu)?;
        export::add(&qmp, &Export::writable("out", "out", "out"))
            .await
            .map_err(qemu)?;
        let nbd = NbdClient::connect_unix(&nbd_socket, "out", &[])
            .await
            .map_err(|e| ApiError::Qemu(format!("qcow2 restore: {e}")))?;
        progress.1.store(map.data_bytes(), Ordering::Relaxed);
        let nbd_ref = &nbd;
        let written = stream::iter(weft_blockdev::restore::data_groups(map))
            .map(|group| {
                let store = store.clone();
                async move {
                    let offset = group.offset;
                    let data = blocking(move || weft_blockdev::restore::read_group(&store, &group))
                        .await?
                        .map_err(store_err)?;
                    let step = nbd_ref.max_request() as usize;
                    for (k, piece) in data.chunks(step).enumerate() {
                        nbd_ref
                            .write(offset + (k * step) as u64, piece)
                            .await
                            .map_err(|e| {
                                ApiError::Qemu(format!("qcow2 restore: write at {offset}: {e}"))
                            })?;
                    }
                    progress.0.fetch_add(data.len() as u64, Ordering::Relaxed);
                    Ok::<u64, ApiError>(data.len() as u64)
                }
            })
            .buffer_unordered(weft_blockdev::restore::PARALLEL_GROUPS)
            .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
            .await?;
        nbd.flush()
            .await
            .map_err(|e| ApiError::Qemu(format!("qcow2 restore: flush: {e}")))?;
        let _ = nbd.disconnect().await;
        Ok::<u64, ApiError>(written)
    }
    .await;
    // quit closes the image cleanly (QEMU writes its metadata); then the file is final.
    let _ = qmp.execute_raw("quit", None).await;
    if tokio::time::timeout(std::time::Duration::from_secs(30), daemon.wait())
        .await
        .is_err()
    {
        daemon.kill().await;
    }
    let _ = std::fs::remove_file(&nbd_socket);
    remove_launch_files(&paths);
    written
}

/// Writes `map` as a sparse raw image of weft's own (a weave's base): into
/// `<output>.partial`, then renamed.
async fn restore_raw(
    store: &ChunkStore,
    map: &BlockMap,
    output: &Path,
    progress: &(AtomicU64, AtomicU64),
) -> Result<u64, ApiError> {
    let partial = PathBuf::from(format!("{}.partial", output.display()));
    let io = |what: &str, e: std::io::Error| {
        ApiError::Internal(format!("{what} {}: {e}", partial.display()))
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
        .map_err(|e| io("cannot create", e))?;
    file.set_len(map.disk_size)
        .map_err(|e| io("cannot size", e))?;
    crate::testpoints::point("restore.partial").await;
    let file = Arc::new(file);
    let result = restore_raw_file(store, map, Arc::clone(&file), progress, &partial).await;
    let written = match result {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    file.sync_all().map_err(|e| io("cannot sync", e))?;
    std::fs::rename(&partial, output).map_err(|e| io("cannot rename", e))?;
    Ok(written)
}

/// Writes the data chunks of `map` into `file` (already sized), in parallel.
async fn restore_raw_file(
    store: &ChunkStore,
    map: &BlockMap,
    file: Arc<std::fs::File>,
    progress: &(AtomicU64, AtomicU64),
    path: &Path,
) -> Result<u64, ApiError> {
    progress.1.store(map.data_bytes(), Ordering::Relaxed);
    let report = |done: u64, _total: u64| progress.0.store(done, Ordering::Relaxed);
    weft_blockdev::restore::restore_into_file(store, map, file, &report)
        .await
        .map_err(|e| match e {
            weft_blockdev::restore::Error::Store(e) => store_err(e),
            // Which file: a full disk is then a one-line answer to "where".
            e @ weft_blockdev::restore::Error::Write { .. } => {
                ApiError::Internal(format!("{}: {e}", path.display()))
            }
            e => ApiError::Internal(e.to_string()),
        })
}

/// Removes the files of a storage daemon that has ended.
fn remove_launch_files(paths: &weft_qmp::launch::LaunchPaths) {
    for p in [&paths.qmp_socket, &paths.serial_log, &paths.output_log]
        .into_iter()
        .chain(paths.pid_file.as_ref())
    {
        let _ = std::fs::remove_file(p);
    }
}

fn disk_names(disks: &[DiskConfig]) -> String {
    disks
        .iter()
        .map(|d| d.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn store_err(e: weft_blockdev::store::Error) -> ApiError {
    ApiError::Internal(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))
}
