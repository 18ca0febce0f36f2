//! Chunk store: bad chunks are quarantined by verify (and by put's cheap check),
//! restores of affected snapshots fail naming the chunk, and the next backup that
//! holds the same data stores the chunk again, healing the old snapshots.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use weft_blockdev::store::{BlockMap, ChunkId, ChunkStore, Error, Slot, StoreConfig, TierPolicy};

mod common;
use common::*;

fn cfg(encrypted: bool) -> StoreConfig {
    StoreConfig {
        chunk_size: CS,
        encrypted,
        zstd_level: 3,
    }
}

fn quarantine_path(base: &Path, id: &ChunkId) -> PathBuf {
    base.join("quarantine").join(id.to_string())
}

fn flip_byte(path: &Path, from_end: usize) -> Vec<u8> {
    let mut b = fs::read(path).unwrap();
    let n = b.len();
    b[n - from_end] ^= 0x40;
    fs::write(path, &b).unwrap();
    b
}

fn index_of(store: &ChunkStore, name: &str, ids: &[ChunkId]) -> BlockMap {
    let mut map = BlockMap::new(u64::from(CS) * ids.len() as u64, CS);
    for (s, id) in map.slots.iter_mut().zip(ids) {
        *s = Slot::Data(*id);
    }
    store.write_index(name, &map).unwrap();
    map
}

/// What a restore does: read every data slot of an index.
fn restore(store: &ChunkStore, name: &str) -> Result<Vec<Vec<u8>>, Error> {
    let map = store.read_index(name)?;
    map.data_ids().map(|id| store.get(id)).collect()
}

fn corrupt_chunk_is_quarantined_and_healed_by_the_next_put(encrypted: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let key = tmp.path().join("k");
    let store = ChunkStore::create(
        &root,
        None,
        &cfg(encrypted),
        encrypted.then_some(key.as_path()),
    )
    .unwrap();
    let good_data = noise(1, CS as usize);
    let bad_data = noise(2, CS as usize);
    let good = store.put(&good_data).unwrap().id;
    let bad = store.put(&bad_data).unwrap().id;
    index_of(&store, "vm/a/1", &[good, bad]);
    index_of(&store, "vm/a/2", &[bad, bad]);
    index_of(&store, "vm/b/1", &[good]);

    // Bit rot in one chunk file.
    let path = chunk_path(&root, &bad);
    let damaged = flip_byte(&path, 5);

    // verify reports it with the indexes referencing it, and moves it aside.
    let report = store.verify().unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.chunks_checked, 2);
    assert_eq!(report.bad_chunks.len(), 1, "{report:?}");
    let b = &report.bad_chunks[0];
    assert_eq!(b.id, bad);
    assert_eq!(b.path, path);
    assert_eq!(b.referenced_by, ["vm/a/1", "vm/a/2"]);
    let q = quarantine_path(&root, &bad);
    assert_eq!(b.quarantined.as_deref(), Some(q.as_path()));
    // Not reported twice (as bad and as missing).
    assert!(report.missing_chunks.is_empty(), "{report:?}");
    assert!(report.bad_indexes.is_empty());
    // Evidence kept byte for byte; the chunk is no longer at its path.
    assert_eq!(fs::read(&q).unwrap(), damaged);
    assert!(!path.exists());
    assert!(!store.contains(&bad));
    assert_eq!(store.quarantined(&bad), Some(q.clone()));

    // Reads fail loudly, naming the chunk and where its file went.
    let err = store.get(&bad).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, Error::Corrupt { id, path, .. } if *id == bad && *path == q),
        "{msg}"
    );
    assert!(
        msg.contains(&bad.to_string()) && msg.contains("quarantine"),
        "{msg}"
    );
    let err = restore(&store, "vm/a/2").unwrap_err();
    assert!(err.to_string().contains(&bad.to_string()), "{err}");
    assert_eq!(
        restore(&store, "vm/b/1").unwrap(),
        std::slice::from_ref(&good_data)
    );
    // A new snapshot cannot reference it (write_index checks chunks exist).
    let mut map = BlockMap::new(u64::from(CS), CS);
    map.slots[0] = Slot::Data(bad);
    let err = store.write_index("vm/c/1", &map).unwrap_err();
    assert!(err.to_string().contains(&bad.to_string()), "{err}");

    // A second verify before any heal: missing, with the evidence named.
    let report = store.verify().unwrap();
    assert!(report.bad_chunks.is_empty(), "{report:?}");
    assert_eq!(report.missing_chunks.len(), 1);
    assert_eq!(report.missing_chunks[0].id, bad);
    assert_eq!(report.missing_chunks[0].referenced_by, ["vm/a/1", "vm/a/2"]);
    assert_eq!(
        report.missing_chunks[0].quarantined.as_deref(),
        Some(q.as_path())
    );

    // The next backup holding the same data stores the chunk again ...
    let out = store.put(&bad_data).unwrap();
    assert_eq!(out.id, bad);
    assert!(
        out.new,
        "a quarantined chunk must be stored again, not deduplicated"
    );
    assert!(out.stored_bytes > 0);
    assert_eq!(store.get(&bad).unwrap(), bad_data);
    // ... which heals the old snapshots that reference it.
    assert_eq!(
        restore(&store, "vm/a/1").unwrap(),
        [good_data.clone(), bad_data.clone()]
    );
    assert_eq!(
        restore(&store, "vm/a/2").unwrap(),
        [bad_data.clone(), bad_data.clone()]
    );
    store.write_index("vm/c/1", &map).unwrap();
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    // The evidence stays (verify never deletes it; gc does not sweep it).
    assert!(q.exists());
    store.gc(Duration::ZERO).unwrap();
    assert!(q.exists());
    assert!(store.contains(&bad));

    // The same chunk rots again: the earlier evidence is kept, the new one
    // goes next to it.
    let damaged2 = flip_byte(&path, 100);
    let report = store.verify().unwrap();
    let q1 = root.join("quarantine").join(format!("{bad}.1"));
    assert_eq!(
        report.bad_chunks[0].quarantined.as_deref(),
        Some(q1.as_path())
    );
    assert_eq!(fs::read(&q).unwrap(), damaged);
    assert_eq!(fs::read(&q1).unwrap(), damaged2);
    assert!(store.put(&bad_data).unwrap().new);
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn corrupt_chunk_is_quarantined_and_healed_plain() {
    corrupt_chunk_is_quarantined_and_healed_by_the_next_put(false);
}

