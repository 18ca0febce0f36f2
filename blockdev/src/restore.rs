//! Reading a snapshot back out of the chunk store.
//!
//! Adjacent data chunks are read as one *group* of up to [`GROUP_BYTES`] and written with
//! one call, so the writes (a `pwrite`, or an NBD request when QEMU writes a qcow2) stay
//! large whatever the store's chunk size; many groups are read in parallel, because a
//! cold read of a chunk file waits on the disk more than on the CPU.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::stream::{self, StreamExt, TryStreamExt};

use crate::pull::Progress;
use crate::store::{self, BlockMap, ChunkId, ChunkStore, Slot};

/// Bytes of adjacent data chunks read and written as one group (at least one chunk).
pub const GROUP_BYTES: u64 = 1 << 20;
/// Groups read at once.
pub const PARALLEL_GROUPS: usize = 48;

/// Adjacent data chunks of a block map, from `offset` on.
#[derive(Debug, Clone)]
pub struct Group {
    /// Disk offset of the first chunk.
    pub offset: u64,
    /// The chunks, in disk order, with no gap between them.
    pub chunks: Vec<ChunkId>,
}

/// The data chunks of `map` cut into groups of adjacent slots of at most
/// [`GROUP_BYTES`] (a single chunk when chunks are larger); zero slots are skipped.
pub fn data_groups(map: &BlockMap) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    let mut last: Option<usize> = None;
    for (i, slot) in map.slots.iter().enumerate() {
        let Slot::Data(id) = slot else { continue };
        let joins = last == Some(i.wrapping_sub(1))
            && out.last().is_some_and(|g| {
                (g.chunks.len() as u64 + 1) * u64::from(map.chunk_size) <= GROUP_BYTES
            });
        match out.last_mut() {
            Some(g) if joins => g.chunks.push(*id),
            _ => out.push(Group {
                offset: map.chunk_offset(i),
                chunks: vec![*id],
            }),
        }
        last = Some(i);
    }
    out
}

/// Bytes of data (not zero) chunks in `map`: what a restore writes.
pub fn data_bytes(map: &BlockMap) -> u64 {
    map.data_bytes()
}

/// Reads the chunks of one group, concatenated (blocking).
pub fn read_group(store: &ChunkStore, group: &Group) -> Result<Vec<u8>, store::Error> {
    let mut out = Vec::with_capacity(group.chunks.len() * store.chunk_size() as usize);
    for id in &group.chunks {
        out.extend_from_slice(&store.get(id)?);
    }
    Ok(out)
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The chunk store failed (missing or corrupt chunk, I/O).
    #[error("restore: {0}")]
    Store(#[from] store::Error),
    /// Writing the output failed.
    #[error("restore: write at offset {offset}: {source}")]
    Write {
        /// Disk offset of the failed write.
        offset: u64,
        /// The cause.
        source: std::io::Error,
    },
    /// A blocking task died.
    #[error("restore: task failed: {0}")]
    Task(String),
}

/// Writes the data chunks of `map` into `file` at their offsets (zero chunks are
/// skipped: the caller sizes the file first, so they read as holes) and returns the
/// bytes written. Does not fsync.
pub async fn restore_into_file(
    store: &ChunkStore,
    map: &BlockMap,
    file: Arc<File>,
    progress: &dyn Progress,
) -> Result<u64, Error> {
    let total = data_bytes(map);
    let done = AtomicU64::new(0);
    let done = &done;
    stream::iter(data_groups(map))
        .map(|group| {
            let (store, file) = (store.clone(), Arc::clone(&file));
            async move {
                let n = tokio::task::spawn_blocking(move || -> Result<u64, Error> {
                    let data = read_group(&store, &group)?;
                    file.write_all_at(&data, group.offset)
                        .map_err(|source| Error::Write {
                            offset: group.offset,
                            source,
                        })?;
                    Ok(data.len() as u64)
                })
                .await
                .map_err(|e| Error::Task(e.to_string()))??;
                progress.update(done.fetch_add(n, Ordering::Relaxed) + n, total);
                Ok::<u64, Error>(n)
            }
        })
        .buffer_unordered(PARALLEL_GROUPS)
        .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        let mut b = [0u8; 32];
        b[0] = n;
        ChunkId(b)
    }

    #[test]
    fn groups_join_adjacent_data_slots_up_to_the_limit() {
        let cs = 256 << 10; // 4 per group
        let mut map = BlockMap::new(10 * cs as u64, cs);
        for i in [0, 1, 2, 3, 4, 6, 7, 9] {
            map.slots[i] = Slot::Data(id(i as u8));
        }
        let g = data_groups(&map);
        let shape: Vec<(u64, usize)> = g.iter().map(|g| (g.offset, g.chunks.len())).collect();
        let c = u64::from(cs);
        assert_eq!(shape, [(0, 4), (4 * c, 1), (6 * c, 2), (9 * c, 1)]);
        assert_eq!(g[2].chunks, [id(6), id(7)]);
    }

    #[test]
    fn chunks_larger_than_a_group_stay_alone() {
        let cs = 4 << 20;
        let mut map = BlockMap::new(3 * cs as u64, cs);
        map.slots.fill(Slot::Data(id(1)));
        assert_eq!(data_groups(&map).len(), 3);
    }
}
