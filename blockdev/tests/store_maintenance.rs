//! Chunk store: corruption, verify, gc and tiers.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use weft_blockdev::store::{BlockMap, ChunkId, ChunkStore, Error, Slot, StoreConfig, TierPolicy};

mod common;
use common::*;

fn set_mtime(path: &Path, t: SystemTime) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

fn mtime(path: &Path) -> SystemTime {
    fs::metadata(path).unwrap().modified().unwrap()
}

fn index_of(store: &ChunkStore, name: &str, ids: &[ChunkId]) {
    let mut map = BlockMap::new(u64::from(CS) * ids.len() as u64, CS);
    for (s, id) in map.slots.iter_mut().zip(ids) {
        *s = Slot::Data(*id);
    }
    store.write_index(name, &map).unwrap();
}

fn corrupt_chunk_is_named(encrypted: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let key = tmp.path().join("k");
    let config = StoreConfig { encrypted, ..cfg() };
    let store =
        ChunkStore::create(&root, None, &config, encrypted.then_some(key.as_path())).unwrap();
    let good = store.put(&noise(1, CS as usize)).unwrap().id;
    let bad = store.put(&vec![3u8; CS as usize]).unwrap().id; // compressed
    let bad_raw = store.put(&noise(2, CS as usize)).unwrap().id; // raw
    index_of(&store, "vm/a/1", &[good, bad]);
    index_of(&store, "vm/a/2", &[bad, bad_raw]);
    index_of(&store, "vm/b/1", &[good]);

    for id in [bad, bad_raw] {
        let p = chunk_path(&root, &id);
        let mut b = fs::read(&p).unwrap();
        let n = b.len();
        b[n - 5] ^= 0x40;
        fs::write(&p, &b).unwrap();
        let err = store.get(&id).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, Error::Corrupt { id: e, .. } if *e == id),
            "{msg}"
        );
        assert!(msg.contains(&id.to_string()), "{msg}");
    }
    assert_eq!(store.get(&good).unwrap(), noise(1, CS as usize));

    // A truncated chunk and a missing one.
    let gone = store.put(&noise(9, 999)).unwrap().id;
    index_of(&store, "vm/c/1", &[gone]);
    fs::remove_file(chunk_path(&root, &gone)).unwrap();
    let err = store.get(&gone).unwrap_err();
    assert!(matches!(err, Error::Missing { .. }), "{err}");

    let report = store.verify().unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.chunks_checked, 3);
    assert_eq!(report.bad_chunks.len(), 2, "{report:?}");
    let by_id = |id: ChunkId| report.bad_chunks.iter().find(|b| b.id == id).unwrap();
    assert_eq!(by_id(bad).referenced_by, vec!["vm/a/1", "vm/a/2"]);
    assert_eq!(by_id(bad_raw).referenced_by, vec!["vm/a/2"]);
    assert_eq!(by_id(bad).path, chunk_path(&root, &bad));
    assert_eq!(report.missing_chunks.len(), 1);
    assert_eq!(report.missing_chunks[0].id, gone);
    assert_eq!(report.missing_chunks[0].referenced_by, vec!["vm/c/1"]);
    assert!(report.bad_indexes.is_empty());
}

#[test]
fn corrupt_chunk_plain_is_named_by_get_and_verify() {
    corrupt_chunk_is_named(false);
}

#[test]
fn corrupt_chunk_encrypted_is_named_by_get_and_verify() {
    corrupt_chunk_is_named(true);
}

#[test]
fn truncated_chunk_file_is_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::create(tmp.path(), None, &cfg(), None).unwrap();
    let id = store.put(&noise(4, 5000)).unwrap().id;
    let p = chunk_path(tmp.path(), &id);
    let b = fs::read(&p).unwrap();
    for n in [0, 3, 16, b.len() - 1] {
        fs::write(&p, &b[..n]).unwrap();
        let err = store.get(&id).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{n}: {err}");
    }
}

