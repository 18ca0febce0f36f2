//! Snapshots of environment resources, restores, and the jobs that run them.
//!
//! A disk snapshot of a running environment follows the pull-mode recipe of
//! [`weft_qmp::backup`]: QEMU exports a point-in-time view of the disk over NBD, the
//! [`weft_blockdev::pull`] engine reads what changed (or everything allocated) into the
//! chunk store, the block map is written once its chunks are durable, and only then
//! does the catalog row become `complete`. Whatever fails on the way, the row ends
//! `failed`, QEMU is cleaned up and the previous checkpoint stays the base.

mod jobs;
mod recovery;
mod restore;
mod take;
#[cfg(test)]
mod tests;

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
use crate::error::ApiError;
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
    let internal = ApiError::from;
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
}

fn disk_names(disks: &[DiskConfig]) -> String {
    disks
        .iter()
        .map(|d| d.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn store_err(e: weft_blockdev::store::Error) -> ApiError {
    ApiError::from(e)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::task("store task failed", e))
}
