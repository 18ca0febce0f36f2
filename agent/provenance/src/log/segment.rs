//! The on-disk format of a VM's provenance log (`docs/provenance.md` describes it for
//! operators; this is the reference).
//!
//! A segment `seg-<first seq, 20 digits>.log` is a 16-byte header (`WEFTPLOG`, format
//! version u32 LE, CRC-32C of the previous 12 bytes) followed by blocks. One append
//! writes one or more blocks. A block is a 68-byte header and a payload:
//!
//! ```text
//! magic "WPB1" | codec u8 (0 none, 1 zstd) | 3 reserved | stored_len u32 | raw_len u32 |
//! count u32 | first_seq u64 | last_seq u64 | min_guest_us i64 | max_guest_us i64 |
//! max_host_us i64 | payload_crc u32 | header_crc u32            (all little-endian)
//! ```
//!
//! `payload_crc` is CRC-32C of the stored payload, `header_crc` of the 64 bytes before
//! it. The raw (decompressed) payload is `count` records, each `len u32 | crc u32 |
//! body`, `crc` being CRC-32C of the body and the body `(host_time_us, entry)` in
//! postcard, the encoding of the DPA wire protocol. Records of a block have consecutive
//! sequence numbers from `first_seq` to `last_seq`.
//!
//! The open segment is extended with zeros ahead of its appends (so that an append's
//! `fdatasync` rewrites allocated blocks and need not commit a size change each time);
//! a zero tail after the last block is that space, cut when the segment is sealed or
//! the log opened. A sealed segment never changes again and has a sidecar `seg-<first>.idx`: `WEFTPIDX`,
//! a postcard [`SegmentIndex`] (its blocks with their ranges and key filters), CRC-32C of
//! everything before. A sidecar that is missing or does not check is rebuilt from its
//! segment.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weft_dpa::Entry;

use super::filter::{self, Bloom, Field};
use super::{io, ProvenanceError};

/// Format version written in segment headers.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of a segment's header.
pub const SEGMENT_HEADER: u64 = 16;
/// Bytes of a block's header.
pub const BLOCK_HEADER: usize = 68;
const SEGMENT_MAGIC: &[u8; 8] = b"WEFTPLOG";
const BLOCK_MAGIC: &[u8; 4] = b"WPB1";
const INDEX_MAGIC: &[u8; 8] = b"WEFTPIDX";
/// A block's raw payload is cut at about this size (one record may take it beyond).
pub const BLOCK_TARGET_RAW: usize = 1 << 20;
/// The largest payload, stored or raw, a block may declare: reading never allocates
/// more than this for one block, whatever the file says.
pub const MAX_BLOCK_BYTES: u32 = 16 << 20;
/// The largest sidecar read.
const MAX_INDEX_BYTES: u64 = 256 << 20;

const CODEC_NONE: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// A decoded block: `(host_time_us, entry)` in seq order.
pub type Decoded = Vec<(i64, Entry)>;

/// What the index keeps of one block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMeta {
    /// Offset of the block header in its segment.
    pub offset: u64,
    /// Bytes of the stored payload.
    pub stored_len: u32,
    /// Bytes of the raw payload.
    pub raw_len: u32,
    /// Records.
    pub count: u32,
    /// Seq of the first record.
    pub first_seq: u64,
    /// Seq of the last record.
    pub last_seq: u64,
    /// Smallest guest time.
    pub min_guest_us: i64,
    /// Largest guest time.
    pub max_guest_us: i64,
    /// Largest host receive time.
    pub max_host_us: i64,
    /// Keys, tables and sources of the block's records.
    pub filter: Bloom,
}

impl BlockMeta {
    /// Bytes of the block on disk.
    pub fn len(&self) -> u64 {
        BLOCK_HEADER as u64 + u64::from(self.stored_len)
    }

    /// Whether the block holds no records (never true for a written block).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// The sidecar of a sealed segment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentIndex {
    /// Bytes of the segment file it describes.
    pub segment_len: u64,
    /// Its blocks in order.
    pub blocks: Vec<BlockMeta>,
}

