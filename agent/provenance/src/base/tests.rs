//! Tests of base extraction: refusals of what a hostile guest can write.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// A guest's file system with a "symlink" whose inode claims 3 TiB on the way to a
/// source: the base is refused with a line; nothing tries to read (or allocate) the
/// target (found by the ext4_base fuzz target, where the allocation aborted).
#[test]
fn a_symlink_claiming_terabytes_is_refused_not_read() {
    let image = include_bytes!("../../testdata/ext4-symlink-claims-3tib.img").to_vec();
    let len = image.len() as u64;
    let fs = load_ext4(Box::new(image), len).unwrap();
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    let sources = Sources {
        sqlite: BTreeMap::from([("/data/app.db".to_string(), set(&["t"]))]),
        json: set(&["/etc/app.json", "/a/b/c/d/e/f/doc.json"]),
        kv: set(&["/etc/app.env", "/etc/app.d/", "//../lost+found/"]),
    };
    let dir = tempfile::tempdir().unwrap();
    let limits = BaseLimits {
        max_file_bytes: 4 << 20,
        max_total_bytes: 16 << 20,
        max_files: 1000,
    };
    // Whatever the outcome, no path resolution reads the long link.
    let _ = extract(&fs, &sources, dir.path(), &limits);
    let mut long = None;
    for p in ["/etc", "/data", "/a", "/lost+found"] {
        if let Err(e @ BaseError::Symlink { .. }) = resolve(&fs, &format!("{p}/x")) {
            long = Some(e.to_string());
        }
    }
    let long = long.expect("the image's long link is met on one of the paths");
    assert!(long.contains("claims"), "{long}");
}

/// A guest's database may hold text that is not UTF-8: the base is refused with a
/// line, weftd does not panic (found by the sqlite_base fuzz target).
#[tokio::test]
async fn text_that_is_not_utf8_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("app.db");
    rusqlite::Connection::open(&copy)
        .unwrap()
        .execute_batch(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); \
             INSERT INTO t VALUES (1, CAST(x'41ff42' AS TEXT));",
        )
        .unwrap();
    let src = "/data/app.db".to_string();
    let sources = Sources {
        sqlite: BTreeMap::from([(src.clone(), BTreeSet::from(["t".to_string()]))]),
        ..Sources::default()
    };
    let x = Extracted {
        json: BTreeMap::new(),
        kv: BTreeMap::new(),
        sqlite: BTreeMap::from([(src.clone(), copy)]),
        found: BTreeMap::from([(src.clone(), src)]),
    };
    let e = state_of(&x, &sources).await.unwrap_err().to_string();
    assert!(e.contains("table \"t\"") && !e.contains('\n'), "{e}");
}
