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
    cache: quick_cache::sync::Cache<ChunkId, Chunk, ChunkWeight>,
}

#[derive(Clone)]
struct ChunkWeight;

/// A decompressed, verified chunk (an `Arc<Vec>`: the store's buffer is kept as it is,
/// not copied into an `Arc<[u8]>`).
pub type Chunk = Arc<Vec<u8>>;

impl quick_cache::Weighter<ChunkId, Chunk> for ChunkWeight {
    fn weight(&self, _: &ChunkId, v: &Chunk) -> u64 {
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

    /// The chunk's bytes, from the cache or read from the store and checked by their
    /// checksum (CRC-32, or the GCM tag in an encrypted store): a disk being served
    /// reads every chunk it touches, and recomputing SHA-256 ids was a third of
    /// weft-blk's CPU time on a sequential read. `weft store verify` checks the ids.
    /// Chunk files are read with `O_DIRECT` where the file system allows it: this cache
    /// and the [`Assembly`] keep what is read, a page-cache copy would be a third one.
    pub fn get(&self, id: &ChunkId) -> Result<Chunk, store::Error> {
        self.cache.get_or_insert_with(id, || {
            self.store
                .get_direct(id, store::Check::Checksum)
                .map(Arc::new)
        })
    }

    /// The store behind the cache.
    pub fn store(&self) -> &ChunkStore {
        &self.store
    }
}

/// The chunks of a composed disk read so far, kept decompressed and verified in a
/// sparse file at their disk offsets (the disk *assembled* as it is read).
///
/// A read of a slot already there is a plain `pread` of the bytes asked for (through
/// the host page cache, like a qcow2 cluster), not a chunk fetch: no file open per
/// chunk, no decompression, no check, and no 32-fold amplification for a 4 KiB read of
/// a 128 KiB chunk. The file is a cache: it is created empty when the disk is opened,
/// holds only bytes that passed the store's checks ([`ChunkCache::get`]), and is never written by
/// the guest (its writes go to the write layer). It grows up to the data the guest has
/// read. A write to it that fails (a full file system) switches it off; reads go on
/// from the store.
pub struct Assembly {
    file: std::fs::File,
    path: std::path::PathBuf,
    /// One bit per slot: set once the slot's bytes are in the file.
    present: Vec<std::sync::atomic::AtomicU64>,
    enabled: std::sync::atomic::AtomicBool,
}

impl Assembly {
    /// Creates (or empties) the file at `path` for a disk of `size` bytes in `slots` slots.
    pub fn create(path: &std::path::Path, size: u64, slots: usize) -> std::io::Result<Assembly> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.set_len(size)?;
        Ok(Assembly {
            file,
            path: path.to_path_buf(),
            present: (0..slots.div_ceil(64))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            enabled: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Whether `slot`'s bytes are in the file.
    pub fn has(&self, slot: usize) -> bool {
        self.present
            .get(slot / 64)
            .is_some_and(|w| w.load(std::sync::atomic::Ordering::Acquire) & (1 << (slot % 64)) != 0)
    }

    /// Slots in the file.
    pub fn slots_present(&self) -> u64 {
        self.present
            .iter()
            .map(|w| u64::from(w.load(std::sync::atomic::Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Keeps `data` (slot `slot`'s verified bytes, at disk offset `offset`).
    fn keep(&self, slot: usize, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering;
        if self.has(slot) || !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        match self.file.write_all_at(data, offset) {
            Ok(()) => {
                if let Some(w) = self.present.get(slot / 64) {
                    w.fetch_or(1 << (slot % 64), Ordering::Release);
                }
            }
            Err(e) => {
                if self.enabled.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "assembly {}: {e}; reading from the chunk store only from now on",
                        self.path.display()
                    );
                }
            }
        }
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset)
    }
}

/// Chunks fetched at once for one read that spans several chunks.
pub const PARALLEL_FETCH: usize = 8;
/// Chunks read ahead of a sequential reader.
pub const READAHEAD_CHUNKS: u64 = 128;
/// Threads that read ahead.
const READAHEAD_THREADS: usize = 16;

/// A read-only composed disk: one flattened block map read through a chunk cache.
///
/// A read that spans several chunks fetches the missing ones in parallel (a chunk
/// fetch is a file read, a decompression and a checksum check; on a cold page cache it
/// waits on the disk). A read that starts where the previous one ended also queues the
/// next [`READAHEAD_CHUNKS`] chunks for background threads, so a sequential reader
/// finds them in the cache.
pub struct ComposedImage {
    map: Arc<BlockMap>,
    cache: Arc<ChunkCache>,
    assembly: Option<Arc<Assembly>>,
    last_end: std::sync::atomic::AtomicU64,
    ahead: std::sync::Mutex<Option<std::sync::mpsc::Sender<usize>>>,
}

impl ComposedImage {
    /// A reader of `map` (the result of [`compose`]) over `cache`.
    pub fn new(map: BlockMap, cache: ChunkCache) -> ComposedImage {
        ComposedImage::with_assembly(map, cache, None)
    }

    /// A reader of `map` over `cache` that keeps what it reads in `assembly` (created
    /// for this map's size and slots).
    pub fn with_assembly(
        map: BlockMap,
        cache: ChunkCache,
        assembly: Option<Assembly>,
    ) -> ComposedImage {
        let map = Arc::new(map);
        let cache = Arc::new(cache);
        let assembly = assembly.map(Arc::new);
        let (tx, rx) = std::sync::mpsc::channel::<usize>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for _ in 0..READAHEAD_THREADS {
            let (map, cache, assembly, rx) = (
                Arc::clone(&map),
                Arc::clone(&cache),
                assembly.clone(),
                Arc::clone(&rx),
            );
            let spawned = std::thread::Builder::new()
                .name("weft-readahead".into())
                .spawn(move || loop {
                    let next = rx.lock().map(|r| r.recv());
                    match next {
                        Ok(Ok(slot)) => {
                            // Errors show on the guest's own read of the chunk.
                            let _ = fetch_slot(&map, &cache, assembly.as_deref(), slot);
                        }
                        _ => return,
                    }
                });
            if spawned.is_err() {
                break;
            }
        }
        ComposedImage {
            map,
            cache,
            assembly,
            last_end: std::sync::atomic::AtomicU64::new(u64::MAX),
            ahead: std::sync::Mutex::new(Some(tx)),
        }
    }

    /// The assembly, if this image keeps one.
    pub fn assembly(&self) -> Option<&Assembly> {
        self.assembly.as_deref()
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

    fn assembled(&self, slot: usize) -> bool {
        self.assembly.as_ref().is_some_and(|a| a.has(slot))
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
                        let wanted = self.data_id(slot).is_some_and(|id| {
                            !self.assembled(slot) && self.cache.cache.peek(&id).is_none()
                        });
                        if wanted {
                            let _ = tx.send(slot);
                        }
                    }
                }
            }
        }
        // Fetch the chunks this read needs in parallel when there are several.
        let missing: Vec<usize> = (first..=last)
            .filter(|&s| self.data_id(s).is_some() && !self.assembled(s))
            .collect();
        let mut fetched: HashMap<usize, Chunk> = HashMap::new();
        if missing.len() > 1 {
            let (map, cache, assembly) = (&*self.map, &*self.cache, self.assembly.as_deref());
            for (slot, r) in crate::par::map(missing, PARALLEL_FETCH, |slot| {
                (slot, fetch_slot(map, cache, assembly, slot))
            }) {
                if let Some(data) = r? {
                    fetched.insert(slot, data);
                }
            }
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let slot = self.map.slot_of(pos);
            let within = (pos % chunk) as usize;
            let n = (buf.len() - done).min(chunk as usize - within);
            let out = &mut buf[done..done + n];
            let data = match fetched.remove(&slot) {
                Some(d) => Some(d),
                None if self.assembled(slot) => {
                    let a = self
                        .assembly
                        .as_ref()
                        .expect("assembled implies an assembly");
                    a.read(out, pos).map_err(|e| store::Error::Io {
                        op: "read assembly",
                        path: a.path.clone(),
                        source: e,
                    })?;
                    done += n;
                    continue;
                }
                None => fetch_slot(&self.map, &self.cache, self.assembly.as_deref(), slot)?,
            };
            match data {
                Some(data) => {
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

/// The bytes of `slot` (`None` for a zero slot) from the chunk cache or the store,
/// kept in the assembly on the way.
fn fetch_slot(
    map: &BlockMap,
    cache: &ChunkCache,
    assembly: Option<&Assembly>,
    slot: usize,
) -> Result<Option<Chunk>, store::Error> {
    let Some(Slot::Data(id)) = map.slots.get(slot) else {
        return Ok(None);
    };
    let data = cache.get(id)?;
    if let Some(a) = assembly {
        a.keep(slot, map.chunk_offset(slot), &data);
    }
    Ok(Some(data))
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
    fn the_assembly_serves_re_reads() {
        let tmp = tempfile::tempdir().unwrap();
        let cs: u32 = 64 << 10;
        let cfg = store::StoreConfig::with_chunk_size(cs);
        let st = ChunkStore::create(&tmp.path().join("store"), None, &cfg, None).unwrap();
        let c = cs as usize;
        let size = 4 * c;
        let disk: Vec<u8> = (0..size).map(|i| (i * 31 % 253) as u8).collect();
        let mut m = BlockMap::new(size as u64, cs);
        for i in [0, 1, 3] {
            m.slots[i] = Slot::Data(st.put(&disk[i * c..(i + 1) * c]).unwrap().id);
        }
        let mut want = disk.clone();
        want[2 * c..3 * c].fill(0);
        let a = Assembly::create(&tmp.path().join("assembly"), size as u64, 4).unwrap();
        let img = ComposedImage::with_assembly(m.clone(), ChunkCache::new(st.clone(), 1), Some(a));
        // An unaligned read across slots 0..=1, and one into the zero slot.
        let mut buf = vec![0u8; c + 100];
        img.read_at(&mut buf, 50).unwrap();
        assert_eq!(buf, want[50..50 + c + 100]);
        let mut z = vec![1u8; 4096];
        img.read_at(&mut z, 2 * c as u64 + 8).unwrap();
        assert!(z.iter().all(|&b| b == 0));
        let asm = img.assembly().unwrap();
        assert!(asm.has(0) && asm.has(1) && !asm.has(2) && !asm.has(3));
        assert_eq!(asm.slots_present(), 2);
        // With the chunk files gone, assembled slots still read (from the assembly);
        // the others fail (the cache holds one byte, so nothing else can serve them).
        for i in [0, 1, 3] {
            if let Slot::Data(id) = m.slots[i] {
                std::fs::remove_file(st.locate(&id).unwrap().1).unwrap();
            }
        }
        let mut again = vec![0u8; 2 * c];
        img.read_at(&mut again, 0).unwrap();
        assert_eq!(again, want[..2 * c]);
        assert!(img.read_at(&mut vec![0u8; 512], 3 * c as u64).is_err());
    }

    #[test]
    fn an_assembly_that_cannot_be_written_is_switched_off() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("assembly");
        let mut a = Assembly::create(&path, 8192, 2).unwrap();
        // Writes now fail (read-only descriptor): the slot is not marked, reads go on.
        a.file = std::fs::File::open(&path).unwrap();
        a.keep(0, 0, &[7u8; 4096]);
        assert!(!a.has(0));
        assert!(!a.enabled.load(std::sync::atomic::Ordering::Relaxed));
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
