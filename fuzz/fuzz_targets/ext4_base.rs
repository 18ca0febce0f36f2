//! Feeds an arbitrary disk image, as a guest's disk could hold it, to what
//! `weft replay --base`, compose data merges and reconciliation do with a disk
//! snapshot's file system: `weft_provenance::base::load_ext4` (`ext4_view::Ext4::load`
//! behind a superblock check), then
//! `weft_provenance::base::extract` for the sources a provenance log could name (a JSON
//! document, a key-value file, a key-value directory, a SQLite database with its
//! write-ahead log; guest paths with `..`, doubled and trailing slashes).
//! It must never panic, and stay within the fuzzer's memory and time limits.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use weft_provenance::base::{extract, load_ext4, BaseLimits, Sources};

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("weft-fuzz-ext4-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

fn sources() -> Sources {
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    Sources {
        sqlite: BTreeMap::from([
            ("/data/app.db".to_string(), set(&["t", "sqlite_master"])),
            ("/srv/../data//x.db".to_string(), set(&["t"])),
        ]),
        json: set(&["/etc/app.json", "/a/b/c/d/e/f/doc.json"]),
        kv: set(&["/etc/app.env", "/etc/app.d/", "//../lost+found/"]),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(fs) = load_ext4(Box::new(data.to_vec()), data.len() as u64) else {
        return;
    };
    // Smaller than weftd's defaults so that a sparse file claiming gigabytes is cut
    // off quickly; the same code enforces either.
    let limits = BaseLimits {
        max_file_bytes: 4 << 20,
        max_total_bytes: 16 << 20,
        max_files: 1000,
    };
    if let Ok(x) = extract(&fs, &sources(), scratch(), &limits) {
        // Every source found was found at an absolute path inside the image.
        for (src, at) in &x.found {
            assert!(at.starts_with('/'), "{src} found at {at}");
        }
        // A database copied out stays within the limit on one file.
        for copy in x.sqlite.values() {
            let len = std::fs::metadata(copy).map(|m| m.len()).unwrap_or(0);
            assert!(
                len <= limits.max_file_bytes,
                "{} is {len} bytes",
                copy.display()
            );
        }
    }
});