/// The file names of the segment starting at `first_seq`.
pub fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("seg-{first_seq:020}.log"))
}

/// The sidecar of the segment starting at `first_seq`.
pub fn index_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("seg-{first_seq:020}.idx"))
}

/// The first seq a segment file name stands for.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segment header bytes.
pub fn segment_header() -> [u8; SEGMENT_HEADER as usize] {
    let mut h = [0u8; SEGMENT_HEADER as usize];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Whether `bytes` are a valid segment header of a version this build reads.
pub fn check_segment_header(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < SEGMENT_HEADER as usize || &bytes[..8] != SEGMENT_MAGIC {
        return Err("not a provenance segment (bad magic)".into());
    }
    let crc = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if crc32c::crc32c(&bytes[..12]) != crc {
        return Err("segment header checksum mismatch".into());
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != FORMAT_VERSION {
        return Err(format!("segment format version {version} is not supported"));
    }
    Ok(())
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A block header as read from disk (checked).
#[derive(Debug, Clone, Copy)]
pub struct BlockHeader {
    codec: u8,
    /// Bytes of the stored payload.
    pub stored_len: u32,
    /// Bytes of the raw payload.
    pub raw_len: u32,
    /// Records.
    pub count: u32,
    /// First seq.
    pub first_seq: u64,
    /// Last seq.
    pub last_seq: u64,
    /// Smallest guest time.
    pub min_guest_us: i64,
    /// Largest guest time.
    pub max_guest_us: i64,
    /// Largest host time.
    pub max_host_us: i64,
    payload_crc: u32,
}

impl BlockHeader {
    /// Parses and checks a header.
    pub fn parse(b: &[u8]) -> Result<BlockHeader, String> {
        if b.len() < BLOCK_HEADER {
            return Err("short block header".into());
        }
        if &b[..4] != BLOCK_MAGIC {
            return Err("bad block magic".into());
        }
        if crc32c::crc32c(&b[..64]) != le_u32(b, 64) {
            return Err("block header checksum mismatch".into());
        }
        let h = BlockHeader {
            codec: b[4],
            stored_len: le_u32(b, 8),
            raw_len: le_u32(b, 12),
            count: le_u32(b, 16),
            first_seq: le_u64(b, 20),
            last_seq: le_u64(b, 28),
            min_guest_us: le_u64(b, 36) as i64,
            max_guest_us: le_u64(b, 44) as i64,
            max_host_us: le_u64(b, 52) as i64,
            payload_crc: le_u32(b, 60),
        };
        let span_ok = h.count > 0
            && h.first_seq > 0
            && h.last_seq >= h.first_seq
            && h.last_seq - h.first_seq == u64::from(h.count) - 1;
        if !span_ok
            || h.stored_len > MAX_BLOCK_BYTES
            || h.raw_len > MAX_BLOCK_BYTES
            || !matches!(h.codec, CODEC_NONE | CODEC_ZSTD)
        {
            return Err("block header out of range".into());
        }
        Ok(h)
    }

    fn write(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(BLOCK_MAGIC);
        out.extend_from_slice(&[self.codec, 0, 0, 0]);
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.first_seq.to_le_bytes());
        out.extend_from_slice(&self.last_seq.to_le_bytes());
        out.extend_from_slice(&self.min_guest_us.to_le_bytes());
        out.extend_from_slice(&self.max_guest_us.to_le_bytes());
        out.extend_from_slice(&self.max_host_us.to_le_bytes());
        out.extend_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&out[start..start + 64]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    /// Checks the payload's checksum, decompresses it and decodes its records.
    pub fn decode(&self, stored: &[u8]) -> Result<Decoded, String> {
        if stored.len() != self.stored_len as usize {
            return Err("short block payload".into());
        }
        if crc32c::crc32c(stored) != self.payload_crc {
            return Err("block payload checksum mismatch".into());
        }
        let raw_owned;
        let raw: &[u8] = match self.codec {
            CODEC_ZSTD => {
                raw_owned = zstd::bulk::decompress(stored, self.raw_len as usize)
                    .map_err(|e| format!("block does not decompress: {e}"))?;
                &raw_owned
            }
            _ => stored,
        };
        if raw.len() != self.raw_len as usize {
            return Err("block raw length mismatch".into());
        }
        let mut out = Vec::with_capacity(self.count as usize);
        let mut at = 0usize;
        while at < raw.len() {
            if raw.len() - at < 8 {
                return Err("truncated record header".into());
            }
            let len = le_u32(raw, at) as usize;
            let crc = le_u32(raw, at + 4);
            at += 8;
            let body = raw
                .get(at..at.saturating_add(len))
                .ok_or("truncated record")?;
            if crc32c::crc32c(body) != crc {
                return Err(format!("record checksum mismatch at raw offset {}", at - 8));
            }
            let rec: (i64, Entry) =
                postcard::from_bytes(body).map_err(|e| format!("record does not decode: {e}"))?;
            let expected = self.first_seq + out.len() as u64;
            if rec.1.seq != expected {
                return Err(format!("record seq {} where {expected} was due", rec.1.seq));
            }
            out.push(rec);
            at += len;
        }
        if out.len() != self.count as usize {
            return Err("block record count mismatch".into());
        }
        Ok(out)
    }

    /// The index entry of this block at `offset`, its filter built from `records`.
    pub fn meta(&self, offset: u64, records: &Decoded) -> BlockMeta {
        BlockMeta {
            offset,
            stored_len: self.stored_len,
            raw_len: self.raw_len,
            count: self.count,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            min_guest_us: self.min_guest_us,
            max_guest_us: self.max_guest_us,
            max_host_us: self.max_host_us,
            filter: filter_of(records.iter().map(|(_, e)| e)),
        }
    }
}

fn filter_of<'a>(entries: impl Iterator<Item = &'a Entry>) -> Bloom {
    let mut distinct = std::collections::HashSet::new();
    for e in entries {
        distinct.insert(filter::hash(Field::Key, &e.key));
        distinct.insert(filter::hash(Field::Collection, &e.collection));
        distinct.insert(filter::hash(Field::Source, &e.source));
        if !e.collection.is_empty() {
            distinct.insert(filter::hash_row(&e.collection, &e.key));
        }
    }
    let mut bloom = Bloom::with_capacity(distinct.len());
    for h in distinct {
        bloom.insert_hash(h);
    }
    bloom
}

/// Encodes entries received at `host_time_us` as blocks appended to `out`; returns each
/// block's index entry, offsets relative to `base` (where `out` will be written).
pub fn encode_blocks(
    entries: &[Entry],
    host_time_us: i64,
    compressor: &mut zstd::bulk::Compressor<'static>,
    base: u64,
    out: &mut Vec<u8>,
) -> Result<Vec<BlockMeta>, String> {
    let mut metas = Vec::new();
    let mut raw = Vec::with_capacity(BLOCK_TARGET_RAW.min(entries.len() * 512));
    let mut body = Vec::new();
    let mut start = 0usize;
    for (i, e) in entries.iter().enumerate() {
        body.clear();
        postcard::to_io(&(host_time_us, e), &mut body)
            .map_err(|err| format!("cannot encode entry {}: {err}", e.seq))?;
        raw.extend_from_slice(&(body.len() as u32).to_le_bytes());
        raw.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        raw.extend_from_slice(&body);
        if raw.len() >= BLOCK_TARGET_RAW || i + 1 == entries.len() {
            let chunk = &entries[start..=i];
            let offset = base + out.len() as u64;
            metas.push(write_block(
                chunk,
                host_time_us,
                &raw,
                compressor,
                offset,
                out,
            )?);
            raw.clear();
            start = i + 1;
        }
    }
    Ok(metas)
}

fn write_block(
    entries: &[Entry],
    host_time_us: i64,
    raw: &[u8],
    compressor: &mut zstd::bulk::Compressor<'static>,
    offset: u64,
    out: &mut Vec<u8>,
) -> Result<BlockMeta, String> {
    if raw.len() > MAX_BLOCK_BYTES as usize {
        return Err(format!("a block of {} bytes is over the limit", raw.len()));
    }
    let compressed = compressor.compress(raw).map_err(|e| format!("zstd: {e}"))?;
    let (codec, stored): (u8, &[u8]) = if compressed.len() < raw.len() {
        (CODEC_ZSTD, &compressed)
    } else {
        (CODEC_NONE, raw)
    };
    let (first, last) = (&entries[0], &entries[entries.len() - 1]);
    let header = BlockHeader {
        codec,
        stored_len: stored.len() as u32,
        raw_len: raw.len() as u32,
        count: entries.len() as u32,
        first_seq: first.seq,
        last_seq: last.seq,
        min_guest_us: entries.iter().map(|e| e.guest_time_us).min().unwrap_or(0),
        max_guest_us: entries.iter().map(|e| e.guest_time_us).max().unwrap_or(0),
        max_host_us: host_time_us,
        payload_crc: crc32c::crc32c(stored),
    };
    header.write(out);
    out.extend_from_slice(stored);
    Ok(BlockMeta {
        offset,
        stored_len: header.stored_len,
        raw_len: header.raw_len,
        count: header.count,
        first_seq: header.first_seq,
        last_seq: header.last_seq,
        min_guest_us: header.min_guest_us,
        max_guest_us: header.max_guest_us,
        max_host_us: header.max_host_us,
        filter: filter_of(entries.iter()),
    })
}

/// Reads and decodes one block of `file` (at `path`, for messages).
pub fn read_block(file: &File, path: &Path, meta: &BlockMeta) -> Result<Decoded, ProvenanceError> {
    let corrupt = |reason: String| ProvenanceError::Corrupt {
        path: path.to_owned(),
        reason: format!("block at offset {}: {reason}", meta.offset),
    };
    if meta.stored_len > MAX_BLOCK_BYTES {
        return Err(corrupt("index entry out of range".into()));
    }
    let mut buf = vec![0u8; meta.len() as usize];
    file.read_exact_at(&mut buf, meta.offset)
        .map_err(io("read", path))?;
    let header = BlockHeader::parse(&buf).map_err(corrupt)?;
    if header.first_seq != meta.first_seq || header.stored_len != meta.stored_len {
        return Err(corrupt("block does not match its index entry".into()));
    }
    header.decode(&buf[BLOCK_HEADER..]).map_err(corrupt)
}

/// What a scan of a segment found.
#[derive(Debug)]
pub struct Scan {
    /// The valid blocks in order.
    pub blocks: Vec<BlockMeta>,
    /// Bytes up to the end of the last valid block.
    pub valid_len: u64,
    /// Why the scan stopped before the end of the file, if it did.
    pub stopped: Option<String>,
    /// Whether a valid block header appears after the point the scan stopped (damage
    /// in the middle of the file rather than a torn tail).
    pub valid_after: bool,
    /// Whether everything after the last valid block is zeros: space the open segment
    /// had allocated ahead, not a torn write.
    pub zero_tail: bool,
}

/// Reads a whole segment, checking every block; stops at the first block that does
/// not check (a torn tail, after a crash).
pub fn scan(path: &Path) -> Result<Scan, ProvenanceError> {
    let bytes = std::fs::read(path).map_err(io("read", path))?;
    check_segment_header(&bytes).map_err(|reason| ProvenanceError::Corrupt {
        path: path.to_owned(),
        reason,
    })?;
    let mut at = SEGMENT_HEADER as usize;
    let mut blocks = Vec::new();
    let mut stopped = None;
    let mut next_seq: Option<u64> = None;
    while at < bytes.len() {
        let result = BlockHeader::parse(&bytes[at..]).and_then(|h| {
            let end = at + BLOCK_HEADER + h.stored_len as usize;
            let payload = bytes
                .get(at + BLOCK_HEADER..end)
                .ok_or("torn block payload")?;
            let records = h.decode(payload)?;
            if next_seq.is_some_and(|n| n != h.first_seq) {
                return Err(format!("block starts at seq {} out of order", h.first_seq));
            }
            Ok((h, records, end))
        });
        match result {
            Ok((h, records, end)) => {
                blocks.push(h.meta(at as u64, &records));
                next_seq = Some(h.last_seq + 1);
                at = end;
            }
            Err(reason) => {
                stopped = Some(format!("at offset {at}: {reason}"));
                break;
            }
        }
    }
    let valid_after = stopped.is_some()
        && (at + 1..bytes.len().saturating_sub(BLOCK_HEADER - 1))
            .filter(|&i| &bytes[i..i + 4] == BLOCK_MAGIC)
            .any(|i| BlockHeader::parse(&bytes[i..]).is_ok());
    let zero_tail = bytes[at.min(bytes.len())..].iter().all(|&b| b == 0);
    Ok(Scan {
        blocks,
        valid_len: at as u64,
        stopped,
        valid_after,
        zero_tail,
    })
}

/// Writes `index` as the sidecar at `path` (temporary file, fsync, rename; the caller
/// syncs the directory).
pub fn write_index(path: &Path, index: &SegmentIndex) -> Result<(), ProvenanceError> {
    let mut bytes = INDEX_MAGIC.to_vec();
    postcard::to_io(index, &mut bytes).map_err(|e| ProvenanceError::Corrupt {
        path: path.to_owned(),
        reason: format!("cannot encode the index: {e}"),
    })?;
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let tmp = path.with_extension("idx.tmp");
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))?;
    Ok(())
}

