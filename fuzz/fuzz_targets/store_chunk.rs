//! Chunk files can be damaged or planted on disk. Two properties of the decoder
//! `ChunkStore::get` and `verify` use (header, length, authentication, decompression,
//! id check), for a plain store and an encrypted one with a fixed test key:
//!
//! 1. Arbitrary bytes as the file of some chunk: never a panic, never an allocation
//!    beyond the chunk size, never accepted (the content cannot hash to the id).
//! 2. Arbitrary plaintext encoded as `put` does decodes to itself; the same file with
//!    one byte changed or cut short is refused when encrypted (authenticated), and in a
//!    plain store is refused or still decodes to exactly the plaintext (the id check).
//!
//! Input: a mode byte (bit 0: encrypted), 4 bytes of damage position, a damage mask,
//! then the bytes (the planted file, and the plaintext).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use weft_blockdev::store::{
    check_chunk_header, encode_chunk_file, parse_chunk_file, ChunkId, StoreKeys,
};

const CHUNK_SIZE: u32 = 64 << 10;

fn keys() -> &'static StoreKeys {
    static KEYS: OnceLock<StoreKeys> = OnceLock::new();
    KEYS.get_or_init(|| StoreKeys::derive(&[7; 32], &[9; 16]).expect("derive test keys"))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let (head, body) = data.split_at(6);
    let encrypted = head[0] & 1 == 1;
    let keys = encrypted.then(keys);
    let pos = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mask = head[5] | 1;

    // 1. A planted file.
    let id = ChunkId([0x5a; 32]);
    let _ = check_chunk_header(body, body.len() as u64, CHUNK_SIZE, encrypted);
    assert!(
        parse_chunk_file(body, &id, CHUNK_SIZE, keys).is_err(),
        "accepted a file whose content does not hash to its id"
    );

    // 2. Round trip, then damage.
    let plain = &body[..body.len().min(CHUNK_SIZE as usize)];
    let (id, mut file) = encode_chunk_file(plain, 3, keys).expect("encode");
    check_chunk_header(&file, file.len() as u64, CHUNK_SIZE, encrypted).expect("own header");
    assert_eq!(
        parse_chunk_file(&file, &id, CHUNK_SIZE, keys).expect("round trip"),
        plain
    );
    let cut = pos % file.len();
    let short = parse_chunk_file(&file[..cut], &id, CHUNK_SIZE, keys);
    assert!(short.is_err(), "accepted a file cut to {cut} bytes");
    file[cut] ^= mask;
    match parse_chunk_file(&file, &id, CHUNK_SIZE, keys) {
        Ok(d) => {
            assert!(
                !encrypted,
                "an encrypted chunk with a changed byte at {cut} was accepted"
            );
            assert_eq!(d, plain, "a damaged file decoded to other data");
        }
        Err(_) => {}
    }
});