#[test]
fn gc_removes_old_unreferenced_and_keeps_referenced_and_recent() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let store = ChunkStore::create(root, None, &cfg(), None).unwrap();
    let old = SystemTime::now() - Duration::from_secs(3 * 3600);
    let referenced = store.put(&noise(1, 5000)).unwrap().id;
    let garbage = store.put(&noise(2, 5000)).unwrap().id;
    let in_flight = store.put(&noise(3, 5000)).unwrap().id; // a running backup's chunk
    let dropped = store.put(&noise(4, 5000)).unwrap().id;
    index_of(&store, "vm/1", &[referenced, dropped]);
    index_of(&store, "vm/2", &[referenced]);
    store.remove_index("vm/1").unwrap();
    for id in [referenced, garbage, dropped] {
        set_mtime(&chunk_path(root, &id), old);
    }
    // A running backup re-puts an old chunk: the touch protects it.
    let revived = store.put(&noise(5, 5000)).unwrap().id;
    set_mtime(&chunk_path(root, &revived), old);
    assert!(!store.put(&noise(5, 5000)).unwrap().new);

    let report = store.gc(Duration::from_secs(3600)).unwrap();
    assert_eq!(report.indexes, 1);
    assert_eq!(report.referenced_chunks, 1);
    assert_eq!(report.removed_chunks, 2, "{report:?}");
    assert_eq!(report.kept_chunks, 3);
    assert_eq!(report.missing_chunks, 0);
    assert!(report.removed_bytes > 10_000);
    assert!(!store.contains(&garbage));
    assert!(!store.contains(&dropped));
    for id in [referenced, in_flight, revived] {
        assert!(store.get(&id).is_ok(), "{id}");
    }
    // The mark touched the referenced chunk.
    assert!(mtime(&chunk_path(root, &referenced)) > old + Duration::from_secs(3000));
    assert!(store.verify().unwrap().is_ok());
    // No temp file is left, in `tmp/` or its per-prefix directories.
    for e in fs::read_dir(root.join("tmp")).unwrap() {
        let e = e.unwrap();
        assert!(e.file_type().unwrap().is_dir(), "{:?} left", e.path());
        assert!(
            fs::read_dir(e.path()).unwrap().next().is_none(),
            "{:?} not empty",
            e.path()
        );
    }
}

#[test]
fn gc_runs_one_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::create(tmp.path(), None, &cfg(), None).unwrap();
    let lock = fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(tmp.path().join("maintenance.lock"))
        .unwrap();
    let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let err = store.gc(Duration::from_secs(60)).unwrap_err();
    assert!(matches!(err, Error::MaintenanceBusy { .. }), "{err}");
    drop(held);
    store.gc(Duration::from_secs(60)).unwrap();
}

fn tiered(encrypted: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("hot");
    let cold = tmp.path().join("cold");
    let key = tmp.path().join("k");
    let config = StoreConfig { encrypted, ..cfg() };
    let store = ChunkStore::create(
        &root,
        Some(&cold),
        &config,
        encrypted.then_some(key.as_path()),
    )
    .unwrap();
    assert!(store.has_cold_tier());
    let a = store.put(&noise(1, CS as usize)).unwrap().id;
    let b = store.put(&noise(2, CS as usize)).unwrap().id;
    index_of(&store, "vm/1", &[a, b]);
    let policy = TierPolicy {
        cold_after: Duration::from_secs(86400),
        frequent_reads: 3,
        frequent_cold_after: Duration::from_secs(10 * 86400),
        promote_after_cold_reads: 2,
    };
    // Nothing is idle yet.
    let r = store.tier(&policy).unwrap();
    assert_eq!((r.demoted, r.promoted, r.hot_chunks), (0, 0, 2));

    // `b` is read often: frequent chunks stay hot longer.
    for _ in 0..3 {
        store.get(&b).unwrap();
    }
    let later = SystemTime::now() + Duration::from_secs(2 * 86400);
    let b_mtime = mtime(&chunk_path(&root, &b));
    let r = store.tier_at(&policy, later).unwrap();
    assert_eq!((r.demoted, r.hot_chunks, r.cold_chunks), (1, 1, 1), "{r:?}");
    assert!(!chunk_path(&root, &a).exists());
    assert!(chunk_path(&cold, &a).exists());
    assert!(chunk_path(&root, &b).exists());
    assert_eq!(mtime(&chunk_path(&root, &b)), b_mtime);

    // Reads still work from cold; a put of the same data dedups against cold.
    assert_eq!(store.get(&a).unwrap(), noise(1, CS as usize));
    assert!(!store.put(&noise(1, CS as usize)).unwrap().new);
    assert!(!chunk_path(&root, &a).exists());
    let stats = store.stats().unwrap();
    assert_eq!((stats.hot_chunks, stats.cold_chunks), (1, 1));
    assert!(store.verify().unwrap().is_ok());

    // Much later b goes cold too (the put of `a` above was an access: a stays cold
    // anyway since it is already cold).
    let much_later = SystemTime::now() + Duration::from_secs(20 * 86400);
    let r = store.tier_at(&policy, much_later).unwrap();
    assert_eq!(
        (r.demoted, r.promoted, r.hot_chunks, r.cold_chunks),
        (1, 0, 0, 2),
        "{r:?}"
    );
    // One cold read of `a` so far; a second promotes it at the next run.
    store.get(&a).unwrap();
    let r = store.tier_at(&policy, much_later).unwrap();
    assert_eq!(
        (r.promoted, r.hot_chunks, r.cold_chunks),
        (1, 1, 1),
        "{r:?}"
    );
    assert!(chunk_path(&root, &a).exists());
    assert!(!chunk_path(&cold, &a).exists());
    assert_eq!(store.get(&a).unwrap(), noise(1, CS as usize));

    // Stats survive reopen (the access log); gc sees both tiers.
    drop(store);
    let store = ChunkStore::open(&root, encrypted.then_some(key.as_path())).unwrap();
    let report = store.gc(Duration::from_secs(3600)).unwrap();
    assert_eq!((report.referenced_chunks, report.removed_chunks), (2, 0));
    store.remove_index("vm/1").unwrap();
    let old = SystemTime::now() - Duration::from_secs(7200);
    set_mtime(&chunk_path(&root, &a), old);
    set_mtime(&chunk_path(&cold, &b), old);
    let report = store.gc(Duration::from_secs(3600)).unwrap();
    assert_eq!(report.removed_chunks, 2, "{report:?}");
    assert!(!store.contains(&a) && !store.contains(&b));
}

