//! Pull-mode backup over QMP, the way libvirt drives QEMU 7.2:
//!
//! 1. A scratch qcow2 (the *fleece*) is created through QMP `blockdev-create`, opened
//!    with the live disk as its backing node.
//! 2. One `transaction` adds the new persistent checkpoint bitmap, (for an incremental)
//!    copies the previous checkpoint into a disabled temporary bitmap, and starts
//!    `blockdev-backup sync=none` from the disk into the fleece. From that instant the
//!    fleece shows the disk as it was: QEMU copies old data into it before the guest
//!    overwrites it (copy-before-write).
//! 3. QEMU's NBD server exports the fleece read-only, with the temporary bitmap as the
//!    `qemu:dirty-bitmap:<name>` meta context.
//! 4. The caller reads the export (dirty extents only for an incremental, allocated
//!    extents for a full) and then calls [`PullBackup::finish`] or [`PullBackup::abort`].
//!    Both tear everything down; `finish` drops the previous checkpoint (the new one now
//!    covers everything since this backup), `abort` drops the new one, so a failed backup
//!    leaves the previous checkpoint valid.
//!
//! Every checkpoint stays enabled until the next backup succeeds, so the chain is
//! never left without a recording bitmap.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::block::{delete_node, find_device};
use crate::export::{self, Export};
use crate::{utf8_path as path_str, Error, Qmp};

/// How long one QMP job of the recipe (creating the fleece) may take.
const JOB_DEADLINE: Duration = Duration::from_secs(60);

/// What to back up and where the pieces go.
#[derive(Debug, Clone)]
pub struct PullBackupSpec {
    /// Node name of the disk's format layer (e.g. `vda-fmt`), where bitmaps live.
    pub node: String,
    /// Name of the checkpoint bitmap this backup adds.
    pub new_checkpoint: String,
    /// Store the checkpoint in the image (qcow2). A raw image cannot hold bitmaps: its
    /// checkpoint lives in QEMU's memory only and is gone when QEMU stops, so the next
    /// backup after a restart is a full one.
    pub persistent: bool,
    /// The checkpoint of the previous backup, for an incremental; `None` for a full.
    pub since: Option<String>,
    /// The fleece file (created and removed by the recipe).
    pub scratch: PathBuf,
    /// Unix socket for QEMU's NBD server.
    pub nbd_socket: PathBuf,
    /// NBD export name.
    pub export: String,
    /// A token unique to this backup, used in node, job and bitmap names.
    pub token: String,
}

/// A checkpoint bitmap as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Bitmap name.
    pub name: String,
    /// Whether it records writes.
    pub recording: bool,
    /// Whether it is stored in the qcow2.
    pub persistent: bool,
    /// QEMU found it inconsistent (the image was not closed cleanly): unusable.
    pub inconsistent: bool,
    /// Granularity in bytes.
    pub granularity: u64,
}

/// The named bitmaps on `node` (from `query-named-block-nodes`).
pub async fn bitmaps(qmp: &Qmp, node: &str) -> Result<Vec<BitmapInfo>, Error> {
    let nodes = qmp
        .execute_raw("query-named-block-nodes", Some(json!({"flat": true})))
        .await?;
    let node_info = nodes
        .as_array()
        .and_then(|all| all.iter().find(|n| n["node-name"] == node))
        .ok_or_else(|| Error::protocol(format!("no block node named {node:?}")))?;
    let list = node_info["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(list
        .iter()
        .filter_map(|b| {
            Some(BitmapInfo {
                name: b["name"].as_str()?.to_string(),
                recording: b["recording"].as_bool().unwrap_or(false),
                persistent: b["persistent"].as_bool().unwrap_or(false),
                inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                granularity: b["granularity"].as_u64().unwrap_or(0),
            })
        })
        .collect())
}

/// The node at the top of the disk that the device `qdev_id` (e.g. `vda`) uses now.
/// A live external snapshot (`blockdev-snapshot`) puts a new overlay on top, so the
/// node a backup must read (and whose bitmaps track writes) is not always the one the
/// VM started with.
pub async fn device_root_node(qmp: &Qmp, qdev_id: &str) -> Result<String, Error> {
    let blocks = qmp.execute_raw("query-block", None).await?;
    find_device(&blocks, qdev_id)
        .and_then(|b| b["inserted"]["node-name"].as_str())
        .map(str::to_string)
        .ok_or_else(|| Error::protocol(format!("no block device {qdev_id:?} with a medium")))
}

