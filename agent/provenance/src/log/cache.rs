//! A small LRU cache of decoded blocks, shared by all VMs: recent reads (a `tail
//! --follow`, a replay going over the same range again) do not decompress twice. It is
//! bounded in blocks and in bytes (each block counted by its decompressed size), so
//! that what guests write cannot make it hold more than [`CACHE_BYTES`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::segment::Decoded;

/// A block: its shard's generation (unique per open shard), its segment and offset.
pub type BlockKey = (u64, u64, u64);

/// Most decompressed bytes of blocks the cache holds.
pub const CACHE_BYTES: u64 = 64 << 20;

/// An LRU cache bounded in blocks and bytes.
pub struct BlockCache {
    capacity: usize,
    max_bytes: u64,
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    tick: u64,
    bytes: u64,
    /// Block → (last use, bytes, decoded block).
    map: HashMap<BlockKey, (u64, u64, Arc<Decoded>)>,
    order: BTreeMap<u64, BlockKey>,
}

impl BlockCache {
    /// A cache of at most `capacity` blocks (0 disables it) and `max_bytes`.
    pub fn new(capacity: usize, max_bytes: u64) -> BlockCache {
        BlockCache {
            capacity,
            max_bytes,
            inner: Mutex::new(Lru::default()),
        }
    }

    /// Most bytes it holds.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // A panic elsewhere cannot leave the cache inconsistent in a way that matters.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The block, if cached (it becomes the most recently used).
    pub fn get(&self, key: &BlockKey) -> Option<Arc<Decoded>> {
        let mut lru = self.lock();
        lru.tick += 1;
        let tick = lru.tick;
        let (old, value) = {
            let slot = lru.map.get_mut(key)?;
            let old = std::mem::replace(&mut slot.0, tick);
            (old, slot.2.clone())
        };
        lru.order.remove(&old);
        lru.order.insert(tick, *key);
        Some(value)
    }

    /// Caches a block of `bytes` (decompressed), evicting the least recently used
    /// beyond the capacity.
    pub fn put(&self, key: BlockKey, value: Arc<Decoded>, bytes: u64) {
        if self.capacity == 0 || bytes > self.max_bytes {
            return;
        }
        let mut lru = self.lock();
        lru.tick += 1;
        let tick = lru.tick;
        lru.bytes += bytes;
        if let Some((old, old_bytes, _)) = lru.map.insert(key, (tick, bytes, value)) {
            lru.order.remove(&old);
            lru.bytes -= old_bytes;
        }
        lru.order.insert(tick, key);
        while lru.map.len() > self.capacity || lru.bytes > self.max_bytes {
            let Some((_, victim)) = lru.order.pop_first() else {
                break;
            };
            if let Some((_, b, _)) = lru.map.remove(&victim) {
                lru.bytes -= b;
            }
        }
    }

    /// Drops every block of one shard generation.
    pub fn forget_shard(&self, generation: u64) {
        let mut lru = self.lock();
        let victims: Vec<(u64, BlockKey)> = lru
            .map
            .iter()
            .filter(|(k, _)| k.0 == generation)
            .map(|(k, (t, _, _))| (*t, *k))
            .collect();
        for (tick, key) in victims {
            lru.order.remove(&tick);
            if let Some((_, b, _)) = lru.map.remove(&key) {
                lru.bytes -= b;
            }
        }
    }

    /// Blocks held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_goes_first() {
        let c = BlockCache::new(2, 1000);
        let v = Arc::new(Vec::new());
        c.put((1, 1, 1), v.clone(), 10);
        c.put((1, 1, 2), v.clone(), 10);
        assert!(c.get(&(1, 1, 1)).is_some());
        c.put((1, 1, 3), v.clone(), 10);
        assert!(
            c.get(&(1, 1, 2)).is_none(),
            "the least recently used was evicted"
        );
        assert!(c.get(&(1, 1, 1)).is_some());
        assert!(c.get(&(1, 1, 3)).is_some());
        c.put((2, 1, 1), v, 10);
        c.forget_shard(1);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn the_cache_holds_at_most_its_bytes() {
        let c = BlockCache::new(100, 1000);
        let v = Arc::new(Vec::new());
        for i in 0..10 {
            c.put((1, 1, i), v.clone(), 300);
        }
        assert_eq!(c.len(), 3, "3 blocks of 300 bytes fit in 1000");
        assert!(c.get(&(1, 1, 9)).is_some() && c.get(&(1, 1, 6)).is_none());
        c.put((1, 2, 0), v, 2000);
        assert!(
            c.get(&(1, 2, 0)).is_none(),
            "a block over the budget is not kept"
        );
        assert_eq!(c.lock().bytes, 900);
    }
}
