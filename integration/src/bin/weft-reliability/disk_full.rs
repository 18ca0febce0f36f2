//! `disk-full`: weftd's data directory on a small loop-mounted ext4 that fills up during
//! a snapshot (of a stopped and of a running environment), a provenance append (a DPA
//! burst) and a weave create, each with nothing and with a little space left.
//!
//! Each case must fail with one line that names the lack of space (and where), leave
//! weftd answering, leave earlier snapshots and provenance entries intact and nothing
//! half-made, and succeed once the filler is removed. The guests' disks are raw and
//! fully allocated, so the guests themselves never need a new block.

use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use weft::model::{Snapshot, SnapshotState};

use crate::checks::{self, Ledger};
use crate::world::{self, sh, World, COLD_ENV, DPA_ENV};
use crate::{Options, Rng};

/// How the system names a full file system.
const NO_SPACE: &[&str] = &[
    "No space left on device",
    "database or disk is full",
    "ENOSPC",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    /// `weft snapshot create rlcold` (stopped: qemu-storage-daemon, a full).
    BackupStopped,
    /// `weft snapshot create rldpa --resource disk:vda` (running: QEMU's NBD export).
    BackupRunning,
    /// The guest's next burst of rows, appended to the provenance log.
    ProvenanceAppend,
    /// `weft weave create rlcold --snapshot S` (restores a base).
    WeaveCreate,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::BackupStopped => "snapshot of a stopped environment (full)",
            Case::BackupRunning => "snapshot of a running environment (incremental)",
            Case::ProvenanceAppend => "provenance append (DPA bursts of 3000 rows)",
            Case::WeaveCreate => "weave create from a snapshot",
        }
    }
}

/// What one case showed.
struct Outcome {
    case: Case,
    leave: u64,
    /// The failure's message (one line when clean).
    message: String,
    problems: Vec<String>,
    retry: String,
}

/// The loop-mounted file system, unmounted (and detached) on drop.
struct Mount {
    point: PathBuf,
}

impl Mount {
    fn new(image: &Path, point: &Path, size_mib: u64) -> Result<Mount> {
        if let Some(dir) = image.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::File::create(image)
            .with_context(|| format!("create {}", image.display()))?
            .set_len(size_mib << 20)?;
        sh(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(image))?;
        std::fs::create_dir_all(point)?;
        sh(Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(point))?;
        Ok(Mount {
            point: point.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // `-d` detaches the loop device mount set up.
        let out = Command::new("umount").arg("-d").arg(&self.point).output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!(
                "weft-reliability: cannot unmount {}: {out:?}",
                self.point.display()
            );
        }
    }
}

/// Bytes the file system under `path` has free (for root).
fn free_bytes(path: &Path) -> Result<u64> {
    let s = nix::sys::statvfs::statvfs(path)?;
    Ok(s.blocks_free() * s.fragment_size())
}

/// Fills the file system of `dir` until at most `leave` bytes are free (give or take a
/// block): fallocate as much as it grants, then 4 KiB writes until the kernel refuses.
fn fill(dir: &Path, leave: u64) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for k in 0..64 {
        let free = free_bytes(dir)?;
        if free <= leave + 4096 {
            break;
        }
        let path = dir.join(format!("filler-{k}"));
        let f = std::fs::File::create(&path)?;
        files.push(path);
        let mut want = free - leave;
        while want >= 4096 {
            match nix::fcntl::fallocate(
                f.as_raw_fd(),
                nix::fcntl::FallocateFlags::empty(),
                0,
                want as i64,
            ) {
                Ok(()) => break,
                Err(nix::errno::Errno::ENOSPC) => want = want * 7 / 8,
                Err(e) => bail!("fallocate {}: {e}", dir.display()),
            }
        }
        if want < 4096 {
            break;
        }
    }
    if leave == 0 {
        use std::io::Write as _;
        let path = dir.join("filler-tail");
        let mut f = std::fs::File::create(&path)?;
        files.push(path);
        let block = [0x5au8; 4096];
        while f.write_all(&block).and_then(|()| f.sync_data()).is_ok() {}
        let small = [0x5au8; 512];
        while f.write_all(&small).and_then(|()| f.sync_data()).is_ok() {}
    }
    Ok(files)
}

fn unfill(files: &[PathBuf]) -> Result<()> {
    for f in files {
        std::fs::remove_file(f).with_context(|| format!("remove {}", f.display()))?;
    }
    Ok(())
}