/// Reads a sidecar; `None` when it is missing, damaged or does not describe a segment
/// of `segment_len` bytes (it is then rebuilt).
pub fn read_index(path: &Path, segment_len: u64) -> Option<SegmentIndex> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.len() > MAX_INDEX_BYTES || meta.len() < 12 {
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if &body[..8] != INDEX_MAGIC || crc32c::crc32c(body) != le_u32(crc, 0) {
        return None;
    }
    let index: SegmentIndex = postcard::from_bytes(&body[8..]).ok()?;
    let consistent = index.segment_len == segment_len
        && index.blocks.iter().all(|b| b.filter.is_valid())
        && index.blocks.windows(2).all(|w| {
            w[1].offset == w[0].offset + w[0].len() && w[1].first_seq == w[0].last_seq + 1
        })
        && index
            .blocks
            .last()
            .is_none_or(|b| b.offset + b.len() == segment_len);
    consistent.then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_dpa::{DataType, Operation};

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            guest_time_us: 1_000 + seq as i64,
            data_type: DataType::Kv,
            op: Operation::Insert,
            source: "/etc/app.env".into(),
            collection: String::new(),
            key: format!("K{seq}"),
            old: None,
            new: Some(format!("\"v{seq}\"")),
            tx: None,
        }
    }

    #[test]
    fn blocks_roundtrip_and_damage_is_detected() {
        let entries: Vec<Entry> = (1..=100).map(entry).collect();
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        let mut out = Vec::new();
        let metas = encode_blocks(&entries, 7, &mut c, 0, &mut out).unwrap();
        assert_eq!(metas.len(), 1);
        let h = BlockHeader::parse(&out).unwrap();
        let got = h.decode(&out[BLOCK_HEADER..]).unwrap();
        assert_eq!(got.len(), 100);
        assert_eq!(got[41], (7, entry(42)));
        assert!(metas[0].filter.may_contain(Field::Key, "K42"));
        let mut bad = out.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(h.decode(&bad[BLOCK_HEADER..]).is_err());
        let mut bad = out.clone();
        bad[20] ^= 1;
        assert!(BlockHeader::parse(&bad).is_err());
    }

    #[test]
    fn names_parse() {
        assert_eq!(parse_segment_name("seg-00000000000000000042.log"), Some(42));
        assert_eq!(parse_segment_name("seg-42.log"), None);
        assert_eq!(parse_segment_name("seg-0000000000000000004x.log"), None);
        let p = segment_path(Path::new("/d"), 7);
        assert_eq!(
            parse_segment_name(p.file_name().unwrap().to_str().unwrap()),
            Some(7)
        );
    }
}
