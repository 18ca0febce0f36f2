//! Chunk store: round trips, dedup, compression, indexes, concurrency, crash leftovers.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use weft_blockdev::store::{BlockMap, Check, ChunkId, ChunkStore, Error, Slot, StoreConfig};

mod common;
use common::*;

fn text(len: usize) -> Vec<u8> {
    b"the quick brown fox jumps over the lazy dog. "
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

fn chunk_files(dir: &Path) -> Vec<PathBuf> {
    files_under(&dir.join("chunks"))
}

fn round_trip(encrypted: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let key = tmp.path().join("key");
    let config = StoreConfig { encrypted, ..cfg() };
    let store =
        ChunkStore::create(&root, None, &config, encrypted.then_some(key.as_path())).unwrap();
    assert_eq!(store.chunk_size(), CS);
    assert_eq!(store.is_encrypted(), encrypted);

    // A disk of 3.5 chunks: data, zero, text, short tail.
    let disk_size = 3 * u64::from(CS) + 1000;
    let chunks = [noise(1, CS as usize), text(CS as usize), noise(2, 1000)];
    let mut map = BlockMap::new(disk_size, CS);
    for (slot, data) in [0usize, 2, 3].into_iter().zip(&chunks) {
        assert_eq!(data.len() as u32, map.chunk_len(slot));
        let out = store.put(data).unwrap();
        assert!(out.new);
        assert!(out.stored_bytes > 0);
        assert_eq!(out.id, store.chunk_id(data));
        map.slots[slot] = Slot::Data(out.id);
    }
    store.write_index("env-web/disk-vda/0001", &map).unwrap();
    drop(store);

    let store = ChunkStore::open(&root, encrypted.then_some(key.as_path())).unwrap();
    let back = store.read_index("env-web/disk-vda/0001").unwrap();
    assert_eq!(back, map);
    assert_eq!(back.slots[1], Slot::Zero);
    for (slot, data) in [0usize, 2, 3].into_iter().zip(&chunks) {
        let Slot::Data(id) = back.slots[slot] else {
            panic!("slot {slot} lost its data")
        };
        assert_eq!(&store.get(&id).unwrap(), data);
    }
    assert_eq!(store.list_indexes().unwrap(), vec!["env-web/disk-vda/0001"]);
    // Plain ids are plain SHA-256; encrypted ids are keyed.
    let sha = ring::digest::digest(&ring::digest::SHA256, &chunks[0]);
    assert_eq!(
        store.chunk_id(&chunks[0]).as_bytes() == sha.as_ref(),
        !encrypted
    );
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn round_trip_plain() {
    round_trip(false);
}

#[test]
fn round_trip_encrypted() {
    round_trip(true);
}

#[test]
fn dedup_across_two_indexes_counts_bytes_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::create(tmp.path(), None, &cfg(), None).unwrap();
    let a = noise(10, CS as usize);
    let b = noise(11, CS as usize);
    let c = noise(12, CS as usize);
    let pa = store.put(&a).unwrap();
    let pb = store.put(&b).unwrap();
    let mut m1 = BlockMap::new(2 * u64::from(CS), CS);
    m1.slots = vec![Slot::Data(pa.id), Slot::Data(pb.id)];
    store.write_index("vm/disk/0001", &m1).unwrap();

    // Incremental: slot 1 changed, slot 0 reused.
    let pa2 = store.put(&a).unwrap();
    assert!(!pa2.new);
    assert_eq!(pa2.stored_bytes, 0);
    assert_eq!(pa2.id, pa.id);
    let pc = store.put(&c).unwrap();
    let mut m2 = m1.clone();
    m2.slots[1] = Slot::Data(pc.id);
    store.write_index("vm/disk/0002", &m2).unwrap();

    let stats = store.stats().unwrap();
    assert_eq!(stats.hot_chunks, 3);
    assert_eq!(
        stats.hot_bytes,
        pa.stored_bytes + pb.stored_bytes + pc.stored_bytes
    );
    assert_eq!(stats.plain_bytes, 3 * u64::from(CS));
    assert_eq!(stats.referenced_bytes, 4 * u64::from(CS));
    assert_eq!(stats.indexes, 2);
    assert!((stats.dedup_ratio - 4.0 / 3.0).abs() < 1e-9, "{stats:?}");
    assert_eq!(chunk_files(tmp.path()).len(), 3);
}

#[test]
fn zstd_shrinks_compressible_and_stores_incompressible_raw() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::create(tmp.path(), None, &cfg(), None).unwrap();
    let t = store.put(&text(CS as usize)).unwrap();
    assert!(t.stored_bytes < u64::from(CS) / 10, "{t:?}");
    let n = store.put(&noise(5, CS as usize)).unwrap();
    // Raw: header (16 bytes) + CRC-32 (4) + the data itself.
    assert_eq!(n.stored_bytes, u64::from(CS) + 20);
    let raw = fs::read(
        chunk_files(tmp.path())
            .into_iter()
            .find(|p| p.ends_with(n.id.to_string()))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(&raw[20..], &noise(5, CS as usize)[..]);
    assert_eq!(raw[5] & 1, 0, "zstd flag must be clear");
    assert_eq!(raw[5] & 4, 4, "a plain chunk has a CRC");
    assert_eq!(
        u32::from_le_bytes(raw[16..20].try_into().unwrap()),
        crc32fast::hash(&noise(5, CS as usize))
    );
    let z = store.put(&vec![0u8; CS as usize]).unwrap();
    assert!(z.stored_bytes < 100);
    assert_eq!(store.get(&z.id).unwrap(), vec![0u8; CS as usize]);
    let e = store.put(&[]).unwrap();
    assert_eq!(store.get(&e.id).unwrap(), Vec::<u8>::new());
    assert!(store.stats().unwrap().compression_ratio > 1.5);
}

#[test]
fn oversized_chunk_and_mismatched_map_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::create(tmp.path(), None, &cfg(), None).unwrap();
    assert!(matches!(
        store.put(&vec![1u8; CS as usize + 1]),
        Err(Error::ChunkTooLarge { .. })
    ));
    let map = BlockMap::new(1 << 20, CS * 2);
    assert!(matches!(
        store.write_index("a", &map),
        Err(Error::BadBlockMap { .. })
    ));
    let mut map = BlockMap::new(u64::from(CS), CS);
    map.slots.push(Slot::Zero);
    assert!(matches!(
        store.write_index("a", &map),
        Err(Error::BadBlockMap { .. })
    ));
    // An index may only reference chunks that are in the store.
    let mut map = BlockMap::new(u64::from(CS), CS);
    map.slots[0] = Slot::Data(ChunkId([0xaa; 32]));
    let err = store.write_index("a", &map).unwrap_err();
    assert!(matches!(err, Error::Missing { .. }), "{err}");
    assert!(store.list_indexes().unwrap().is_empty());
}