#[test]
fn tier_moves_idle_chunks_and_cold_reads_promote_plain() {
    tiered(false);
}

#[test]
fn tier_moves_idle_chunks_and_cold_reads_promote_encrypted() {
    tiered(true);
}

#[test]
fn unmounted_cold_tier_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("hot");
    let cold = tmp.path().join("cold");
    let store = ChunkStore::create(&root, Some(&cold), &cfg(), None).unwrap();
    let a = store.put(&noise(1, 1000)).unwrap().id;
    index_of(&store, "vm/1", &[a]);
    store
        .tier_at(
            &TierPolicy::default(),
            SystemTime::now() + Duration::from_secs(365 * 86400),
        )
        .unwrap();
    drop(store);
    // "Unmount" the cold file system.
    fs::rename(&cold, tmp.path().join("elsewhere")).unwrap();
    fs::create_dir(&cold).unwrap();
    let store = ChunkStore::open(&root, None).unwrap();
    assert!(!store.has_cold_tier());
    let err = store.get(&a).unwrap_err();
    assert!(matches!(err, Error::ColdTier { .. }), "{err}");
    assert!(err.to_string().contains("mounted"), "{err}");
    assert!(matches!(
        store.gc(Duration::ZERO),
        Err(Error::ColdTier { .. })
    ));
    assert!(matches!(store.verify(), Err(Error::ColdTier { .. })));

    let plain = ChunkStore::create(&tmp.path().join("nocold"), None, &cfg(), None).unwrap();
    assert!(matches!(
        plain.tier(&TierPolicy::default()),
        Err(Error::ColdTier { .. })
    ));
}

#[test]
fn concurrent_puts_gets_and_gc() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let store = ChunkStore::create(root, None, &cfg(), None).unwrap();
    let keep: Vec<ChunkId> = (0..8)
        .map(|i| store.put(&noise(i, 4096)).unwrap().id)
        .collect();
    index_of(&store, "vm/keep", &keep);
    // Unreferenced chunks older than the grace period: the gc below races to
    // remove them while the threads re-put them (dedup touches).
    let old = SystemTime::now() - Duration::from_secs(7200);
    for i in 0..10u64 {
        let id = store.put(&noise(100 + i, 4096)).unwrap().id;
        set_mtime(&chunk_path(root, &id), old);
    }
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let store = store.clone();
            let keep = &keep;
            s.spawn(move || {
                for i in 0..40u64 {
                    let data = noise(100 + (i + t) % 10, 4096);
                    let id = store.put(&data).unwrap().id;
                    assert_eq!(store.get(&id).unwrap(), data);
                    assert_eq!(store.get(&keep[(i + t) as usize % 8]).unwrap().len(), 4096);
                }
            });
        }
        let store = store.clone();
        s.spawn(move || {
            for _ in 0..5 {
                match store.gc(Duration::from_secs(60)) {
                    Ok(_) | Err(Error::MaintenanceBusy { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
        });
    });
    assert!(keep.iter().all(|id| store.contains(id)));
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    // Every chunk the threads put survived (they were all touched within grace).
    for i in 0..10u64 {
        assert!(store.contains(&store.chunk_id(&noise(100 + i, 4096))));
    }
}
