//! `weft replay ENV --into X` through a real weftd: X must be a weave of ENV; the
//! environment itself, another environment or another environment's weave are
//! refused (409) unless `--force`, and a forced push is audited on its target. No
//! guest is needed: the refusal comes before anything reaches a DPA.

mod common;
use common::Weftd;

use std::process::{Command, Output};

use weft::model::AuditEntry;
use weft_client::{Client, ClientError};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Records `weave` as a weave of `parent` in weftd's catalog, as `weave create` would
/// (the weave's environment row exists already; no QEMU is started).
fn make_weave(catalog: &std::path::Path, weave: &str, parent: &str, index: u8) {
    let sql = format!(
        "INSERT INTO weaves (name, parent, source, taken_at, net_index, created_at) \
         VALUES ('{weave}', '{parent}', 'now', '2026-01-01T00:00:00Z', {index}, '2026-01-01T00:00:00Z');"
    );
    let out = Command::new("sqlite3")
        .arg(catalog)
        .arg(&sql)
        .output()
        .expect("sqlite3 runs");
    assert!(out.status.success(), "sqlite3: {}", stderr(&out));
}

#[tokio::test]
async fn replay_into_only_weaves_of_the_environment_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let weftd = Weftd::start(dir.path()).await;
    for name in ["rfa", "rfb", "rfwa", "rfwb"] {
        let disk = dir.path().join(format!("{name}.raw"));
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(1 << 20))
            .unwrap();
        let spec = format!("{},name=vda,format=raw", disk.display());
        let out = weftd.cli(&[
            "env",
            "create",
            name,
            "--disk",
            &spec,
            "--memory",
            "64M",
            "--no-start",
        ]);
        assert!(out.status.success(), "env create {name}: {}", stderr(&out));
    }
    let catalog = dir.path().join("data/catalog.db");
    make_weave(&catalog, "rfwa", "rfa", 201);
    make_weave(&catalog, "rfwb", "rfb", 202);

    let replay = |into: &str, force: bool| {
        let mut args = vec!["replay", "rfa", "--to", "now", "--into", into];
        if force {
            args.push("--force");
        }
        weftd.cli(&args)
    };
    // Not weaves of rfa: itself, another environment, another environment's weave.
    for (into, why) in [
        ("rfa", "is the replayed environment itself"),
        ("rfb", "is an environment, not a weave of \"rfa\""),
        ("rfwb", "is a weave of \"rfb\", not of \"rfa\""),
    ] {
        let out = replay(into, false);
        let err = stderr(&out);
        assert!(!out.status.success(), "--into {into} was accepted");
        assert!(err.contains(why), "--into {into}: {err}");
        assert!(err.contains("--force"), "--into {into}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    // The status code through the API: 409.
    let client = Client::new(&weftd.socket);
    let r = client
        .post::<_, serde_json::Value>(
            "/v1/environments/rfa/replay",
            &serde_json::json!({"to": "now", "into": "rfb"}),
        )
        .await;
    match r {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status.as_u16(), 409, "{message}");
            assert!(message.contains("only into weaves"), "{message}");
        }
        other => panic!("--into another environment: {other:?}"),
    }
    // A missing target is not found.
    let out = replay("rfnone", false);
    assert!(
        stderr(&out).contains("no environment named \"rfnone\""),
        "{}",
        stderr(&out)
    );

    // A weave of rfa passes the check (the push itself then fails: no guest runs).
    let out = replay("rfwa", false);
    assert!(
        !stderr(&out).contains("only into weaves"),
        "{}",
        stderr(&out)
    );

    // Forced: passes the check, and the audit log names the target.
    let out = replay("rfb", true);
    assert!(
        !stderr(&out).contains("only into weaves"),
        "{}",
        stderr(&out)
    );
    let log: Vec<AuditEntry> = client.get("/v1/audit?limit=50").await.unwrap();
    let forced: Vec<_> = log
        .iter()
        .filter(|e| e.action == "provenance.replay.force")
        .collect();
    assert_eq!(forced.len(), 1, "{log:#?}");
    assert_eq!(forced[0].target.as_deref(), Some("rfb"));
    let detail = forced[0].detail.as_deref().unwrap_or_default();
    assert!(
        detail.contains("\"rfa\"") && detail.contains("not a weave"),
        "{detail}"
    );
    // --force without --into is a usage error in the CLI.
    let out = weftd.cli(&["replay", "rfa", "--to", "now", "--out", "/tmp/x", "--force"]);
    assert!(!out.status.success());
}
