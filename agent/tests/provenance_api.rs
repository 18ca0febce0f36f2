//! `weft provenance` through a real weftd (no QEMU): the log written by the library is
//! served over the API, filtered, paged, and removed with its environment.

mod common;
use common::Weftd;

use weft::catalog::{Catalog, NewEnvironment};
use weft::model::{EnvKind, EnvState};
use weft_api::provenance::{Page, RecordView};
use weft_client::{Client, ClientError};
use weft_dpa::{DataType, Entry, Operation};
use weft_provenance::log::{LogOptions, ProvenanceLog};
use weft_provenance::view::format_us;

const T0: i64 = 1_790_000_000_000_000; // 2026-09-21T...

fn entry(seq: u64) -> Entry {
    let t = T0 + seq as i64 * 1_000_000;
    if seq.is_multiple_of(3) {
        Entry {
            seq,
            guest_time_us: t,
            data_type: DataType::Json,
            op: Operation::Update,
            source: "/etc/app/settings.json".into(),
            collection: String::new(),
            key: "/features/beta".into(),
            old: Some("false".into()),
            new: Some("true".into()),
            tx: None,
        }
    } else {
        Entry {
            seq,
            guest_time_us: t,
            data_type: DataType::Sqlite,
            op: Operation::Update,
            source: "/data/app.db".into(),
            collection: "customers".into(),
            key: format!("[{}]", seq % 10),
            old: Some(format!(r#"{{"customer_name":"Alice {seq}"}}"#)),
            new: Some(format!(r#"{{"customer_name":"Bob {seq}"}}"#)),
            tx: Some(seq),
        }
    }
}

impl Weftd {
    fn json(&self, args: &[&str]) -> Vec<RecordView> {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "weft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn seqs(records: &[RecordView]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

#[tokio::test]
async fn provenance_is_served_filtered_paged_and_removed_with_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let catalog = Catalog::open(&data.join("catalog.db")).await.unwrap();
    let config = weft_qmp::launch::VmConfig::default();
    catalog
        .insert_environment(&NewEnvironment {
            name: "web",
            kind: EnvKind::Managed,
            config: Some(&config),
            qmp_socket: &dir.path().join("run/web.qmp"),
            state: EnvState::Stopped,
            pid: None,
        })
        .await
        .unwrap();
    catalog.close().await;
    let log = ProvenanceLog::open(data.join("provenance"), LogOptions::default()).unwrap();
    let entries: Vec<Entry> = (1..=12_000).map(entry).collect();
    for chunk in entries.chunks(512) {
        log.append("web", T0 + 7, chunk).unwrap();
    }
    drop(log);

    let weftd = Weftd::start(dir.path()).await;

    // Every record, across pages of the API (at most 10000 each).
    let all = weftd.json(&["--json", "provenance", "query", "web", "--limit", "0"]);
    assert_eq!(seqs(&all), (1..=12_000).collect::<Vec<_>>());
    let r = &all[4];
    assert_eq!((r.vm.as_str(), r.seq, r.host_time_us), ("web", 5, T0 + 7));
    assert_eq!(r.collection, "customers");
    assert_eq!(r.new, Some(serde_json::json!({"customer_name": "Bob 5"})));
    assert_eq!(r.guest_time, format_us(T0 + 5_000_000));

    // Filters: table and key, source, guest time.
    let got = weftd.json(&[
        "--json",
        "provenance",
        "query",
        "web",
        "--table",
        "customers",
        "--key",
        "[7]",
        "--limit",
        "5",
    ]);
    assert_eq!(seqs(&got), vec![7, 17, 37, 47, 67]);
    let from = format_us(T0 + 100_000_000);
    let to = format_us(T0 + 106_000_000);
    let got = weftd.json(&[
        "--json",
        "provenance",
        "query",
        "web",
        "--source",
        "/etc/app/settings.json",
        "--from",
        &from,
        "--to",
        &to,
    ]);
    assert_eq!(seqs(&got), vec![102, 105]);

    // Tail: the newest N, as text and as JSON lines.
    let out = weftd.cli(&["provenance", "tail", "web", "-n", "3"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].contains("GUEST TIME"));
    assert!(lines[1].trim_start().starts_with("11998"), "{text}");
    assert!(
        lines[1].contains("/data/app.db:customers  [8]") && lines[1].contains("→"),
        "{text}"
    );
    assert!(lines[3].contains("/features/beta  false → true"), "{text}");
    let out = weftd.cli(&["--json", "provenance", "tail", "web", "-n", "2"]);
    let tail: Vec<RecordView> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seqs(&tail), vec![11_999, 12_000]);

    // The API directly: paging and its bounds.
    let client = Client::new(&weftd.socket);
    let page: Page = client
        .get("/v1/environments/web/provenance?after_seq=100&limit=50")
        .await
        .unwrap();
    assert_eq!(page.last_seq, 12_000);
    assert_eq!(seqs(&page.records), (101..=150).collect::<Vec<_>>());
    assert_eq!(page.next_after_seq, Some(150));
    let page: Page = client
        .get("/v1/environments/web/provenance?after_seq=11990")
        .await
        .unwrap();
    assert_eq!(page.records.len(), 10);
    assert_eq!(page.next_after_seq, None);

    // Mistakes: a bad time is a usage error, an unknown environment a refusal.
    let out = weftd.cli(&["provenance", "query", "web", "--from", "yesterday"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    match client
        .get::<Page>("/v1/environments/web/provenance?to=yesterday")
        .await
    {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status.as_u16(), 400);
            assert!(message.contains("--to"), "{message}");
        }
        other => panic!("expected a 400, got {other:?}"),
    }
    let out = weftd.cli(&["provenance", "query", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));

    // Deleting the environment removes its log.
    assert!(data.join("provenance/web").exists());
    let out = weftd.cli(&["env", "delete", "web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !data.join("provenance/web").exists(),
        "the log went with the environment"
    );
}

/// A page of `GET …/provenance` ends at its byte budget, whatever the records' count,
/// and its cursor leads through the rest; weftd reads no further than the page.
#[tokio::test]
async fn provenance_pages_are_bounded_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let catalog = Catalog::open(&data.join("catalog.db")).await.unwrap();
    let config = weft_qmp::launch::VmConfig::default();
    catalog
        .insert_environment(&NewEnvironment {
            name: "big",
            kind: EnvKind::Managed,
            config: Some(&config),
            qmp_socket: &dir.path().join("run/big.qmp"),
            state: EnvState::Stopped,
            pid: None,
        })
        .await
        .unwrap();
    catalog.close().await;
    let log = ProvenanceLog::open(data.join("provenance"), LogOptions::default()).unwrap();
    // 600 records of 8 KiB values: 4.8 MiB, far fewer than any count limit.
    let entries: Vec<Entry> = (1..=600)
        .map(|seq| Entry {
            new: Some(format!("\"{}\"", "v".repeat(8 * 1024))),
            ..entry(seq)
        })
        .collect();
    for chunk in entries.chunks(100) {
        log.append("big", T0, chunk).unwrap();
    }
    drop(log);
    let weftd = Weftd::start(dir.path()).await;
    let client = Client::new(&weftd.socket);

    const BUDGET: usize = 64 * 1024;
    let mut seen = Vec::new();
    let mut after = 0;
    let mut pages = 0;
    loop {
        let path = format!("/v1/environments/big/provenance?max_bytes={BUDGET}&after_seq={after}");
        let body = client
            .request(hyper::Method::GET, &path, None::<&()>)
            .await
            .unwrap();
        assert!(
            body.len() <= BUDGET,
            "a page of {} bytes over a budget of {BUDGET}",
            body.len()
        );
        let page: Page = serde_json::from_slice(&body).unwrap();
        pages += 1;
        assert!(!page.records.is_empty() || page.next_after_seq.is_none());
        seen.extend(seqs(&page.records));
        match page.next_after_seq {
            Some(n) => {
                assert!(body.len() > BUDGET - 9 * 1024, "a page ends only when full");
                after = n;
            }
            None => break,
        }
        assert!(pages < 200, "paging does not end");
    }
    assert_eq!(seen, (1..=600).collect::<Vec<_>>());
    assert!(pages >= 600 * 8 * 1024 / BUDGET, "{pages} pages");

    // The default budget (4 MiB) also ends a page, with a cursor to go on.
    let body = client
        .request(
            hyper::Method::GET,
            "/v1/environments/big/provenance",
            None::<&()>,
        )
        .await
        .unwrap();
    assert!(body.len() <= 4 << 20, "{} bytes", body.len());
    let page: Page = serde_json::from_slice(&body).unwrap();
    assert!(page.records.len() < 600);
    assert_eq!(page.next_after_seq, page.records.last().map(|r| r.seq));

    // A record larger than the budget comes alone, so paging always moves on.
    let page: Page = client
        .get("/v1/environments/big/provenance?max_bytes=1024&after_seq=10")
        .await
        .unwrap();
    assert_eq!(seqs(&page.records), vec![11]);
    assert_eq!(page.next_after_seq, Some(11));
    // Out of range: a one-line refusal.
    match client
        .get::<Page>("/v1/environments/big/provenance?max_bytes=100")
        .await
    {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status.as_u16(), 400);
            assert!(message.contains("max_bytes"), "{message}");
        }
        other => panic!("expected a 400, got {other:?}"),
    }
    // The CLI pages through it all.
    let all = weftd.json(&["--json", "provenance", "query", "big", "--limit", "0"]);
    assert_eq!(seqs(&all), (1..=600).collect::<Vec<_>>());
}
