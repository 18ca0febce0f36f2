//! Chunk file encoding (format version 1).
//!
//! ```text
//! offset size
//!  0      4   magic "WFCK"
//!  4      1   format version (1)
//!  5      1   flags: bit 0 = zstd-compressed payload, bit 1 = AES-256-GCM,
//!             bit 2 = CRC-32 of the plaintext follows the header (plain chunks only)
//!  6      2   reserved, zero
//!  8      4   plaintext length (u32 LE)
//! 12      4   stored payload length (u32 LE; includes the 16-byte GCM tag)
//! 16     12   nonce (only when encrypted)
//! 16      4   CRC-32 (IEEE) of the plaintext, u32 LE (only with bit 2)
//! ..          payload
//! ```
//!
//! Every read can check a chunk two ways ([`Check`]): against its id (SHA-256 or
//! HMAC-SHA256 of the plaintext: what `get`, restore and `verify` do), or by its
//! checksum (the CRC-32 of a plain chunk, the GCM tag of an encrypted one), which is
//! a tenth of the cost and what weft-blk uses on its read path. Chunks written before
//! the CRC existed have no bit 2 and are always checked against their id.

use std::cell::RefCell;

use ring::aead::{Aad, Nonce, Tag};

use super::crypto::{random_bytes, Keys, NONCE_LEN, TAG_LEN};
use super::error::Error;
use super::ChunkId;

pub(crate) const MAGIC: &[u8; 4] = b"WFCK";
pub(crate) const VERSION: u8 = 1;
pub(crate) const HEADER_LEN: usize = 16;
pub(crate) const FLAG_ZSTD: u8 = 1;
pub(crate) const FLAG_AES_GCM: u8 = 2;
pub(crate) const FLAG_CRC: u8 = 4;
const CRC_LEN: usize = 4;
const KNOWN_FLAGS: u8 = FLAG_ZSTD | FLAG_AES_GCM | FLAG_CRC;

/// How a read checks a chunk's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Recompute the id (SHA-256, or HMAC-SHA256 in an encrypted store) and compare:
    /// detects any change, accidental or deliberate.
    Id,
    /// The chunk's own checksum: the CRC-32 of a plain chunk (detects corruption, not
    /// a forgery by someone who can write the store), the GCM tag of an encrypted one
    /// (detects both). A plain chunk without a CRC is checked against its id.
    Checksum,
}

/// A parsed chunk header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub flags: u8,
    pub plain_len: u32,
    pub stored_len: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(MAGIC);
        h[4] = VERSION;
        h[5] = self.flags;
        h[8..12].copy_from_slice(&self.plain_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.stored_len.to_le_bytes());
        h
    }

    /// Parse and sanity-check a header against the store's chunk size and
    /// encryption mode. The error is a reason for `Error::Corrupt`.
    pub fn parse(h: &[u8; HEADER_LEN], chunk_size: u32, encrypted: bool) -> Result<Header, String> {
        if &h[..4] != MAGIC {
            return Err("bad magic (not a chunk file)".into());
        }
        if h[4] != VERSION {
            return Err(format!(
                "chunk format version {} is not supported (this build reads {VERSION})",
                h[4]
            ));
        }
        let flags = h[5];
        if flags & !KNOWN_FLAGS != 0 || h[6] != 0 || h[7] != 0 {
            return Err(format!("unknown flags {flags:#04x}"));
        }
        if flags & FLAG_CRC != 0 && flags & FLAG_AES_GCM != 0 {
            return Err("a CRC on an encrypted chunk (GCM authenticates it)".into());
        }
        if (flags & FLAG_AES_GCM != 0) != encrypted {
            return Err(if encrypted {
                "chunk is not encrypted in an encrypted store".into()
            } else {
                "chunk is encrypted in a plain store".into()
            });
        }
        let plain_len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let stored_len = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        if plain_len > chunk_size {
            return Err(format!(
                "plaintext length {plain_len} exceeds the chunk size {chunk_size}"
            ));
        }
        let tag = if encrypted { TAG_LEN as u32 } else { 0 };
        let body = stored_len
            .checked_sub(tag)
            .ok_or("payload shorter than its tag")?;
        if flags & FLAG_ZSTD == 0 && body != plain_len {
            return Err(format!(
                "raw payload of {body} bytes for a {plain_len}-byte chunk"
            ));
        }
        if flags & FLAG_ZSTD != 0 && body >= plain_len {
            return Err(format!(
                "compressed payload of {body} bytes is not smaller than the {plain_len}-byte chunk"
            ));
        }
        Ok(Header {
            flags,
            plain_len,
            stored_len,
        })
    }

    /// Bytes before the payload.
    pub fn prefix_len(&self) -> usize {
        HEADER_LEN
            + if self.flags & FLAG_AES_GCM != 0 {
                NONCE_LEN
            } else {
                0
            }
            + if self.flags & FLAG_CRC != 0 {
                CRC_LEN
            } else {
                0
            }
    }
}

