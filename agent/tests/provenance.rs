//! The provenance log on real files: appends, queries, crash recovery, retention,
//! quota, lineage, concurrency and removal.

use std::path::{Path, PathBuf};

use weft_dpa::{DataType, Entry, Operation};
use weft_provenance::log::{LogOptions, ProvenanceError, ProvenanceLog, Query};

const T0: i64 = 1_700_000_000_000_000;

/// Entry `seq`: a mix of SQLite rows in two tables, JSON and key-value changes, one
/// guest millisecond apart.
fn entry(seq: u64) -> Entry {
    let t = T0 + seq as i64 * 1000;
    match seq % 4 {
        0 | 1 => Entry {
            seq,
            guest_time_us: t,
            data_type: DataType::Sqlite,
            op: if seq % 8 < 2 {
                Operation::Insert
            } else {
                Operation::Update
            },
            source: "/data/app.db".into(),
            collection: if seq.is_multiple_of(4) {
                "customers"
            } else {
                "orders"
            }
            .into(),
            key: format!("[{}]", seq % 50),
            old: (seq % 8 >= 2).then(|| format!(r#"{{"id":{},"name":"old {seq}"}}"#, seq % 50)),
            new: Some(format!(r#"{{"id":{},"name":"new {seq}"}}"#, seq % 50)),
            tx: Some(seq / 3),
        },
        2 => Entry {
            seq,
            guest_time_us: t,
            data_type: DataType::Json,
            op: Operation::Update,
            source: "/etc/app/settings.json".into(),
            collection: String::new(),
            key: format!("/features/{}", seq % 10),
            old: Some("false".into()),
            new: Some("true".into()),
            tx: None,
        },
        _ => Entry {
            seq,
            guest_time_us: t,
            data_type: DataType::Kv,
            op: Operation::Insert,
            source: "/etc/app.env".into(),
            collection: String::new(),
            key: format!("KEY_{seq}"),
            old: None,
            new: Some(format!("\"value {seq}\"")),
            tx: None,
        },
    }
}

fn entries(from: u64, to: u64) -> Vec<Entry> {
    (from..=to).map(entry).collect()
}

fn seqs(log: &ProvenanceLog, vm: &str, q: &Query) -> Vec<u64> {
    log.query(vm, q)
        .unwrap()
        .iter()
        .map(|r| r.entry.seq)
        .collect()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(files(&e.path()));
            }
            out.push(e.path());
        }
    }
    out.sort();
    out
}

fn small(segment_bytes: u64) -> LogOptions {
    LogOptions {
        segment_bytes,
        ..LogOptions::default()
    }
}

#[test]
fn appended_entries_come_back_filtered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = ProvenanceLog::open(dir.path().join("p"), small(8192)).unwrap();
    assert_eq!(log.last_seq("web").unwrap(), 0);
    for chunk in entries(1, 1000).chunks(64) {
        log.append("web", T0 + 5, chunk).unwrap();
    }
    assert_eq!(log.last_seq("web").unwrap(), 1000);
    assert!(
        log.usage("web").unwrap().segments > 1,
        "small segments were sealed"
    );

    let all = log.query("web", &Query::default()).unwrap();
    assert_eq!(all.len(), 1000);
    assert!(all.iter().zip(1..).all(|(r, s)| r.entry == entry(s)));
    assert!(all
        .iter()
        .all(|r| r.vm == "web" && r.host_time_us == T0 + 5));

    let q = |q: Query| seqs(&log, "web", &q);
    let want =
        |f: &dyn Fn(&Entry) -> bool| -> Vec<u64> { (1..=1000).filter(|s| f(&entry(*s))).collect() };
    assert_eq!(
        q(Query {
            key: Some("[7]".into()),
            ..Default::default()
        }),
        want(&|e| e.key == "[7]")
    );
    assert_eq!(
        q(Query {
            collection: Some("orders".into()),
            ..Default::default()
        }),
        want(&|e| e.collection == "orders")
    );
    assert_eq!(
        q(Query {
            source: Some("/etc/app.env".into()),
            ..Default::default()
        }),
        want(&|e| e.source == "/etc/app.env")
    );
    assert_eq!(
        q(Query {
            key: Some("KEY_999".into()),
            ..Default::default()
        }),
        vec![999]
    );
    assert!(q(Query {
        key: Some("nope".into()),
        ..Default::default()
    })
    .is_empty());
    assert_eq!(
        q(Query {
            from_us: Some(T0 + 100_000),
            to_us: Some(T0 + 200_000),
            ..Default::default()
        }),
        (100..=200).collect::<Vec<_>>()
    );
    assert_eq!(
        q(Query {
            after_seq: Some(990),
            ..Default::default()
        }),
        (991..=1000).collect::<Vec<_>>()
    );
    assert_eq!(
        q(Query {
            after_seq: Some(500),
            limit: Some(3),
            ..Default::default()
        }),
        vec![501, 502, 503]
    );
    assert_eq!(
        q(Query {
            collection: Some("customers".into()),
            key: Some("[8]".into()),
            to_us: Some(T0 + 300_000),
            ..Default::default()
        }),
        want(&|e| e.collection == "customers" && e.key == "[8]" && e.seq <= 300)
    );

    // The same from a fresh open (sealed segments from their sidecars, the open one
    // scanned).
    drop(log);
    let log = ProvenanceLog::open(dir.path().join("p"), small(8192)).unwrap();
    assert_eq!(log.last_seq("web").unwrap(), 1000);
    assert_eq!(log.query("web", &Query::default()).unwrap(), all);
}

