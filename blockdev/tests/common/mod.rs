//! Helpers shared by the chunk store tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use weft_blockdev::store::{ChunkId, StoreConfig};

/// The chunk size of the test stores.
pub const CS: u32 = 64 << 10;

/// A plain store configuration with test-sized chunks.
pub fn cfg() -> StoreConfig {
    StoreConfig {
        chunk_size: CS,
        encrypted: false,
        zstd_level: 3,
    }
}

/// Deterministic incompressible bytes (xorshift64*).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Where a hot chunk lives under a tier directory.
pub fn chunk_path(base: &Path, id: &ChunkId) -> PathBuf {
    let h = id.to_string();
    base.join("chunks").join(&h[..2]).join(&h)
}
