//! A weave's provenance through a real weftd and QEMU: its log starts with its
//! parent's entries up to the branch instant, and goes when the weave is deleted.

mod common;
use common::Weftd;

use std::process::Command;

use weft::client::Client;
use weft::provenance::service::{host_now_us, Page, RecordView};
use weft::provenance::{LogOptions, ProvenanceLog};
use weft_dpa::{DataType, Entry, Operation};

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