/// The AAD of an encrypted chunk: header || chunk id.
fn aad(header: &[u8; HEADER_LEN], id: &ChunkId) -> [u8; HEADER_LEN + 32] {
    let mut a = [0u8; HEADER_LEN + 32];
    a[..HEADER_LEN].copy_from_slice(header);
    a[HEADER_LEN..].copy_from_slice(id.as_bytes());
    a
}

struct Scratch {
    cctx: Option<(i32, zstd::bulk::Compressor<'static>)>,
    buf: Vec<u8>,
}

thread_local! {
    /// Per-thread compressor and buffer, reused across puts (a 4 MiB chunk
    /// costs no allocation after the first one on a thread).
    static SCRATCH: RefCell<Scratch> = const { RefCell::new(Scratch { cctx: None, buf: Vec::new() }) };
}

/// Encode `data` as a chunk file and hand its parts (header+nonce, payload,
/// tag) to `write`. Returns what `write` returned and the file length.
pub(crate) fn encode<R>(
    id: &ChunkId,
    data: &[u8],
    level: i32,
    keys: Option<&Keys>,
    write: impl FnOnce(&[&[u8]]) -> Result<R, Error>,
) -> Result<(R, u64), Error> {
    let plain_len = u32::try_from(data.len()).map_err(|_| Error::ChunkTooLarge {
        len: data.len(),
        max: u32::MAX,
    })?;
    SCRATCH.with(|cell| {
        let mut guard = cell.borrow_mut();
        let s = &mut *guard;
        if s.cctx.as_ref().map(|(l, _)| *l) != Some(level) {
            let c = zstd::bulk::Compressor::new(level).map_err(|source| Error::Zstd {
                op: "compressor setup",
                source,
            })?;
            s.cctx = Some((level, c));
        }
        if s.buf.len() < data.len() {
            s.buf.resize(data.len(), 0);
        }
        let mut flags = 0u8;
        let mut body_len = data.len();
        // Only worth storing compressed when it shrinks: give zstd a buffer one
        // byte short of the input; "too small" means incompressible.
        if let (Some((_, cctx)), Some(limit)) = (s.cctx.as_mut(), data.len().checked_sub(1)) {
            if let Ok(n) = cctx.compress_to_buffer(data, &mut s.buf[..limit]) {
                flags |= FLAG_ZSTD;
                body_len = n;
            }
        }
        let encrypted = keys.is_some();
        if !encrypted {
            flags |= FLAG_CRC;
        }
        if encrypted {
            flags |= FLAG_AES_GCM;
            if flags & FLAG_ZSTD == 0 {
                s.buf[..data.len()].copy_from_slice(data);
            }
        }
        let tag_len = if encrypted { TAG_LEN } else { 0 };
        let header = Header {
            flags,
            plain_len,
            stored_len: (body_len + tag_len) as u32,
        }
        .encode();
        let mut prefix = [0u8; HEADER_LEN + NONCE_LEN];
        prefix[..HEADER_LEN].copy_from_slice(&header);
        let crc_end = HEADER_LEN + CRC_LEN;
        let file_len = (HEADER_LEN + body_len + tag_len) as u64;
        match keys {
            Some(keys) => {
                let mut nonce = [0u8; NONCE_LEN];
                random_bytes(&mut nonce)?;
                prefix[HEADER_LEN..].copy_from_slice(&nonce);
                let tag: Tag = keys
                    .enc
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(aad(&header, id)),
                        &mut s.buf[..body_len],
                    )
                    .map_err(|_| Error::Crypto { op: "chunk seal" })?;
                let r = write(&[&prefix[..], &s.buf[..body_len], tag.as_ref()])?;
                Ok((r, file_len + NONCE_LEN as u64))
            }
            None => {
                let body: &[u8] = if flags & FLAG_ZSTD != 0 {
                    &s.buf[..body_len]
                } else {
                    data
                };
                prefix[HEADER_LEN..crc_end].copy_from_slice(&crc32fast::hash(data).to_le_bytes());
                let r = write(&[&prefix[..crc_end], body])?;
                Ok((r, file_len + CRC_LEN as u64))
            }
        }
    })
}

