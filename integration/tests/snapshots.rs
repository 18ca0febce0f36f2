//! End-to-end tests of disk snapshots and restores through weftd, with a real guest
//! writing to its disk. The disk content at a snapshot's instant is captured from
//! outside: the environment is paused (QEMU drains and flushes its disks), the image is
//! copied with `qemu-img convert -U`, the snapshot is taken, the guest resumes. Every
//! restored image is compared with its copy by `qemu-img compare`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use weft::model::{Job, JobState, Snapshot, SnapshotKind};
use weft_integration::{bin_path, wait_until};

mod common;
use common::*;

#[tokio::test]
async fn qemu_full_and_incremental_snapshots_restore_exactly() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    rig.start_weftd().await?;
    let disk = qcow2_data_disk(&rig, "vda")?;
    rig.boot("g", &[&disk]).await?;

    let mut taken = Vec::new();
    for round in 0..4 {
        rig.ticks("g", 5).await?;
        taken.push(
            rig.snapshot_at_instant("g", &disk, "disk:vda", &round.to_string())
                .await?,
        );
    }
    let kinds: Vec<SnapshotKind> = taken.iter().map(|(s, _)| s.kind).collect();
    assert_eq!(
        kinds,
        [
            SnapshotKind::Full,
            SnapshotKind::Incremental,
            SnapshotKind::Incremental,
            SnapshotKind::Incremental
        ],
        "{taken:#?}"
    );
    let full_read = taken[0].0.bytes_read.context("bytes_read")?;
    for (s, _) in &taken[1..] {
        let read = s.bytes_read.context("bytes_read")?;
        // The counter appends a few lines between snapshots: a handful of 64 KiB
        // clusters (data, inode, journal), never the disk.
        assert!(
            read > 0 && read <= 4 * MIB,
            "incremental {} read {read} bytes",
            s.id
        );
        assert!(
            read < full_read,
            "incremental {} read {read} >= full {full_read}",
            s.id
        );
        // Only what QEMU marked dirty is read: exactly those bytes.
        assert_eq!(
            s.bytes_marked,
            Some(read),
            "incremental {} read what was dirtied",
            s.id
        );
        assert_eq!(
            s.parent,
            Some(s.id - 1),
            "each incremental builds on the one before"
        );
    }
    for (s, reference) in &taken {
        rig.restore_matches(s.id, reference).await?;
    }
    let verify = rig.weft_ok(&["store", "verify"])?;
    assert!(verify.contains("bad_chunks:"), "{verify}");
    let listed = rig.weft_ok(&[
        "snapshot",
        "list",
        "g",
        "--resource",
        "disk:vda",
        "--category",
        "test",
    ])?;
    assert_eq!(listed.lines().count(), 1 + 4, "{listed}");
    rig.passed();
    Ok(())
}

#[tokio::test]
async fn qemu_snapshot_after_poweroff_and_start_is_still_correct() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    rig.start_weftd().await?;
    let disk = qcow2_data_disk(&rig, "vda")?;
    rig.boot("g", &[&disk]).await?;
    rig.ticks("g", 5).await?;
    let (first, r1) = rig.snapshot_at_instant("g", &disk, "disk:vda", "1").await?;
    rig.weft_ok(&["env", "stop", "g"])?;
    rig.weft_ok(&["env", "start", "g"])?;
    rig.serial("g").wait_for("WEFT-READY", BOOT).await?;
    rig.ticks("g", 5).await?;
    let (second, r2) = rig.snapshot_at_instant("g", &disk, "disk:vda", "2").await?;
    // The qcow2 kept the checkpoint bitmap across the clean power-off.
    assert_eq!(second.kind, SnapshotKind::Incremental, "{second:#?}");
    assert_eq!(second.parent, Some(first.id));
    rig.restore_matches(first.id, &r1).await?;
    rig.restore_matches(second.id, &r2).await?;
    rig.passed();
    Ok(())
}

/// A raw second disk full of random data: large enough that a backup takes a while.
fn random_disk(rig: &Rig, name: &str, mib: u64) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    let path = rig.path(name);
    let mut f = std::fs::File::create(&path)?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..mib {
        for b in buf.chunks_mut(8) {
            // xorshift: incompressible, deterministic.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b.copy_from_slice(&state.to_le_bytes()[..b.len()]);
        }
        f.write_all(&buf)?;
    }
    Ok(path)
}

