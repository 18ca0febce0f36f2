//! backup: disk snapshots of one image with weft, restic and borg in the same run.
//!
//! The image is built deterministically (random, unallocated zeros, one repeated block,
//! text-like data, in 16 MiB stripes) and cached under the bench directory as raw and
//! qcow2. Per round:
//!
//! 1. A fresh copy of the qcow2 is attached to a paused QEMU (`weft_qmp::launch`).
//! 2. Full snapshots, in an order rotated every round: weft into a plain store, weft into
//!    an encrypted store (both through `weft_qmp::backup` → NBD → `pull::pull` →
//!    `write_index`, as weftd does), `restic backup` and `borg create` of the raw image.
//! 3. 1 % of the disk's 64 KiB blocks are written through the guest's block backend
//!    (HMP `qemu-io`), then weft takes an incremental on top of the plain full.
//! 4. Restores of the full snapshot, alternating: weft (parallel chunk gets and
//!    `pwrite`, weftd's `restore_raw`) and `restic restore`.
//!
//! The page cache is dropped before every timed phase (when running as root). Every
//! repository and restored file lives in a per-round directory that is removed at the
//! end of the round; weft's stores (about 1.5 GiB a round) are kept in one directory
//! removed at the end of the run, see [`bench_backup`]. QEMU is killed and reaped.
//!
//! Where things are: `image` builds the image, `weft` holds weft's side (the QEMU, stores,
//! a snapshot through the real recipe, dirtying, the restore), `peers` runs restic and borg
//! and measures what a tool wrote, `report` prints the tables, `breakdown` times the stages
//! of a weft full one by one (`--breakdown`); this file runs the rounds.

mod breakdown;
mod image;
mod peers;
mod report;
mod weft;

use std::fs::{self, File};
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use weft_qmp::Qmp;

use super::{bench_dir, drop_caches, Pids};
use breakdown::run_breakdown;
use image::{prepare_image, Content, Image};
use peers::{dir_bytes, os, run_tool, same_as, tool_version, Peers};
use report::print_results;
use weft::{dirty, dirty_offsets, new_store, restore_raw, start_vm, weft_snapshot};
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// weftd's default chunk size in KiB (`store.chunk_kib`).
pub(crate) const DEFAULT_CHUNK_KIB: u32 = 128;
/// weftd's zstd level (`StoreConfig::default()`).
const ZSTD_LEVEL: i32 = 3;
/// weftd's restore parallelism (groups of adjacent chunks read at once).
const RESTORE_PARALLEL: usize = weft_blockdev::restore::PARALLEL_GROUPS;
/// The disk's device name in QEMU; its format node is `vda-fmt`.
const DISK: &str = "vda";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Full {
    Weft,
    WeftEncrypted,
    Restic,
    Borg,
    BorgZstd,
}

const FULLS: [Full; 5] = [
    Full::Weft,
    Full::WeftEncrypted,
    Full::Restic,
    Full::Borg,
    Full::BorgZstd,
];

