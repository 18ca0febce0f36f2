//! The test guest runs weft-dpa and the workload (10,000 changes; no host connected):
//! afterwards the spool on the guest's data disk is replayed on the host and must equal the state the
//! workload recorded, at its two intermediate checkpoints and at the end.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use rusqlite::types::Value as SqlValue;
use rusqlite::Connection;
use serde_json::Value;
use weft_dpa::agent::{files, jsonptr, spool::Spool, sqlite};
use weft_dpa::proto::{DataType, Entry, Operation};
use weft_integration::{read_ext4_file, Guest, GuestOpts};

fn table_rows(db: &Path, table: &str) -> anyhow::Result<Vec<Vec<SqlValue>>> {
    let c = Connection::open(db)?;
    let mut stmt = c.prepare(&format!("SELECT * FROM {table} ORDER BY 1"))?;
    let n = stmt.column_count();
    let rows = stmt.query_map([], |r| (0..n).map(|i| r.get::<_, SqlValue>(i)).collect())?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The state the entries up to `until` (guest µs) describe, compared with a checkpoint
/// read from the disk.
fn check_replay(
    disk: &Path,
    work: &Path,
    entries: &[Entry],
    checkpoint: &str,
) -> anyhow::Result<usize> {
    let cp = format!("/dpa/checkpoints/{checkpoint}");
    let meta: Value = serde_json::from_slice(&read_ext4_file(disk, &format!("{cp}/meta.json"))?)?;
    let until = meta["time_us"].as_i64().context("meta.json time_us")?;
    let upto: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.guest_time_us <= until)
        .collect();

    let replayed = work.join(format!("replay-{checkpoint}.db"));
    let sql: Vec<&Entry> = upto
        .iter()
        .copied()
        .filter(|e| e.data_type == DataType::Sqlite)
        .collect();
    sqlite::apply(replayed.to_str().unwrap_or_default(), &sql)?;
    let expected = work.join(format!("expected-{checkpoint}.db"));
    std::fs::write(&expected, read_ext4_file(disk, &format!("{cp}/app.db"))?)?;
    for t in ["customers", "orders", "inventory"] {
        let (got, want) = (table_rows(&replayed, t)?, table_rows(&expected, t)?);
        assert_eq!(got.len(), want.len(), "{checkpoint}: rows of {t}");
        if let Some((g, w)) = got.iter().zip(&want).find(|(g, w)| g != w) {
            panic!("{checkpoint}: table {t} differs: replayed {g:?}, recorded {w:?}");
        }
    }

    let mut doc = Value::Null;
    for e in upto.iter().filter(|e| e.data_type == DataType::Json) {
        match e.op {
            Operation::Delete => jsonptr::remove(&mut doc, &e.key).map_err(anyhow::Error::msg)?,
            _ => {
                let v: Value = serde_json::from_str(e.new.as_deref().unwrap_or("null"))?;
                jsonptr::set(&mut doc, &e.key, v).map_err(anyhow::Error::msg)?
            }
        }
    }
    let want: Value =
        serde_json::from_slice(&read_ext4_file(disk, &format!("{cp}/settings.json"))?)?;
    assert_eq!(doc, want, "{checkpoint}: settings.json");

    let mut kv: BTreeMap<(String, String), String> = BTreeMap::new();
    for e in upto.iter().filter(|e| e.data_type == DataType::Kv) {
        let k = (e.source.clone(), e.key.clone());
        match &e.new {
            Some(v) => kv.insert(k, serde_json::from_str(v)?),
            None => kv.remove(&k),
        };
    }
    let env = files::parse_env(&String::from_utf8(read_ext4_file(
        disk,
        &format!("{cp}/app.env"),
    )?)?);
    let got_env: BTreeMap<String, String> = kv
        .iter()
        .filter(|((s, _), _)| s == "/data/dpa/app.env")
        .map(|((_, k), v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(got_env, env, "{checkpoint}: app.env");
    for i in 0..10 {
        let want = read_ext4_file(disk, &format!("{cp}/flags/flag{i}"))
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let got = kv
            .get(&("/data/dpa/flags/".to_string(), format!("flag{i}")))
            .cloned();
        assert_eq!(got, want, "{checkpoint}: flags/flag{i}");
    }
    Ok(upto.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_dpa_spool_replays_to_the_workloads_checkpoints() -> anyhow::Result<()> {
    let guest = Guest::boot(GuestOpts {
        workload: "dpa".into(),
        extra_append:
            "weft.dpa=1 weft.workload_args=--count=10000,--checkpoints=2,--settle-ms=1000".into(),
        ready_timeout: Duration::from_secs(90),
        ..GuestOpts::default()
    })
    .await?;
    guest
        .serial()
        .wait_for("weft-dpa-workload: done", Duration::from_secs(600))
        .await?;
    let serial = guest.serial().contents();
    assert!(
        !serial.contains("weft-dpa exited"),
        "the agent must not exit"
    );
    assert!(!serial.contains("weft-dpa-workload: failed"));
    let disk = guest.data_disk().to_path_buf();
    let (exit, dir) = guest.shutdown_keep_dir().await?;
    assert!(exit.success(), "{exit}");

    let work = dir.path().join("replay");
    let spool_dir = work.join("spool");
    std::fs::create_dir_all(&spool_dir)?;
    for gen in 1u64.. {
        let name = format!("{gen:016x}.seg");
        match read_ext4_file(&disk, &format!("/.weft-dpa/{name}")) {
            Ok(bytes) => std::fs::write(spool_dir.join(name), bytes)?,
            Err(_) if gen > 1 => break,
            Err(e) => return Err(e.context("no spool segment on the guest's disk")),
        }
    }
    let spool = Spool::open(&spool_dir, u64::MAX, 1 << 20)?;
    let entries = spool.read_from(1, usize::MAX)?;
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=entries.len() as u64).collect::<Vec<_>>(),
        "gap-free from 1"
    );
    let one = check_replay(&disk, &work, &entries, "1")?;
    let two = check_replay(&disk, &work, &entries, "2")?;
    let all = check_replay(&disk, &work, &entries, "final")?;
    assert!(one < two && two < all);
    eprintln!(
        "guest spool: {} entries; checkpoint 1 after {one}, 2 after {two}, final after {all}",
        entries.len()
    );
    Ok(())
}