#[tokio::test]
async fn qemu_weftd_killed_mid_backup_leaves_a_sound_store() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    rig.start_weftd().await?;
    let disk = qcow2_data_disk(&rig, "vda")?;
    let big = random_disk(&rig, "vdb.raw", 384)?;
    rig.boot("g", &[&disk, &big]).await?;
    let (first, _) = rig.snapshot_at_instant("g", &disk, "disk:vda", "1").await?;

    // Kill weftd while it pulls the big disk.
    let job: Job = rig
        .client()
        .post(
            "/v1/environments/g/snapshots",
            &serde_json::json!({"resource": "disk:vdb"}),
        )
        .await?;
    let client = rig.client();
    wait_until(JOB, "the backup to be under way", || {
        let client = client.clone();
        async move {
            let j: Job = client.get(&format!("/v1/jobs/{}", job.id)).await?;
            ensure!(
                j.state == JobState::Running,
                "the backup ended before weftd was killed: {j:?}"
            );
            Ok((j.done_bytes > 0).then_some(()))
        }
    })
    .await?;
    rig.kill_weftd();
    rig.start_weftd().await?;

    let after: Job = rig.client().get(&format!("/v1/jobs/{}", job.id)).await?;
    assert_eq!(after.state, JobState::Failed, "{after:?}");
    let all: Vec<Snapshot> = rig
        .client()
        .get("/v1/environments/g/snapshots?all=true")
        .await?;
    let vdb: Vec<&Snapshot> = all.iter().filter(|s| s.resource == "disk:vdb").collect();
    assert_eq!(vdb.len(), 1);
    assert_eq!(
        vdb[0].state,
        weft::model::SnapshotState::Failed,
        "no partial snapshot is complete"
    );
    let visible: Vec<Snapshot> = rig
        .client()
        .get("/v1/environments/g/snapshots?resource=disk:vdb")
        .await?;
    assert!(visible.is_empty(), "{visible:?}");
    rig.weft_ok(&["store", "verify"])?;

    // The next snapshots are correct: vda incremental from its surviving checkpoint,
    // vdb in full (its interrupted checkpoint is cleaned out of QEMU).
    rig.ticks("g", 5).await?;
    let (next, reference) = rig.snapshot_at_instant("g", &disk, "disk:vda", "2").await?;
    assert_eq!(next.kind, SnapshotKind::Incremental);
    assert_eq!(next.parent, Some(first.id));
    rig.restore_matches(next.id, &reference).await?;
    let (vdb_snap, vdb_ref) = rig.snapshot_at_instant("g", &big, "disk:vdb", "3").await?;
    assert_eq!(vdb_snap.kind, SnapshotKind::Full);
    rig.restore_matches(vdb_snap.id, &vdb_ref).await?;
    rig.passed();
    Ok(())
}

