//! Block nodes exported over NBD by QEMU's own NBD server.
//!
//! QEMU runs at most one NBD server ([`start_server`], on a unix socket) and any number
//! of exports on it ([`add`]), each of one block node. An export is removed with
//! [`remove`], which waits for QEMU's `BLOCK_EXPORT_DELETED`: only then is the node
//! free for `blockdev-del` or a job. [`stop_server`] ends the server (and whatever
//! exports are left).

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::{utf8_path, Error, Qmp};

/// One NBD export of a block node (`block-export-add`, type `nbd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The export's id in QEMU (for [`remove`]).
    pub id: String,
    /// The exported block node.
    pub node: String,
    /// The name NBD clients ask for.
    pub name: String,
    /// Whether clients may write.
    pub writable: bool,
    /// Offer the `qemu:allocation-depth` meta context (in which layer of the backing
    /// chain each extent is allocated).
    pub allocation_depth: bool,
    /// Dirty bitmaps of `node` offered as `qemu:dirty-bitmap:<name>` meta contexts.
    pub bitmaps: Vec<String>,
}

impl Export {
    /// A read-only export of `node` named `name`, with id `id`.
    pub fn read_only(id: &str, node: &str, name: &str) -> Export {
        Export {
            id: id.to_string(),
            node: node.to_string(),
            name: name.to_string(),
            writable: false,
            allocation_depth: false,
            bitmaps: Vec::new(),
        }
    }

    /// A writable export of `node` named `name`, with id `id`.
    pub fn writable(id: &str, node: &str, name: &str) -> Export {
        Export {
            writable: true,
            ..Export::read_only(id, node, name)
        }
    }

    /// The `block-export-add` arguments.
    fn arguments(&self) -> serde_json::Value {
        let mut args = json!({
            "type": "nbd",
            "id": self.id,
            "node-name": self.node,
            "name": self.name,
            "writable": self.writable,
        });
        if self.allocation_depth {
            args["allocation-depth"] = json!(true);
        }
        if !self.bitmaps.is_empty() {
            args["bitmaps"] = json!(self.bitmaps);
        }
        args
    }
}

/// Starts QEMU's NBD server listening on the unix socket `socket`. Fails if a server
/// runs already (QEMU has one at most), for example for a backup under way.
pub async fn start_server(qmp: &Qmp, socket: &Path) -> Result<(), Error> {
    let path = utf8_path(socket)?;
    qmp.execute_raw(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": path}}})),
    )
    .await
    .map(drop)
}

/// Stops QEMU's NBD server; exports still on it end with it.
pub async fn stop_server(qmp: &Qmp) -> Result<(), Error> {
    qmp.execute_raw("nbd-server-stop", None).await.map(drop)
}

/// Adds `export` to the running NBD server.
pub async fn add(qmp: &Qmp, export: &Export) -> Result<(), Error> {
    qmp.execute_raw("block-export-add", Some(export.arguments()))
        .await
        .map(drop)
}