#[test]
fn index_names_are_validated() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::create(tmp.path(), None, &cfg(), None).unwrap();
    let map = BlockMap::new(10, CS);
    for bad in ["../escape", "/etc/passwd", "a/../../b", "", "a//b", ".x"] {
        let err = store.write_index(bad, &map).unwrap_err();
        assert!(
            matches!(err, Error::InvalidIndexName { .. }),
            "{bad}: {err}"
        );
        assert!(store.read_index(bad).is_err());
    }
    store.write_index("env/disk", &map).unwrap();
    store.write_index("env/disk/0001", &map).unwrap();
    store.write_index("env/disk/0001", &map).unwrap(); // replace
    assert_eq!(
        store.list_indexes().unwrap(),
        vec!["env/disk", "env/disk/0001"]
    );
    store.remove_index("env/disk/0001").unwrap();
    assert!(
        !tmp.path().join("indexes/env/disk").exists(),
        "empty dir pruned"
    );
    assert!(matches!(
        store.remove_index("env/disk/0001"),
        Err(Error::IndexNotFound { .. })
    ));
    assert!(matches!(
        store.read_index("nope"),
        Err(Error::IndexNotFound { .. })
    ));
}

#[test]
fn truncated_or_garbage_index_gives_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::create(tmp.path(), None, &cfg(), None).unwrap();
    let p = store.put(&noise(1, 5000)).unwrap();
    let mut map = BlockMap::new(5000, CS);
    map.slots[0] = Slot::Data(p.id);
    store.write_index("vm/a", &map).unwrap();
    let file = tmp.path().join("indexes/vm/a.idx");
    let good = fs::read(&file).unwrap();

    fs::write(&file, &good[..good.len() - 7]).unwrap();
    let err = store.read_index("vm/a").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::CorruptIndex { .. }), "{msg}");
    assert!(msg.contains("vm/a") && msg.contains("checksum"), "{msg}");

    fs::write(
        &file,
        b"hello, I am not an index at all, just some text here",
    )
    .unwrap();
    let msg = store.read_index("vm/a").unwrap_err().to_string();
    assert!(msg.contains("not an index file"), "{msg}");

    fs::write(&file, b"").unwrap();
    let msg = store.read_index("vm/a").unwrap_err().to_string();
    assert!(msg.contains("truncated"), "{msg}");

    let mut future = good.clone();
    future[4] = 9;
    fs::write(&file, &future).unwrap();
    let msg = store.read_index("vm/a").unwrap_err().to_string();
    assert!(msg.contains("version 9"), "{msg}");

    // verify lists it; gc refuses to sweep with an unreadable index.
    let report = store.verify().unwrap();
    assert_eq!(report.bad_indexes.len(), 1);
    assert_eq!(report.bad_indexes[0].name, "vm/a");
    assert!(matches!(
        store.gc(std::time::Duration::ZERO),
        Err(Error::CorruptIndex { .. })
    ));
    assert!(store.contains(&p.id));
}