#[test]
fn resends_are_skipped_and_gaps_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = ProvenanceLog::open(dir.path().to_path_buf(), LogOptions::default()).unwrap();
    assert_eq!(log.append("db", T0, &entries(1, 10)).unwrap(), 10);
    // A whole resend, then one that overlaps: only 11..=15 are new.
    assert_eq!(log.append("db", T0 + 1, &entries(1, 10)).unwrap(), 10);
    assert_eq!(log.append("db", T0 + 2, &entries(8, 15)).unwrap(), 15);
    let all = log.query("db", &Query::default()).unwrap();
    assert_eq!(
        all.iter().map(|r| r.entry.seq).collect::<Vec<_>>(),
        (1..=15).collect::<Vec<_>>()
    );
    assert_eq!(all[9].host_time_us, T0, "a resend does not overwrite");
    assert_eq!(all[12].host_time_us, T0 + 2);
    // A gap.
    match log.append("db", T0, &entries(17, 20)) {
        Err(ProvenanceError::Gap {
            last: 15, got: 17, ..
        }) => {}
        other => panic!("expected a gap error, got {other:?}"),
    }
    // Not consecutive within a batch.
    let mut bad = entries(16, 18);
    bad.remove(1);
    assert!(matches!(
        log.append("db", T0, &bad),
        Err(ProvenanceError::Invalid(_))
    ));
    assert_eq!(log.last_seq("db").unwrap(), 15);
    // A VM name that is not a directory name.
    assert!(matches!(
        log.append("../etc", T0, &entries(1, 1)),
        Err(ProvenanceError::InvalidName(_))
    ));
    // An empty batch changes nothing.
    assert_eq!(log.append("db", T0, &[]).unwrap(), 15);
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    files(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect()
}

#[test]
fn a_torn_tail_is_cut_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("p");
    let log = ProvenanceLog::open(root.clone(), LogOptions::default()).unwrap();
    log.append("web", T0, &entries(1, 100)).unwrap();
    log.append("web", T0, &entries(101, 200)).unwrap();
    drop(log);
    let seg = segment_files(&root.join("web")).pop().unwrap();
    // The open segment has zeros allocated ahead of its data: find where data ends.
    let bytes = std::fs::read(&seg).unwrap();
    let len = bytes.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
    assert!(len < bytes.len() as u64, "space is allocated ahead");
    // Cut the second append's block in the middle of its payload.
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 37).unwrap();
    drop(f);

    let log = ProvenanceLog::open(root.clone(), LogOptions::default()).unwrap();
    assert_eq!(log.last_seq("web").unwrap(), 100, "the torn append is gone");
    assert_eq!(
        seqs(&log, "web", &Query::default()),
        (1..=100).collect::<Vec<_>>()
    );
    let cut_len = std::fs::metadata(&seg).unwrap().len();
    assert!(
        cut_len < len - 37,
        "the file was truncated to the last whole block"
    );
    // The DPA resends what was not acknowledged; the log continues cleanly.
    assert_eq!(log.append("web", T0 + 9, &entries(101, 200)).unwrap(), 200);
    drop(log);

    // Garbage after the last block (a torn header) is cut too.
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.extend_from_slice(b"WPB1\x01\x00\x00\x00garbage");
    std::fs::write(&seg, &bytes).unwrap();
    let log = ProvenanceLog::open(root.clone(), LogOptions::default()).unwrap();
    assert_eq!(log.last_seq("web").unwrap(), 200);
    let all = log.query("web", &Query::default()).unwrap();
    assert_eq!(all.len(), 200);
    assert_eq!(all[150].host_time_us, T0 + 9);
}