/// Virtual size in bytes of `node`.
pub async fn node_size(qmp: &Qmp, node: &str) -> Result<u64, Error> {
    let nodes = qmp
        .execute_raw("query-named-block-nodes", Some(json!({"flat": true})))
        .await?;
    nodes
        .as_array()
        .and_then(|all| all.iter().find(|n| n["node-name"] == node))
        .and_then(|n| n["image"]["virtual-size"].as_u64())
        .ok_or_else(|| Error::protocol(format!("no size for block node {node:?}")))
}

/// Whether `node` can store persistent bitmaps: only qcow2 images of version 3
/// (`compat=1.1`) can; raw images and qcow2 version 2 (`compat=0.10`) cannot. Returns
/// the reason when it cannot.
pub async fn persistent_bitmaps_unsupported(
    qmp: &Qmp,
    node: &str,
) -> Result<Option<String>, Error> {
    let nodes = qmp
        .execute_raw("query-named-block-nodes", Some(json!({"flat": true})))
        .await?;
    let image = nodes
        .as_array()
        .and_then(|all| all.iter().find(|n| n["node-name"] == node))
        .map(|n| n["image"].clone())
        .ok_or_else(|| Error::protocol(format!("no block node named {node:?}")))?;
    let format = image["format"].as_str().unwrap_or("");
    Ok(match format {
        "qcow2" => match image["format-specific"]["data"]["compat"].as_str() {
            Some("0.10") => Some(
                "a qcow2 version 2 image (compat=0.10) cannot store checkpoint bitmaps; `qemu-img amend -o compat=1.1` upgrades it"
                    .into(),
            ),
            _ => None,
        },
        other => Some(format!(
            "a {other} image cannot store checkpoint bitmaps; they last only while QEMU runs"
        )),
    })
}

/// Why an incremental cannot use the previous checkpoint (`None`: it can).
pub async fn checkpoint_problem(
    qmp: &Qmp,
    node: &str,
    checkpoint: &str,
) -> Result<Option<String>, Error> {
    let list = bitmaps(qmp, node).await?;
    Ok(match list.iter().find(|b| b.name == checkpoint) {
        None => Some(format!(
            "checkpoint bitmap {checkpoint:?} is not on {node:?} (image replaced, or bitmaps not supported)"
        )),
        Some(b) if b.inconsistent => Some(format!(
            "checkpoint bitmap {checkpoint:?} is inconsistent (QEMU did not close the image cleanly)"
        )),
        Some(b) if !b.recording => Some(format!(
            "checkpoint bitmap {checkpoint:?} is not recording writes"
        )),
        Some(_) => None,
    })
}

/// A running pull backup: the fleece is exported over NBD until finished or aborted.
#[derive(Debug)]
pub struct PullBackup {
    qmp: Qmp,
    spec: PullBackupSpec,
    /// Size of the disk in bytes.
    pub size: u64,
    /// The dirty-bitmap meta context to ask the NBD server for (incrementals).
    pub dirty_context: Option<String>,
    /// What has been set up so far, undone in reverse on teardown.
    done: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    ScratchFile,
    FileNode,
    FleeceNode,
    Checkpoint,
    TempBitmap,
    Job,
    NbdServer,
    Export,
}

impl PullBackupSpec {
    fn file_node(&self) -> String {
        format!("weft-fleece-file-{}", self.token)
    }
    fn fleece_node(&self) -> String {
        format!("weft-fleece-{}", self.token)
    }
    fn job(&self) -> String {
        format!("weft-backup-{}", self.token)
    }
    fn temp_bitmap(&self) -> String {
        format!("weft-tmp-{}", self.token)
    }
    fn export_id(&self) -> String {
        format!("weft-export-{}", self.token)
    }
}

/// Sets up a pull backup of `spec.node` and exports its point-in-time view.
///
/// On failure everything set up so far is torn down again and the previous checkpoint
/// is left as it was.
pub async fn start(qmp: &Qmp, spec: PullBackupSpec) -> Result<PullBackup, Error> {
    let size = node_size(qmp, &spec.node).await?;
    let mut backup = PullBackup {
        qmp: qmp.clone(),
        dirty_context: spec
            .since
            .as_ref()
            .map(|_| format!("qemu:dirty-bitmap:{}", spec.temp_bitmap())),
        spec,
        size,
        done: Vec::new(),
    };
    match backup.set_up().await {
        Ok(()) => Ok(backup),
        Err(e) => {
            backup.tear_down(false).await;
            Err(e)
        }
    }
}