#[test]
fn four_threads_put_and_get_concurrently() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(ChunkStore::create(tmp.path(), None, &cfg(), None).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let mut news = 0;
                for i in 0..40u64 {
                    // Half the chunks are shared by all threads (racing puts).
                    let seed = if i % 2 == 0 { i } else { 1000 * (t + 1) + i };
                    let data = noise(seed, CS as usize / 2);
                    let out = store.put(&data).unwrap();
                    if out.new {
                        news += 1;
                    }
                    assert_eq!(store.get(&out.id).unwrap(), data);
                }
                news
            })
        })
        .collect();
    let news: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    // 20 shared + 4 × 20 private chunks, each reported new exactly once.
    assert_eq!(news, 100);
    assert_eq!(chunk_files(tmp.path()).len(), 100);
    assert!(files_under(&tmp.path().join("tmp")).is_empty());
}

#[test]
fn crash_leftovers_are_cleaned_and_never_visible() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let store = ChunkStore::create(&root, None, &cfg(), None).unwrap();
    let good = store.put(&noise(1, 4096)).unwrap();
    let mut map = BlockMap::new(4096, CS);
    map.slots[0] = Slot::Data(good.id);
    store.write_index("vm/d/1", &map).unwrap();
    drop(store);

    // A crash mid-put and mid-index-write leaves temp files behind, and a
    // crash mid-gc leaves a parked chunk.
    fs::create_dir_all(root.join("tmp/7f")).unwrap();
    fs::write(root.join("tmp/7f/123-chunk-0-0.tmp"), b"WFCK half a chunk").unwrap();
    fs::write(root.join("tmp/123-index-1-0.tmp"), b"WFIX half an index").unwrap();
    let hot = root.join("chunks");
    let good_path = files_under(&hot)
        .into_iter()
        .find(|p| p.ends_with(good.id.to_string()))
        .unwrap();
    fs::rename(&good_path, root.join(format!("tmp/{}.parked", good.id))).unwrap();

    let store = ChunkStore::open(&root, None).unwrap();
    assert!(files_under(&root.join("tmp")).is_empty());
    assert_eq!(store.list_indexes().unwrap(), vec!["vm/d/1"]);
    assert_eq!(store.get(&good.id).unwrap(), noise(1, 4096));
    assert!(store.verify().unwrap().is_ok());
    assert_eq!(store.stats().unwrap().hot_chunks, 1);

    // While another handle is open, leftovers stay until gc finds them stale.
    let other = ChunkStore::open(&root, None).unwrap();
    fs::write(root.join("tmp/9-chunk-0-0.tmp"), b"x").unwrap();
    drop(store);
    let again = ChunkStore::open(&root, None).unwrap();
    assert!(root.join("tmp/9-chunk-0-0.tmp").exists());
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    fs::File::options()
        .write(true)
        .open(root.join("tmp/9-chunk-0-0.tmp"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    let report = again.gc(std::time::Duration::from_secs(60)).unwrap();
    assert_eq!(report.temp_files_removed, 1);
    assert_eq!(report.removed_chunks, 0);
    drop(other);
}

#[test]
fn create_and_open_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = ChunkStore::open(tmp.path(), None).unwrap_err();
    assert!(matches!(err, Error::NotAStore { .. }), "{err}");
    ChunkStore::create(tmp.path(), None, &cfg(), None).unwrap();
    let err = ChunkStore::create(tmp.path(), None, &cfg(), None).unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    let bad = StoreConfig {
        chunk_size: 100_000,
        ..cfg()
    };
    let err = ChunkStore::create(&tmp.path().join("x"), None, &bad, None).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    let enc = StoreConfig {
        encrypted: true,
        ..cfg()
    };
    let err = ChunkStore::create(&tmp.path().join("y"), None, &enc, None).unwrap_err();
    assert!(err.to_string().contains("key file"), "{err}");
    // Unknown future store version.
    let meta = tmp.path().join("store.json");
    let text = fs::read_to_string(&meta).unwrap();
    fs::write(&meta, text.replace("\"version\": 2", "\"version\": 7")).unwrap();
    let err = ChunkStore::open(tmp.path(), None).unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedVersion { version: 7, .. }),
        "{err}"
    );
}