/// Problems with a failure message: more than one line, or no word of the lack of
/// space, or no path.
fn judge_message(message: &str) -> Vec<String> {
    let lines: Vec<&str> = message.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::new();
    if lines.len() != 1 {
        out.push(format!("{} lines, not one", lines.len()));
    }
    if !NO_SPACE.iter().any(|n| message.contains(n)) {
        out.push("does not say the disk is full".into());
    }
    if !message.contains('/') {
        out.push("names no path".into());
    }
    out
}

pub async fn run(options: &Options) -> Result<bool> {
    let seed = options.seed;
    println!(
        "weft-reliability disk-full: seed {seed} (replay: weft-reliability disk-full --seed {seed} --size-mib {})",
        options.size_mib
    );
    let dir = crate::work_dir(options, "weft-rel-full")?;
    println!("work directory: {}", dir.display());
    let mount = Mount::new(&dir.join("fs.img"), &dir.join("mnt"), options.size_mib)?;
    // Small segments: appends then need new blocks every MiB, not every 64.
    let mut world = World::new(
        &dir,
        &mount.point.join("data"),
        "\n[provenance]\nsegment_mib = 1\n",
    )?;
    let started = Instant::now();
    let result = scenario(&mut world, &mount.point, seed).await;
    // Teardown: everything goes before the file system is unmounted.
    let mut leftover = Vec::new();
    if world.weftd_alive() || world.start_weftd().await.is_ok() {
        if let Ok(live) = checks::Live::read(&world).await {
            for w in live.weaves {
                let _ = world.weft(&["weave", "delete", &w.name]);
            }
        }
        for env in [DPA_ENV, COLD_ENV] {
            let _ = world.weft(&["env", "delete", env]);
        }
        match checks::leftovers(&world).await {
            Ok(l) => leftover.extend(l.into_iter().map(|l| format!("after teardown: {l}"))),
            Err(e) => leftover.push(format!("after teardown: {e:#}")),
        }
    }
    world.stop_weftd();
    leftover.extend(world.kill_strays());
    drop(mount);
    let outcomes = result.with_context(|| format!("work directory {} kept", dir.display()))?;
    let clean = summary(seed, options, &outcomes, &leftover, started.elapsed());
    if clean && !options.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("work directory kept: {}", dir.display());
    }
    Ok(clean)
}

async fn scenario(world: &mut World, mnt: &Path, seed: u64) -> Result<Vec<Outcome>> {
    let mut rng = Rng::new(seed);
    world.start_weftd().await?;
    let (kernel, initrd) = world.install_assets().await?;
    let cold = world.create_cold_env(&kernel, &initrd, seed)?;
    // Bursts of 3000 padded rows in one transaction: about 600 KiB of log each.
    world
        .create_dpa_env(&kernel, &initrd, true, "3000,100,tx")
        .await?;
    let mut ledger = Ledger {
        cold_next: Some(world::sha256_file(&cold)?),
        ..Ledger::default()
    };
    world.weft_ok(&["snapshot", "create", COLD_ENV, "--resource", "all"])?;
    world.weft_ok(&["snapshot", "create", DPA_ENV, "--resource", "disk:vda"])?;
    checks::restore_new(world, &mut ledger, None)?;
    checks::dpa_rows(world, &mut ledger.dpa).await?;
    println!(
        "setup: {} MiB free of the data file system",
        free_bytes(mnt)? >> 20
    );

    let mut outcomes = Vec::new();
    let cases = [
        Case::BackupStopped,
        Case::BackupRunning,
        Case::ProvenanceAppend,
        Case::WeaveCreate,
    ];
    for case in cases {
        let small = (64 << 10) + rng.next_u64() % (2 << 20);
        // With 8 MiB left the catalog has room and the data does not: the snapshot's
        // chunks (12 MiB changed) or the weave's base (32 MiB) fail instead.
        let leaves: &[u64] = match case {
            Case::BackupStopped | Case::WeaveCreate => &[0, small, 8 << 20],
            Case::BackupRunning | Case::ProvenanceAppend => &[0, small],
        };
        for &leave in leaves {
            let free = free_bytes(mnt)?;
            ensure!(
                free > 40 << 20,
                "only {} MiB of the data file system are free before the next case: give a larger --size-mib",
                free >> 20
            );
            let t = Instant::now();
            let outcome = one_case(world, mnt, &mut ledger, &mut rng, case, leave).await?;
            println!(
                "{:<50} leave {:>7} B: {} | {} ({:.1} s)",
                case.label(),
                leave,
                outcome.message,
                if outcome.problems.is_empty() {
                    "clean".to_string()
                } else {
                    outcome.problems.join("; ")
                },
                t.elapsed().as_secs_f64()
            );
            outcomes.push(outcome);
        }
    }
    Ok(outcomes)
}

