//! A small LRU cache of decoded blocks, shared by all VMs: recent reads (a `tail
//! --follow`, a replay going over the same range again) do not decompress twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::segment::Decoded;

/// A block: its shard's generation (unique per open shard), its segment and offset.
pub type BlockKey = (u64, u64, u64);

/// An LRU cache bounded in blocks.
pub struct BlockCache {
    capacity: usize,
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    tick: u64,
    map: HashMap<BlockKey, (u64, Arc<Decoded>)>,
    order: BTreeMap<u64, BlockKey>,
}

impl BlockCache {
    /// A cache of at most `capacity` blocks (0 disables it).
    pub fn new(capacity: usize) -> BlockCache {
        BlockCache {
            capacity,
            inner: Mutex::new(Lru::default()),
        }
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
            (old, slot.1.clone())
        };
        lru.order.remove(&old);
        lru.order.insert(tick, *key);
        Some(value)
    }

    /// Caches a block, evicting the least recently used beyond the capacity.
    pub fn put(&self, key: BlockKey, value: Arc<Decoded>) {
        if self.capacity == 0 {
            return;
        }
        let mut lru = self.lock();
        lru.tick += 1;
        let tick = lru.tick;
        if let Some((old, _)) = lru.map.insert(key, (tick, value)) {
            lru.order.remove(&old);
        }
        lru.order.insert(tick, key);
        while lru.map.len() > self.capacity {
            let Some((_, victim)) = lru.order.pop_first() else {
                break;
            };
            lru.map.remove(&victim);
        }
    }

    /// Drops every block of one shard generation.
    pub fn forget_shard(&self, generation: u64) {
        let mut lru = self.lock();
        let victims: Vec<(u64, BlockKey)> = lru
            .map
            .iter()
            .filter(|(k, _)| k.0 == generation)
            .map(|(k, (t, _))| (*t, *k))
            .collect();
        for (tick, key) in victims {
            lru.order.remove(&tick);
            lru.map.remove(&key);
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
        let c = BlockCache::new(2);
        let v = Arc::new(Vec::new());
        c.put((1, 1, 1), v.clone());
        c.put((1, 1, 2), v.clone());
        assert!(c.get(&(1, 1, 1)).is_some());
        c.put((1, 1, 3), v.clone());
        assert!(
            c.get(&(1, 1, 2)).is_none(),
            "the least recently used was evicted"
        );
        assert!(c.get(&(1, 1, 1)).is_some());
        assert!(c.get(&(1, 1, 3)).is_some());
        c.put((2, 1, 1), v);
        c.forget_shard(1);
        assert_eq!(c.len(), 1);
    }
}
