//! `weft replay --base`: the application state read out of a disk snapshot in the
//! chunk store. A real ext4 image (mkfs.ext4 -d) holding a SQLite database whose last
//! transactions are still only in its write-ahead log, a JSON document, an env file and
//! a key-per-file directory is chunked into a real store; the base reader must find
//! every source under the guest's paths (the disk is mounted at /data in the guest)
//! and read them as the DPA would have captured them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::json;
use sqlx::{ConnectOptions, Connection, Executor};
use weft::replay_base::{extract, state_of, SnapshotDisk, Sources};
use weft_blockdev::store::{BlockMap, ChunkStore, Slot, StoreConfig};

const CHUNK: u32 = 64 * 1024;

/// Chunks a raw image into `store` as a snapshot's block map.
fn chunk_image(store: &ChunkStore, image: &Path) -> BlockMap {
    let bytes = std::fs::read(image).expect("image");
    let mut map = BlockMap::new(bytes.len() as u64, CHUNK);
    for (i, c) in bytes.chunks(CHUNK as usize).enumerate() {
        map.slots[i] = if c.iter().all(|b| *b == 0) {
            Slot::Zero
        } else {
            Slot::Data(store.put(c).expect("put").id)
        };
    }
    map
}

#[tokio::test]
async fn a_base_is_read_from_the_snapshot_as_the_dpa_captures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("flags")).expect("mkdir");

    // A database in WAL mode whose second transaction is only in the -wal file: the
    // files are copied while the connection is open (closing would checkpoint).
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).expect("mkdir");
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(live.join("app.db"))
        .create_if_missing(true)
        .connect()
        .await
        .expect("open");
    conn.execute("PRAGMA journal_mode=WAL").await.expect("wal");
    conn.execute("PRAGMA wal_autocheckpoint=0")
        .await
        .expect("no checkpoints");
    conn.execute(
        "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, price REAL, data BLOB);
         CREATE TABLE pairs(a TEXT, b INTEGER, note TEXT, PRIMARY KEY(a, b));
         CREATE TABLE _weft_capture(id INTEGER PRIMARY KEY AUTOINCREMENT, x TEXT);
         INSERT INTO items VALUES (1, 'one', 1.5, NULL), (2, 'two', 0.1, x'00ff');
         INSERT INTO pairs VALUES ('k', 1, 'first');
         PRAGMA wal_checkpoint(TRUNCATE);",
    )
    .await
    .expect("schema");
    conn.execute(
        "INSERT INTO items VALUES (3, 'three', NULL, NULL);
         UPDATE items SET name = 'uno' WHERE id = 1;
         DELETE FROM items WHERE id = 2;
         INSERT INTO pairs VALUES ('k', 2, 'second');",
    )
    .await
    .expect("second transaction");
    let wal = std::fs::metadata(live.join("app.db-wal"))
        .expect("wal")
        .len();
    assert!(wal > 0, "the second transaction must be in the WAL only");
    std::fs::copy(live.join("app.db"), root.join("app.db")).expect("copy db");
    std::fs::copy(live.join("app.db-wal"), root.join("app.db-wal")).expect("copy wal");
    conn.close().await.expect("close");

    std::fs::write(
        root.join("config.json"),
        r#"{"mode":"blue","limits":{"n":3}}"#,
    )
    .expect("json");
    std::fs::write(
        root.join("app.env"),
        "# settings\nexport A=1\nB = \"two words\"\n",
    )
    .expect("env");
    std::fs::write(root.join("flags/alpha"), "on").expect("flag");
    std::fs::write(root.join("flags/.tmp"), "half").expect("dotfile");

    let image = dir.path().join("disk.raw");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&image)
        .arg("32M")
        .output()
        .expect("mkfs.ext4 (e2fsprogs) must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let store = new_store(dir.path());
    let map = chunk_image(&store, &image);

    let sources = Sources {
        sqlite: BTreeMap::from([(
            "/data/app.db".to_string(),
            BTreeSet::from(["items".to_string(), "pairs".to_string()]),
        )]),
        json: BTreeSet::from([
            "/data/config.json".to_string(),
            "/data/gone.json".to_string(),
        ]),
        kv: BTreeSet::from(["/data/app.env".to_string(), "/data/flags/".to_string()]),
    };
    let fs = SnapshotDisk::new(store.clone(), map)
        .find_ext4()
        .expect("ext4 found");
    let scratch = tempfile::tempdir().expect("scratch");
    let x = extract(&fs, &sources, scratch.path()).expect("extract");
    assert_eq!(
        x.found.get("/data/app.db").map(String::as_str),
        Some("/app.db")
    );
    assert_eq!(
        x.found.get("/data/flags/").map(String::as_str),
        Some("/flags")
    );
    assert!(!x.found.contains_key("/data/gone.json"), "{:?}", x.found);
    let state = state_of(&x, &sources).await.expect("state");

    let db = &state.sqlite["/data/app.db"];
    let items: BTreeMap<_, _> = db.rows["items"]
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::Object(v.clone())))
        .collect();
    assert_eq!(
        items,
        BTreeMap::from([
            (
                "[1]".to_string(),
                json!({"id": 1, "name": "uno", "price": 1.5, "data": null})
            ),
            (
                "[3]".to_string(),
                json!({"id": 3, "name": "three", "price": null, "data": null})
            ),
        ]),
        "the WAL's transaction is part of the base"
    );
    assert_eq!(
        db.rows["pairs"].keys().cloned().collect::<Vec<_>>(),
        vec![r#"["k",1]"#.to_string(), r#"["k",2]"#.to_string()]
    );
    assert!(db.schemas["items"].starts_with("CREATE TABLE items"));
    assert!(!db.rows.contains_key("_weft_capture"));
    assert_eq!(
        state.json["/data/config.json"],
        json!({"mode": "blue", "limits": {"n": 3}})
    );
    assert_eq!(
        state.kv["/data/app.env"],
        BTreeMap::from([
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "two words".to_string())
        ])
    );
    assert_eq!(
        state.kv["/data/flags/"],
        BTreeMap::from([("alpha".to_string(), "on".to_string())]),
        "dotfiles are not keys"
    );
}

