//! Feeds arbitrary bytes as an index file (a snapshot's block map) to the decoder
//! `ChunkStore::read_index` uses: index files can be damaged or planted on disk. It must
//! never panic or allocate beyond the input, and whatever it accepts must be a
//! consistent block map whose encoding is exactly the input (one encoding per map).
//!
//! The first byte picks the mode: the bytes as they are, for a plain or an encrypted
//! store (HMAC: only the early checks are reachable), or the bytes with their valid
//! SHA-256 appended, so the fuzzer gets past the checksum into the header and slots.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ring::digest;
use weft_blockdev::store::{encode_index_file, parse_index_file, StoreKeys};

fn keys() -> &'static StoreKeys {
    static KEYS: OnceLock<StoreKeys> = OnceLock::new();
    KEYS.get_or_init(|| StoreKeys::derive(&[7; 32], &[9; 16]).expect("derive test keys"))
}

fn check(file: &[u8], keys: Option<&StoreKeys>) {
    let Ok(map) = parse_index_file(file, keys) else {
        return;
    };
    assert!(map.check().is_ok(), "accepted an inconsistent map: {map:?}");
    assert!(map.data_bytes() <= map.disk_size);
    assert_eq!(
        encode_index_file(&map, keys),
        file,
        "accepted bytes that are not the map's encoding"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => check(body, None),
        1 => check(body, Some(keys())),
        _ => {
            let mut file = body.to_vec();
            file.extend_from_slice(digest::digest(&digest::SHA256, body).as_ref());
            check(&file, None);
        }
    }
});
