//! Snapshot block maps and their index-file encoding (format version 1).
//!
//! ```text
//! offset size
//!  0      4   magic "WFIX"
//!  4      2   format version (u16 LE, 1)
//!  6      1   checksum kind: 1 = SHA-256, 2 = HMAC-SHA256 (index key)
//!  7      1   reserved, zero
//!  8      8   disk size in bytes (u64 LE)
//! 16      4   chunk size (u32 LE)
//! 20      4   reserved, zero
//! 24      8   slot count (u64 LE) = ceil(disk size / chunk size)
//! 32      ..  slots: tag byte 0 = Zero, 1 = Data followed by the 32-byte chunk id
//! end-32 32   checksum of every preceding byte
//! ```

use ring::{digest, hmac};

use super::ChunkId;

const MAGIC: &[u8; 4] = b"WFIX";
pub(crate) const VERSION: u16 = 1;
const HEADER_LEN: usize = 32;
const SUM_LEN: usize = 32;
const SUM_SHA256: u8 = 1;
const SUM_HMAC: u8 = 2;
const TAG_ZERO: u8 = 0;
const TAG_DATA: u8 = 1;

/// One chunk-sized slot of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// All zeros or unallocated: nothing stored, restore leaves a hole.
    Zero,
    /// The chunk holding this slot's bytes.
    Data(ChunkId),
}

/// A snapshot of one disk: which chunk holds each chunk-sized slot.
/// The last slot may be shorter than `chunk_size` (see [`BlockMap::chunk_len`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMap {
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Slot size in bytes (the store's chunk size).
    pub chunk_size: u32,
    /// One slot per chunk of the disk, in disk order.
    pub slots: Vec<Slot>,
}

impl BlockMap {
    /// A map of an all-zero disk.
    pub fn new(disk_size: u64, chunk_size: u32) -> BlockMap {
        let n = Self::slot_count(disk_size, chunk_size);
        BlockMap {
            disk_size,
            chunk_size,
            slots: vec![Slot::Zero; usize::try_from(n).unwrap_or(usize::MAX)],
        }
    }

    /// Number of slots a disk of `disk_size` bytes needs.
    pub fn slot_count(disk_size: u64, chunk_size: u32) -> u64 {
        if chunk_size == 0 {
            return 0;
        }
        disk_size.div_ceil(u64::from(chunk_size))
    }

    /// Disk offset of slot `i`.
    pub fn chunk_offset(&self, i: usize) -> u64 {
        i as u64 * u64::from(self.chunk_size)
    }

    /// Length of slot `i` in bytes (the last one may be short; 0 past the end).
    pub fn chunk_len(&self, i: usize) -> u32 {
        let off = self.chunk_offset(i);
        let left = self.disk_size.saturating_sub(off);
        left.min(u64::from(self.chunk_size)) as u32
    }

    /// The slot index holding disk offset `offset`.
    pub fn slot_of(&self, offset: u64) -> usize {
        (offset / u64::from(self.chunk_size.max(1))) as usize
    }

