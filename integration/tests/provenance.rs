//! End-to-end data provenance: a real guest runs weft-dpa and the DPA workload (10,000
//! mixed SQLite, JSON and key-value changes), streaming over virtio-vsock to weftd's
//! provenance log. weftd is killed with SIGKILL mid-stream and restarted, the guest is
//! rebooted once; the log must then hold every entry exactly once (sequence numbers
//! 1..=N), and `weft replay` must rebuild the workload's state at its intermediate
//! checkpoints and at the end, row by row and file by file. Then compositions over that
//! history: one takes the disk of the end, the configuration of another instant and the
//! data of checkpoint 1 (pushed into the weave's guest through its DPA); another merges
//! checkpoint 2's data with now's key by key, with conflicts prompted and resolved.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use weft_api::provenance::Page;
use weft_integration::{read_ext4_file, wait_until};

mod common;
use common::*;

const WORKLOAD: &str = "weft.workload=dpa weft.dpa=1 \
     weft.workload_args=--count=10000,--checkpoints=2,--settle-ms=1500";

/// Every record of `env`'s log, in sequence order, through the API's pages.
async fn all_records(rig: &Rig, env: &str) -> anyhow::Result<Page> {
    let client = rig.client();
    let mut after = 0u64;
    let mut all = Page {
        records: Vec::new(),
        last_seq: 0,
        next_after_seq: None,
    };
    loop {
        let page: Page = client
            .get(&format!(
                "/v1/environments/{env}/provenance?after_seq={after}&limit=5000"
            ))
            .await?;
        all.last_seq = page.last_seq;
        all.records.extend(page.records);
        match page.next_after_seq {
            Some(next) if next > after => after = next,
            _ => return Ok(all),
        }
    }
}

/// The highest sequence number weftd holds for `env`, once it stopped moving for 5 s.
async fn settled_last_seq(rig: &Rig, env: &str) -> anyhow::Result<u64> {
    let seen = Cell::new((all_last_seq(rig, env).await?, Instant::now()));
    let seen = &seen;
    wait_until(
        Duration::from_secs(300),
        &format!("the provenance log of {env} to stop growing for 5 s"),
        || async move {
            let now = all_last_seq(rig, env).await?;
            let (last, since) = seen.get();
            if now != last {
                seen.set((now, Instant::now()));
                return Ok(None);
            }
            Ok((since.elapsed() > Duration::from_secs(5)).then_some(now))
        },
    )
    .await
}

