//! Pulling a disk image from an NBD export into the chunk store.
//!
//! A **full** pull asks the export's `base:allocation` context which extents hold data
//! and reads only those; a chunk slot with no data, or whose data is all zeros, is a
//! [`Slot::Zero`]. An **incremental** pull starts from the parent's block map and asks
//! the export's dirty-bitmap context which extents changed: only those bytes are read
//! over NBD, patched into the parent's chunk (fetched from the store) and stored again;
//! untouched slots keep the parent's chunk. So the bytes read over NBD are the bytes
//! dirtied, rounded to the bitmap's granularity.
//!
//! The block map is returned, not written: the caller writes it (making the snapshot
//! visible) only after this returns, when every chunk it references is durable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::stream::{self, StreamExt, TryStreamExt};
use ring::digest;

use crate::nbd::{self, Extent, NbdClient, NBD_STATE_DIRTY, NBD_STATE_ZERO};
use crate::store::{BlockMap, ChunkId, ChunkStore, PutBatch, Slot};

/// Groups of adjacent chunk slots processed at once (each holds its group in
/// memory, plus NBD reads in flight).
const PARALLEL_GROUPS: usize = 8;
/// Bytes of adjacent chunk slots read and stored as one group (at least one slot).
const GROUP_BYTES: u64 = 1 << 20;
/// Threads that check, before an incremental, that the parent's chunks are all there.
const EXISTENCE_THREADS: usize = 8;

/// A chunk slot and the byte ranges `(offset, length)` of it to read.
type SlotWork = (usize, Vec<(u64, u64)>);

/// What to pull.
#[derive(Debug, Clone)]
pub enum PullKind {
    /// Every allocated extent.
    Full,
    /// Only the extents the dirty-bitmap `context` marks, on top of `parent`.
    Incremental {
        /// `qemu:dirty-bitmap:<name>`.
        context: String,
        /// The block map of the previous snapshot of this disk.
        parent: BlockMap,
    },
}

/// What one pull did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullStats {
    /// Bytes the export reported as dirty (incremental) or allocated (full).
    pub bytes_marked: u64,
    /// Bytes read over NBD.
    pub bytes_read: u64,
    /// Chunks that were not in the store before.
    pub chunks_new: u64,
    /// Bytes those new chunks take in the store (after compression).
    pub bytes_stored: u64,
    /// Chunk slots written (new or deduplicated).
    pub chunks_written: u64,
    /// Time spent checking that an incremental's parent chunks are all in the store.
    pub check_time: std::time::Duration,
    /// Time spent making the chunks durable at the end (the put batch's commit).
    pub commit_time: std::time::Duration,
}

/// Progress of a pull: bytes of marked extents handled so far, of the total.
pub trait Progress: Send + Sync {
    /// Called as chunks complete.
    fn update(&self, done: u64, total: u64);
}