    /// Ids of the data slots (with repeats).
    pub fn data_ids(&self) -> impl Iterator<Item = &ChunkId> + '_ {
        self.slots.iter().filter_map(|s| match s {
            Slot::Data(id) => Some(id),
            Slot::Zero => None,
        })
    }

    /// Bytes of the disk held in data slots (zero slots excluded).
    pub fn data_bytes(&self) -> u64 {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::Data(_)))
            .map(|(i, _)| u64::from(self.chunk_len(i)))
            .sum()
    }

    /// Check the internal consistency (slot count versus sizes).
    pub fn check(&self) -> Result<(), String> {
        if self.chunk_size == 0 {
            return Err("chunk size is zero".into());
        }
        let want = Self::slot_count(self.disk_size, self.chunk_size);
        if self.slots.len() as u64 != want {
            return Err(format!(
                "{} slots for a {}-byte disk in {}-byte chunks (expected {want})",
                self.slots.len(),
                self.disk_size,
                self.chunk_size
            ));
        }
        Ok(())
    }

    /// Encode as an index file; `mac` selects HMAC (encrypted stores).
    pub(crate) fn encode(&self, mac: Option<&hmac::Key>) -> Vec<u8> {
        let data = self.data_ids().count();
        let mut out = Vec::with_capacity(HEADER_LEN + self.slots.len() + 32 * data + SUM_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(if mac.is_some() { SUM_HMAC } else { SUM_SHA256 });
        out.push(0);
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
        out.extend_from_slice(&(self.slots.len() as u64).to_le_bytes());
        for s in &self.slots {
            match s {
                Slot::Zero => out.push(TAG_ZERO),
                Slot::Data(id) => {
                    out.push(TAG_DATA);
                    out.extend_from_slice(id.as_bytes());
                }
            }
        }
        let sum = checksum(&out, mac);
        out.extend_from_slice(&sum);
        out
    }

    /// Decode and verify an index file. Errors are reasons for `Error::CorruptIndex`.
    pub(crate) fn decode(bytes: &[u8], mac: Option<&hmac::Key>) -> Result<BlockMap, String> {
        if bytes.len() >= 4 && &bytes[..4] != MAGIC {
            return Err("bad magic (not an index file)".into());
        }
        if bytes.len() < HEADER_LEN + SUM_LEN {
            return Err(format!(
                "truncated: {} bytes is shorter than an empty index",
                bytes.len()
            ));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(format!(
                "index format version {version} is not supported (this build reads {VERSION})"
            ));
        }
        let kind = bytes[6];
        match (kind, mac.is_some()) {
            (SUM_SHA256, false) | (SUM_HMAC, true) => {}
            (SUM_SHA256, true) => {
                return Err("unauthenticated (SHA-256) index in an encrypted store".into())
            }
            (SUM_HMAC, false) => return Err("HMAC index in a plain store".into()),
            (k, _) => return Err(format!("unknown checksum kind {k}")),
        }
        let (body, sum) = bytes.split_at(bytes.len() - SUM_LEN);
        let ok = match mac {
            Some(key) => hmac::verify(key, body, sum).is_ok(),
            None => digest::digest(&digest::SHA256, body).as_ref() == sum,
        };
        if !ok {
            return Err(
                "checksum mismatch (truncated, damaged or written with another key)".into(),
            );
        }
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[o..o + 8]);
            u64::from_le_bytes(b)
        };
        // Reserved bytes are zero in version 1: a writer that sets them wrote a
        // layout this reader does not know (and the encoding stays canonical).
        if body[7] != 0 || body[20..24] != [0; 4] {
            return Err("reserved header bytes are not zero".into());
        }
        let disk_size = u64_at(8);
        let chunk_size = u32::from_le_bytes([body[16], body[17], body[18], body[19]]);
        let count = u64_at(24);
        if chunk_size == 0 {
            return Err("chunk size is zero".into());
        }
        if count != BlockMap::slot_count(disk_size, chunk_size) {
            return Err(format!(
                "slot count {count} does not match a {disk_size}-byte disk in {chunk_size}-byte chunks"
            ));
        }
        let mut rest = &body[HEADER_LEN..];
        if count > rest.len() as u64 {
            return Err(format!("truncated: {count} slots in {} bytes", rest.len()));
        }
        let mut slots = Vec::with_capacity(count as usize);
        for i in 0..count {
            let (&tag, tail) = rest
                .split_first()
                .ok_or_else(|| format!("truncated at slot {i}"))?;
            match tag {
                TAG_ZERO => {
                    slots.push(Slot::Zero);
                    rest = tail;
                }
                TAG_DATA => {
                    let id: [u8; 32] = tail
                        .get(..32)
                        .and_then(|b| b.try_into().ok())
                        .ok_or_else(|| format!("truncated at slot {i}"))?;
                    slots.push(Slot::Data(ChunkId(id)));
                    rest = &tail[32..];
                }
                t => return Err(format!("slot {i}: unknown tag {t}")),
            }
        }
        if !rest.is_empty() {
            return Err(format!("{} trailing bytes after the slots", rest.len()));
        }
        Ok(BlockMap {
            disk_size,
            chunk_size,
            slots,
        })
    }
}

fn checksum(body: &[u8], mac: Option<&hmac::Key>) -> [u8; SUM_LEN] {
    let mut out = [0u8; SUM_LEN];
    match mac {
        Some(key) => out.copy_from_slice(hmac::sign(key, body).as_ref()),
        None => out.copy_from_slice(digest::digest(&digest::SHA256, body).as_ref()),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BlockMap {
        let mut m = BlockMap::new(10 * 65536 + 100, 65536);
        m.slots[1] = Slot::Data(ChunkId([7; 32]));
        m.slots[10] = Slot::Data(ChunkId([9; 32]));
        m
    }

    #[test]
    fn geometry() {
        let m = sample();
        assert_eq!(m.slots.len(), 11);
        assert_eq!(m.chunk_len(0), 65536);
        assert_eq!(m.chunk_len(10), 100);
        assert_eq!(m.chunk_len(11), 0);
        assert_eq!(m.data_bytes(), 65536 + 100);
        assert_eq!(m.slot_of(65536 * 3 + 5), 3);
        assert!(m.check().is_ok());
        assert_eq!(BlockMap::new(0, 65536).slots.len(), 0);
    }

    #[test]
    fn round_trip_sha_and_hmac() {
        let m = sample();
        let bytes = m.encode(None);
        assert_eq!(BlockMap::decode(&bytes, None), Ok(m.clone()));
        let key = hmac::Key::new(hmac::HMAC_SHA256, &[3; 32]);
        let other = hmac::Key::new(hmac::HMAC_SHA256, &[4; 32]);
        let bytes = m.encode(Some(&key));
        assert_eq!(BlockMap::decode(&bytes, Some(&key)), Ok(m));
        assert!(BlockMap::decode(&bytes, Some(&other)).is_err());
        assert!(BlockMap::decode(&bytes, None).is_err());
    }

    #[test]
    fn reserved_bytes_are_refused_even_with_a_valid_checksum() {
        // Found by the `store_index` fuzz target: the reader ignored them.
        for at in [7, 20, 23] {
            let mut bytes = sample().encode(None);
            let n = bytes.len();
            bytes[at] = 1;
            let sum = checksum(&bytes[..n - SUM_LEN], None);
            bytes[n - SUM_LEN..].copy_from_slice(&sum);
            let err = BlockMap::decode(&bytes, None).unwrap_err();
            assert!(err.contains("reserved"), "{at}: {err}");
        }
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused() {
        let bytes = sample().encode(None);
        for n in 0..bytes.len() {
            assert!(BlockMap::decode(&bytes[..n], None).is_err(), "len {n}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(BlockMap::decode(&b, None).is_err(), "flip at {i}");
        }
    }
}