/// A `Write` into a shared buffer, to read what was logged.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The zeros allocated ahead of the open segment's data are there after every stop or
/// crash: reopening cuts them without calling them a torn tail (which would tell the
/// operator at every restart that a crash tore data).
#[test]
fn space_allocated_ahead_is_cut_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("p");
    let log = ProvenanceLog::open(root.clone(), LogOptions::default()).unwrap();
    log.append("web", T0, &entries(1, 100)).unwrap();
    drop(log);
    let seg = segment_files(&root.join("web")).pop().unwrap();
    let bytes = std::fs::read(&seg).unwrap();
    assert_eq!(bytes.last(), Some(&0), "space is allocated ahead");

    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let log = ProvenanceLog::open(root.clone(), LogOptions::default()).unwrap();
        assert_eq!(log.last_seq("web").unwrap(), 100);
    });
    let logged = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    assert!(logged.is_empty(), "reopening warned: {logged}");
}

#[test]
fn a_flipped_bit_inside_a_record_is_never_returned() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("p");
    let log = ProvenanceLog::open(root.clone(), LogOptions::default()).unwrap();
    log.append("web", T0, &entries(1, 50)).unwrap();
    log.append("web", T0, &entries(51, 100)).unwrap();
    drop(log);
    let seg = segment_files(&root.join("web")).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    // A bit in the first block's payload: the block checksum fails; since a valid block
    // follows, this is damage, not a torn tail: the rest is kept aside and reported.
    bytes[16 + 68 + 10] ^= 0x04;
    std::fs::write(&seg, &bytes).unwrap();
    let log = ProvenanceLog::open(root.clone(), LogOptions::default()).unwrap();
    assert_eq!(log.last_seq("web").unwrap(), 0);
    assert!(log.query("web", &Query::default()).unwrap().is_empty());
    let kept: Vec<_> = files(&root.join("web"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".damaged-"))
        .collect();
    assert_eq!(kept.len(), 1, "the damaged bytes are kept for inspection");
}

#[test]
fn retention_drops_old_sealed_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("p");
    // By size: keep about 3 segments of 8 KiB.
    let options = LogOptions {
        segment_bytes: 8192,
        retain_bytes: 3 * 8192,
        ..LogOptions::default()
    };
    let log = ProvenanceLog::open(root.clone(), options.clone()).unwrap();
    for chunk in entries(1, 3000).chunks(50) {
        log.append("web", T0, chunk).unwrap();
    }
    let usage = log.usage("web").unwrap();
    assert!(usage.bytes <= 4 * 8192 + 8192, "{usage:?}");
    assert!(usage.first_seq > 1, "old entries were dropped: {usage:?}");
    assert_eq!(usage.last_seq, 3000);
    let left = seqs(&log, "web", &Query::default());
    assert_eq!(
        left,
        (usage.first_seq..=3000).collect::<Vec<_>>(),
        "a whole, contiguous tail is kept"
    );
    // The sequence continues where it was.
    assert_eq!(log.append("web", T0, &entries(3001, 3001)).unwrap(), 3001);
    drop(log);

    // By age (host receive time): everything received long ago goes, except the newest
    // segment, even when it is sealed.
    let options = LogOptions {
        segment_bytes: 8192,
        retain_us: Some(3_600_000_000),
        ..LogOptions::default()
    };
    let log = ProvenanceLog::open(root.join("age"), options).unwrap();
    let long_ago = T0; // 2023
    for chunk in entries(1, 2000).chunks(50) {
        log.append("db", long_ago, chunk).unwrap();
    }
    let report = log.enforce_retention().unwrap();
    assert!(report.segments > 0);
    let usage = log.usage("db").unwrap();
    assert_eq!(usage.segments, 1, "{usage:?}");
    assert_eq!(usage.last_seq, 2000);
    assert_eq!(
        log.append("db", long_ago, &entries(2001, 2001)).unwrap(),
        2001
    );
    // Nothing further to drop: the only segment is the newest.
    assert_eq!(log.enforce_retention().unwrap().segments, 0);
}

