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
use weft::provenance::output::write_to;
use weft_blockdev::store::{BlockMap, ChunkStore, Slot, StoreConfig};
use weft_provenance::base::{extract, state_of, BaseLimits, SnapshotDisk, Sources};

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
    let x = extract(&fs, &sources, scratch.path(), &BaseLimits::default()).expect("extract");
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

/// An ext4 image of `root`'s tree (mkfs.ext4 -d), chunked into a new store under
/// `dir`, as its file system.
fn ext4_of(dir: &Path, root: &Path, size: &str) -> ext4_view::Ext4 {
    let image = dir.join("disk.raw");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(root)
        .arg(&image)
        .arg(size)
        .output()
        .expect("mkfs.ext4 (e2fsprogs) must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = new_store(dir);
    let map = chunk_image(&store, &image);
    SnapshotDisk::new(store, map)
        .find_ext4()
        .expect("ext4 found")
}

/// Every file under `dir`, recursively.
fn tree(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(tree(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

/// A guest's database whose `sqlite_master` was rewritten (`writable_schema`, as any
/// program in the guest may do) so that table definitions carry more statements:
/// ATTACH of a host path, a trigger, a view; plus a real trigger and view. Reading it
/// for a base and writing the replay out must run none of them on the host: the file
/// named by ATTACH never appears, the hostile tables are left out, the rest is intact.
#[tokio::test]
async fn a_hostile_database_on_the_guest_disk_runs_nothing_on_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&root).expect("mkdir");
    std::fs::create_dir_all(&outside).expect("mkdir");
    let escaped = outside.join("escaped.db");
    let q = |p: &Path| p.display().to_string().replace('\'', "''");
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(root.join("app.db"))
        .create_if_missing(true)
        .connect()
        .await
        .expect("open");
    conn.execute(
        "CREATE TABLE good(id INTEGER PRIMARY KEY, name TEXT);
         INSERT INTO good VALUES (1, 'one'), (2, 'two');
         CREATE TABLE evil(x); CREATE TABLE trig(x); CREATE TABLE vw(x); CREATE TABLE prag(x);
         CREATE VIEW gv AS SELECT * FROM good;
         CREATE TRIGGER gt AFTER INSERT ON good BEGIN INSERT INTO good(name) VALUES ('planted'); END;",
    )
    .await
    .expect("schema");
    let rewrite = format!(
        "PRAGMA writable_schema=ON;
         UPDATE sqlite_master SET sql = 'CREATE TABLE evil(x); COMMIT; ATTACH DATABASE ''{0}'' AS p; CREATE TABLE p.y(z); BEGIN' WHERE name = 'evil';
         UPDATE sqlite_master SET sql = 'CREATE TABLE trig(x); CREATE TRIGGER planted AFTER INSERT ON good BEGIN INSERT INTO good(name) VALUES (''planted''); END' WHERE name = 'trig';
         UPDATE sqlite_master SET sql = 'CREATE TABLE vw(x); CREATE VIEW planted_view AS SELECT 1' WHERE name = 'vw';
         UPDATE sqlite_master SET sql = 'CREATE TABLE prag(x); PRAGMA writable_schema=1; SELECT load_extension(''{1}'')' WHERE name = 'prag';
         PRAGMA writable_schema=OFF;",
        q(&escaped),
        q(&outside.join("evil.so")),
    );
    conn.execute(rewrite.as_str())
        .await
        .expect("rewrite sqlite_master");
    conn.close().await.expect("close");

    let fs = ext4_of(dir.path(), &root, "32M");
    let tables = ["good", "evil", "trig", "vw", "prag", "gv", "gt"];
    let sources = Sources {
        sqlite: BTreeMap::from([(
            "/data/app.db".to_string(),
            tables.iter().map(|t| t.to_string()).collect(),
        )]),
        ..Default::default()
    };
    let scratch = tempfile::tempdir().expect("scratch");
    let x = extract(&fs, &sources, scratch.path(), &BaseLimits::default()).expect("extract");
    let state = state_of(&x, &sources)
        .await
        .expect("a hostile table does not fail the base");
    let out = dir.path().join("out");
    let written = write_to(&state, &out).await;
    assert!(!escaped.exists(), "ATTACH ran on the host");
    assert_eq!(tree(&outside), Vec::<std::path::PathBuf>::new());
    let files = written.expect("the replay is written");
    assert_eq!(files, vec![out.join("data/app.db")]);
    let db = &state.sqlite["/data/app.db"];
    assert_eq!(
        db.schemas.keys().collect::<Vec<_>>(),
        vec!["good"],
        "only the plain table is taken"
    );
    assert_eq!(db.rows["good"].len(), 2);
    assert_eq!(tree(&out), vec![out.join("data/app.db")]);
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(out.join("data/app.db"))
        .read_only(true)
        .connect()
        .await
        .expect("open the replay");
    let objects: Vec<(String, String)> =
        sqlx::query_as("SELECT type, name FROM sqlite_master ORDER BY name")
            .fetch_all(&mut conn)
            .await
            .expect("schema");
    assert_eq!(objects, vec![("table".to_string(), "good".to_string())]);
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM good ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .expect("rows");
    assert_eq!(names, vec!["one", "two"]);
    // The copy of the guest's file was only read.
    let copy = std::fs::read(scratch.path().join("db0.sqlite")).expect("copy");
    assert_eq!(copy, std::fs::read(root.join("app.db")).expect("original"));
}

/// A guest's disk may claim files of any size: a sparse 1 GiB file (no data block)
/// is refused from its inode's size, before a byte is read; caps on the total and
/// on the number of files hold the same way.
#[test]
fn files_beyond_the_caps_are_refused_before_they_are_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("flags")).expect("mkdir");
    let big = std::fs::File::create(root.join("big.json")).expect("create");
    big.set_len(1 << 30).expect("sparse 1 GiB");
    drop(big);
    std::fs::write(root.join("small.json"), vec![b' '; 300 << 10]).expect("write");
    for i in 0..40 {
        std::fs::write(root.join(format!("flags/f{i}")), "on").expect("flag");
    }
    let fs = ext4_of(dir.path(), &root, "32M");
    let scratch = tempfile::tempdir().expect("scratch");
    let json = |names: &[&str]| Sources {
        json: names.iter().map(|n| format!("/data/{n}")).collect(),
        ..Default::default()
    };

    let started = std::time::Instant::now();
    let Err(e) = extract(
        &fs,
        &json(&["big.json"]),
        scratch.path(),
        &BaseLimits::default(),
    ) else {
        panic!("a 1 GiB file was read");
    };
    let e = e.to_string();
    let took = started.elapsed();
    assert!(
        e.contains("/big.json") && e.contains("1073741824 bytes"),
        "{e}"
    );
    assert!(e.contains("base_max_file_mib"), "{e}");
    eprintln!("a sparse 1 GiB file refused in {took:?}");

    let tight = BaseLimits {
        max_file_bytes: 1 << 20,
        max_total_bytes: 512 << 10,
        max_files: 10,
    };
    let x = extract(&fs, &json(&["small.json"]), scratch.path(), &tight).expect("one small file");
    assert_eq!(x.json["/data/small.json"].len(), 300 << 10);
    let twice = Sources {
        json: BTreeSet::from(["/data/small.json".to_string()]),
        kv: BTreeSet::from(["/data/small.json".to_string()]),
        ..Default::default()
    };
    let Err(e) = extract(&fs, &twice, scratch.path(), &tight) else {
        panic!("600 KiB read under a 512 KiB total");
    };
    let e = e.to_string();
    assert!(e.contains("base_max_total_mib"), "{e}");
    let flags = Sources {
        kv: BTreeSet::from(["/data/flags/".to_string()]),
        ..Default::default()
    };
    let Err(e) = extract(&fs, &flags, scratch.path(), &tight) else {
        panic!("40 files read under a cap of 10");
    };
    let e = e.to_string();
    assert!(e.contains("at most 10 files"), "{e}");
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
    let err = err.to_string();
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
        let err = err.to_string();
        assert!(err.contains(want), "{err}");
    }
}

