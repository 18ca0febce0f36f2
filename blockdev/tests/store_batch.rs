//! Put batches: one syncfs per batch, and the re-check of a batch that died
//! before its commit.

use std::fs;
use std::path::Path;

use weft_blockdev::store::ChunkStore;

mod common;
use common::*;

fn markers(root: &Path) -> Vec<String> {
    match fs::read_dir(root.join("pending")) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn committed_batch_leaves_no_marker_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    let store = ChunkStore::create(&root, None, &cfg(), None).unwrap();
    let batch = store.batch().unwrap();
    assert_eq!(markers(&root).len(), 1, "a live batch has its marker");
    let a = batch.put(&noise(1, CS as usize)).unwrap();
    let again = batch.put(&noise(1, CS as usize)).unwrap();
    assert!(a.new && !again.new, "batches deduplicate like put");
    batch.commit().unwrap();
    assert!(markers(&root).is_empty());
    assert_eq!(store.get(&a.id).unwrap(), noise(1, CS as usize));
}

#[test]
fn chunks_of_a_batch_that_died_are_rechecked_and_bad_ones_removed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    let store = ChunkStore::create(&root, None, &cfg(), None).unwrap();
    let old = store.put(&noise(9, CS as usize)).unwrap();

    let batch = store.batch().unwrap();
    let good = batch.put(&noise(1, CS as usize)).unwrap();
    let torn = batch.put(&noise(2, CS as usize)).unwrap();
    // The process dies before the commit; the data of one chunk never
    // reached the disk (its name did: an empty file, as ext4 leaves it).
    drop(batch);
    fs::write(chunk_path(&root, &torn.id), b"").unwrap();
    assert_eq!(markers(&root).len(), 1, "the marker outlives its batch");

    let reopened = ChunkStore::open(&root, None).unwrap();
    assert!(markers(&root).is_empty(), "recovery removes the marker");
    assert!(
        !chunk_path(&root, &torn.id).exists(),
        "the torn chunk is removed"
    );
    assert_eq!(reopened.get(&good.id).unwrap(), noise(1, CS as usize));
    assert_eq!(reopened.get(&old.id).unwrap(), noise(9, CS as usize));
    // The next backup stores it again instead of deduplicating against garbage.
    let again = reopened.put(&noise(2, CS as usize)).unwrap();
    assert!(again.new);
    assert_eq!(reopened.get(&torn.id).unwrap(), noise(2, CS as usize));
    assert!(reopened.verify().unwrap().is_ok());
}

#[test]
fn a_new_batch_rechecks_one_that_was_dropped_in_the_same_process() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    let store = ChunkStore::create(&root, None, &cfg(), None).unwrap();
    let batch = store.batch().unwrap();
    let torn = batch.put(&noise(3, CS as usize)).unwrap();
    drop(batch);
    // Half a chunk file: a plausible header, data cut short.
    let path = chunk_path(&root, &torn.id);
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();

    let next = store.batch().unwrap();
    assert!(!path.exists(), "starting a batch re-checks the dropped one");
    assert!(next.put(&noise(3, CS as usize)).unwrap().new);
    next.commit().unwrap();
    assert!(markers(&root).is_empty());
    assert_eq!(store.get(&torn.id).unwrap(), noise(3, CS as usize));
}

#[test]
fn a_live_batch_is_left_alone_by_other_openers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    let store = ChunkStore::create(&root, None, &cfg(), None).unwrap();
    let batch = store.batch().unwrap();
    let a = batch.put(&noise(4, CS as usize)).unwrap();
    let other = ChunkStore::open(&root, None).unwrap();
    let other_batch = other.batch().unwrap();
    assert_eq!(
        markers(&root).len(),
        2,
        "both live batches keep their markers"
    );
    assert_eq!(other.get(&a.id).unwrap(), noise(4, CS as usize));
    other_batch.commit().unwrap();
    batch.commit().unwrap();
    assert!(markers(&root).is_empty());
}
