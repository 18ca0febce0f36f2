//! NIC ids, taps and MACs reach QEMU's `-netdev`/`-device` options, where a `,` adds
//! options of the caller's choosing: weftd refuses a bad one with a one-line 400
//! before the environment is recorded or QEMU is started. No guest is needed.

mod common;
use common::Weftd;

use weft_client::{Client, ClientError};

#[tokio::test]
async fn env_create_refuses_nic_values_that_would_inject_qemu_options() {
    let dir = tempfile::tempdir().unwrap();
    let weftd = Weftd::start(dir.path()).await;
    let disk = dir.path().join("nicx.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let client = Client::new(&weftd.socket);
    let create = |id: &str, tap: &str, mac: &str| {
        serde_json::json!({
            "kind": "managed",
            "name": "nicx",
            "disks": [{"path": disk, "name": "vda", "format": "raw"}],
            "memory_mib": 64,
            "nics": [{"id": id, "tap": tap, "mac": mac}],
        })
    };
    let good_mac = "52:54:00:12:34:56";
    for (body, what) in [
        (
            create(
                "net0",
                "nicxtap0",
                "52:54:00:12:34:56,romfile=/etc/hostname",
            ),
            "MAC",
        ),
        (create("net0", "nicxtap0", "01:00:5e:00:00:01"), "MAC"),
        (create("net0", "nicxtap0", "52:54:00:12:34"), "MAC"),
        (
            create("net0", "nicxtap0,script=/tmp/x,downscript=no", good_mac),
            "tap",
        ),
        (create("net0", "..", good_mac), "tap"),
        (create("net0", "a-tap-name-too-long", good_mac), "tap"),
        (
            create("net0,romfile=/etc/hostname", "nicxtap0", good_mac),
            "NIC id",
        ),
    ] {
        let r = client
            .post::<_, serde_json::Value>("/v1/environments", &body)
            .await;
        match r {
            Err(ClientError::Api { status, message }) => {
                assert_eq!(status.as_u16(), 400, "{body}: {message}");
                assert!(message.contains(what), "{body}: {message}");
                assert!(!message.contains('\n'), "one line: {message}");
            }
            other => panic!("{body} was not refused: {other:?}"),
        }
        // Refused before anything was recorded (or launched).
        let shown = client
            .get::<serde_json::Value>("/v1/environments/nicx")
            .await;
        assert!(
            matches!(&shown, Err(ClientError::Api { status, .. }) if status.as_u16() == 404),
            "{body} left {shown:?}"
        );
    }
    // Through the CLI: its --nic parser lets a multicast MAC through; weftd refuses it.
    let spec = format!("{},name=vda,format=raw", disk.display());
    let out = weftd.cli(&[
        "env",
        "create",
        "nicx",
        "--disk",
        &spec,
        "--memory",
        "64M",
        "--nic",
        "nicxtap0,mac=03:00:00:00:00:01",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a multicast MAC was accepted");
    assert!(err.contains("unicast"), "{err}");
    // A valid NIC passes validation (recorded without starting: no tap exists here).
    let mut ok = create("net0", "nicxtap0", good_mac);
    ok["no_start"] = serde_json::json!(true);
    let made: serde_json::Value = client.post("/v1/environments", &ok).await.unwrap();
    assert_eq!(made["name"], "nicx", "{made}");
}