/// The weftd log from byte `from` on: lines naming the lack of space.
fn log_lines_since(world: &World, from: u64) -> Vec<String> {
    let text = std::fs::read(world.weftd_log()).unwrap_or_default();
    let from = usize::try_from(from).unwrap_or(usize::MAX).min(text.len());
    String::from_utf8_lossy(&text[from..])
        .lines()
        .filter(|l| NO_SPACE.iter().any(|n| l.contains(n)))
        .map(|l| strip_ansi(l).trim().to_string())
        .collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn log_len(world: &World) -> u64 {
    std::fs::metadata(world.weftd_log())
        .map(|m| m.len())
        .unwrap_or(0)
}

async fn one_case(
    world: &mut World,
    mnt: &Path,
    ledger: &mut Ledger,
    rng: &mut Rng,
    case: Case,
    leave: u64,
) -> Result<Outcome> {
    let mut problems = Vec::new();
    let name = format!("rlf{}", rng.next_u64() % 100_000);
    // Something new to store: changed blocks of rlcold; for rldpa, the guest writes
    // 2 MiB and rows every cycle.
    if case == Case::BackupStopped {
        let cold = world.images().join("rlcold-vda.raw");
        world::scramble_cold(&cold, rng.next_u64())?;
        ledger.cold_next = Some(world::sha256_file(&cold)?);
    }
    let rows_before = checks::dpa_rows(world, &mut ledger.dpa).await?;
    let log_from = log_len(world);
    let filler = fill(mnt, leave)?;
    let args: Vec<String> = match case {
        Case::BackupStopped => ["snapshot", "create", COLD_ENV, "--resource", "all"]
            .map(String::from)
            .to_vec(),
        Case::BackupRunning => ["snapshot", "create", DPA_ENV, "--resource", "disk:vda"]
            .map(String::from)
            .to_vec(),
        Case::ProvenanceAppend => Vec::new(),
        Case::WeaveCreate => {
            let s = oldest_cold_disk_snapshot(world)?;
            [
                "weave",
                "create",
                COLD_ENV,
                "--snapshot",
                &s.id.to_string(),
                "--name",
                &name,
            ]
            .map(String::from)
            .to_vec()
        }
    };
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let message = if case == Case::ProvenanceAppend {
        // The guest's bursts go on; an append fails once the open segment's allocated
        // room is used up (its next block, or the next segment, needs new blocks).
        // The serial log is on the full file system too, so weftd's log is the guide.
        let deadline = Instant::now() + Duration::from_secs(120);
        while log_lines_since(world, log_from).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // What it says while the guest keeps trying.
        tokio::time::sleep(Duration::from_secs(15)).await;
        let lines = log_lines_since(world, log_from);
        if lines.is_empty() {
            problems.push("no append failed within 120 s (not exercised)".into());
            String::new()
        } else {
            if lines.len() > 10 {
                problems.push(format!("{} log lines about it", lines.len()));
            }
            lines[0].clone()
        }
    } else {
        let out = world.weft(&refs)?;
        if out.status.success() {
            problems.push("the operation succeeded on a full disk".into());
        }
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    };
    if !message.is_empty() {
        problems.extend(judge_message(&message));
    }
    // weftd answers, or restarts clean.
    if !world.weftd_alive() {
        problems.push("weftd died".into());
        if let Err(e) = world.start_weftd().await {
            problems.push(format!("weftd does not restart on the full disk: {e:#}"));
        }
    } else if world
        .client()
        .get::<serde_json::Value>("/v1/status")
        .await
        .is_err()
    {
        problems.push("weftd does not answer".into());
    }
    // Intact while full: the store verifies, the rows delivered before are there, and
    // nothing is half-made.
    if let Err(e) = checks::store_verify(world) {
        problems.push(format!("on the full disk: {e:#}"));
    }
    if let Err(e) = rows_present(world, ledger, rows_before).await {
        problems.push(format!("on the full disk: {e:#}"));
    }
    match checks::leftovers(world).await {
        Ok(l) if l.is_empty() => {}
        Ok(l) => problems.push(format!("left over on the full disk: {}", l.join("; "))),
        Err(e) => problems.push(format!("cannot look for leftovers: {e:#}")),
    }
    let pending: Vec<i64> = [COLD_ENV, DPA_ENV]
        .iter()
        .map(|e| world.snapshots(e))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .filter(|s| s.state == SnapshotState::Pending)
        .map(|s| s.id)
        .collect();
    if !pending.is_empty() {
        problems.push(format!("snapshots left pending: {pending:?}"));
    }

    // Space again: the same operation succeeds, and everything checks out.
    unfill(&filler)?;
    if !world.weftd_alive() {
        world.start_weftd().await?;
    }
    let retry = if case == Case::ProvenanceAppend {
        match checks::dpa_rows(world, &mut ledger.dpa).await {
            Ok(n) => format!("rows 1..={n} in the log once each"),
            Err(e) => {
                problems.push(format!("after freeing space: {e:#}"));
                "rows missing".into()
            }
        }
    } else {
        match world.weft(&refs) {
            Ok(out) if out.status.success() => "succeeded".to_string(),
            Ok(out) => {
                let e = String::from_utf8_lossy(&out.stderr).trim().to_string();
                problems.push(format!("after freeing space it still fails: {e}"));
                "failed".into()
            }
            Err(e) => {
                problems.push(format!("after freeing space: {e:#}"));
                "failed".into()
            }
        }
    };
    if case == Case::WeaveCreate && retry == "succeeded" {
        if let Err(e) = world.weft_ok(&["weave", "delete", &name]) {
            problems.push(format!("{e:#}"));
        }
    }
    checks::note_cold(world, ledger)?;
    if let Err(e) = checks::restore_new(world, ledger, Some(rng.next_u64())) {
        problems.push(format!("restore after freeing space: {e:#}"));
    }
    if let Err(e) = checks::store_verify(world) {
        problems.push(format!("after freeing space: {e:#}"));
    }
    if case != Case::ProvenanceAppend {
        if let Err(e) = checks::dpa_rows(world, &mut ledger.dpa).await {
            problems.push(format!("after freeing space: {e:#}"));
        }
    }
    match checks::leftovers(world).await {
        Ok(l) if l.is_empty() => {}
        Ok(l) => problems.push(format!("left over: {}", l.join("; "))),
        Err(e) => problems.push(format!("cannot look for leftovers: {e:#}")),
    }
    Ok(Outcome {
        case,
        leave,
        message,
        problems,
        retry,
    })
}

/// Rows 1..=`n` (delivered before the disk filled) are in the log, once each.
async fn rows_present(world: &World, ledger: &mut Ledger, n: u64) -> Result<()> {
    // Reads what is there now; entries that arrive later are checked later.
    let mut copy = checks::DpaLedger {
        after_seq: ledger.dpa.after_seq,
        rows: ledger.dpa.rows.clone(),
    };
    checks::read_log(world, &mut copy).await?;
    let missing = (1..=n).filter(|r| !copy.rows.contains(r)).count();
    ensure!(
        missing == 0,
        "{missing} of rows 1..={n} are not in the provenance log"
    );
    ledger.dpa = copy;
    Ok(())
}

fn oldest_cold_disk_snapshot(world: &World) -> Result<Snapshot> {
    world
        .snapshots(COLD_ENV)?
        .into_iter()
        .find(|s| s.state == SnapshotState::Complete && s.index_name.is_some())
        .context("rlcold has no complete disk snapshot")
}

fn summary(
    seed: u64,
    options: &Options,
    outcomes: &[Outcome],
    leftover: &[String],
    elapsed: Duration,
) -> bool {
    println!();
    println!(
        "Command: `weft-reliability disk-full --seed {seed} --size-mib {}`",
        options.size_mib
    );
    println!("Date: {}; machine: {}", crate::now_utc(), crate::machine());
    println!();
    println!("| filled during | bytes left | how it failed | clean | after freeing space |");
    println!("| --- | ---: | --- | --- | --- |");
    let mut clean = leftover.is_empty();
    for o in outcomes {
        clean &= o.problems.is_empty();
        println!(
            "| {} | {} | `{}` | {} | {} |",
            o.case.label(),
            o.leave,
            o.message.replace('|', "\\|"),
            if o.problems.is_empty() {
                "yes".to_string()
            } else {
                format!("**no**: {}", o.problems.join("; ").replace('|', "\\|"))
            },
            o.retry
        );
    }
    println!();
    println!(
        "Cases clean: {} of {}. Run time {:.1} min.",
        outcomes.iter().filter(|o| o.problems.is_empty()).count(),
        outcomes.len(),
        elapsed.as_secs_f64() / 60.0
    );
    for l in leftover {
        println!("- {l}");
    }
    clean
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_message_is_one_line_naming_space_and_path() {
        assert!(judge_message(
            "weft: snapshot failed: cannot write chunk /d/store/chunks/ab/x: No space left on device (os error 28)"
        )
        .is_empty());
        assert_eq!(judge_message("weft: failed\ncaused by: disk full").len(), 3);
        assert!(judge_message("weft: out of luck at /x").len() == 1);
    }

    #[test]
    fn ansi_colours_are_removed() {
        assert_eq!(strip_ansi("\u{1b}[33m WARN\u{1b}[0m x"), " WARN x");
    }
}