impl Full {
    fn name(self) -> &'static str {
        match self {
            Full::Weft => "weft, plain store",
            Full::WeftEncrypted => "weft, encrypted store (AES-256-GCM)",
            Full::Restic => "restic backup (AES-256 + Poly1305, zstd auto)",
            Full::Borg => "borg create (--encryption=none, lz4)",
            Full::BorgZstd => "borg create (--encryption=none, -C zstd,3: weft's compressor)",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Restore {
    Weft,
    Restic,
}

/// Every figure of every round.
#[derive(Default)]
struct Results {
    /// Per `FULLS` entry: seconds and stored bytes.
    full_s: [Vec<f64>; 5],
    stored: [Vec<f64>; 5],
    weft_read: Vec<f64>,
    teardown_s: Vec<f64>,
    full_setup_s: Vec<f64>,
    full_pull_s: Vec<f64>,
    inc_s: Vec<f64>,
    inc_setup_s: Vec<f64>,
    inc_pull_s: Vec<f64>,
    inc_marked: Vec<f64>,
    inc_read: Vec<f64>,
    inc_chunks: Vec<f64>,
    inc_stored: Vec<f64>,
    inc_teardown_s: Vec<f64>,
    dirty_s: Vec<f64>,
    /// weft, restic: seconds and bytes written.
    restore_s: [Vec<f64>; 2],
    restore_written: [Vec<f64>; 2],
}
pub(crate) async fn bench_backup(
    size_gib: u64,
    chunk_kib: u32,
    rounds: usize,
    breakdown: bool,
    pids: &mut Pids,
) -> Result<()> {
    let chunk_size = chunk_kib
        .checked_mul(1024)
        .context("--chunk-kib is too large")?;
    let restic = tool_version("restic", "version").await?;
    let borg = tool_version("borg", "--version").await?;
    let qemu_img = tool_version("qemu-img", "--version").await?;
    let qemu_img = qemu_img.lines().next().unwrap_or_default().to_string();
    let base = bench_dir()?;
    let image = {
        let base = base.clone();
        tokio::task::spawn_blocking(move || prepare_image(&base, size_gib)).await??
    };
    let dropped = drop_caches();
    let offsets = dirty_offsets(image.size);
    eprintln!(
        "backup: {} ({} GiB: {} MiB random, {} MiB zero, {} MiB one repeated MiB, {} MiB text)",
        image.qcow2.display(),
        size_gib,
        image.mib_of(Content::Random),
        image.mib_of(Content::Zero),
        image.mib_of(Content::Repeated),
        image.mib_of(Content::Text),
    );
    eprintln!(
        "backup: {restic}; {borg}; {qemu_img}; {rounds} rounds; weft chunks of {chunk_kib} KiB; page cache {}",
        if dropped {
            "dropped before every timed phase"
        } else {
            "NOT dropped (not root)"
        }
    );

    // weft's stores are removed at the end of the run, not of each round. The file
    // systems these benchmarks run on may have no journal, and then ext4 does not hand
    // out an inode freed less than a minute ago (`recently_deleted` in `ialloc.c`): each
    // new file scans past them. Deleting a round's 16,400 chunk files made every chunk
    // file of the next round pay that scan (13 % of weft's CPU time in a profile, and
    // round 0 used 3.4 CPU seconds where later rounds used 4.7); the peers, which write a
    // few large files, did not pay it. A store that is not being cleaned up is what a
    // backup writes to in steady state.
    let stores = tempfile::Builder::new()
        .prefix("backup-stores-")
        .tempdir_in(&base)?;
    let mut res = Results::default();
    for round in 0..rounds {
        let work = tempfile::Builder::new()
            .prefix("backup-round-")
            .tempdir_in(&base)?;
        let disk = work.path().join("vda.qcow2");
        fs::copy(&image.qcow2, &disk)?;
        let vm = start_vm(work.path(), &disk, pids).await?;
        let r = one_round(
            round,
            chunk_size,
            &image,
            vm.qmp(),
            work.path(),
            &stores.path().join(format!("round-{round}")),
            &offsets,
            dropped,
            &mut res,
        )
        .await;
        vm.kill().await;
        r?;
        drop(work);
    }

    print_results(
        &image, chunk_size, rounds, &offsets, &restic, &borg, dropped, &res,
    );
    if breakdown {
        let work = tempfile::Builder::new()
            .prefix("backup-breakdown-")
            .tempdir_in(&base)?;
        let disk = work.path().join("vda.qcow2");
        fs::copy(&image.qcow2, &disk)?;
        let vm = start_vm(work.path(), &disk, pids).await?;
        let r = run_breakdown(&image, chunk_size, vm.qmp(), work.path()).await;
        vm.kill().await;
        r?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn one_round(
    round: usize,
    chunk_size: u32,
    image: &Image,
    qmp: &Qmp,
    work: &Path,
    stores: &Path,
    offsets: &[u64],
    dropped: bool,
    res: &mut Results,
) -> Result<()> {
    let peers = Peers::new(work);
    fs::create_dir_all(stores)?;
    let plain = new_store(&stores.join("weft-plain"), false, chunk_size)?;
    let encrypted = new_store(&stores.join("weft-encrypted"), true, chunk_size)?;
    run_tool(
        "restic",
        &[os("init"), os("--repo"), peers.restic_repo.clone().into()],
        &peers.restic_env,
    )
    .await?;
    for repo in [&peers.borg_repo, &peers.borg_zstd_repo] {
        run_tool(
            "borg",
            &[os("init"), os("--encryption=none"), repo.clone().into()],
            &peers.borg_env,
        )
        .await?;
    }
    let cache = |what: &str| {
        if dropped {
            ensure!(drop_caches(), "cannot drop the page cache before {what}");
        }
        Ok(())
    };

    // Fulls, the order rotated each round.
    let mut plain_full = None;
    for k in 0..FULLS.len() {
        let i = (k + round) % FULLS.len();
        let who = FULLS[i];
        cache(who.name())?;
        let (secs, stored) = match who {
            Full::Weft | Full::WeftEncrypted => {
                let (store, token) = if who == Full::Weft {
                    (&plain, format!("r{round}-full"))
                } else {
                    (&encrypted, format!("r{round}-full-enc"))
                };
                let run = weft_snapshot(qmp, work, store, &token, None).await?;
                let stored = dir_bytes(store.root())?;
                let s = {
                    let store = store.clone();
                    tokio::task::spawn_blocking(move || store.stats()).await??
                };
                eprintln!(
                    "  round {round} {}: {:.2} s (setup {:.0} ms, pull {:.2} s of which commit {:.2} s; CPU s: weft {:.2}, QEMU {:.2}), read {:.0} MiB, stored {:.1} MiB (chunk files {:.1} MiB in {} chunks, {} new of {} written), teardown {:.0} ms",
                    who.name(),
                    run.time.as_secs_f64(),
                    run.setup.as_secs_f64() * 1e3,
                    run.pull.as_secs_f64(),
                    run.stats.commit_time.as_secs_f64(),
                    run.cpu.0,
                    run.cpu.1,
                    run.stats.bytes_read as f64 / MIB as f64,
                    stored as f64 / MIB as f64,
                    s.hot_bytes as f64 / MIB as f64,
                    s.hot_chunks,
                    run.stats.chunks_new,
                    run.stats.chunks_written,
                    run.teardown.as_secs_f64() * 1e3,
                );
                if who == Full::Weft {
                    res.weft_read.push(run.stats.bytes_read as f64);
                    res.teardown_s.push(run.teardown.as_secs_f64());
                    res.full_setup_s.push(run.setup.as_secs_f64());
                    res.full_pull_s.push(run.pull.as_secs_f64());
                    plain_full = Some((token, run.map.clone()));
                }
                (run.time.as_secs_f64(), stored)
            }
            Full::Restic => {
                let d = run_tool(
                    "restic",
                    &[
                        os("backup"),
                        os("--quiet"),
                        os("--repo"),
                        peers.restic_repo.clone().into(),
                        image.raw.clone().into(),
                    ],
                    &peers.restic_env,
                )
                .await?;
                let stored = dir_bytes(&peers.restic_repo)?;
                eprintln!(
                    "  round {round} {}: {:.2} s, stored {:.1} MiB",
                    who.name(),
                    d.as_secs_f64(),
                    stored as f64 / MIB as f64
                );
                (d.as_secs_f64(), stored)
            }
            Full::Borg | Full::BorgZstd => {
                let (repo, compression) = if who == Full::Borg {
                    (&peers.borg_repo, "lz4")
                } else {
                    (&peers.borg_zstd_repo, "zstd,3")
                };
                let archive = format!("{}::full", repo.display());
                let d = run_tool(
                    "borg",
                    &[
                        os("create"),
                        os("--compression"),
                        os(compression),
                        os(archive),
                        image.raw.clone().into(),
                    ],
                    &peers.borg_env,
                )
                .await?;
                let stored = dir_bytes(repo)?;
                eprintln!(
                    "  round {round} {}: {:.2} s, stored {:.1} MiB",
                    who.name(),
                    d.as_secs_f64(),
                    stored as f64 / MIB as f64
                );
                (d.as_secs_f64(), stored)
            }
        };
        res.full_s[i].push(secs);
        res.stored[i].push(stored as f64);
    }
    let (full_token, full_map) = plain_full.context("no plain full")?;

    // Incremental: 1 % of the 64 KiB blocks dirtied through the guest's path.
    let t = Instant::now();
    dirty(qmp, offsets).await?;
    res.dirty_s.push(t.elapsed().as_secs_f64());
    cache("the incremental")?;
    let before = dir_bytes(plain.root())?;
    let checkpoint = format!("bench-{full_token}");
    let inc = weft_snapshot(
        qmp,
        work,
        &plain,
        &format!("r{round}-inc"),
        Some((&checkpoint, full_map.clone())),
    )
    .await?;
    let added = dir_bytes(plain.root())?.saturating_sub(before);
    eprintln!(
        "  round {round} weft incremental: {:.3} s (setup {:.0} ms, pull {:.3} s of which parent check {:.3} s and commit {:.3} s; CPU s: weft {:.2}, QEMU {:.2}), marked {:.1} MiB, read {:.1} MiB, {} chunks written ({} new), +{:.1} MiB stored, teardown {:.0} ms",
        inc.time.as_secs_f64(),
        inc.setup.as_secs_f64() * 1e3,
        inc.pull.as_secs_f64(),
        inc.stats.check_time.as_secs_f64(),
        inc.stats.commit_time.as_secs_f64(),
        inc.cpu.0,
        inc.cpu.1,
        inc.stats.bytes_marked as f64 / MIB as f64,
        inc.stats.bytes_read as f64 / MIB as f64,
        inc.stats.chunks_written,
        inc.stats.chunks_new,
        added as f64 / MIB as f64,
        inc.teardown.as_secs_f64() * 1e3,
    );
    res.inc_s.push(inc.time.as_secs_f64());
    res.inc_setup_s.push(inc.setup.as_secs_f64());
    res.inc_pull_s.push(inc.pull.as_secs_f64());
    res.inc_marked.push(inc.stats.bytes_marked as f64);
    res.inc_read.push(inc.stats.bytes_read as f64);
    res.inc_chunks.push(inc.stats.chunks_written as f64);
    res.inc_stored.push(added as f64);
    res.inc_teardown_s.push(inc.teardown.as_secs_f64());

    // Restores of the full snapshot, alternating who goes first.
    let order = if round % 2 == 1 {
        [Restore::Restic, Restore::Weft]
    } else {
        [Restore::Weft, Restore::Restic]
    };
    for who in order {
        cache("a restore")?;
        let (i, secs, written, output) = match who {
            Restore::Weft => {
                let output = work.join("weft-restored.raw");
                let t = Instant::now();
                let written = restore_raw(&plain, &full_map, &output).await?;
                (0, t.elapsed().as_secs_f64(), written, output)
            }
            Restore::Restic => {
                let target = work.join("restic-restored");
                let t = Instant::now();
                run_tool(
                    "restic",
                    &[
                        os("restore"),
                        os("latest"),
                        os("--quiet"),
                        os("--repo"),
                        peers.restic_repo.clone().into(),
                        os("--target"),
                        target.clone().into(),
                    ],
                    &peers.restic_env,
                )
                .await?;
                // weft's restore ends with an fsync of the image; so does this one.
                let output = target.join(image.raw.strip_prefix("/").unwrap_or(&image.raw));
                File::open(&output)
                    .with_context(|| format!("restic restored no {}", output.display()))?
                    .sync_all()?;
                let secs = t.elapsed().as_secs_f64();
                // restic 0.14 has no sparse restore: it writes every byte.
                (1, secs, image.size, output)
            }
        };
        eprintln!(
            "  round {round} restore {}: {secs:.2} s ({:.0} MiB/s), {:.0} MiB written",
            if i == 0 { "weft" } else { "restic" },
            image.size as f64 / MIB as f64 / secs,
            written as f64 / MIB as f64
        );
        res.restore_s[i].push(secs);
        res.restore_written[i].push(written as f64);
        if round == 0 {
            // Not timed: the restored image is the image.
            let (raw, size, out) = (image.raw.clone(), image.size, output.clone());
            tokio::task::spawn_blocking(move || same_as(&raw, size, &out)).await??;
        }
        fs::remove_file(&output)?;
    }
    Ok(())
}