/// Removes export `id` (`mode: hard`: connected clients are cut off) and waits up to
/// `deadline` until QEMU reports it gone (`BLOCK_EXPORT_DELETED`).
pub async fn remove(qmp: &Qmp, id: &str, deadline: Duration) -> Result<(), Error> {
    let gone = qmp.wait_event(deadline, {
        let id = id.to_string();
        move |e| e.name == "BLOCK_EXPORT_DELETED" && e.data["id"] == id.as_str()
    });
    qmp.execute_raw("block-export-del", Some(json!({"id": id, "mode": "hard"})))
        .await?;
    gone.await.map(drop)
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::fake::{Answer, FakeQemu};

    const T: Duration = Duration::from_secs(5);

    /// QEMU's answer to `block-export-del`: the reply, then the event.
    fn deletes_exports(fake: &FakeQemu) {
        fake.on("block-export-del", |call| {
            let id = call.arg_str("id").to_string();
            call.event_after("BLOCK_EXPORT_DELETED", json!({ "id": id }));
            Answer::ok()
        });
    }

    #[tokio::test]
    async fn server_and_exports_send_exactly_these_commands() {
        let fake = FakeQemu::start();
        for cmd in ["nbd-server-start", "nbd-server-stop", "block-export-add"] {
            fake.reply(cmd, json!({}));
        }
        deletes_exports(&fake);
        let qmp = fake.connect().await;
        start_server(&qmp, Path::new("/run/weft/sync/a.nbd"))
            .await
            .expect("start");
        let mut depth = Export::read_only("r", "vda-fmt", "r");
        depth.allocation_depth = true;
        add(&qmp, &depth).await.expect("add");
        let mut dirty = Export::read_only("e", "fleece", "vda");
        dirty.bitmaps = vec!["weft-tmp-3".into()];
        add(&qmp, &dirty).await.expect("add");
        add(&qmp, &Export::writable("out", "out", "out"))
            .await
            .expect("add");
        remove(&qmp, "r", T).await.expect("remove");
        stop_server(&qmp).await.expect("stop");
        assert_eq!(
            fake.executed(),
            [
                "nbd-server-start",
                "block-export-add",
                "block-export-add",
                "block-export-add",
                "block-export-del",
                "nbd-server-stop"
            ]
        );
        assert_eq!(
            fake.args_of("nbd-server-start"),
            [json!({"addr": {"type": "unix", "data": {"path": "/run/weft/sync/a.nbd"}}})]
        );
        assert_eq!(
            fake.args_of("block-export-add"),
            [
                json!({"type": "nbd", "id": "r", "node-name": "vda-fmt", "name": "r",
                       "writable": false, "allocation-depth": true}),
                json!({"type": "nbd", "id": "e", "node-name": "fleece", "name": "vda",
                       "writable": false, "bitmaps": ["weft-tmp-3"]}),
                json!({"type": "nbd", "id": "out", "node-name": "out", "name": "out",
                       "writable": true}),
            ]
        );
        assert_eq!(
            fake.args_of("block-export-del"),
            [json!({"id": "r", "mode": "hard"})]
        );
        assert_eq!(fake.args_of("nbd-server-stop"), [Value::Null]);
    }

    #[tokio::test]
    async fn qemu_errors_are_returned() {
        let fake = FakeQemu::start();
        fake.fail(
            "nbd-server-start",
            "GenericError",
            "NBD server already running",
        )
        .fail("block-export-add", "GenericError", "Node 'x' not found")
        .fail(
            "block-export-del",
            "GenericError",
            "Export 'x' is not found",
        );
        let qmp = fake.connect().await;
        let err = start_server(&qmp, Path::new("/s"))
            .await
            .expect_err("running");
        assert_eq!(
            err.to_string(),
            "qemu error (GenericError): NBD server already running"
        );
        let err = add(&qmp, &Export::read_only("x", "x", "x"))
            .await
            .expect_err("no node");
        assert!(err.to_string().contains("Node 'x' not found"), "{err}");
        // A refused delete fails at once, without waiting for the event.
        let start = std::time::Instant::now();
        let err = remove(&qmp, "x", T).await.expect_err("no export");
        assert!(err.to_string().contains("is not found"), "{err}");
        assert!(start.elapsed() < T);
    }

    #[tokio::test]
    async fn removal_waits_for_the_deleted_event() {
        let fake = FakeQemu::start();
        // QEMU accepts the delete but the export lingers (a client still reading).
        let asked = std::sync::Arc::new(tokio::sync::Notify::new());
        fake.on("block-export-del", {
            let asked = asked.clone();
            move |_| {
                asked.notify_one();
                Answer::ok()
            }
        });
        let qmp = fake.connect().await;
        let err = remove(&qmp, "e", Duration::from_millis(100))
            .await
            .expect_err("never deleted");
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        // An event for another export does not count; the one for this export does.
        let removing = tokio::spawn({
            let qmp = qmp.clone();
            async move { remove(&qmp, "e", T).await }
        });
        asked.notified().await;
        asked.notified().await;
        fake.emit("BLOCK_EXPORT_DELETED", json!({"id": "other"}));
        fake.emit("BLOCK_EXPORT_DELETED", json!({"id": "e"}));
        removing.await.expect("task").expect("removed");
    }

    #[tokio::test]
    async fn a_socket_path_that_is_not_utf8_is_refused_before_qemu_sees_it() {
        use std::os::unix::ffi::OsStrExt;
        let fake = FakeQemu::start();
        let qmp = fake.connect().await;
        let bad = Path::new(std::ffi::OsStr::from_bytes(b"/run/\xff.nbd"));
        let err = start_server(&qmp, bad).await.expect_err("not utf-8");
        assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
        assert!(fake.executed().is_empty());
    }
}