#[test]
fn index_of_another_chunk_size_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = ChunkStore::create(&tmp.path().join("a"), None, &cfg(), None).unwrap();
    let big = StoreConfig {
        chunk_size: 2 * CS,
        ..cfg()
    };
    let b = ChunkStore::create(&tmp.path().join("b"), None, &big, None).unwrap();
    b.write_index("planted", &BlockMap::new(10 * u64::from(CS), 2 * CS))
        .unwrap();
    fs::copy(
        tmp.path().join("b/indexes/planted.idx"),
        tmp.path().join("a/indexes/planted.idx"),
    )
    .unwrap();
    let err = a.read_index("planted").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::CorruptIndex { .. }), "{msg}");
    assert!(msg.contains("chunk size"), "{msg}");
}

/// `get_direct` returns what `get` returns, on a disk file system and on tmpfs (which
/// refuses `O_DIRECT` before Linux 6.6; the read is then buffered), plain and encrypted, for raw, compressed and
/// short chunks; a damaged chunk fails its check and a missing one is `Missing`.
fn direct_reads_match(dir: &Path) {
    for encrypted in [false, true] {
        let tmp = tempfile::tempdir_in(dir).unwrap();
        let key = tmp.path().join("key");
        let config = StoreConfig { encrypted, ..cfg() };
        let store = ChunkStore::create(
            &tmp.path().join("store"),
            None,
            &config,
            encrypted.then_some(key.as_path()),
        )
        .unwrap();
        let chunks = [noise(7, CS as usize), text(CS as usize), noise(8, 1000)];
        let mut ids = Vec::new();
        for data in &chunks {
            let id = store.put(data).unwrap().id;
            for check in [Check::Id, Check::Checksum] {
                assert_eq!(&store.get_direct(&id, check).unwrap(), data);
            }
            ids.push(id);
        }
        let absent = store.chunk_id(b"never stored");
        assert!(matches!(
            store.get_direct(&absent, Check::Checksum),
            Err(Error::Missing { .. })
        ));
        // Damage the raw chunk's last byte (payload, or the GCM tag).
        let path = chunk_files(&tmp.path().join("store"))
            .into_iter()
            .find(|p| p.ends_with(ids[0].to_hex()))
            .unwrap();
        let mut bytes = fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 0x55;
        fs::write(&path, &bytes).unwrap();
        for check in [Check::Id, Check::Checksum] {
            let e = store.get_direct(&ids[0], check).unwrap_err();
            assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        }
        assert_eq!(
            &store.get_direct(&ids[1], Check::Checksum).unwrap(),
            &chunks[1]
        );
    }
}

#[test]
fn direct_reads_on_disk_file_systems() {
    direct_reads_match(&std::env::temp_dir());
}

#[test]
fn direct_reads_on_tmpfs() {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        direct_reads_match(shm);
    }
}