/// The largest chunk file a store with `chunk_size` can hold: header, nonce,
/// an uncompressed payload and the GCM tag. `read_chunk` refuses bigger files
/// before reading them (a planted multi-GiB file must not be loaded).
pub(crate) fn max_file_len(chunk_size: u32) -> u64 {
    (HEADER_LEN + (NONCE_LEN + TAG_LEN).max(CRC_LEN)) as u64 + u64::from(chunk_size)
}

/// The id of `data`: SHA-256, or HMAC-SHA256 with the store's id key.
pub(crate) fn chunk_id(keys: Option<&Keys>, data: &[u8]) -> ChunkId {
    let mut out = [0u8; 32];
    match keys {
        Some(k) => out.copy_from_slice(ring::hmac::sign(&k.id, data).as_ref()),
        None => out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref()),
    }
    ChunkId(out)
}

/// Check the header and length of a chunk file (the cheap check `put` does
/// before deduplicating against an existing file). Errors are reasons for
/// `Error::Corrupt`.
pub(crate) fn check_header(
    header_bytes: &[u8],
    file_len: u64,
    chunk_size: u32,
    encrypted: bool,
) -> Result<Header, String> {
    let hb: &[u8; HEADER_LEN] = header_bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| format!("truncated: {file_len} bytes is shorter than a chunk header"))?;
    let header = Header::parse(hb, chunk_size, encrypted)?;
    let want = header.prefix_len() as u64 + u64::from(header.stored_len);
    if file_len != want {
        return Err(format!(
            "file is {file_len} bytes, header says {want} (truncated or trailing garbage)"
        ));
    }
    Ok(header)
}

/// Decode a whole chunk file (the bytes `read_chunk` read) stored under `id`:
/// header, length, authentication, decompression and finally the id of the
/// plaintext. The file buffer is reused for the result. Errors are reasons
/// for `Error::Corrupt`.
pub(crate) fn decode_file(
    file: Vec<u8>,
    id: &ChunkId,
    chunk_size: u32,
    keys: Option<&Keys>,
    check: Check,
) -> Result<Vec<u8>, String> {
    decode_file_at(file, 0, id, chunk_size, keys, check)
}

/// [`decode_file`] of the chunk file in `buf[start..]` (an `O_DIRECT` read lands at
/// an aligned position inside its buffer); the bytes before `start` are dropped with
/// the header, in one move.
pub(crate) fn decode_file_at(
    mut buf: Vec<u8>,
    start: usize,
    id: &ChunkId,
    chunk_size: u32,
    keys: Option<&Keys>,
    check: Check,
) -> Result<Vec<u8>, String> {
    let file = buf
        .get(start..)
        .ok_or("chunk buffer shorter than its start")?;
    let header = check_header(file, file.len() as u64, chunk_size, keys.is_some())?;
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(&file[..HEADER_LEN]);
    let nonce = if keys.is_some() {
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(&file[HEADER_LEN..HEADER_LEN + NONCE_LEN]);
        Some(n)
    } else {
        None
    };
    let crc = (header.flags & FLAG_CRC != 0).then(|| {
        let at = header.prefix_len() - CRC_LEN;
        u32::from_le_bytes([file[at], file[at + 1], file[at + 2], file[at + 3]])
    });
    // check_header made the length exactly prefix + stored_len.
    buf.drain(..start + header.prefix_len());
    let data = decode(id, &hb, &header, nonce, buf, keys)?;
    if let Some(want) = crc {
        let got = crc32fast::hash(&data);
        if got != want {
            return Err(format!(
                "CRC-32 of the content is {got:08x}, the chunk says {want:08x}"
            ));
        }
    }
    // GCM authenticated an encrypted chunk against its id already (the id is in the
    // AAD); a CRC says the bytes are the ones written.
    let checked = check == Check::Checksum && (keys.is_some() || crc.is_some());
    if !checked && chunk_id(keys, &data) != *id {
        return Err("content does not match its id".into());
    }
    Ok(data)
}

