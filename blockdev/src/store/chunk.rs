//! Chunk file encoding (format version 1).
//!
//! ```text
//! offset size
//!  0      4   magic "WFCK"
//!  4      1   format version (1)
//!  5      1   flags: bit 0 = zstd-compressed payload, bit 1 = AES-256-GCM
//!  6      2   reserved, zero
//!  8      4   plaintext length (u32 LE)
//! 12      4   stored payload length (u32 LE; includes the 16-byte GCM tag)
//! 16     12   nonce (only when encrypted)
//! ..          payload
//! ```

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
const KNOWN_FLAGS: u8 = FLAG_ZSTD | FLAG_AES_GCM;

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
                let r = write(&[&prefix[..HEADER_LEN], body])?;
                Ok((r, file_len))
            }
        }
    })
}

/// The largest chunk file a store with `chunk_size` can hold: header, nonce,
/// an uncompressed payload and the GCM tag. `read_chunk` refuses bigger files
/// before reading them (a planted multi-GiB file must not be loaded).
pub(crate) fn max_file_len(chunk_size: u32) -> u64 {
    (HEADER_LEN + NONCE_LEN + TAG_LEN) as u64 + u64::from(chunk_size)
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
    mut file: Vec<u8>,
    id: &ChunkId,
    chunk_size: u32,
    keys: Option<&Keys>,
) -> Result<Vec<u8>, String> {
    let header = check_header(&file, file.len() as u64, chunk_size, keys.is_some())?;
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(&file[..HEADER_LEN]);
    let nonce = if keys.is_some() {
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(&file[HEADER_LEN..HEADER_LEN + NONCE_LEN]);
        Some(n)
    } else {
        None
    };
    // check_header made the length exactly prefix + stored_len.
    file.drain(..header.prefix_len());
    let data = decode(id, &hb, &header, nonce, file, keys)?;
    if chunk_id(keys, &data) != *id {
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