#[tokio::test]
async fn qemu_encrypted_store_holds_no_plaintext_and_needs_its_key() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    let config = rig.path("weftd.toml");
    std::fs::write(&config, "[store]\nencrypt = true\n")?;
    rig.config = Some(config);
    rig.start_weftd().await?;
    let disk = qcow2_data_disk(&rig, "vda")?;
    // A known plaintext in a region ext4 does not use, written before the guest boots.
    let canary = "WEFT-PLAINTEXT-CANARY the guest wrote this sentence. ";
    let text: Vec<u8> = canary.bytes().cycle().take(MIB as usize).collect();
    let blob = rig.path("canary.bin");
    std::fs::write(&blob, &text)?;
    let out = Command::new("qemu-io")
        .arg("-c")
        .arg(format!("write -s {} 40M 1M", blob.display()))
        .arg(&disk)
        .output()?;
    ensure!(out.status.success(), "{out:?}");
    rig.boot("g", &[&disk]).await?;
    let (snap, reference) = rig.snapshot_at_instant("g", &disk, "disk:vda", "1").await?;
    assert!(snap.bytes_new.unwrap_or(0) > 0);

    let store = rig.path("data/store");
    let mut scanned = 0;
    for file in walk(&store)? {
        let data = std::fs::read(&file)?;
        scanned += 1;
        assert!(
            !data.windows(canary.len()).any(|w| w == canary.as_bytes()),
            "{} holds the guest's plaintext",
            file.display()
        );
    }
    assert!(scanned > 3, "the store holds chunk files");
    rig.restore_matches(snap.id, &reference).await?;

    // Without its key the store does not open: weftd says so in one line.
    rig.kill_weftd();
    std::fs::rename(rig.path("data/store.key"), rig.path("elsewhere.key"))?;
    let out = Command::new(bin_path("weftd"))
        .arg("--data-dir")
        .arg(rig.path("data"))
        .arg("--run-dir")
        .arg(rig.path("run"))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("encrypted") && err.contains("key"), "{err}");
    rig.passed();
    Ok(())
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(walk(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}

#[tokio::test]
async fn qemu_policies_snapshot_on_schedule_prune_and_record_failures() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    rig.start_weftd().await?;
    let disk = qcow2_data_disk(&rig, "vda")?;
    rig.boot("g", &[&disk]).await?;
    rig.weft_ok(&[
        "policy",
        "set",
        "g",
        "--resource",
        "disk:vda",
        "--every",
        "2s",
        "--keep-last",
        "2",
    ])?;
    // A policy whose run cannot work (the disk's file is gone) fails, is recorded, and
    // is retried later.
    let spare = qcow2_data_disk(&rig, "spare")?;
    rig.weft_ok(&[
        "env",
        "create",
        "off",
        "--disk",
        spare.to_str().context("utf-8")?,
        "--no-start",
    ])?;
    std::fs::remove_file(&spare)?;
    rig.weft_ok(&[
        "policy",
        "set",
        "off",
        "--resource",
        "disk:vda",
        "--every",
        "1s",
    ])?;

    let client = rig.client();
    wait_until(
        Duration::from_secs(90),
        "three successful policy runs",
        || {
            let client = client.clone();
            async move {
                let audit: Vec<weft::model::AuditEntry> =
                    client.get("/v1/audit?limit=1000").await?;
                let ok = audit
                    .iter()
                    .filter(|a| {
                        a.action == "policy.run"
                            && a.target.as_deref() == Some("g")
                            && a.result == "ok"
                    })
                    .count();
                Ok((ok >= 3).then_some(()))
            }
        },
    )
    .await?;
    rig.weft_ok(&["policy", "delete", "g", "--resource", "disk:vda"])?;
    // Let a run that was under way finish, then look at what retention left.
    wait_until(JOB, "policy jobs to finish", || {
        let client = client.clone();
        async move {
            let jobs: Vec<Job> = client.get("/v1/jobs").await?;
            Ok(jobs
                .iter()
                .all(|j| j.state != JobState::Running)
                .then_some(()))
        }
    })
    .await?;
    let left: Vec<Snapshot> = rig
        .client()
        .get("/v1/environments/g/snapshots?resource=disk:vda")
        .await?;
    // keep-last 2 after each run; a run that finished after the last prune adds one.
    assert!((2..=3).contains(&left.len()), "{left:#?}");
    assert!(
        left.iter().all(|s| s.actor.starts_with("policy:")),
        "{left:#?}"
    );

    let policies: Vec<weft::policies::Policy> = rig.client().get("/v1/policies?env=off").await?;
    let off = policies.first().context("the failing policy")?;
    assert!(off.failures >= 1, "{off:?}");
    assert!(
        off.last_result
            .as_deref()
            .unwrap_or("")
            .starts_with("error:"),
        "{off:?}"
    );
    assert!(
        off.last_result
            .as_deref()
            .unwrap_or("")
            .contains("does not exist"),
        "{off:?}"
    );
    let last = humantime::parse_rfc3339_weak(off.last_run.as_deref().context("ran")?)?;
    let next = humantime::parse_rfc3339_weak(&off.next_run)?;
    assert!(
        next.duration_since(last)? >= Duration::from_secs(25),
        "backoff after a failure: {off:?}"
    );

    // Manual retention: a dry run changes nothing, then keep only the newest.
    let dry = rig.weft_ok(&[
        "snapshot",
        "prune",
        "g",
        "--resource",
        "disk:vda",
        "--keep-last",
        "1",
        "--dry-run",
    ])?;
    assert!(dry.contains("WOULD REMOVE"), "{dry}");
    let still: Vec<Snapshot> = rig
        .client()
        .get("/v1/environments/g/snapshots?resource=disk:vda")
        .await?;
    assert_eq!(still.len(), left.len());
    rig.weft_ok(&[
        "snapshot",
        "prune",
        "g",
        "--resource",
        "disk:vda",
        "--keep-last",
        "1",
    ])?;
    let after: Vec<Snapshot> = rig
        .client()
        .get("/v1/environments/g/snapshots?resource=disk:vda")
        .await?;
    assert_eq!(after.len(), 1);
    assert_eq!(
        after[0].id,
        left.iter().map(|s| s.id).max().context("ids")?,
        "the newest stays"
    );
    // The chunks of removed snapshots go at gc; the kept snapshot still verifies.
    rig.weft_ok(&["store", "gc", "--grace", "0s"])?;
    rig.weft_ok(&["snapshot", "verify", &after[0].id.to_string()])?;
    rig.passed();
    Ok(())
}