/// Decode a chunk from its header, nonce and payload (the payload buffer is
/// decrypted in place). Errors are reasons for `Error::Corrupt`.
pub(crate) fn decode(
    id: &ChunkId,
    header_bytes: &[u8; HEADER_LEN],
    header: &Header,
    nonce: Option<[u8; NONCE_LEN]>,
    mut payload: Vec<u8>,
    keys: Option<&Keys>,
) -> Result<Vec<u8>, String> {
    let plain_len = header.plain_len as usize;
    let body_len = match (keys, nonce) {
        (Some(keys), Some(nonce)) => keys
            .enc
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(header_bytes, id)),
                &mut payload,
            )
            .map_err(|_| "authentication failed (tampered, wrong key or wrong chunk)".to_string())?
            .len(),
        (None, None) => payload.len(),
        _ => return Err("encryption flag does not match the store".into()),
    };
    if header.flags & FLAG_ZSTD != 0 {
        let out = zstd::bulk::decompress(&payload[..body_len], plain_len)
            .map_err(|e| format!("zstd: {e}"))?;
        if out.len() != plain_len {
            return Err(format!(
                "decompressed to {} bytes, header says {plain_len}",
                out.len()
            ));
        }
        Ok(out)
    } else {
        payload.truncate(body_len);
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(data: &[u8], keys: Option<&Keys>) -> (ChunkId, Vec<u8>) {
        let id = chunk_id(keys, data);
        let (file, _) = encode(&id, data, 3, keys, |parts| Ok(parts.concat())).unwrap();
        (id, file)
    }

    fn text() -> Vec<u8> {
        b"weft chunk checks ".repeat(1000)
    }

    #[test]
    fn plain_chunks_carry_a_crc_that_either_check_uses() {
        for data in [
            text(),
            (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ] {
            let (id, file) = file_of(&data, None);
            assert_ne!(file[5] & FLAG_CRC, 0);
            for check in [Check::Id, Check::Checksum] {
                assert_eq!(
                    decode_file(file.clone(), &id, 1 << 20, None, check).unwrap(),
                    data
                );
            }
            // One flipped payload bit fails both checks.
            let mut bad = file.clone();
            *bad.last_mut().unwrap() ^= 1;
            for check in [Check::Id, Check::Checksum] {
                let e = decode_file(bad.clone(), &id, 1 << 20, None, check).unwrap_err();
                assert!(e.contains("CRC-32") || e.contains("zstd"), "{e}");
            }
        }
    }

    #[test]
    fn a_chunk_without_crc_is_checked_against_its_id() {
        let data = text();
        let (id, file) = file_of(&data, None);
        // The layout before the CRC: no flag, no 4 bytes after the header.
        let mut old = file[..HEADER_LEN].to_vec();
        old[5] &= !FLAG_CRC;
        old.extend_from_slice(&file[HEADER_LEN + CRC_LEN..]);
        assert_eq!(
            decode_file(old.clone(), &id, 1 << 20, None, Check::Checksum).unwrap(),
            data
        );
        // A consistent forgery (another valid chunk under this id) is caught by the id.
        let (_, other) = file_of(b"something else entirely", None);
        let mut forged = other[..HEADER_LEN].to_vec();
        forged[5] &= !FLAG_CRC;
        forged.extend_from_slice(&other[HEADER_LEN + CRC_LEN..]);
        let e = decode_file(forged, &id, 1 << 20, None, Check::Checksum).unwrap_err();
        assert!(e.contains("does not match its id"), "{e}");
    }

    #[test]
    fn encrypted_chunks_are_checked_by_their_tag() {
        let keys = Keys::derive(&[7u8; 32], b"store").unwrap();
        let data = text();
        let (id, file) = file_of(&data, Some(&keys));
        assert_eq!(file[5] & FLAG_CRC, 0);
        assert_eq!(
            decode_file(file.clone(), &id, 1 << 20, Some(&keys), Check::Checksum).unwrap(),
            data
        );
        let mut bad = file;
        bad[HEADER_LEN + NONCE_LEN] ^= 1;
        let e = decode_file(bad, &id, 1 << 20, Some(&keys), Check::Checksum).unwrap_err();
        assert!(e.contains("authentication failed"), "{e}");
        // A CRC flag on an encrypted chunk is refused.
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(MAGIC);
        h[4] = VERSION;
        h[5] = FLAG_AES_GCM | FLAG_CRC;
        assert!(Header::parse(&h, 1 << 20, true).is_err());
    }
}