/// Sources reached through symbolic links, as guests lay them out (`/etc/app` pointing
/// elsewhere, relative links with `..`, a link to a key-value directory), are found and
/// read where the links lead. weft resolves the links itself (each link's size is checked
/// before its target is read), so this is its own resolution under test; a loop of links
/// leads nowhere (it is given up after 40 links).
#[test]
fn sources_behind_symlinks_are_followed_and_loops_refused() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("srv/app/conf.d")).expect("mkdir");
    std::fs::create_dir_all(root.join("etc")).expect("mkdir");
    std::fs::write(root.join("srv/app/app.json"), r#"{"via":"links"}"#).expect("json");
    std::fs::write(root.join("srv/app/conf.d/mode"), "fast").expect("kv");
    symlink("/srv/app", root.join("etc/app")).expect("absolute link");
    symlink("../srv/app/conf.d", root.join("etc/conf.d")).expect("relative link");
    symlink("app/./../app/app.json", root.join("etc/doc.json")).expect("link to a file");
    symlink("loop-b", root.join("etc/loop-a")).expect("loop");
    symlink("loop-a", root.join("etc/loop-b")).expect("loop");
    let fs = ext4_of(dir.path(), &root, "8M");
    let scratch = tempfile::tempdir().expect("scratch");
    let sources = Sources {
        json: BTreeSet::from(["/etc/app/app.json".to_string(), "/etc/doc.json".to_string()]),
        kv: BTreeSet::from(["/etc/conf.d/".to_string()]),
        ..Default::default()
    };
    let x = extract(&fs, &sources, scratch.path(), &BaseLimits::default()).expect("extract");
    assert_eq!(x.json["/etc/app/app.json"], br#"{"via":"links"}"#);
    assert_eq!(x.json["/etc/doc.json"], br#"{"via":"links"}"#);
    assert_eq!(
        x.kv["/etc/conf.d/"],
        BTreeMap::from([("mode".to_string(), "fast".to_string())])
    );
    let looped = Sources {
        json: BTreeSet::from(["/etc/loop-a".to_string()]),
        ..Default::default()
    };
    let x = extract(&fs, &looped, scratch.path(), &BaseLimits::default()).expect("extract");
    assert!(x.json.is_empty(), "a loop of links leads to no file");
}
