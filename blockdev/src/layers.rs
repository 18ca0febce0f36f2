//! The layered image reader: a virtual disk composed of chunk-store snapshots.
//!
//! A composed disk is an ordered list of layers, bottom first. Each layer is a
//! snapshot's block map (a store index, a full snapshot or an incremental: every index
//! describes the whole disk) or the resolution map of a merge (also stored as an
//! index), optionally narrowed to ranges of slots. A higher layer wins where it has a
//! say. Composition happens once, when the disk is opened: the result is one block map
//! naming, per chunk-sized slot, the chunk to read. A read then costs the same whatever
//! the number of layers (no per-layer lookup on the I/O path, unlike a qcow2 backing
//! chain).
//!
//! Reads go through a bounded cache of decompressed chunks ([`ChunkCache`]).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::store::{self, BlockMap, ChunkId, ChunkStore, Slot};

/// One layer of a composed disk, as a disk spec names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    /// Name of the store index (snapshot block map or merge resolution map).
    pub index: String,
    /// Slot ranges `[start, end)` this layer provides; absent: the whole disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<Vec<[u64; 2]>>,
}

/// Why layers cannot be composed.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    /// No layer at all.
    #[error("a composed disk needs at least one layer")]
    Empty,
    /// Two layers disagree on the disk geometry.
    #[error(
        "layer {layer} ({index}) is {size} bytes in {chunk}-byte chunks, \
         but the bottom layer is {base_size} bytes in {base_chunk}-byte chunks: \
         layers of one disk must have the same size and chunk size"
    )]
    Geometry {
        /// Position of the layer, bottom = 0.
        layer: usize,
        /// Its index name.
        index: String,
        /// Its disk size.
        size: u64,
        /// Its chunk size.
        chunk: u32,
        /// The bottom layer's disk size.
        base_size: u64,
        /// The bottom layer's chunk size.
        base_chunk: u32,
    },
    /// A slot range is empty, reversed or past the end of the disk.
    #[error("layer {layer} ({index}): slot range {start}..{end} is not within 0..{slots}")]
    Range {
        /// Position of the layer.
        layer: usize,
        /// Its index name.
        index: String,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// Slots of the disk.
        slots: u64,
    },
    /// A block map is inconsistent.
    #[error("layer {layer} ({index}): {reason}")]
    BadMap {
        /// Position of the layer.
        layer: usize,
        /// Its index name.
        index: String,
        /// What is wrong.
        reason: String,
    },
}

/// One layer to [`compose`]: its name (for errors), its block map, and the slot
/// ranges it provides (`None`: all).
pub type Layer<'a> = (&'a str, &'a BlockMap, Option<&'a [Range<u64>]>);