#[test]
fn the_quota_refuses_appends_beyond_it() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        quota_bytes: 64 * 1024,
        ..LogOptions::default()
    };
    let log = ProvenanceLog::open(dir.path().to_path_buf(), options).unwrap();
    let mut last = 0;
    let refused = loop {
        let batch: Vec<Entry> = (last + 1..=last + 100)
            .map(|s| {
                let mut e = entry(s);
                // Values that do not compress away.
                e.new = Some(format!(
                    "\"{:x}{:x}\"",
                    s.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    s * 31
                ));
                e
            })
            .collect();
        match log.append("noisy", T0, &batch) {
            Ok(l) => last = l,
            Err(e) => break e,
        }
        assert!(last < 100_000, "the quota never applied");
    };
    assert!(
        matches!(refused, ProvenanceError::Quota { quota: 65536, .. }),
        "{refused}"
    );
    assert!(log.usage("noisy").unwrap().bytes <= 64 * 1024);
    assert_eq!(
        log.last_seq("noisy").unwrap(),
        last,
        "nothing of the refused batch is kept"
    );
    // Resends are still answered (the link can acknowledge them), and other VMs go on.
    assert_eq!(log.append("noisy", T0, &entries(1, 5)).unwrap(), last);
    assert_eq!(log.append("quiet", T0, &entries(1, 5)).unwrap(), 5);
}

#[test]
fn a_weave_sees_its_parent_up_to_the_branch_then_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("p");
    let log = ProvenanceLog::open(root.clone(), small(8192)).unwrap();
    for chunk in entries(1, 500).chunks(40) {
        log.append("web", T0, chunk).unwrap();
    }
    // Branch at the guest instant of entry 300.
    let at = entry(300).guest_time_us;
    log.branch("w1", "web", at).unwrap();
    log.branch("w1", "web", at).unwrap(); // the same branch again is fine
    assert!(matches!(
        log.branch("w1", "web", at + 1),
        Err(ProvenanceError::Branch(_))
    ));
    assert_eq!(
        log.last_seq("w1").unwrap(),
        300,
        "the weave's guest continues at 301"
    );
    assert_eq!(
        seqs(&log, "w1", &Query::default()),
        (1..=300).collect::<Vec<_>>()
    );
    // The weave's own entries follow on; a resend of lineage entries is skipped.
    let own: Vec<Entry> = entries(290, 400)
        .into_iter()
        .map(|mut e| {
            e.key = format!("w1-{}", e.seq);
            e
        })
        .collect();
    assert_eq!(log.append("w1", T0 + 1, &own).unwrap(), 400);
    assert!(matches!(
        log.append("w1", T0, &entries(402, 402)),
        Err(ProvenanceError::Gap { last: 400, .. })
    ));
    // The parent goes on too, unseen by the weave.
    log.append("web", T0, &entries(501, 600)).unwrap();
    let w = log.query("w1", &Query::default()).unwrap();
    assert_eq!(w.len(), 400);
    assert!(w[..300]
        .iter()
        .all(|r| r.vm == "web" && r.entry.key == entry(r.entry.seq).key));
    assert!(w[300..]
        .iter()
        .all(|r| r.vm == "w1" && r.entry.key == format!("w1-{}", r.entry.seq)));
    // Filters, paging and the time bound reach into the lineage.
    assert_eq!(
        seqs(
            &log,
            "w1",
            &Query {
                after_seq: Some(295),
                limit: Some(10),
                ..Default::default()
            }
        ),
        (296..=305).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(
            &log,
            "w1",
            &Query {
                key: Some("KEY_299".into()),
                ..Default::default()
            }
        ),
        vec![299]
    );
    assert!(seqs(
        &log,
        "w1",
        &Query {
            key: Some("KEY_303".into()),
            ..Default::default()
        }
    )
    .is_empty());
    assert_eq!(
        seqs(
            &log,
            "w1",
            &Query {
                from_us: Some(entry(299).guest_time_us),
                to_us: Some(entry(302).guest_time_us),
                ..Default::default()
            }
        ),
        vec![299, 300, 301, 302]
    );
    // It survives a restart.
    drop(log);
    let log = ProvenanceLog::open(root.clone(), small(8192)).unwrap();
    assert_eq!(log.last_seq("w1").unwrap(), 400);
    assert_eq!(log.query("w1", &Query::default()).unwrap(), w);
    // A weave with entries of its own cannot be branched again; nor a VM from itself.
    assert!(log.branch("w1", "db", at).is_err());
    assert!(log.branch("web", "web", at).is_err());
    // A branch before anything was recorded: the weave starts from nothing.
    log.branch("w2", "web", T0 - 1).unwrap();
    assert_eq!(log.last_seq("w2").unwrap(), 0);
    // Removing the weave leaves the parent whole.
    log.remove("w1").unwrap();
    assert_eq!(
        seqs(&log, "web", &Query::default()),
        (1..=600).collect::<Vec<_>>()
    );
}

