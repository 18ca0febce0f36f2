//! A weave's provenance through a real weftd and QEMU: its log starts with its
//! parent's entries up to the branch instant, and goes when the weave is deleted.
//! And a hostile DPA on weftd's real listener: the table definitions it sends are
//! never run on the host by `weft replay --out`.

mod common;
use common::Weftd;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use weft::provenance::service::host_now_us;
use weft_api::provenance::{Page, RecordView};
use weft_client::Client;
use weft_dpa::proto::{encode, Decoder, Hello, Message, PROTOCOL_VERSION};
use weft_dpa::{DataType, Entry, Operation};
use weft_provenance::log::{LogOptions, ProvenanceLog};

fn entry(seq: u64, guest_time_us: i64) -> Entry {
    Entry {
        seq,
        guest_time_us,
        data_type: DataType::Kv,
        op: Operation::Insert,
        source: "/etc/app.env".into(),
        collection: String::new(),
        key: format!("KEY_{seq}"),
        old: None,
        new: Some(format!("\"v{seq}\"")),
        tx: None,
    }
}

#[tokio::test]
async fn qemu_a_weave_inherits_its_parents_provenance_up_to_its_instant() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // The parent's log: 100 entries from the last 100 s, then 10 stamped an hour ahead
    // (a guest clock may say anything); a weave from now inherits the first 100.
    let now = host_now_us();
    let log = ProvenanceLog::open(data.join("provenance"), LogOptions::default()).unwrap();
    let past: Vec<Entry> = (1..=100)
        .map(|s| entry(s, now - (101 - s as i64) * 1_000_000))
        .collect();
    let ahead: Vec<Entry> = (101..=110).map(|s| entry(s, now + 3_600_000_000)).collect();
    log.append("pweb", now, &past).unwrap();
    log.append("pweb", now, &ahead).unwrap();
    drop(log);

    let weftd = Weftd::start(dir.path()).await;
    // A diskful environment without a kernel: SeaBIOS runs, which is all a weave from
    // now needs (a live external snapshot of its disk).
    let disk = dir.path().join("vda.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .status()
        .expect("qemu-img runs");
    assert!(made.success());
    let spec = format!("{},name=vda,format=qcow2", disk.display());
    let out = weftd.cli(&["env", "create", "pweb", "--disk", &spec, "--memory", "64M"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = weftd.cli(&["weave", "create", "pweb", "--name", "pw1"]);
    let created = out.status.success();
    let cleanup = |w: &Weftd| {
        let _ = w.cli(&["weave", "delete", "pw1"]);
        let _ = w.cli(&["env", "delete", "pweb"]);
    };
    if !created {
        cleanup(&weftd);
        panic!("weave create: {}", String::from_utf8_lossy(&out.stderr));
    }

    let client = Client::new(&weftd.socket);
    let page: Page = client
        .get("/v1/environments/pw1/provenance?limit=10000")
        .await
        .unwrap();
    let lineage = std::fs::read_to_string(data.join("provenance/pw1/lineage")).unwrap_or_default();
    cleanup(&weftd);
    assert_eq!(page.last_seq, 100, "lineage file: {lineage}");
    assert_eq!(
        page.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=100).collect::<Vec<_>>()
    );
    assert!(page.records.iter().all(|r: &RecordView| r.vm == "pweb"));
    assert!(lineage.contains("\"parent\": \"pweb\""), "{lineage}");
    assert!(
        !data.join("provenance/pw1").exists(),
        "the weave's log went with it"
    );
    assert!(
        !data.join("provenance/pweb").exists(),
        "the environment's log went with it"
    );
}

/// A SQLite change of `/data/app.db` at guest time `t`.
fn sqlite(
    seq: u64,
    t: i64,
    op: Operation,
    table: &str,
    key: &str,
    new: serde_json::Value,
) -> Entry {
    Entry {
        seq,
        guest_time_us: t,
        data_type: DataType::Sqlite,
        op,
        source: "/data/app.db".into(),
        collection: table.into(),
        key: key.into(),
        old: None,
        new: Some(new.to_string()),
        tx: None,
    }
}

/// The next frame weftd sends on `s`.
async fn recv(s: &mut UnixStream, d: &mut Decoder) -> Result<Message, String> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(m) = d.next_message().map_err(|e| e.to_string())? {
            return Ok(m);
        }
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .map_err(|_| "weftd did not answer within 20 s".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("weftd closed the connection".into());
        }
        d.feed(&buf[..n]);
    }
}

fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(tree(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

/// A guest's DPA is hostile: on weftd's real listener (the socket vhost-device-vsock
/// hands guest connections to) it sends table definitions that ATTACH a host file,
/// create a trigger or a view, call load_extension, set a pragma, carry a second
/// statement or create another table than they name. `weft replay --out` through
/// weftd's API succeeds with the plain table and its rows, counts each hostile entry
/// as skipped with one log line, and nothing appears outside the output directory.
#[tokio::test]
async fn qemu_hostile_schemas_from_a_dpa_never_run_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let escaped = outside.join("escaped.db");
    let lit = |p: &Path| p.display().to_string().replace('\'', "''");
    let weftd = Weftd::start(dir.path()).await;
    // A diskful environment without a kernel: SeaBIOS runs, which is all weftd needs
    // to start the VM's vsock device and listen for its DPA.
    let disk = dir.path().join("vda.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("16M")
        .status()
        .expect("qemu-img runs");
    assert!(made.success());
    let spec = format!("{},name=vda,format=qcow2", disk.display());
    let out = weftd.cli(&["env", "create", "hdpa", "--disk", &spec, "--memory", "64M"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cleanup = |w: &Weftd| {
        let _ = w.cli(&["env", "delete", "hdpa"]);
    };

    let t = host_now_us() - 10_000_000;
    let schema = |seq, table: &str, sql: String| {
        sqlite(
            seq,
            t,
            Operation::Schema,
            table,
            "",
            serde_json::Value::String(sql),
        )
    };
    let hostile = [
        schema(
            1,
            "a_attach",
            format!(
                "CREATE TABLE a_attach(x); COMMIT; ATTACH DATABASE '{}' AS p; CREATE TABLE p.y(z); BEGIN",
                lit(&escaped)
            ),
        ),
        schema(
            5,
            "z_trigger",
            "CREATE TRIGGER z_trigger AFTER INSERT ON good BEGIN INSERT INTO good(name) VALUES ('planted'); END".into(),
        ),
        schema(6, "z_view", "CREATE VIEW z_view AS SELECT * FROM good".into()),
        schema(
            7,
            "z_load",
            format!("SELECT load_extension('{}')", lit(&outside.join("evil.so"))),
        ),
        schema(8, "z_pragma", "PRAGMA writable_schema=1".into()),
        schema(9, "z_multi", "CREATE TABLE z_multi(x); CREATE TABLE sneaky(y)".into()),
        schema(10, "z_other", "CREATE TABLE sneaky2(y)".into()),
    ];
    let mut entries = vec![
        schema(
            2,
            "good",
            "CREATE TABLE good(id INTEGER PRIMARY KEY, name TEXT)".into(),
        ),
        sqlite(
            3,
            t,
            Operation::Insert,
            "good",
            "[1]",
            serde_json::json!({"id": 1, "name": "one"}),
        ),
        sqlite(
            4,
            t,
            Operation::Insert,
            "good",
            "[2]",
            serde_json::json!({"id": 2, "name": "two"}),
        ),
        sqlite(
            11,
            t,
            Operation::Insert,
            "z_multi",
            "[1]",
            serde_json::json!({"x": 1}),
        ),
    ];
    entries.extend(hostile.iter().cloned());
    entries.sort_by_key(|e| e.seq);

    // The hostile guest's connection; any failure is returned, so that the
    // environment is deleted before the test fails.
    let listener = dir.path().join("run/vsock/hdpa/vsock_5150");
    let sent: Result<(), String> = async {
        let mut s = UnixStream::connect(&listener)
            .await
            .map_err(|e| format!("weftd does not listen for the DPA: {e}"))?;
        let mut d = Decoder::new();
        let hello = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            capabilities: vec!["sqlite".into()],
            agent: "hostile-dpa-test".into(),
        });
        s.write_all(&encode(&hello))
            .await
            .map_err(|e| e.to_string())?;
        match recv(&mut s, &mut d).await? {
            Message::Welcome(w) if w.acked == 0 => {}
            other => return Err(format!("want a welcome from 0, got {other:?}")),
        }
        s.write_all(&encode(&Message::Batch(entries.clone())))
            .await
            .map_err(|e| e.to_string())?;
        match recv(&mut s, &mut d).await? {
            Message::Ack { upto: 11 } => Ok(()),
            other => Err(format!("want every entry acked, got {other:?}")),
        }
    }
    .await;
    let replay_out = dir.path().join("replay");
    let out = weftd.cli(&[
        "--json",
        "replay",
        "hdpa",
        "--to",
        "now",
        "--out",
        replay_out.to_str().unwrap(),
    ]);
    cleanup(&weftd);
    sent.unwrap();
    assert!(!escaped.exists(), "ATTACH ran on the host");
    assert_eq!(tree(&outside), Vec::<PathBuf>::new());
    assert!(
        out.status.success(),
        "replay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: weft_api::provenance::ReplayReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report.applied, report.skipped),
        (4, hostile.len() as u64),
        "each hostile definition is skipped"
    );
    let db = replay_out.join("data/app.db");
    assert_eq!(tree(&replay_out), vec![db.clone()]);
    let log = std::fs::read_to_string(dir.path().join("weftd.log")).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("replay skipped an entry"))
        .collect();
    eprintln!("weftd said:\n{}", lines.join("\n"));
    assert_eq!(lines.len(), hostile.len(), "{lines:#?}");
    assert!(lines.iter().all(|l| l.contains("is refused")), "{lines:#?}");

    use sqlx::{ConnectOptions as _, Connection as _};
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db)
        .read_only(true)
        .connect()
        .await
        .unwrap();
    let objects: Vec<(String, String)> =
        sqlx::query_as("SELECT type, name FROM sqlite_master ORDER BY name")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(objects, vec![("table".to_string(), "good".to_string())]);
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM good ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(names, vec!["one", "two"]);
    conn.close().await.unwrap();
}
