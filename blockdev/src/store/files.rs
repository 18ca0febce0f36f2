//! The store's file formats as standalone functions, with exactly the checks the store
//! makes: for tools and fuzzing (index and chunk files may be damaged or planted on disk).

use super::crypto::Keys;
use super::{chunk, BlockMap, Check, ChunkId, Error};

/// The keys of an encrypted store, derived from its master key (the key file's
/// 32 bytes) and its 16-byte store id, for the file parsers below.
pub struct StoreKeys(Keys);

impl std::fmt::Debug for StoreKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreKeys").finish_non_exhaustive()
    }
}

impl StoreKeys {
    /// Derive the keys as `open` does (HKDF-SHA256, see `docs/store-format.md`).
    pub fn derive(master: &[u8; 32], store_id: &[u8; 16]) -> Result<StoreKeys, Error> {
        Keys::derive(master, store_id).map(StoreKeys)
    }
}

/// Decode and check an index file's bytes with exactly the checks of
/// [`ChunkStore::read_index`](super::ChunkStore::read_index) (`keys` for an encrypted
/// store's HMAC). The error is the reason `Error::CorruptIndex` would carry. For tools and
/// fuzzing: index files may be damaged or planted on disk.
pub fn parse_index_file(bytes: &[u8], keys: Option<&StoreKeys>) -> Result<BlockMap, String> {
    BlockMap::decode(bytes, keys.map(|k| &k.0.index))
}

/// Encode a block map as an index file, as
/// [`ChunkStore::write_index`](super::ChunkStore::write_index) does.
pub fn encode_index_file(map: &BlockMap, keys: Option<&StoreKeys>) -> Vec<u8> {
    map.encode(keys.map(|k| &k.0.index))
}

/// Decode and check the bytes of a chunk file stored under `id` in a store of `chunk_size`,
/// with exactly the checks of [`ChunkStore::get`](super::ChunkStore::get) (header, length,
/// authentication, decompression, id). The error is the reason `Error::Corrupt` would
/// carry. For tools and fuzzing.
pub fn parse_chunk_file(
    bytes: &[u8],
    id: &ChunkId,
    chunk_size: u32,
    keys: Option<&StoreKeys>,
) -> Result<Vec<u8>, String> {
    if bytes.len() as u64 > chunk::max_file_len(chunk_size) {
        return Err(format!(
            "file is {} bytes, more than a chunk file of this store can be",
            bytes.len()
        ));
    }
    chunk::decode_file(
        bytes.to_vec(),
        id,
        chunk_size,
        keys.map(|k| &k.0),
        Check::Id,
    )
}

/// Check only the 16-byte header of a chunk file and the file length it implies: the cheap
/// check [`ChunkStore::put`](super::ChunkStore::put) makes before deduplicating.
pub fn check_chunk_header(
    header: &[u8],
    file_len: u64,
    chunk_size: u32,
    encrypted: bool,
) -> Result<(), String> {
    chunk::check_header(header, file_len, chunk_size, encrypted).map(|_| ())
}

/// Encode `data` as a chunk file as [`ChunkStore::put`](super::ChunkStore::put) would;
/// returns its id and the file bytes.
pub fn encode_chunk_file(
    data: &[u8],
    zstd_level: i32,
    keys: Option<&StoreKeys>,
) -> Result<(ChunkId, Vec<u8>), Error> {
    let keys = keys.map(|k| &k.0);
    let id = chunk::chunk_id(keys, data);
    let (bytes, _) = chunk::encode(&id, data, zstd_level, keys, |parts| Ok(parts.concat()))?;
    Ok((id, bytes))
}