/// A plain store with the test's chunk size under `dir`.
fn new_store(dir: &std::path::Path) -> ChunkStore {
    ChunkStore::create(
        &dir.join("store"),
        None,
        &StoreConfig::with_chunk_size(CHUNK),
        None,
    )
    .expect("store")
}

#[test]
fn a_disk_without_ext4_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = new_store(dir.path());
    let mut map = BlockMap::new(4 << 20, CHUNK);
    map.slots[0] = Slot::Data(store.put(&vec![7u8; CHUNK as usize]).expect("put").id);
    let Err(err) = SnapshotDisk::new(store, map).find_ext4() else {
        panic!("a disk of sevens holds no file system");
    };
    assert!(err.contains("no ext4 file system"), "{err}");
}

/// A guest can write any superblock: ones that made `ext4-view` panic or allocate
/// gigabytes (found by fuzzing) are refused with a message: 0 blocks per group (a
/// division by zero), 64-bit group descriptors of 16 bytes (read past their end),
/// more blocks than the disk has (the cap on block groups needs a disk of more than
/// 1 GiB to reach, so it is not exercised here).
#[test]
fn superblocks_that_panicked_ext4_view_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "64bit"])
        .arg(&image)
        .arg("4M")
        .output()
        .expect("mkfs.ext4 (e2fsprogs) must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let good = std::fs::read(&image).expect("image");
    let sb = 1024;
    let zero_per_group = |b: &mut Vec<u8>| b[sb + 0x20..sb + 0x24].fill(0);
    let small_descriptors =
        |b: &mut Vec<u8>| b[sb + 0xfe..sb + 0x100].copy_from_slice(&16u16.to_le_bytes());
    // 2^32 - 1 blocks, 8 per group: half a billion groups, 8 GiB of descriptors.
    let huge = |b: &mut Vec<u8>| {
        b[sb + 0x04..sb + 0x08].copy_from_slice(&u32::MAX.to_le_bytes());
        b[sb + 0x20..sb + 0x24].copy_from_slice(&8u32.to_le_bytes());
    };
    type Damage<'a> = &'a dyn Fn(&mut Vec<u8>);
    let cases: [(&str, Damage); 3] = [
        ("0 blocks per group", &zero_per_group),
        ("group descriptors of 16 bytes", &small_descriptors),
        ("more than the disk's", &huge),
    ];
    for (want, damage) in cases {
        let mut bytes = good.clone();
        damage(&mut bytes);
        std::fs::write(&image, &bytes).expect("write");
        let sub = dir.path().join(want.replace(' ', "-"));
        std::fs::create_dir_all(&sub).expect("dir");
        let store = new_store(&sub);
        let map = chunk_image(&store, &image);
        let Err(err) = SnapshotDisk::new(store, map).find_ext4() else {
            panic!("a superblock with {want} was taken");
        };
        assert!(err.contains(want), "{err}");
    }
}