impl<F: Fn(u64, u64) + Send + Sync> Progress for F {
    fn update(&self, done: u64, total: u64) {
        self(done, total)
    }
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the export failed.
    #[error("pull: {0}")]
    Nbd(#[from] nbd::Error),
    /// The chunk store failed.
    #[error("pull: {0}")]
    Store(#[from] crate::store::Error),
    /// The export and the parent do not fit together.
    #[error("pull: {0}")]
    Mismatch(String),
    /// A blocking store task died.
    #[error("pull: store task failed: {0}")]
    Task(String),
}

/// Pulls the export behind `nbd` into `store` and returns the new block map.
///
/// Chunks are written through one [`PutBatch`](crate::store::PutBatch), committed
/// (one `syncfs`) before this returns, on success and on failure alike: when it
/// returns `Ok`, every chunk the map references is durable.
pub async fn pull(
    nbd: &NbdClient,
    store: Arc<ChunkStore>,
    kind: &PullKind,
    progress: &dyn Progress,
) -> Result<(BlockMap, PullStats), Error> {
    let batch = {
        let store = Arc::clone(&store);
        Arc::new(blocking(move || store.batch()).await??)
    };
    let result = pull_into(nbd, store, Arc::clone(&batch), kind, progress).await;
    let commit_started = std::time::Instant::now();
    let committed = blocking(move || match Arc::try_unwrap(batch) {
        Ok(b) => b.commit(),
        // Unreachable (every task holding a clone has finished); the marker
        // stays and the next batch re-checks its chunks.
        Err(_) => Ok(()),
    })
    .await?;
    let (map, mut stats) = result?;
    committed?;
    stats.commit_time = commit_started.elapsed();
    Ok((map, stats))
}

async fn pull_into(
    nbd: &NbdClient,
    store: Arc<ChunkStore>,
    batch: Arc<PutBatch>,
    kind: &PullKind,
    progress: &dyn Progress,
) -> Result<(BlockMap, PullStats), Error> {
    let size = nbd.size();
    let chunk_size = store.chunk_size();
    let (marked, parent) = match kind {
        PullKind::Full => {
            let extents = nbd.block_status_all("base:allocation").await?;
            (select(&extents, |f| f & NBD_STATE_ZERO == 0), None)
        }
        PullKind::Incremental { context, parent } => {
            if parent.disk_size != size || parent.chunk_size != chunk_size {
                return Err(Error::Mismatch(format!(
                    "the parent block map ({} bytes in {}-byte chunks) does not fit the export ({size} bytes, {chunk_size}-byte chunks)",
                    parent.disk_size, parent.chunk_size
                )));
            }
            let extents = nbd.block_status_all(context).await?;
            (select(&extents, |f| f & NBD_STATE_DIRTY != 0), Some(parent))
        }
    };
    let mut map = BlockMap::new(size, chunk_size);
    let mut marked = marked;
    let check_started = std::time::Instant::now();
    if let Some(parent) = parent {
        map.slots.clone_from(&parent.slots);
        // A parent chunk the store no longer has (quarantined by verify, lost) is read
        // whole from the export, which shows the entire disk: the snapshot stays
        // complete and the chunk is stored again, healing older snapshots too.
        let store_ref = Arc::clone(&store);
        let slots = map.slots.clone();
        let lost: Vec<usize> = blocking(move || {
            // One existence check per distinct chunk, not per slot, spread over
            // threads: on a cold cache each check reads an inode, and the disk
            // serves several at once (8200 checks: 115 ms on one thread, 55 ms on 8).
            let distinct: Vec<ChunkId> = slots
                .iter()
                .filter_map(|s| match s {
                    Slot::Data(id) => Some(*id),
                    Slot::Zero => None,
                })
                .collect::<std::collections::HashSet<_>>()
                .into_iter()
                .collect();
            let missing: std::collections::HashSet<ChunkId> = std::thread::scope(|scope| {
                let workers: Vec<_> = distinct
                    .chunks(distinct.len().div_ceil(EXISTENCE_THREADS).max(1))
                    .map(|ids| {
                        let store = &store_ref;
                        scope.spawn(move || {
                            ids.iter()
                                .filter(|id| !store.contains(id))
                                .copied()
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect()
            });
            slots
                .iter()
                .enumerate()
                .filter(|(_, s)| matches!(s, Slot::Data(id) if missing.contains(id)))
                .map(|(i, _)| i)
                .collect()
        })
        .await?;
        for i in lost {
            map.slots[i] = Slot::Zero;
            marked.push((map.chunk_offset(i), u64::from(map.chunk_len(i))));
        }
        marked.sort_unstable();
        marked = merge(&marked);
    }
    let total: u64 = marked.iter().map(|(_, len)| len).sum();
    // The marked ranges of each slot that has any.
    let mut work: Vec<SlotWork> = Vec::new();
    for (start, len) in &marked {
        let (mut at, end) = (*start, start + len);
        while at < end {
            let slot = map.slot_of(at);
            let slot_end = map.chunk_offset(slot) + u64::from(map.chunk_len(slot));
            let piece_end = end.min(slot_end);
            match work.last_mut() {
                Some((s, ranges)) if *s == slot => ranges.push((at, piece_end - at)),
                _ => work.push((slot, vec![(at, piece_end - at)])),
            }
            at = piece_end;
        }
    }

    // Adjacent slots are handled together, up to GROUP_BYTES: one NBD request
    // then covers several small chunks (QEMU's cost is per request).
    let mut groups: Vec<Vec<SlotWork>> = Vec::new();
    for (slot, ranges) in work {
        let joins = groups.last().is_some_and(|g| {
            let (first, last) = (g[0].0, g[g.len() - 1].0);
            slot == last + 1 && (slot - first + 1) as u64 * u64::from(chunk_size) <= GROUP_BYTES
        });
        match groups.last_mut() {
            Some(g) if joins => g.push((slot, ranges)),
            _ => groups.push(vec![(slot, ranges)]),
        }
    }

    let done = AtomicU64::new(0);
    let stats = std::sync::Mutex::new(PullStats {
        bytes_marked: total,
        check_time: check_started.elapsed(),
        ..PullStats::default()
    });
    let map_ref = &map;
    let results: Vec<Vec<(usize, Slot)>> = stream::iter(groups)
        .map(|group| {
            let store = Arc::clone(&store);
            let batch = Arc::clone(&batch);
            let (done, stats) = (&done, &stats);
            async move {
                let base = map_ref.chunk_offset(group[0].0);
                let last = group[group.len() - 1].0;
                let end = map_ref.chunk_offset(last) + u64::from(map_ref.chunk_len(last));
                let mut buf = vec![0u8; (end - base) as usize];
                // Parents of the slots only partly rewritten (whole ones need none).
                for (slot, ranges) in &group {
                    let len = map_ref.chunk_len(*slot) as usize;
                    let covered: u64 = ranges.iter().map(|(_, l)| l).sum();
                    let Slot::Data(id) = map_ref.slots[*slot] else {
                        continue;
                    };
                    if covered == len as u64 {
                        continue;
                    }
                    let store = Arc::clone(&store);
                    let parent = blocking(move || store.get(&id)).await??;
                    if parent.len() != len {
                        return Err(Error::Mismatch(format!(
                            "parent chunk of slot {slot} holds {} bytes, not {len}",
                            parent.len()
                        )));
                    }
                    let at = (map_ref.chunk_offset(*slot) - base) as usize;
                    buf[at..at + len].copy_from_slice(&parent);
                }
                let mut read = 0u64;
                let mut ranges: Vec<(u64, u64)> =
                    group.iter().flat_map(|(_, r)| r.iter().copied()).collect();
                ranges = merge(&ranges);
                for (start, rlen) in ranges {
                    let mut at = start;
                    while at < start + rlen {
                        let n = (start + rlen - at).min(u64::from(nbd.max_request()));
                        let from = (at - base) as usize;
                        // n <= max_request (a u32) by construction.
                        nbd.read_into(at, &mut buf[from..from + n as usize]).await?;
                        at += n;
                        read += n;
                    }
                }
                let slots: Vec<usize> = group.iter().map(|(s, _)| *s).collect();
                let offsets: Vec<(usize, usize)> = slots
                    .iter()
                    .map(|s| {
                        let at = (map_ref.chunk_offset(*s) - base) as usize;
                        (at, at + map_ref.chunk_len(*s) as usize)
                    })
                    .collect();
                let outcomes = blocking(move || {
                    offsets
                        .into_iter()
                        .map(|(from, to)| {
                            let chunk = &buf[from..to];
                            if chunk.iter().all(|b| *b == 0) {
                                Ok(None)
                            } else {
                                batch.put(chunk).map(Some)
                            }
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .await??;
                let mut new_slots = Vec::with_capacity(slots.len());
                {
                    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
                    s.bytes_read += read;
                    for (slot, outcome) in slots.into_iter().zip(outcomes) {
                        new_slots.push((
                            slot,
                            match outcome {
                                None => Slot::Zero,
                                Some(o) => {
                                    s.chunks_written += 1;
                                    if o.new {
                                        s.chunks_new += 1;
                                        s.bytes_stored += o.stored_bytes;
                                    }
                                    Slot::Data(o.id)
                                }
                            },
                        ));
                    }
                }
                let marked_here: u64 = group
                    .iter()
                    .flat_map(|(_, r)| r.iter().map(|(_, l)| l))
                    .sum();
                let now = done.fetch_add(marked_here, Ordering::Relaxed) + marked_here;
                progress.update(now, total);
                Ok::<_, Error>(new_slots)
            }
        })
        .buffer_unordered(PARALLEL_GROUPS)
        .try_collect()
        .await?;
    for (slot, value) in results.into_iter().flatten() {
        map.slots[slot] = value;
    }
    let stats = stats.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok((map, stats))
}

/// The content digest of an image from its block map: SHA-256 over, per chunk slot,
/// `0x00 ‖ length (u32 LE)` for a zero slot or `0x01 ‖ chunk id` for a data slot.
/// Chunk ids are content hashes (keyed in an encrypted store), so equal digests mean
/// equal images within one store; restore re-derives every id from the data it writes.
pub fn digest_of(map: &BlockMap) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for (i, slot) in map.slots.iter().enumerate() {
        match slot {
            Slot::Zero => {
                ctx.update(&[0]);
                ctx.update(&map.chunk_len(i).to_le_bytes());
            }
            Slot::Data(id) => {
                ctx.update(&[1]);
                ctx.update(id.as_bytes());
            }
        }
    }
    let d = ctx.finish();
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest of raw image bytes, chunked as `map` chunks them, with `id_of` giving a
/// chunk's id: what [`digest_of`] must equal for a faithful restore.
pub fn digest_of_data(data: &[u8], chunk_size: u32, id_of: impl Fn(&[u8]) -> ChunkId) -> String {
    let mut map = BlockMap::new(data.len() as u64, chunk_size);
    for (i, piece) in data.chunks(chunk_size as usize).enumerate() {
        map.slots[i] = if piece.iter().all(|b| *b == 0) {
            Slot::Zero
        } else {
            Slot::Data(id_of(piece))
        };
    }
    digest_of(&map)
}

/// Sorted ranges with overlapping or touching ones merged.
fn merge(sorted: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(start, len) in sorted {
        match out.last_mut() {
            Some((s, l)) if start <= *s + *l => *l = (*l).max(start + len - *s),
            _ => out.push((start, len)),
        }
    }
    out
}

/// The ranges `(offset, length)` of the extents whose flags satisfy `keep`, merged.
fn select(extents: &[Extent], keep: impl Fn(u32) -> bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in extents.iter().filter(|e| keep(e.flags) && e.length > 0) {
        match out.last_mut() {
            Some((start, len)) if *start + *len == e.offset => *len += e.length,
            _ => out.push((e.offset, e.length)),
        }
    }
    out
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Task(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_joins_overlapping_and_touching_ranges() {
        assert_eq!(
            merge(&[(0, 10), (5, 10), (15, 5), (30, 1)]),
            [(0, 20), (30, 1)]
        );
        assert_eq!(merge(&[(0, 10), (2, 3)]), [(0, 10)]);
        assert!(merge(&[]).is_empty());
    }

    #[test]
    fn select_merges_adjacent_kept_extents() {
        let e = |offset, length, flags| Extent {
            offset,
            length,
            flags,
        };
        let extents = [e(0, 10, 1), e(10, 5, 1), e(15, 5, 0), e(20, 5, 1)];
        assert_eq!(select(&extents, |f| f & 1 != 0), [(0, 15), (20, 5)]);
        assert_eq!(select(&extents, |f| f & 1 == 0), [(15, 5)]);
    }
}
