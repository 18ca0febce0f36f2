//! `--breakdown`: where a weft full spends its time, each stage alone (one pass each, not
//! interleaved): reading the allocated extents over NBD, SHA-256 and zstd of every chunk,
//! chunk puts through one batch (on this disk and on tmpfs), and the two halves of a
//! restore (chunk gets, `pwrite` of the image).

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use futures::stream::{self, StreamExt, TryStreamExt};
use weft_blockdev::nbd::{NbdClient, NBD_STATE_ZERO};
use weft_qmp::backup::{self as recipe, PullBackupSpec};
use weft_qmp::Qmp;

use super::image::Image;
use super::weft::new_store;
use super::{DISK, MIB, RESTORE_PARALLEL, ZSTD_LEVEL};
use crate::drop_caches;
pub(super) async fn run_breakdown(
    image: &Image,
    chunk_size: u32,
    qmp: &Qmp,
    work: &Path,
) -> Result<()> {
    let mib = |b: u64| b as f64 / MIB as f64;
    println!();
    println!(
        "### backup --breakdown: the stages of a weft full, each alone (one pass, {} KiB chunks)",
        chunk_size / 1024
    );
    println!();
    println!("| stage | s | MiB | MiB/s |");
    println!("| --- | ---: | ---: | ---: |");

    // 1. NBD only: the export's allocated extents read 8 chunks at a time, discarded.
    drop_caches();
    let spec = PullBackupSpec {
        node: format!("{DISK}-fmt"),
        new_checkpoint: "bench-breakdown".into(),
        persistent: true,
        since: None,
        scratch: work.join("fleece-breakdown.qcow2"),
        nbd_socket: work.join("nbd-breakdown.sock"),
        export: DISK.into(),
        token: "breakdown".into(),
    };
    let running = recipe::start(qmp, spec.clone()).await?;
    let read = async {
        let client =
            NbdClient::connect_unix(&spec.nbd_socket, &spec.export, &["base:allocation"]).await?;
        let nbd = &client;
        let t = Instant::now();
        let extents = nbd.block_status_all("base:allocation").await?;
        let mut pieces = Vec::new();
        for e in extents.iter().filter(|e| e.flags & NBD_STATE_ZERO == 0) {
            let mut at = e.offset;
            while at < e.offset + e.length {
                let n = (e.offset + e.length - at).min(u64::from(chunk_size));
                pieces.push((at, n));
                at += n;
            }
        }
        let bytes = stream::iter(pieces)
            .map(|(at, n)| async move {
                let mut buf = vec![0u8; n as usize];
                let mut done = 0;
                while done < n {
                    let k = (n - done).min(u64::from(nbd.max_request()));
                    nbd.read_into(at + done, &mut buf[done as usize..(done + k) as usize])
                        .await?;
                    done += k;
                }
                Ok::<u64, anyhow::Error>(n)
            })
            .buffer_unordered(8)
            .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
            .await?;
        let d = t.elapsed();
        let _ = client.disconnect().await;
        Ok::<_, anyhow::Error>((d, bytes))
    }
    .await;
    running.abort().await;
    let (d, bytes) = read?;
    println!(
        "| NBD read of the allocated extents (8 chunk-sized reads in flight, discarded) | {:.2} | {:.0} | {:.0} |",
        d.as_secs_f64(),
        mib(bytes),
        mib(bytes) / d.as_secs_f64()
    );

    // The non-zero chunks of the image, in memory.
    let chunks: Arc<Vec<Vec<u8>>> = {
        let raw = image.raw.clone();
        let size = image.size;
        Arc::new(
            tokio::task::spawn_blocking(move || -> Result<Vec<Vec<u8>>> {
                let f = File::open(raw)?;
                let mut out = Vec::new();
                for i in 0..size / u64::from(chunk_size) {
                    let mut buf = vec![0u8; chunk_size as usize];
                    f.read_exact_at(&mut buf, i * u64::from(chunk_size))?;
                    if buf.iter().any(|b| *b != 0) {
                        out.push(buf);
                    }
                }
                Ok(out)
            })
            .await??,
        )
    };
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();

    // 2. Single-threaded CPU costs per chunk.
    let c = Arc::clone(&chunks);
    let (sha, zstd_s, zstd_out) = tokio::task::spawn_blocking(move || -> Result<_> {
        let t = Instant::now();
        for chunk in c.iter() {
            std::hint::black_box(ring::digest::digest(&ring::digest::SHA256, chunk));
        }
        let sha = t.elapsed();
        let t = Instant::now();
        let mut out = 0u64;
        for chunk in c.iter() {
            out += zstd::bulk::compress(chunk, ZSTD_LEVEL)?.len() as u64;
        }
        Ok((sha, t.elapsed(), out))
    })
    .await??;
    println!(
        "| SHA-256 of every chunk (1 thread) | {:.2} | {:.0} | {:.0} |",
        sha.as_secs_f64(),
        mib(total),
        mib(total) / sha.as_secs_f64()
    );
    println!(
        "| zstd -{ZSTD_LEVEL} of every chunk (1 thread; {:.0} MiB out) | {:.2} | {:.0} | {:.0} |",
        mib(zstd_out),
        zstd_s.as_secs_f64(),
        mib(total),
        mib(total) / zstd_s.as_secs_f64()
    );

    // 3. ChunkStore::put from memory, 8 at a time through one put batch made durable
    //    by one syncfs, as pull does: on this disk, and on tmpfs (where syncing costs
    //    nothing) to separate the disk's share.
    let shm = tempfile::Builder::new()
        .prefix("weft-bench-")
        .tempdir_in("/dev/shm")
        .ok();
    let mut targets = vec![("disk", work.join("put-store"))];
    if let Some(shm) = &shm {
        targets.push(("tmpfs, fsync free", shm.path().join("put-store")));
    }
    for (where_, root) in targets {
        let store = new_store(&root, false, chunk_size)?;
        drop_caches();
        let t = Instant::now();
        let batch = Arc::new(store.batch()?);
        let ids: Vec<_> = stream::iter(0..chunks.len())
            .map(|i| {
                let (batch, chunks) = (Arc::clone(&batch), Arc::clone(&chunks));
                async move {
                    Ok::<_, anyhow::Error>(
                        tokio::task::spawn_blocking(move || batch.put(&chunks[i])).await??,
                    )
                }
            })
            .buffer_unordered(8)
            .try_collect()
            .await?;
        let Ok(batch) = Arc::try_unwrap(batch) else {
            bail!("the put batch is still shared")
        };
        batch.commit()?;
        let d = t.elapsed();
        println!(
            "| ChunkStore::put from memory, 8 in flight, one batch + syncfs ({where_}) | {:.2} | {:.0} | {:.0} |",
            d.as_secs_f64(),
            mib(total),
            mib(total) / d.as_secs_f64()
        );
        if where_ == "disk" {
            // The two halves of a restore: gets (read, decrypt, decompress, verify)...
            drop_caches();
            let t = Instant::now();
            let got = stream::iter(ids)
                .map(|o| {
                    let store = store.clone();
                    async move {
                        let n = tokio::task::spawn_blocking(move || store.get(&o.id)).await??;
                        Ok::<_, anyhow::Error>(n.len() as u64)
                    }
                })
                .buffer_unordered(RESTORE_PARALLEL)
                .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
                .await?;
            let d = t.elapsed();
            println!(
                "| ChunkStore::get, {RESTORE_PARALLEL} in flight, cold cache (distinct chunks) | {:.2} | {:.0} | {:.0} |",
                d.as_secs_f64(),
                mib(got),
                mib(got) / d.as_secs_f64()
            );
            // ... and writing the image: pwrite from memory + fsync, no store at all.
            let out = work.join("pwrite.raw");
            let f = Arc::new(File::create(&out)?);
            f.set_len(image.size)?;
            let t = Instant::now();
            stream::iter(0..chunks.len())
                .map(|i| {
                    let (f, chunks) = (Arc::clone(&f), Arc::clone(&chunks));
                    async move {
                        tokio::task::spawn_blocking(move || {
                            let at = i as u64 * u64::from(chunk_size);
                            f.write_all_at(&chunks[i], at)?;
                            // As the restore does: write-back starts at once.
                            weft_blockdev::store::start_writeback(&f, at, chunks[i].len() as u64);
                            Ok::<_, std::io::Error>(())
                        })
                        .await??;
                        Ok::<_, anyhow::Error>(())
                    }
                })
                .buffer_unordered(RESTORE_PARALLEL)
                .try_collect::<Vec<()>>()
                .await?;
            f.sync_all()?;
            let d = t.elapsed();
            println!(
                "| pwrite from memory, {RESTORE_PARALLEL} in flight, write-back started per write, + fsync (no store) | {:.2} | {:.0} | {:.0} |",
                d.as_secs_f64(),
                mib(total),
                mib(total) / d.as_secs_f64()
            );
            fs::remove_file(&out)?;
        }
        drop(store);
        fs::remove_dir_all(&root)?;
    }
    Ok(())
}