/// Waits until the guest's DPA has connected to weftd in this boot and weftd holds every
/// entry its spool had given out by then (the spool's resend is complete).
async fn spool_delivered(rig: &Rig, env: &str) -> anyhow::Result<u64> {
    let serial = rig.serial(env);
    wait_until(
        Duration::from_secs(120),
        &format!("{env}'s DPA to connect and deliver its spool"),
        || async {
            let text = serial.contents();
            let Some(next_seq) = text
                .lines()
                .filter(|l| l.contains("connected to the host"))
                .filter_map(|l| {
                    l.split_once("next_seq=")?
                        .1
                        .split_whitespace()
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .max()
            else {
                return Ok(None);
            };
            let held = all_last_seq(rig, env).await?;
            Ok((held + 1 >= next_seq).then_some(held))
        },
    )
    .await
}

/// How often the guest's DPA has reported losing its connection to the host so far.
fn dpa_connection_losses(rig: &Rig, env: &str) -> usize {
    rig.serial(env)
        .contents()
        .matches("connection to the host: ")
        .count()
}

async fn all_last_seq(rig: &Rig, env: &str) -> anyhow::Result<u64> {
    let page: Page = rig
        .client()
        .get(&format!("/v1/environments/{env}/provenance?limit=1"))
        .await?;
    Ok(page.last_seq)
}

fn rows(db: &Path, table: &str) -> anyhow::Result<Vec<Vec<rusqlite::types::Value>>> {
    let c = rusqlite::Connection::open(db)?;
    let mut stmt = c.prepare(&format!("SELECT * FROM \"{table}\" ORDER BY 1"))?;
    let n = stmt.column_count();
    let out = stmt
        .query_map([], |r| (0..n).map(|i| r.get(i)).collect())?
        .collect::<Result<_, _>>()?;
    Ok(out)
}

fn env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

/// Compares a replay under `out` with the workload's state in `state_dir` of the disk
/// image (`/dpa` for the live state, `/dpa/checkpoints/<n>` for a checkpoint).
fn compare(out: &Path, image: &Path, state_dir: &str, what: &str) -> anyhow::Result<()> {
    let replayed = out.join("data/dpa");
    let recorded_db = out.join(format!("recorded-{what}.db"));
    std::fs::write(
        &recorded_db,
        read_ext4_file(image, &format!("{state_dir}/app.db"))?,
    )?;
    for table in ["customers", "orders", "inventory"] {
        let (got, want) = (
            rows(&replayed.join("app.db"), table)?,
            rows(&recorded_db, table)?,
        );
        ensure!(
            got.len() == want.len(),
            "{what}: {table} has {} rows replayed, {} recorded",
            got.len(),
            want.len()
        );
        if let Some((g, w)) = got.iter().zip(&want).find(|(g, w)| g != w) {
            anyhow::bail!("{what}: a row of {table} differs: replayed {g:?}, recorded {w:?}");
        }
    }
    let got: serde_json::Value =
        serde_json::from_slice(&std::fs::read(replayed.join("settings.json"))?)?;
    let want: serde_json::Value = serde_json::from_slice(&read_ext4_file(
        image,
        &format!("{state_dir}/settings.json"),
    )?)?;
    ensure!(got == want, "{what}: settings.json differs");
    let got = env_file(&std::fs::read_to_string(replayed.join("app.env"))?);
    let want = env_file(&String::from_utf8(read_ext4_file(
        image,
        &format!("{state_dir}/app.env"),
    )?)?);
    ensure!(got == want, "{what}: app.env differs: {got:?} vs {want:?}");
    let mut flags = 0;
    for i in 0..10 {
        let want = read_ext4_file(image, &format!("{state_dir}/flags/flag{i}")).ok();
        let got = std::fs::read(replayed.join(format!("flags/flag{i}"))).ok();
        ensure!(got == want, "{what}: flags/flag{i} differs");
        flags += usize::from(got.is_some());
    }
    eprintln!("{what}: replay equals the recorded state ({flags} flags)");
    Ok(())
}

/// Every item of the workload's state as one map (a row by table and primary key, a
/// JSON leaf by pointer, a key of app.env, a flag file) from its files under `dir`
/// (`read` reads a file there, `None` when it does not exist).
fn items_of(
    db: &Path,
    read: impl Fn(&str) -> anyhow::Result<Option<Vec<u8>>>,
) -> anyhow::Result<BTreeMap<String, String>> {
    fn leaves(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    leaves(&format!("{prefix}/{k}"), x, out);
                }
            }
            _ => {
                out.insert(format!("settings.json {prefix}"), v.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    for table in ["customers", "orders", "inventory"] {
        for row in rows(db, table)? {
            out.insert(format!("{table} {:?}", row[0]), format!("{row:?}"));
        }
    }
    if let Some(json) = read("settings.json")? {
        leaves("", &serde_json::from_slice(&json)?, &mut out);
    }
    if let Some(env) = read("app.env")? {
        for (k, v) in env_file(&String::from_utf8(env)?) {
            out.insert(format!("app.env {k}"), v);
        }
    }
    for i in 0..10 {
        if let Some(flag) = read(&format!("flags/flag{i}"))? {
            out.insert(format!("flag{i}"), String::from_utf8_lossy(&flag).into());
        }
    }
    Ok(out)
}

/// The state the workload recorded at checkpoint `cp` on the disk image.
fn recorded_items(rig: &Rig, image: &Path, cp: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let dir = format!("/dpa/checkpoints/{cp}");
    let db = rig.path(&format!("items-{cp}.db"));
    std::fs::write(&db, read_ext4_file(image, &format!("{dir}/app.db"))?)?;
    items_of(&db, |f| {
        Ok(read_ext4_file(image, &format!("{dir}/{f}")).ok())
    })
}

/// The state a replay wrote under `out`.
fn replayed_items(out: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let dir = out.join("data/dpa");
    items_of(&dir.join("app.db"), |f| Ok(std::fs::read(dir.join(f)).ok()))
}

/// Waits for weftd to push a composed weave's application data into its guest; returns
/// the record of it (which must say it was reconciled).
async fn reconciled(rig: &Rig, weave: &str) -> anyhow::Result<String> {
    let detail = wait_until(
        Duration::from_secs(240),
        &format!("the data of {weave} to be reconciled"),
        || async {
            let out = rig.weft_ok(&["--json", "weave", "show", weave, "--sources"])?;
            let rows: Vec<weft::weaves::SourceRow> = serde_json::from_str(&out)?;
            Ok(rows
                .into_iter()
                .find(|r| r.resource.starts_with("data:"))
                .and_then(|r| r.detail)
                .filter(|d| d.starts_with("reconciled") || d.starts_with("not reconciled")))
        },
    )
    .await?;
    eprintln!("{detail}");
    ensure!(detail.starts_with("reconciled"), "{detail}");
    Ok(detail)
}

fn checkpoint_time(serial: &str, name: &str) -> anyhow::Result<i64> {
    let prefix = format!("weft-dpa-workload: checkpoint {name} time_us=");
    serial
        .lines()
        .find_map(|l| l.find(prefix.as_str()).map(|i| &l[i + prefix.len()..]))
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|t| t.parse().ok())
        .with_context(|| {
            let seen: Vec<&str> = serial
                .lines()
                .filter(|l| l.contains("weft-dpa-workload"))
                .collect();
            format!("no checkpoint {name} on the console; workload lines: {seen:?}")
        })
}

fn rfc3339(us: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap_or(0));
    humantime::format_rfc3339_micros(t).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_provenance_survives_sigkill_and_reboot_and_replays_exactly() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    rig.start_weftd().await?;
    let disk = qcow2_data_disk(&rig, "vda")?;
    rig.boot_with("app", &[&disk], WORKLOAD, &[]).await?;
    let serial = rig.serial("app");

    // Mid-stream: weftd dies without a word and comes back; the guest keeps changing.
    serial
        .wait_for("weft-dpa-workload: checkpoint 1", Duration::from_secs(600))
        .await?;
    ensure!(all_last_seq(&rig, "app").await? > 0, "entries arrived");
    let losses = dpa_connection_losses(&rig, "app");
    rig.kill_weftd();
    // weftd comes back once the DPA has seen it gone (and spools what the guest changes).
    wait_until(
        Duration::from_secs(60),
        "the DPA to report the lost connection",
        || async { Ok((dpa_connection_losses(&rig, "app") > losses).then_some(())) },
    )
    .await?;
    rig.start_weftd().await?;
    serial
        .wait_for("weft-dpa-workload: done", Duration::from_secs(900))
        .await?;
    let before_reboot = settled_last_seq(&rig, "app").await?;
    // The console of this boot, with the checkpoints' times (a new boot starts a new log).
    let text = serial.contents();
    ensure!(
        !text.contains("weft-dpa-workload: failed"),
        "the workload failed"
    );
    // The DPA measures commit-to-host latency in the guest (trigger clock to the host's
    // durable ack) and reports it every 2000 SQLite changes.
    let latency: Vec<&str> = text
        .lines()
        .filter_map(|l| l.find("commit-to-host latency").map(|i| &l[i..]))
        .collect();
    ensure!(!latency.is_empty(), "the DPA reported no latency");
    for l in &latency {
        eprintln!("guest: {l}");
    }

    // The guest reboots: its DPA continues the same sequence from its spool.
    rig.weft_ok(&["env", "stop", "app"])?;
    rig.weft_ok(&["env", "start", "app"])?;
    serial
        .wait_for("weft-dpa-workload: already done", Duration::from_secs(300))
        .await?;
    spool_delivered(&rig, "app").await?;
    let page = all_records(&rig, "app").await?;
    let seqs: Vec<u64> = page.records.iter().map(|r| r.seq).collect();
    let n = seqs.len() as u64;
    ensure!(n >= 10_000, "only {n} entries for 10,000 changes");
    ensure!(
        seqs.iter().copied().eq(1..=n),
        "sequence numbers are not 1..={n} exactly once: first break near {:?}",
        seqs.windows(2).find(|w| w[1] != w[0] + 1)
    );
    ensure!(page.last_seq == n && n >= before_reboot);

    // Replay: at each checkpoint and at the end, against what the workload recorded.
    let snap = rig.snapshot("app", "disk:vda").await?;
    let image = rig.path("app-final.raw");
    rig.weft_ok(&[
        "restore",
        &snap.id.to_string(),
        "--output",
        image.to_str().context("utf-8")?,
    ])?;
    for cp in ["1", "2", "final"] {
        let t = checkpoint_time(&text, cp)?;
        let out = rig.path(&format!("replay-{cp}"));
        rig.weft_ok(&[
            "replay",
            "app",
            "--to",
            &rfc3339(t),
            "--out",
            out.to_str().context("utf-8")?,
        ])?;
        compare(&out, &image, &format!("/dpa/checkpoints/{cp}"), cp)?;
    }
    let out = rig.path("replay-now");
    rig.weft_ok(&[
        "replay",
        "app",
        "--to",
        "now",
        "--out",
        out.to_str().context("utf-8")?,
    ])?;
    // Nothing changed after the final checkpoint (the live database on the disk is not
    // comparable byte for byte: recent commits sit in its WAL file).
    compare(&out, &image, "/dpa/checkpoints/final", "now")?;

    // The same state from the disk snapshot alone: with no margin, nothing of the log
    // precedes or follows the snapshot (the workload ended before the reboot), so every
    // row, document and key comes out of the snapshot's file system, the database's
    // recent commits out of its WAL.
    let out = rig.path("replay-base");
    rig.weft_ok(&[
        "replay",
        "app",
        "--to",
        "now",
        "--base",
        &snap.id.to_string(),
        "--base-margin",
        "0",
        "--out",
        out.to_str().context("utf-8")?,
    ])?;
    compare(&out, &image, "/dpa/checkpoints/final", "base")?;

    // Apply mode: a weave from now holds the final state; replaying checkpoint 1 into it
    // makes its DPA change the guest's files back, and the weave's own log then rebuilds
    // checkpoint 1.
    rig.weft_ok(&["weave", "create", "app", "--name", "back"])?;
    let cp1 = rfc3339(checkpoint_time(&text, "1")?);
    let replayed = wait_until(
        Duration::from_secs(60),
        "the weave's DPA to take the replay",
        || async {
            let out = rig.weft(&["replay", "app", "--to", &cp1, "--into", "back"]);
            if out.status.success() {
                return Ok(Some(
                    String::from_utf8_lossy(&out.stdout).trim().to_string(),
                ));
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            // The weave's guest boots and its DPA connects within a few seconds.
            ensure!(err.contains("no DPA"), "replay --into: {err}");
            Ok(None)
        },
    )
    .await?;
    eprintln!("{replayed}");
    let back = rig.path("replay-back");
    let settled = settled_last_seq(&rig, "back").await?;
    ensure!(settled > n, "the weave's DPA recorded the changes it made");
    rig.weft_ok(&[
        "replay",
        "back",
        "--to",
        "now",
        "--out",
        back.to_str().context("utf-8")?,
    ])?;
    compare(
        &back,
        &image,
        "/dpa/checkpoints/1",
        "the weave after replay --into",
    )?;
    rig.weft_ok(&["weave", "delete", "back"])?;

    // State reconciliation (F14): a composition takes the disk of the end and the data
    // of checkpoint 1; once its weave's DPA connects, weftd pushes checkpoint 1's state
    // into the guest and records what differed from the disk. A second push then finds
    // nothing left to change.
    // With them, the configuration of a third instant (320 MiB, 2 vCPUs; then set back):
    // the disk from one instant, the settings from another, the data from a third.
    rig.weft_ok(&["env", "set", "app", "--memory", "320M", "--cpus", "2"])?;
    let config = rig.snapshot("app", "config").await?;
    rig.weft_ok(&["env", "set", "app", "--memory", "256M", "--cpus", "1"])?;
    let rules = rig.path("reconcile.toml");
    std::fs::write(
        &rules,
        format!(
            "[[rule]]\nresources = [\"disk:*\"]\npin = {}\n\n[[rule]]\nresources = [\"config\"]\npin = {}\n\n[[rule]]\nresources = [\"data:*\"]\nuntil = \"{cp1}\"\n",
            snap.id, config.id
        ),
    )?;
    rig.weft_ok(&[
        "compose",
        "create",
        "rc",
        "--env",
        "app",
        "--rules",
        rules.to_str().context("utf-8")?,
    ])?;
    rig.weft_ok(&["compose", "apply", "rc", "--weave", "rcw"])?;
    let (m, smp) = rig.qemu_memory_cpus("rcw")?;
    ensure!(
        m == "320M" && smp == "2",
        "the composed weave runs with -m {m} -smp {smp}"
    );
    let detail = reconciled(&rig, "rcw").await?;
    let changed: u64 = detail
        .strip_prefix("reconciled: ")
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no change count")?;
    ensure!(
        changed > 0,
        "the disk of the end held checkpoint 1's data already? {detail}"
    );
    // The weave's log learns what the push changed as its guest's DPA captures those
    // writes and streams them back; `--into` diffs against that log, so wait for it.
    settled_last_seq(&rig, "rcw").await?;
    let again = rig.weft_ok(&["--json", "replay", "app", "--to", &cp1, "--into", "rcw"])?;
    let again: serde_json::Value = serde_json::from_str(&again)?;
    ensure!(
        again["changes_made"].as_u64() == Some(0),
        "after reconciliation the guest still differed from checkpoint 1: {again}"
    );
    rig.weft_ok(&["weave", "delete", "rcw"])?;

    // A key-level data merge (F12): checkpoint 2's data and now's, merged against
    // checkpoint 1's with conflicts prompted. Items both windows changed are open
    // conflicts; taking the older side for all, the weave's guest must end up with, per
    // item, checkpoint 2's value where both changed it, now's where only the later
    // window did — checked against the states the workload itself recorded.
    let cp2 = rfc3339(checkpoint_time(&text, "2")?);
    std::fs::write(
        &rules,
        format!(
            "conflict = \"prompt\"\n\
             [[rule]]\nresources = [\"disk:*\"]\npin = {}\n\n\
             [[rule]]\nname = \"window 2\"\nresources = [\"data:*\"]\nfrom = \"{cp1}\"\nuntil = \"{cp2}\"\n\n\
             [[rule]]\nname = \"now\"\nresources = [\"data:*\"]\n",
            snap.id
        ),
    )?;
    let rules = rules.to_str().context("utf-8")?;
    rig.weft_ok(&["compose", "create", "rm", "--env", "app", "--rules", rules])?;
    let conflicts: Vec<weft_api::composition::Conflict> =
        serde_json::from_str(&rig.weft_ok(&["--json", "compose", "conflicts", "rm"])?)?;
    ensure!(
        !conflicts.is_empty() && conflicts.iter().all(|c| c.resource == "data:*"),
        "no data conflicts: {conflicts:?}"
    );
    eprintln!("data merge: {} conflicting item(s)", conflicts.len());
    let refused = rig.weft(&["compose", "apply", "rm", "--weave", "rmw"]);
    ensure!(
        !refused.status.success(),
        "apply with open data conflicts worked"
    );
    rig.weft_ok(&["compose", "resolve", "rm", "--all", "--take", "older"])?;
    rig.weft_ok(&["compose", "apply", "rm", "--weave", "rmw"])?;
    reconciled(&rig, "rmw").await?;
    settled_last_seq(&rig, "rmw").await?;
    let merged = rig.path("replay-merged");
    rig.weft_ok(&[
        "replay",
        "rmw",
        "--to",
        "now",
        "--out",
        merged.to_str().context("utf-8")?,
    ])?;
    let recorded = |cp: &str| recorded_items(&rig, &image, cp);
    let (base, older, newer) = (recorded("1")?, recorded("2")?, recorded("final")?);
    let mut want = BTreeMap::new();
    let keys: std::collections::BTreeSet<&String> = base
        .keys()
        .chain(older.keys())
        .chain(newer.keys())
        .collect();
    let mut both = 0;
    for k in keys {
        let (b, o, n) = (base.get(k), older.get(k), newer.get(k));
        // Only the later window changed it: now's; otherwise checkpoint 2's.
        let v = if o != n && b == o { n } else { o };
        both += usize::from(o != n && b != o && b != n);
        if let Some(v) = v {
            want.insert(k.clone(), v.clone());
        }
    }
    ensure!(both > 0, "the recorded windows share no changed item");
    let got = replayed_items(&merged)?;
    if let Some(k) = want
        .keys()
        .chain(got.keys())
        .find(|k| want.get(*k) != got.get(*k))
    {
        anyhow::bail!(
            "merged data differs at {k}: weave {:?}, expected {:?} (checkpoint 1 {:?}, 2 {:?}, final {:?})",
            got.get(k),
            want.get(k),
            base.get(k),
            older.get(k),
            newer.get(k)
        );
    }
    eprintln!(
        "data merge: the weave holds the merge ({} items, {both} changed in both windows)",
        want.len()
    );
    rig.weft_ok(&["weave", "delete", "rmw"])?;
    rig.passed();
    Ok(())
}
