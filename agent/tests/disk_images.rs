//! What weftd lets QEMU open of a caller's disk: the format the caller gives or weftd
//! reads itself, never a backing file an image's header names unless the caller gives
//! it, and a `-blockdev` chain that names every node (so QEMU follows no header).

mod common;
use common::Weftd;

use std::path::Path;
use std::process::Command;

use weft_client::{Client, ClientError};

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn refused(client: &Client, body: serde_json::Value, needle: &str) {
    match client
        .post::<_, serde_json::Value>("/v1/environments", &body)
        .await
    {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status.as_u16(), 400, "{body}: {message}");
            assert!(message.contains(needle), "{body}: {message}");
            assert!(!message.contains('\n'), "one line: {message}");
        }
        other => panic!("{body} was not refused: {other:?}"),
    }
    // Nothing was recorded.
    let name = body["name"].as_str().unwrap();
    let shown = client
        .get::<serde_json::Value>(&format!("/v1/environments/{name}"))
        .await;
    assert!(
        matches!(&shown, Err(ClientError::Api { status, .. }) if status.as_u16() == 404),
        "{body} left {shown:?}"
    );
}

fn env(name: &str, disk: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "kind": "managed",
        "name": name,
        "disks": [disk],
        "memory_mib": 64,
        "no_start": true,
    })
}

#[tokio::test]
async fn env_create_refuses_backing_files_and_data_files_it_is_not_given() {
    let dir = tempfile::tempdir().unwrap();
    let weftd = Weftd::start(dir.path()).await;
    let client = Client::new(&weftd.socket);
    let p = |n: &str| dir.path().join(n);

    // The image of the report: its header names /etc/hostname.
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "/etc/hostname",
        "-F",
        "raw",
        s(&p("h.qcow2")),
    ]);
    for format in [serde_json::Value::Null, "qcow2".into()] {
        refused(
            &client,
            env(
                "hostx",
                serde_json::json!({"path": p("h.qcow2"), "format": format}),
            ),
            "/etc/hostname",
        )
        .await;
    }
    // An external data file is refused whatever the caller gives.
    let data = p("d.raw");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&data)),
        s(&p("d.qcow2")),
        "1M",
    ]);
    refused(
        &client,
        env("datax", serde_json::json!({"path": p("d.qcow2")})),
        "external data file",
    )
    .await;
    // A backing the header does not name, or one with its own backing.
    std::fs::write(p("base.img"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(p("other.img"), vec![0u8; 1 << 20]).unwrap();
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&p("base.img")),
        "-F",
        "raw",
        s(&p("top.qcow2")),
    ]);
    refused(
        &client,
        env(
            "topx",
            serde_json::json!({"path": p("top.qcow2"), "backing": p("other.img")}),
        ),
        "names",
    )
    .await;
    // A raw image named .qcow2 told to be qcow2.
    std::fs::write(p("raw.qcow2"), vec![0u8; 1 << 20]).unwrap();
    refused(
        &client,
        env(
            "rawx",
            serde_json::json!({"path": p("raw.qcow2"), "format": "qcow2"}),
        ),
        "no qcow2 header",
    )
    .await;

    // Given explicitly, the backing is recorded; names do not decide formats.
    let made: serde_json::Value = client
        .post(
            "/v1/environments",
            &env(
                "topx",
                serde_json::json!({"path": p("top.qcow2"), "backing": p("base.img")}),
            ),
        )
        .await
        .unwrap();
    let disk = &made["config"]["disks"][0];
    assert_eq!(disk["format"], "qcow2", "{made}");
    assert_eq!(
        disk["backing"],
        serde_json::json!([{"path": p("base.img"), "format": "raw"}]),
        "{made}"
    );
    let raw: serde_json::Value = client
        .post(
            "/v1/environments",
            &env("rawy", serde_json::json!({"path": p("raw.qcow2")})),
        )
        .await
        .unwrap();
    assert_eq!(raw["config"]["disks"][0]["format"], "raw", "{raw}");
    std::fs::copy(p("top.qcow2"), p("q.raw")).unwrap();
    let q = client
        .post::<_, serde_json::Value>(
            "/v1/environments",
            &env(
                "qrawy",
                serde_json::json!({"path": p("q.raw"), "backing": p("base.img")}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(q["config"]["disks"][0]["format"], "qcow2", "{q}");
    // Through the CLI: backing= on --disk.
    let spec = format!("{},backing={}", s(&p("top.qcow2")), s(&p("base.img")));
    let out = weftd.cli(&[
        "env",
        "create",
        "clix",
        "--disk",
        &spec,
        "--memory",
        "64M",
        "--no-start",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The environment's QEMU gets the chain node by node, and its top qcow2 names the
/// backing node: the raw base is a read-only node of its own.
#[tokio::test]
async fn qemu_env_start_pins_the_backing_chain() {
    let dir = tempfile::tempdir().unwrap();
    let weftd = Weftd::start(dir.path()).await;
    let client = Client::new(&weftd.socket);
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("base.img"), vec![0u8; 1 << 20]).unwrap();
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.img",
        "-F",
        "raw",
        s(&p("top.qcow2")),
    ]);
    let mut body = env(
        "pinx",
        serde_json::json!({"path": p("top.qcow2"), "backing": p("base.img")}),
    );
    body["no_start"] = false.into();
    // No kernel and no bootable disk: the firmware waits, which is all this needs.
    let made: serde_json::Value = client.post("/v1/environments", &body).await.unwrap();
    let pid = made["pid"].as_u64().expect("running") as u32;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let nodes: Vec<serde_json::Value> = args
        .windows(2)
        .filter(|w| w[0] == "-blockdev")
        .map(|w| serde_json::from_str(&w[1]).unwrap())
        .collect();
    let fmt = nodes
        .iter()
        .find(|n| n["node-name"] == "vda-fmt")
        .expect("format node");
    assert_eq!(fmt["backing"], "vda-b0", "{nodes:?}");
    let base = nodes
        .iter()
        .find(|n| n["node-name"] == "vda-b0")
        .expect("backing node");
    assert_eq!(
        (&base["driver"], &base["read-only"]),
        (&"raw".into(), &true.into())
    );
    let stopped: serde_json::Value = client
        .post("/v1/environments/pinx/stop", &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
}
