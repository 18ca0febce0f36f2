//! Chunk store encryption: no plaintext on disk, key handling.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use weft_blockdev::store::{BlockMap, ChunkStore, Error, Slot, StoreConfig};

const SENTENCE: &[u8] = b"Attack at dawn; the password is hunter2 and nobody must know. ";

fn enc_cfg() -> StoreConfig {
    StoreConfig {
        chunk_size: 4 << 20,
        encrypted: true,
        zstd_level: 3,
    }
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

#[test]
fn no_file_contains_known_plaintext() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let key = tmp.path().join("store.key");
    let store = ChunkStore::create(&root, None, &enc_cfg(), Some(&key)).unwrap();
    let data: Vec<u8> = SENTENCE.iter().copied().cycle().take(4 << 20).collect();
    let out = store.put(&data).unwrap();
    // Also an incompressible chunk that embeds the sentence (stored raw, then encrypted).
    let mut mixed: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    mixed[1000..1000 + SENTENCE.len()].copy_from_slice(SENTENCE);
    let out2 = store.put(&mixed).unwrap();
    let mut map = BlockMap::new(5 << 20, 4 << 20);
    map.slots = vec![Slot::Data(out.id), Slot::Data(out2.id)];
    store.write_index("vm/disk/0001", &map).unwrap();
    assert_eq!(store.get(&out.id).unwrap(), data);
    assert_eq!(store.get(&out2.id).unwrap(), mixed);

    let needle = &SENTENCE[..24];
    let plain_hash = ring::digest::digest(&ring::digest::SHA256, &data);
    let files = files_under(&root);
    assert!(files.len() >= 4, "{files:?}");
    for f in files {
        let bytes = fs::read(&f).unwrap();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{} contains plaintext",
            f.display()
        );
        assert!(
            !bytes.windows(32).any(|w| w == plain_hash.as_ref()),
            "{} contains the plaintext SHA-256",
            f.display()
        );
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        assert!(!name.contains(&hex(plain_hash.as_ref())), "{name}");
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn key_required_and_wrong_key() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let key = tmp.path().join("a.key");
    let store = ChunkStore::create(&root, None, &enc_cfg(), Some(&key)).unwrap();
    let id = store.put(b"secret block").unwrap().id;
    drop(store);
    assert_eq!(fs::read(&key).unwrap().len(), 32);
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let err = ChunkStore::open(&root, None).unwrap_err();
    assert!(matches!(err, Error::KeyRequired { .. }), "{err}");
    assert!(
        err.to_string().contains("is encrypted: pass its key file"),
        "{err}"
    );

    // Another store's key.
    let other = tmp.path().join("b.key");
    ChunkStore::create(&tmp.path().join("other"), None, &enc_cfg(), Some(&other)).unwrap();
    let err = ChunkStore::open(&root, Some(&other)).unwrap_err();
    assert!(matches!(err, Error::WrongKey { .. }), "{err}");

    // A key file of the wrong length.
    let short = tmp.path().join("short.key");
    fs::write(&short, [1u8; 16]).unwrap();
    let err = ChunkStore::open(&root, Some(&short)).unwrap_err();
    assert!(matches!(err, Error::BadKeyFile { .. }), "{err}");

    // create never overwrites a key.
    let before = fs::read(&key).unwrap();
    let err =
        ChunkStore::create(&tmp.path().join("third"), None, &enc_cfg(), Some(&key)).unwrap_err();
    assert!(matches!(err, Error::KeyFileExists { .. }), "{err}");
    assert_eq!(fs::read(&key).unwrap(), before);

    let store = ChunkStore::open(&root, Some(&key)).unwrap();
    assert_eq!(store.get(&id).unwrap(), b"secret block");

    // A plain store refuses a key (likely a mix-up of stores).
    let plain = tmp.path().join("plain");
    ChunkStore::create(&plain, None, &StoreConfig::default(), None).unwrap();
    let err = ChunkStore::open(&plain, Some(&key)).unwrap_err();
    assert!(matches!(err, Error::KeyNotExpected { .. }), "{err}");
}

#[test]
fn tampered_encrypted_chunk_and_index_are_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let key = tmp.path().join("k");
    let store = ChunkStore::create(&root, None, &enc_cfg(), Some(&key)).unwrap();
    let a = store.put(&vec![7u8; 100_000]).unwrap().id;
    let b = store.put(&vec![8u8; 100_000]).unwrap().id;
    let mut map = BlockMap::new(100_000, 4 << 20);
    map.slots[0] = Slot::Data(a);
    store.write_index("i", &map).unwrap();

    // Swap two chunk files: authentication binds each payload to its id.
    let pa = files_under(&root.join("chunks"))
        .into_iter()
        .find(|p| p.ends_with(a.to_string()))
        .unwrap();
    let pb = files_under(&root.join("chunks"))
        .into_iter()
        .find(|p| p.ends_with(b.to_string()))
        .unwrap();
    fs::copy(&pb, &pa).unwrap();
    let err = store.get(&a).unwrap_err();
    assert!(matches!(err, Error::Corrupt { id, .. } if id == a), "{err}");
    assert!(err.to_string().contains("authentication failed"), "{err}");

    // A recomputed SHA-256 cannot forge an HMAC-protected index.
    let ip = root.join("indexes/i.idx");
    let mut bytes = fs::read(&ip).unwrap();
    let n = bytes.len();
    bytes[33] ^= 1;
    let sum = ring::digest::digest(&ring::digest::SHA256, &bytes[..n - 32]);
    bytes[n - 32..].copy_from_slice(sum.as_ref());
    fs::write(&ip, &bytes).unwrap();
    let err = store.read_index("i").unwrap_err();
    assert!(matches!(err, Error::CorruptIndex { .. }), "{err}");
}