#[test]
fn corrupt_chunk_is_quarantined_and_healed_encrypted() {
    corrupt_chunk_is_quarantined_and_healed_by_the_next_put(true);
}

#[test]
fn put_quarantines_an_implausible_file_instead_of_deduplicating() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let store = ChunkStore::create(root, None, &cfg(false), None).unwrap();
    let data = noise(3, 5000);
    let id = store.put(&data).unwrap().id;
    let path = chunk_path(root, &id);
    let good = fs::read(&path).unwrap();

    // Truncated (a torn copy, a full disk during a restore from elsewhere ...).
    for bad in [&good[..good.len() - 1], &good[..10], &b""[..]] {
        fs::write(&path, bad).unwrap();
        let out = store.put(&data).unwrap();
        assert!(out.new, "truncated to {}", bad.len());
        assert_eq!(store.get(&id).unwrap(), data);
    }
    // Every damaged file was kept as evidence.
    let mut kept: Vec<usize> = fs::read_dir(root.join("quarantine"))
        .unwrap()
        .map(|e| fs::metadata(e.unwrap().path()).unwrap().len() as usize)
        .collect();
    kept.sort_unstable();
    assert_eq!(kept, [0, 10, good.len() - 1]);

    // Trailing garbage and a header from another store kind are implausible too.
    let mut long = good.clone();
    long.extend_from_slice(b"junk");
    fs::write(&path, &long).unwrap();
    assert!(store.put(&data).unwrap().new);
    let mut enc_flag = good.clone();
    enc_flag[5] |= 2;
    fs::write(&path, &enc_flag).unwrap();
    assert!(store.put(&data).unwrap().new);
    assert_eq!(store.get(&id).unwrap(), data);

    // A plausible file with a damaged payload passes the cheap check (put does
    // not re-hash): it is deduplicated until verify quarantines it.
    flip_byte(&path, 7);
    assert!(!store.put(&data).unwrap().new);
    assert_eq!(store.verify().unwrap().bad_chunks.len(), 1);
    assert!(store.put(&data).unwrap().new);
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn bad_cold_chunk_is_quarantined_in_the_cold_tier() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("hot");
    let cold = tmp.path().join("cold");
    let store = ChunkStore::create(&root, Some(&cold), &cfg(false), None).unwrap();
    let data = noise(4, CS as usize);
    let id = store.put(&data).unwrap().id;
    index_of(&store, "vm/1", &[id]);
    let policy = TierPolicy {
        cold_after: Duration::from_secs(60),
        ..TierPolicy::default()
    };
    let later = SystemTime::now() + Duration::from_secs(3600);
    assert_eq!(store.tier_at(&policy, later).unwrap().demoted, 1);
    let path = chunk_path(&cold, &id);
    flip_byte(&path, 3);

    let report = store.verify().unwrap();
    assert_eq!(report.bad_chunks.len(), 1);
    let q = quarantine_path(&cold, &id);
    assert_eq!(
        report.bad_chunks[0].quarantined.as_deref(),
        Some(q.as_path())
    );
    assert!(q.exists() && !path.exists());
    let err = store.get(&id).unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { path, .. } if *path == q),
        "{err}"
    );
    // Stored again (hot), the snapshot restores.
    assert!(store.put(&data).unwrap().new);
    assert!(chunk_path(&root, &id).exists());
    assert_eq!(restore(&store, "vm/1").unwrap(), [data]);
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn verify_report_names_where_the_bad_file_was_found() {
    // verify's report keeps the path where the bad file was found; the chunk
    // path is empty afterwards and get names the quarantine file instead.
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::create(tmp.path(), None, &cfg(false), None).unwrap();
    let id = store.put(&vec![9u8; CS as usize]).unwrap().id; // compressed
    let path = chunk_path(tmp.path(), &id);
    flip_byte(&path, 2);
    let before = store.get(&id).unwrap_err();
    assert!(
        matches!(&before, Error::Corrupt { path: p, .. } if *p == path),
        "{before}"
    );
    let report = store.verify().unwrap();
    assert_eq!(report.bad_chunks[0].path, path);
    assert!(report.bad_chunks[0].referenced_by.is_empty());
    assert!(!path.exists());
}
