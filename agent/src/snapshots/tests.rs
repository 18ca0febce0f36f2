//! Root-free tests of a disk snapshot's failure path against the fake QEMU: what the
//! pull backup set up in QEMU and on disk is removed, the job fails with the cause,
//! and the previous checkpoint stays the base of the next incremental.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use weft_qmp::fake::{Answer, FakeQemu};

use super::*;
use crate::testrig::{Rig, ENV};

/// The block node of `vda` as the fake QEMU reports it.
const NODE: &str = "vda-fmt";

/// A QEMU running [`ENV`]: disk `vda` on a qcow2 v3 node, with the bitmaps of `bitmaps`
/// (added and removed as QEMU would) and the block nodes of `nodes`. Every command a
/// pull backup sends is answered as QEMU 7.2 does, `blockdev-create` of a file creates
/// it, and `block-export-add` fails.
fn fake_qemu(
    bitmaps: Arc<Mutex<BTreeSet<String>>>,
    nodes: Arc<Mutex<BTreeSet<String>>>,
) -> FakeQemu {
    let fake = FakeQemu::start();
    fake.reply(
        "query-block",
        json!([{"device": "", "qdev": "vda", "inserted": {"node-name": NODE}}]),
    )
    .reply("query-block-exports", json!([]))
    .reply("query-block-jobs", json!([]))
    .reply("query-jobs", json!([]))
    .reply("nbd-server-start", json!({}))
    .reply("nbd-server-stop", json!({}))
    .fail(
        "block-export-add",
        "GenericError",
        "export refused: too many clients",
    );
    // QEMU ends on quit: the connection closes.
    fake.on("quit", |_| Answer::HangUp);
    let b = bitmaps.clone();
    fake.on("query-named-block-nodes", move |_| {
        let listed: Vec<Value> = lock(&b)
            .iter()
            .map(|name| json!({"name": name, "recording": true, "persistent": true, "granularity": 65536}))
            .collect();
        Answer::Return(json!([{
            "node-name": NODE,
            "image": {"virtual-size": 1 << 20, "format": "qcow2",
                      "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}},
            "dirty-bitmaps": listed,
        }]))
    });
    fake.on("blockdev-create", |call| {
        let options = &call.args["options"];
        if options["driver"] == "file" {
            let file = options["filename"].as_str().unwrap_or_default();
            std::fs::write(file, b"").expect("the fleece file");
        }
        let id = call.arg_str("job-id").to_string();
        call.event_after(
            "JOB_STATUS_CHANGE",
            json!({"id": id, "status": "concluded"}),
        );
        Answer::ok()
    });
    let n = nodes.clone();
    fake.on("blockdev-add", move |call| {
        lock(&n).insert(call.arg_str("node-name").to_string());
        Answer::ok()
    });
    let n = nodes;
    fake.on("blockdev-del", move |call| {
        lock(&n).remove(call.arg_str("node-name"));
        Answer::ok()
    });
    let b = bitmaps.clone();
    fake.on("transaction", move |call| {
        for a in call.args["actions"].as_array().into_iter().flatten() {
            if a["type"] == "block-dirty-bitmap-add" {
                lock(&b).insert(a["data"]["name"].as_str().unwrap_or_default().to_string());
            }
        }
        Answer::ok()
    });
    let b = bitmaps;
    fake.on("block-dirty-bitmap-remove", move |call| {
        lock(&b).remove(call.arg_str("name"));
        Answer::ok()
    });
    fake.on("block-job-cancel", |call| {
        let job = call.arg_str("device").to_string();
        call.event_after(
            "BLOCK_JOB_CANCELLED",
            json!({"device": job, "type": "backup", "len": 1 << 20, "offset": 0, "speed": 0}),
        );
        Answer::ok()
    });
    fake
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[tokio::test]
async fn snapshot_failure_at_the_export_removes_the_backup_and_keeps_the_checkpoint() {
    let rig = Rig::new().await;
    let catalog = rig.manager.catalog();
    // The previous snapshot, and its checkpoint in QEMU.
    let previous = rig.disk_snapshot("2026-12-01T10:00:00.000000Z").await;
    let checkpoint = format!("{CHECKPOINT_PREFIX}{previous}");
    catalog
        .set_snapshot_checkpoint(previous, &checkpoint)
        .await
        .unwrap();
    let bitmaps = Arc::new(Mutex::new(BTreeSet::from([checkpoint.clone()])));
    let nodes = Arc::new(Mutex::new(BTreeSet::new()));
    let qemu = Arc::new(fake_qemu(bitmaps.clone(), nodes.clone()));
    rig.doubles.processes.serve(qemu.clone());
    rig.manager.start(ENV).await.unwrap();
    qemu.clear();

    let job = rig
        .snapshots
        .create(ENV, Some("disk:vda"), None, None, "test")
        .await
        .unwrap();
    let job = wait_until::wait_until_async(
        &format!("job {} to end", job.id),
        Duration::from_secs(10),
        || async {
            match rig.snapshots.job(job.id).await {
                Ok(j) if j.state != JobState::Running => wait_until::Step::Ready(j),
                other => wait_until::Step::Pending(format!("{other:?}")),
            }
        },
    )
    .await
    .unwrap();

    // The job failed with QEMU's cause.
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap_or_default();
    assert!(error.contains("too many clients"), "{error}");
    // It went as far as the export, and undid everything before it, in reverse.
    let executed = qemu.executed();
    let after_export: Vec<&str> = executed
        .iter()
        .skip_while(|c| *c != "block-export-add")
        .map(String::as_str)
        .collect();
    assert_eq!(
        after_export,
        [
            "block-export-add",
            "nbd-server-stop",
            "block-job-cancel",
            "query-block-jobs",
            "block-dirty-bitmap-remove",
            "block-dirty-bitmap-remove",
            "blockdev-del",
            "blockdev-del",
        ],
        "{executed:?}"
    );
    let removed: Vec<Value> = qemu.args_of("block-dirty-bitmap-remove");
    assert!(
        removed.iter().any(|a| a["name"]
            .as_str()
            .unwrap_or_default()
            .starts_with("weft-tmp-")),
        "{removed:?}"
    );
    // QEMU holds nothing of the backup: no fleece node, only the previous checkpoint.
    assert!(lock(&nodes).is_empty(), "{:?}", lock(&nodes));
    assert_eq!(*lock(&bitmaps), BTreeSet::from([checkpoint.clone()]));
    // The scratch file (and the NBD socket) are gone.
    let work = rig.manager.config().run_dir.join("backup");
    let left: Vec<_> = std::fs::read_dir(&work)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    // No half snapshot: the new row is failed with the cause; the previous one is still
    // the newest complete snapshot, with its checkpoint.
    let all = catalog
        .snapshots(
            ENV,
            &SnapshotFilter {
                all_states: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let new: Vec<_> = all.iter().filter(|s| s.id != previous).collect();
    assert_eq!(new.len(), 1, "{all:?}");
    assert_eq!(new[0].state, SnapshotState::Failed);
    assert!(new[0].index_name.is_none());
    let latest = catalog
        .latest_snapshot(ENV, "disk:vda")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.id, previous);
    assert_eq!(latest.checkpoint.as_deref(), Some(checkpoint.as_str()));
    rig.manager.stop(ENV).await.unwrap();
}