/// Runs one `blockdev-create` job to its end.
async fn create_job(qmp: &Qmp, id: &str, options: Value) -> Result<(), Error> {
    let done = qmp.wait_job(id, JOB_DEADLINE);
    qmp.execute_raw(
        "blockdev-create",
        Some(json!({"job-id": id, "options": options})),
    )
    .await?;
    done.await
}

/// Creates the file `path` and opens it as node `file_node` (if opening fails the file
/// stays: the caller removes it).
pub async fn create_file_node(qmp: &Qmp, path: &Path, file_node: &str) -> Result<(), Error> {
    let filename = path_str(path)?;
    create_job(
        qmp,
        &format!("{file_node}-create"),
        json!({"driver": "file", "filename": filename, "size": 0}),
    )
    .await?;
    qmp.execute_raw(
        "blockdev-add",
        Some(json!({"driver": "file", "node-name": file_node, "filename": filename})),
    )
    .await
    .map(drop)
}

/// Formats the open file node `file_node` as an empty qcow2 of `size` bytes and opens
/// it as node `node`, with `backing` (a node name) as its backing node if given, and
/// with `"backing": null` if not (QEMU opens nothing on its own).
pub async fn create_qcow2_node(
    qmp: &Qmp,
    file_node: &str,
    node: &str,
    size: u64,
    backing: Option<&str>,
) -> Result<(), Error> {
    create_job(
        qmp,
        &format!("{node}-create"),
        json!({"driver": "qcow2", "file": file_node, "size": size}),
    )
    .await?;
    let add = json!({"driver": "qcow2", "node-name": node, "file": file_node, "backing": backing});
    qmp.execute_raw("blockdev-add", Some(add)).await.map(drop)
}

impl PullBackup {
    async fn set_up(&mut self) -> Result<(), Error> {
        let spec = self.spec.clone();
        // The fleece: an empty qcow2 the size of the disk, backed by the live disk.
        self.done.push(Step::ScratchFile);
        create_file_node(&self.qmp, &spec.scratch, &spec.file_node()).await?;
        self.done.push(Step::FileNode);
        create_qcow2_node(
            &self.qmp,
            &spec.file_node(),
            &spec.fleece_node(),
            self.size,
            Some(&spec.node),
        )
        .await?;
        self.done.push(Step::FleeceNode);

        // The instant of the backup: checkpoint, dirty set and copy-before-write at once.
        let mut actions = vec![json!({
            "type": "block-dirty-bitmap-add",
            "data": {"node": spec.node, "name": spec.new_checkpoint, "persistent": spec.persistent},
        })];
        if let Some(since) = &spec.since {
            actions.push(json!({
                "type": "block-dirty-bitmap-add",
                "data": {"node": spec.node, "name": spec.temp_bitmap(), "persistent": false, "disabled": true},
            }));
            actions.push(json!({
                "type": "block-dirty-bitmap-merge",
                "data": {"node": spec.node, "target": spec.temp_bitmap(), "bitmaps": [since]},
            }));
        }
        actions.push(json!({
            "type": "blockdev-backup",
            "data": {"job-id": spec.job(), "device": spec.node, "target": spec.fleece_node(), "sync": "none"},
        }));
        self.qmp
            .execute_raw("transaction", Some(json!({"actions": actions})))
            .await?;
        self.done.push(Step::Checkpoint);
        if spec.since.is_some() {
            self.done.push(Step::TempBitmap);
        }
        self.done.push(Step::Job);

        export::start_server(&self.qmp, &spec.nbd_socket).await?;
        self.done.push(Step::NbdServer);
        let mut export = Export::read_only(&spec.export_id(), &spec.fleece_node(), &spec.export);
        if spec.since.is_some() {
            export.bitmaps = vec![spec.temp_bitmap()];
        }
        export::add(&self.qmp, &export).await?;
        self.done.push(Step::Export);
        Ok(())
    }

    /// The backup's data was read completely: tear down and make the new checkpoint the
    /// only one (the previous one is removed).
    pub async fn finish(mut self) -> Result<(), Error> {
        self.tear_down(true).await;
        if let Some(since) = &self.spec.since {
            self.qmp
                .execute_raw(
                    "block-dirty-bitmap-remove",
                    Some(json!({"node": self.spec.node, "name": since})),
                )
                .await?;
        }
        Ok(())
    }

    /// The backup failed: tear down and remove the new checkpoint, so the previous one
    /// stays the base of the next incremental.
    pub async fn abort(mut self) {
        self.tear_down(false).await;
    }

