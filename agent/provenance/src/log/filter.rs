//! A bloom filter over the keys, tables, sources and (table, key) pairs of a block's
//! records, so that a query by key, table or source skips the blocks that cannot hold a
//! match.
//!
//! The hash is FNV-1a (64 bit) with a splitmix64 finaliser, fixed here because filters
//! are stored in segment indexes: changing it is a format change.

use serde::{Deserialize, Serialize};

/// Bits per distinct item (about 1 % false positives with [`HASHES`] probes).
const BITS_PER_ITEM: usize = 10;
/// Probes per item.
const HASHES: u32 = 7;
/// Most bits of one filter (64 KiB): a block never holds more distinct items than this
/// makes useful, and a stored index cannot make us allocate more.
pub const MAX_WORDS: usize = 8192;

/// Which field an item is from (a key equal to a table name must not match the table).
#[derive(Debug, Clone, Copy)]
pub enum Field {
    /// `entry.key`.
    Key,
    /// `entry.collection`.
    Collection,
    /// `entry.source`.
    Source,
}

impl Field {
    fn tag(self) -> u8 {
        match self {
            Field::Key => b'k',
            Field::Collection => b'c',
            Field::Source => b's',
        }
    }
}

/// A fixed-size bloom filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bloom {
    words: Vec<u64>,
}

fn fnv(bytes: impl Iterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix(h)
}

/// The hash of one field's value.
pub fn hash(field: Field, item: &str) -> u64 {
    fnv(std::iter::once(field.tag()).chain(item.bytes()))
}

/// The hash of a SQLite row: its table and key together (names hold no NUL, so the
/// separator is unambiguous).
pub fn hash_row(collection: &str, key: &str) -> u64 {
    fnv(std::iter::once(b'r')
        .chain(collection.bytes())
        .chain(std::iter::once(0))
        .chain(key.bytes()))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Bloom {
    /// A filter sized for `items` distinct items.
    pub fn with_capacity(items: usize) -> Bloom {
        let words = (items * BITS_PER_ITEM).div_ceil(64).clamp(1, MAX_WORDS);
        Bloom {
            words: vec![0; words],
        }
    }

    /// Whether the stored shape is usable (a corrupt index must not make us divide by 0).
    pub fn is_valid(&self) -> bool {
        (1..=MAX_WORDS).contains(&self.words.len())
    }

    fn probes(&self, h: u64) -> impl Iterator<Item = usize> {
        let (h1, h2) = (h as u32 as u64, (h >> 32) | 1);
        let bits = (self.words.len() * 64) as u64;
        (0..u64::from(HASHES)).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) % bits) as usize)
    }

    /// Adds an item by its hash ([`hash`], [`hash_row`]).
    pub fn insert_hash(&mut self, h: u64) {
        let probes: Vec<usize> = self.probes(h).collect();
        for bit in probes {
            self.words[bit / 64] |= 1 << (bit % 64);
        }
    }

    /// Adds an item.
    pub fn insert(&mut self, field: Field, item: &str) {
        self.insert_hash(hash(field, item));
    }

    /// False when the item of this hash was certainly never added.
    pub fn may_contain_hash(&self, h: u64) -> bool {
        if self.words.is_empty() {
            return true;
        }
        self.probes(h)
            .all(|bit| self.words[bit / 64] & (1 << (bit % 64)) != 0)
    }

    /// False when the item was certainly never added.
    pub fn may_contain(&self, field: Field, item: &str) -> bool {
        self.may_contain_hash(hash(field, item))
    }

    /// Bytes the filter takes.
    pub fn bytes(&self) -> usize {
        self.words.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_items_are_found_and_fields_are_distinct() {
        let mut b = Bloom::with_capacity(100);
        for i in 0..100 {
            b.insert(Field::Key, &format!("[{i}]"));
        }
        b.insert(Field::Collection, "customers");
        for i in 0..100 {
            assert!(b.may_contain(Field::Key, &format!("[{i}]")));
        }
        assert!(b.may_contain(Field::Collection, "customers"));
        let false_hits = (1000..11_000)
            .filter(|i| b.may_contain(Field::Key, &format!("[{i}]")))
            .count();
        assert!(false_hits < 400, "{false_hits} false positives of 10000");
        // The same text as another field is (almost always) not a hit.
        assert!(!b.may_contain(Field::Source, "customers"));
        b.insert_hash(hash_row("customers", "[1]"));
        assert!(b.may_contain_hash(hash_row("customers", "[1]")));
        assert!(!b.may_contain_hash(hash_row("orders", "[1]")));
    }

    #[test]
    fn sizes_are_bounded() {
        assert_eq!(Bloom::with_capacity(0).bytes(), 8);
        assert_eq!(Bloom::with_capacity(usize::MAX / 64).bytes(), MAX_WORDS * 8);
        assert!(!Bloom { words: vec![] }.is_valid());
    }
}
