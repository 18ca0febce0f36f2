//! The block graph of a running QEMU: what a device runs on, finding nodes, and the
//! changes weft makes to it (opening an overlay, putting it on top of a disk, closing
//! nodes).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::{utf8_path, Error, Qmp};

/// The longest backing chain [`device_chain`] follows (QEMU's own chains are far
/// shorter; a hostile or broken answer must not make it loop).
pub const MAX_CHAIN: usize = 4096;

/// The `query-block` entry of device `qdev_id`: QEMU reports a device by its id, or by
/// its QOM path `/machine/peripheral/<id>/…`.
pub(crate) fn find_device<'a>(blocks: &'a Value, qdev_id: &str) -> Option<&'a Value> {
    blocks.as_array()?.iter().find(|b| {
        let qdev = b["qdev"].as_str().unwrap_or("");
        qdev == qdev_id
            || qdev
                .strip_prefix("/machine/peripheral/")
                .and_then(|r| r.split('/').next())
                == Some(qdev_id)
    })
}

/// The image files of the backing chain device `qdev_id` (e.g. `vda`) runs on, top
/// first, as QEMU names them (`query-block`). `None` when QEMU has no such device; an
/// empty list when it has no medium.
pub async fn device_chain(qmp: &Qmp, qdev_id: &str) -> Result<Option<Vec<String>>, Error> {
    let blocks = qmp.execute_raw("query-block", None).await?;
    let Some(block) = find_device(&blocks, qdev_id) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    let mut image = &block["inserted"]["image"];
    while let Some(f) = image["filename"].as_str() {
        if out.len() >= MAX_CHAIN {
            return Err(Error::protocol(format!(
                "backing chain longer than {MAX_CHAIN} images"
            )));
        }
        out.push(f.to_string());
        image = &image["backing-image"];
    }
    Ok(Some(out))
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The name of the node of format `driver` (e.g. `qcow2`) whose file is `path`
/// (`query-named-block-nodes`; both sides compared with symbolic links resolved).
pub async fn node_of_file(qmp: &Qmp, driver: &str, path: &Path) -> Result<Option<String>, Error> {
    let nodes = qmp
        .execute_raw("query-named-block-nodes", Some(json!({"flat": true})))
        .await?;
    let want = canonical(path);
    Ok(nodes.as_array().and_then(|all| {
        all.iter()
            .find(|n| {
                n["drv"].as_str() == Some(driver)
                    && n["file"]
                        .as_str()
                        .is_some_and(|f| canonical(Path::new(f)) == want)
            })
            .and_then(|n| n["node-name"].as_str().map(str::to_string))
    }))
}

/// Whether QEMU's description of its block nodes (`query-named-block-nodes`) names the
/// file `path` anywhere: as a node's file, or as a backing file.
pub async fn file_in_use(qmp: &Qmp, path: &Path) -> Result<bool, Error> {
    let nodes = qmp.execute_raw("query-named-block-nodes", None).await?;
    Ok(nodes.to_string().contains(&*path.to_string_lossy()))
}

/// Opens the qcow2 image `path` as node `node`, with no backing node (`"backing":
/// null`: QEMU opens nothing the image's header names); [`snapshot`] then puts it on top
/// of a disk, which becomes its backing node.
pub async fn open_qcow2(qmp: &Qmp, node: &str, path: &Path) -> Result<(), Error> {
    let filename = utf8_path(path)?;
    qmp.execute_raw(
        "blockdev-add",
        Some(json!({
            "driver": "qcow2",
            "node-name": node,
            "file": {"driver": "file", "filename": filename},
            "backing": null,
        })),
    )
    .await
    .map(drop)
}

/// Puts every overlay node on top of its node (`(node, overlay)` pairs), in one
/// `transaction` of `blockdev-snapshot`s: all switch at the same instant, or none does.
/// From then on the device of each node writes into its overlay.
pub async fn snapshot(qmp: &Qmp, pairs: &[(&str, &str)]) -> Result<(), Error> {
    let actions: Vec<Value> = pairs
        .iter()
        .map(|(node, overlay)| {
            json!({"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay}})
        })
        .collect();
    qmp.execute_raw("transaction", Some(json!({ "actions": actions })))
        .await
        .map(drop)
}

/// Closes node `node` (`blockdev-del`); QEMU refuses while anything uses it.
pub async fn delete_node(qmp: &Qmp, node: &str) -> Result<(), Error> {
    qmp.execute_raw("blockdev-del", Some(json!({ "node-name": node })))
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeQemu;

    fn query_block() -> Value {
        json!([
            {"device": "", "qdev": "/machine/peripheral/vdb/virtio-backend", "inserted": {
                "node-name": "vdb-t5",
                "image": {"filename": "/e/vdb-5.qcow2", "backing-image": {
                    "filename": "/e/vdb.qcow2", "backing-image": {"filename": "/e/base.raw"}}}}},
            {"device": "", "qdev": "vda", "inserted": {"node-name": "vda-fmt",
                "image": {"filename": "/e/vda.raw"}}},
            {"device": "cd0", "qdev": "cdrom"},
        ])
    }

    #[tokio::test]
    async fn chains_of_devices_top_first() {
        let fake = FakeQemu::start();
        fake.reply("query-block", query_block());
        let qmp = fake.connect().await;
        assert_eq!(
            device_chain(&qmp, "vdb").await.expect("vdb"),
            Some(vec![
                "/e/vdb-5.qcow2".to_string(),
                "/e/vdb.qcow2".into(),
                "/e/base.raw".into()
            ])
        );
        assert_eq!(
            device_chain(&qmp, "vda").await.expect("vda"),
            Some(vec!["/e/vda.raw".to_string()])
        );
        assert_eq!(
            device_chain(&qmp, "cdrom").await.expect("no medium"),
            Some(vec![])
        );
        assert_eq!(device_chain(&qmp, "vdz").await.expect("none"), None);
        assert_eq!(device_chain(&qmp, "vd").await.expect("not a prefix"), None);
        fake.fail("query-block", "GenericError", "no");
        assert!(device_chain(&qmp, "vda").await.is_err());
    }

    #[tokio::test]
    async fn nodes_are_found_by_driver_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.qcow2");
        std::fs::write(&image, b"").expect("image");
        let link = dir.path().join("link.qcow2");
        std::os::unix::fs::symlink(&image, &link).expect("link");
        let fake = FakeQemu::start();
        fake.reply(
            "query-named-block-nodes",
            json!([
                {"node-name": "vda-file", "drv": "file", "file": image},
                {"node-name": "vda-fmt", "drv": "qcow2", "file": link,
                 "backing_file": "/e/base.raw"},
            ]),
        );
        let qmp = fake.connect().await;
        assert_eq!(
            node_of_file(&qmp, "qcow2", &image).await.expect("found"),
            Some("vda-fmt".into())
        );
        assert_eq!(node_of_file(&qmp, "raw", &image).await.expect("none"), None);
        assert_eq!(
            fake.args_of("query-named-block-nodes"),
            [json!({"flat": true}), json!({"flat": true})]
        );
        assert!(file_in_use(&qmp, Path::new("/e/base.raw"))
            .await
            .expect("query"));
        assert!(!file_in_use(&qmp, Path::new("/e/other.raw"))
            .await
            .expect("query"));
    }

    #[tokio::test]
    async fn overlays_go_on_in_one_transaction() {
        let fake = FakeQemu::start();
        for cmd in ["blockdev-add", "transaction", "blockdev-del"] {
            fake.reply(cmd, json!({}));
        }
        let qmp = fake.connect().await;
        open_qcow2(&qmp, "vda-t9", Path::new("/e/vda-9.qcow2"))
            .await
            .expect("open");
        snapshot(&qmp, &[("vda-fmt", "vda-t9"), ("vdb-t5", "vdb-t9")])
            .await
            .expect("snapshot");
        delete_node(&qmp, "vda-t9").await.expect("delete");
        assert_eq!(
            fake.executed(),
            ["blockdev-add", "transaction", "blockdev-del"]
        );
        assert_eq!(
            fake.args_of("blockdev-add"),
            [json!({"driver": "qcow2", "node-name": "vda-t9",
                    "file": {"driver": "file", "filename": "/e/vda-9.qcow2"}, "backing": null})]
        );
        assert_eq!(
            fake.args_of("transaction"),
            [json!({"actions": [
                {"type": "blockdev-snapshot", "data": {"node": "vda-fmt", "overlay": "vda-t9"}},
                {"type": "blockdev-snapshot", "data": {"node": "vdb-t5", "overlay": "vdb-t9"}},
            ]})]
        );
        assert_eq!(
            fake.args_of("blockdev-del"),
            [json!({"node-name": "vda-t9"})]
        );
        fake.fail(
            "transaction",
            "GenericError",
            "The overlay already has a backing image",
        );
        let err = snapshot(&qmp, &[("vda-fmt", "vda-t9")])
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("already has a backing"), "{err}");
    }
}