/// Flattens `layers` (bottom first) into the one block map a reader uses.
pub fn compose(layers: &[Layer<'_>]) -> Result<BlockMap, ComposeError> {
    let (_, base, _) = layers.first().ok_or(ComposeError::Empty)?;
    let mut out = BlockMap::new(base.disk_size, base.chunk_size);
    let slots = out.slots.len() as u64;
    for (layer, (index, map, ranges)) in layers.iter().enumerate() {
        map.check().map_err(|reason| ComposeError::BadMap {
            layer,
            index: index.to_string(),
            reason,
        })?;
        if map.disk_size != base.disk_size || map.chunk_size != base.chunk_size {
            return Err(ComposeError::Geometry {
                layer,
                index: index.to_string(),
                size: map.disk_size,
                chunk: map.chunk_size,
                base_size: base.disk_size,
                base_chunk: base.chunk_size,
            });
        }
        match ranges {
            None => out.slots.copy_from_slice(&map.slots),
            Some(ranges) => {
                for r in ranges.iter() {
                    if r.start >= r.end || r.end > slots {
                        return Err(ComposeError::Range {
                            layer,
                            index: index.to_string(),
                            start: r.start,
                            end: r.end,
                            slots,
                        });
                    }
                    let (s, e) = (r.start as usize, r.end as usize);
                    out.slots[s..e].copy_from_slice(&map.slots[s..e]);
                }
            }
        }
    }
    Ok(out)
}

/// A bounded cache of decompressed chunks, shared by every reader of a disk.
pub struct ChunkCache {
    store: ChunkStore,
    cache: quick_cache::sync::Cache<ChunkId, Arc<[u8]>, ChunkWeight>,
}

#[derive(Clone)]
struct ChunkWeight;

impl quick_cache::Weighter<ChunkId, Arc<[u8]>> for ChunkWeight {
    fn weight(&self, _: &ChunkId, v: &Arc<[u8]>) -> u64 {
        v.len().max(1) as u64
    }
}

impl ChunkCache {
    /// A cache of at most `bytes` of decompressed chunks of `store`.
    pub fn new(store: ChunkStore, bytes: u64) -> ChunkCache {
        let chunk = u64::from(store.chunk_size().max(1));
        let items = (bytes / chunk).max(1) as usize;
        ChunkCache {
            store,
            cache: quick_cache::sync::Cache::with_weighter(items, bytes.max(chunk), ChunkWeight),
        }
    }

    /// The chunk's bytes, from the cache or read (and verified) from the store.
    pub fn get(&self, id: &ChunkId) -> Result<Arc<[u8]>, store::Error> {
        self.cache
            .get_or_insert_with(id, || self.store.get(id).map(Arc::from))
    }

    /// The store behind the cache.
    pub fn store(&self) -> &ChunkStore {
        &self.store
    }
}

/// Chunks fetched at once for one read that spans several chunks.
pub const PARALLEL_FETCH: usize = 8;
/// Chunks read ahead of a sequential reader.
pub const READAHEAD_CHUNKS: u64 = 16;
/// Threads that read ahead.
const READAHEAD_THREADS: usize = 4;

/// A read-only composed disk: one flattened block map read through a chunk cache.
///
/// A read that spans several chunks fetches the missing ones in parallel (a chunk
/// fetch is a file read, a decompression and a digest check; on a cold page cache it
/// waits on the disk). A read that starts where the previous one ended also queues the
/// next [`READAHEAD_CHUNKS`] chunks for background threads, so a sequential reader
/// finds them in the cache.
pub struct ComposedImage {
    map: Arc<BlockMap>,
    cache: Arc<ChunkCache>,
    last_end: std::sync::atomic::AtomicU64,
    ahead: std::sync::Mutex<Option<std::sync::mpsc::Sender<ChunkId>>>,
}

impl ComposedImage {
    /// A reader of `map` (the result of [`compose`]) over `cache`.
    pub fn new(map: BlockMap, cache: ChunkCache) -> ComposedImage {
        let cache = Arc::new(cache);
        let (tx, rx) = std::sync::mpsc::channel::<ChunkId>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for _ in 0..READAHEAD_THREADS {
            let (cache, rx) = (Arc::clone(&cache), Arc::clone(&rx));
            let spawned = std::thread::Builder::new()
                .name("weft-readahead".into())
                .spawn(move || loop {
                    let next = rx.lock().map(|r| r.recv());
                    match next {
                        Ok(Ok(id)) => {
                            // Errors show on the guest's own read of the chunk.
                            let _ = cache.get(&id);
                        }
                        _ => return,
                    }
                });
            if spawned.is_err() {
                break;
            }
        }
        ComposedImage {
            map: Arc::new(map),
            cache,
            last_end: std::sync::atomic::AtomicU64::new(u64::MAX),
            ahead: std::sync::Mutex::new(Some(tx)),
        }
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.map.disk_size
    }

    /// The flattened block map.
    pub fn map(&self) -> &BlockMap {
        &self.map
    }

    fn data_id(&self, slot: usize) -> Option<ChunkId> {
        match self.map.slots.get(slot) {
            Some(Slot::Data(id)) => Some(*id),
            _ => None,
        }
    }

    /// Fills `buf` with the disk's bytes at `offset`. A range past the end of the disk
    /// reads as zeros (callers bound requests by the disk size first).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), store::Error> {
        if buf.is_empty() {
            return Ok(());
        }
        let chunk = u64::from(self.map.chunk_size);
        let end = offset + buf.len() as u64;
        let (first, last) = (self.map.slot_of(offset), self.map.slot_of(end - 1));
        let sequential = self
            .last_end
            .swap(end, std::sync::atomic::Ordering::Relaxed)
            == offset;
        if sequential {
            if let Ok(guard) = self.ahead.lock() {
                if let Some(tx) = guard.as_ref() {
                    for slot in last + 1..=last + READAHEAD_CHUNKS as usize {
                        if let Some(id) = self.data_id(slot) {
                            if self.cache.cache.peek(&id).is_none() {
                                let _ = tx.send(id);
                            }
                        }
                    }
                }
            }
        }
        // Fetch the chunks this read needs in parallel when there are several.
        let mut ids: Vec<ChunkId> = (first..=last).filter_map(|s| self.data_id(s)).collect();
        ids.dedup();
        let mut fetched: HashMap<ChunkId, Arc<[u8]>> = HashMap::new();
        if ids.len() > 1 {
            let cache = &self.cache;
            for (id, r) in crate::par::map(ids, PARALLEL_FETCH, |id| (id, cache.get(&id))) {
                fetched.insert(id, r?);
            }
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let slot = self.map.slot_of(pos);
            let within = (pos % chunk) as usize;
            let n = (buf.len() - done).min(chunk as usize - within);
            let out = &mut buf[done..done + n];
            match self.data_id(slot) {
                Some(id) => {
                    let data = match fetched.get(&id) {
                        Some(d) => Arc::clone(d),
                        None => self.cache.get(&id)?,
                    };
                    let have = data.len().saturating_sub(within).min(n);
                    out[..have].copy_from_slice(&data[within..within + have]);
                    out[have..].fill(0);
                }
                None => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }
}

impl Drop for ComposedImage {
    fn drop(&mut self) {
        // Closing the channel ends the read-ahead threads.
        if let Ok(mut g) = self.ahead.lock() {
            g.take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn map(slots: &[Option<u8>]) -> BlockMap {
        let mut m = BlockMap::new(slots.len() as u64 * 4096, 4096);
        for (i, s) in slots.iter().enumerate() {
            m.slots[i] = s.map_or(Slot::Zero, |n| Slot::Data(id(n)));
        }
        m
    }

    #[test]
    fn higher_layers_win_where_they_have_a_say() {
        let a = map(&[Some(1), Some(1), Some(1), Some(1)]);
        let b = map(&[Some(2), None, Some(2), Some(2)]);
        let c = map(&[Some(3), Some(3), Some(3), Some(3)]);
        let ranges = [1..2u64, 3..4];
        let out = compose(&[("a", &a, None), ("b", &b, None), ("c", &c, Some(&ranges))]).unwrap();
        assert_eq!(out.slots, map(&[Some(2), Some(3), Some(2), Some(3)]).slots);
    }

    #[test]
    fn mismatched_or_out_of_range_layers_are_refused() {
        let a = map(&[Some(1), Some(1)]);
        let b = map(&[Some(1), Some(1), Some(1)]);
        let e = compose(&[("a", &a, None), ("b", &b, None)]).unwrap_err();
        assert!(e.to_string().contains("same size"), "{e}");
        let bad = vec![1..3u64, 0..1];
        let e = compose(&[("a", &a, Some(&bad))]).unwrap_err();
        assert!(e.to_string().contains("1..3"), "{e}");
        let empty = vec![1..1u64, 0..1];
        assert!(compose(&[("a", &a, Some(&empty))]).is_err());
        assert!(compose(&[]).is_err());
    }
}