#[tokio::test]
async fn qemu_stopped_environments_are_snapshotted_through_the_storage_daemon() -> anyhow::Result<()>
{
    let mut rig = Rig::new()?;
    rig.start_weftd().await?;
    let disk = qcow2_data_disk(&rig, "vda")?;
    let disk_arg = disk.to_str().context("utf-8")?;
    rig.weft_ok(&[
        "env",
        "create",
        "off",
        "--disk",
        disk_arg,
        "--memory",
        "64M",
        "--no-start",
    ])?;
    let reference = |label: &str| -> anyhow::Result<PathBuf> {
        let out = rig.path(&format!("ref-{label}.raw"));
        let res = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&disk)
            .arg(&out)
            .output()?;
        ensure!(res.status.success(), "{res:?}");
        Ok(out)
    };

    let full = rig.snapshot("off", "disk:vda").await?;
    assert_eq!(full.kind, SnapshotKind::Full);
    let r1 = reference("1")?;
    // Written while the VM is off: the persistent bitmap records it.
    let out = Command::new("qemu-io")
        .args(["-c", "write -P 0x61 2M 128k"])
        .arg(&disk)
        .output()?;
    ensure!(out.status.success(), "{out:?}");
    let inc = rig.snapshot("off", "disk:vda").await?;
    assert_eq!(inc.kind, SnapshotKind::Incremental, "{inc:#?}");
    assert_eq!(
        inc.bytes_read,
        Some(128 * 1024),
        "exactly the bytes written"
    );
    let r2 = reference("2")?;
    rig.restore_matches(full.id, &r1).await?;
    rig.restore_matches(inc.id, &r2).await?;
    // The same snapshot as qcow2: written by QEMU, identical content, only data allocated.
    let q = rig.path("restored.qcow2");
    rig.weft_ok(&[
        "restore",
        &inc.id.to_string(),
        "--output",
        q.to_str().context("utf-8")?,
        "--format",
        "qcow2",
    ])?;
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&r2)
        .arg(&q)
        .output()?;
    ensure!(
        cmp.status.success(),
        "qcow2 restore differs: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&q)
        .output()?;
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)?;
    assert_eq!(info["format"], "qcow2");
    assert!(
        info["actual-size"].as_u64().context("actual-size")? < 32 * MIB,
        "sparse: {info}"
    );
    // Nothing of the storage daemon is left, and the VM can start on its disk.
    let backup_dir = rig.path("run/backup");
    let left: Vec<_> = std::fs::read_dir(&backup_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name())
                .filter(|n| n.to_string_lossy().ends_with(".qmp"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    rig.weft_ok(&["env", "start", "off"])?;
    let online = rig.snapshot("off", "disk:vda").await?;
    assert_eq!(
        online.kind,
        SnapshotKind::Incremental,
        "the offline checkpoint carries over: {online:#?}"
    );
    assert_eq!(online.parent, Some(inc.id));
    rig.passed();
    Ok(())
}

#[tokio::test]
async fn qemu_a_corrupted_chunk_is_found_named_and_healed_by_the_next_snapshot(
) -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    rig.start_weftd().await?;
    let disk = qcow2_data_disk(&rig, "vda")?;
    let out = Command::new("qemu-io")
        .args(["-c", "write -P 0x5c 8M 3M"])
        .arg(&disk)
        .output()?;
    ensure!(out.status.success(), "{out:?}");
    rig.weft_ok(&[
        "env",
        "create",
        "off",
        "--disk",
        disk.to_str().context("utf-8")?,
        "--no-start",
    ])?;
    let first = rig.snapshot("off", "disk:vda").await?;
    let reference = rig.path("ref.raw");
    let res = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&disk)
        .arg(&reference)
        .output()?;
    ensure!(res.status.success(), "{res:?}");

    // Flip one byte in the middle of the biggest chunk file.
    let chunks = walk(&rig.path("data/store/chunks"))?;
    let victim = chunks
        .iter()
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .context("chunk files")?
        .clone();
    let hex = victim
        .file_name()
        .context("name")?
        .to_string_lossy()
        .into_owned();
    let mut bytes = std::fs::read(&victim)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, bytes)?;

    let out = rig.weft(&["store", "verify"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "verify fails: {text}");
    assert!(text.contains(&hex), "verify names the chunk: {text}");
    assert!(
        text.contains("off/disk-vda"),
        "verify names the snapshot's block map: {text}"
    );

    let target = rig.path("broken.raw");
    let out = rig.weft(&[
        "restore",
        &first.id.to_string(),
        "--output",
        target.to_str().context("utf-8")?,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "restore fails loudly: {err}");
    assert!(err.contains(&hex), "restore names the chunk: {err}");
    assert!(
        !target.exists(),
        "no partial image under the requested name"
    );

    // The next snapshot reads the lost chunk again from the disk and heals the old one.
    let next = rig.snapshot("off", "disk:vda").await?;
    assert_eq!(next.kind, SnapshotKind::Incremental, "{next:#?}");
    rig.restore_matches(next.id, &reference).await?;
    rig.restore_matches(first.id, &reference).await?;
    rig.weft_ok(&["store", "verify"])?;
    rig.passed();
    Ok(())
}