#[test]
fn appends_of_two_vms_run_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let log = ProvenanceLog::open(dir.path().to_path_buf(), small(64 * 1024)).unwrap();
    let threads: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|vm| {
            let log = log.clone();
            std::thread::spawn(move || {
                for chunk in entries(1, 3000).chunks(100) {
                    log.append(vm, T0, chunk).unwrap();
                    // A reader of the same VM at the same time.
                    let tail = log
                        .query(
                            vm,
                            &Query {
                                after_seq: Some(chunk[0].seq - 1),
                                ..Default::default()
                            },
                        )
                        .unwrap();
                    assert!(tail.len() >= chunk.len());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for vm in ["a", "b", "c"] {
        let all = log.query(vm, &Query::default()).unwrap();
        assert_eq!(all.len(), 3000);
        assert!(all
            .iter()
            .zip(1..)
            .all(|(r, s)| r.entry == entry(s) && r.vm == vm));
    }
}

#[test]
fn remove_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("p");
    let log = ProvenanceLog::open(root.clone(), small(8192)).unwrap();
    for chunk in entries(1, 800).chunks(100) {
        log.append("web", T0, chunk).unwrap();
    }
    log.branch("w1", "web", T0 + 400_000).unwrap();
    log.append("w1", T0, &entries(401, 410)).unwrap();
    log.append("db", T0, &entries(1, 10)).unwrap();
    assert!(!files(&root.join("web")).is_empty());
    log.remove("w1").unwrap();
    log.remove("web").unwrap();
    assert!(!root.join("web").exists() && !root.join("w1").exists());
    let strays: Vec<_> = files(&root)
        .into_iter()
        .filter(|p| !p.starts_with(root.join("db")))
        .collect();
    assert!(strays.is_empty(), "left behind: {strays:?}");
    assert_eq!(log.last_seq("web").unwrap(), 0);
    assert!(log.query("web", &Query::default()).unwrap().is_empty());
    // Removing what is not there is fine; a VM of the same name starts afresh.
    log.remove("web").unwrap();
    assert!(matches!(
        log.append("web", T0, &entries(5, 6)),
        Err(ProvenanceError::Gap { last: 0, .. })
    ));
    assert_eq!(log.append("web", T0, &entries(1, 3)).unwrap(), 3);
    assert_eq!(seqs(&log, "web", &Query::default()), vec![1, 2, 3]);
}

#[test]
fn a_lost_or_damaged_sidecar_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("p");
    let log = ProvenanceLog::open(root.clone(), small(8192)).unwrap();
    for chunk in entries(1, 1000).chunks(64) {
        log.append("web", T0, chunk).unwrap();
    }
    let before = log.query("web", &Query::default()).unwrap();
    drop(log);
    let idx: Vec<PathBuf> = files(&root.join("web"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "idx"))
        .collect();
    assert!(idx.len() >= 2);
    std::fs::remove_file(&idx[0]).unwrap();
    let mut damaged = std::fs::read(&idx[1]).unwrap();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0xff;
    std::fs::write(&idx[1], damaged).unwrap();
    let log = ProvenanceLog::open(root.clone(), small(8192)).unwrap();
    assert_eq!(log.query("web", &Query::default()).unwrap(), before);
    assert_eq!(
        seqs(
            &log,
            "web",
            &Query {
                key: Some("KEY_7".into()),
                ..Default::default()
            }
        ),
        vec![7]
    );
    assert!(idx[0].exists(), "the sidecar was written again");
}