    /// Undoes every step done so far, in reverse; logs what it cannot undo.
    async fn tear_down(&mut self, keep_checkpoint: bool) {
        let spec = self.spec.clone();
        while let Some(step) = self.done.pop() {
            let result = match step {
                Step::Export => export::remove(&self.qmp, &spec.export_id(), JOB_DEADLINE).await,
                Step::NbdServer => export::stop_server(&self.qmp).await,
                Step::Job => {
                    let ended = self.qmp.wait_block_job(&spec.job(), JOB_DEADLINE);
                    match self
                        .qmp
                        .execute_raw(
                            "block-job-cancel",
                            Some(json!({"device": spec.job(), "force": true})),
                        )
                        .await
                    {
                        Ok(_) => ended.await.map(drop),
                        Err(e) => Err(e),
                    }
                }
                Step::TempBitmap => self
                    .qmp
                    .execute_raw(
                        "block-dirty-bitmap-remove",
                        Some(json!({"node": spec.node, "name": spec.temp_bitmap()})),
                    )
                    .await
                    .map(drop),
                Step::Checkpoint if keep_checkpoint => Ok(()),
                Step::Checkpoint => self
                    .qmp
                    .execute_raw(
                        "block-dirty-bitmap-remove",
                        Some(json!({"node": spec.node, "name": spec.new_checkpoint})),
                    )
                    .await
                    .map(drop),
                Step::FleeceNode => delete_node(&self.qmp, &spec.fleece_node()).await,
                Step::FileNode => delete_node(&self.qmp, &spec.file_node()).await,
                Step::ScratchFile => match std::fs::remove_file(&spec.scratch) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io(e)),
                    _ => Ok(()),
                },
            };
            match result {
                Ok(()) => debug!(?step, token = %spec.token, "backup step undone"),
                Err(e) => warn!(?step, token = %spec.token, error = %e, "cannot undo backup step"),
            }
        }
    }
}

/// Removes what an interrupted backup (weftd killed mid-way) left in a running QEMU:
/// weft's NBD exports, the NBD server, backup jobs, fleece nodes, temporary bitmaps,
/// and checkpoint bitmaps named with `checkpoint_prefix` other than `keep` (the
/// checkpoint of the last complete snapshot). Returns what it removed.
pub async fn clean_leftovers(
    qmp: &Qmp,
    node: &str,
    checkpoint_prefix: &str,
    keep: Option<&str>,
) -> Result<Vec<String>, Error> {
    let mut removed = Vec::new();
    let exports = qmp.execute_raw("query-block-exports", None).await?;
    for id in names_with(&exports, "id", "weft-export-") {
        export::remove(qmp, &id, JOB_DEADLINE).await?;
        removed.push(format!("export {id}"));
    }
    if !removed.is_empty() {
        // Only weft's own backups start the server in a VM weft backs up.
        if export::stop_server(qmp).await.is_ok() {
            removed.push("nbd server".into());
        }
    }
    let jobs = qmp.execute_raw("query-block-jobs", None).await?;
    for id in names_with(&jobs, "device", "weft-backup-") {
        let ended = qmp.wait_block_job(&id, JOB_DEADLINE);
        qmp.execute_raw(
            "block-job-cancel",
            Some(json!({"device": id, "force": true})),
        )
        .await?;
        ended.await?;
        removed.push(format!("job {id}"));
    }
    let nodes = qmp
        .execute_raw("query-named-block-nodes", Some(json!({"flat": true})))
        .await?;
    // Fleece format nodes first, then the file nodes under them.
    let mut fleece: Vec<String> = names_with(&nodes, "node-name", "weft-fleece-");
    fleece.sort_by_key(|n| n.starts_with("weft-fleece-file-"));
    for name in fleece {
        delete_node(qmp, &name).await?;
        removed.push(format!("node {name}"));
    }
    for b in bitmaps(qmp, node).await? {
        let stale_checkpoint =
            b.name.starts_with(checkpoint_prefix) && Some(b.name.as_str()) != keep;
        if stale_checkpoint || b.name.starts_with("weft-tmp-") {
            qmp.execute_raw(
                "block-dirty-bitmap-remove",
                Some(json!({"node": node, "name": b.name})),
            )
            .await?;
            removed.push(format!("bitmap {}", b.name));
        }
    }
    Ok(removed)
}

fn names_with(list: &Value, key: &str, prefix: &str) -> Vec<String> {
    list.as_array()
        .map(|all| {
            all.iter()
                .filter_map(|v| v[key].as_str())
                .filter(|n| n.starts_with(prefix))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}
