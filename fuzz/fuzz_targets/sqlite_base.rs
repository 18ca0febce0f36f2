//! Feeds an arbitrary file, as a guest's disk could hold it at a SQLite source's path,
//! to what `weft replay --base` and reconciliation do with it once copied out of the
//! snapshot: `weft_provenance::base::state_of` opens it with SQLite and reads the tables
//! the provenance log names (their schema, columns, primary key, and every row as
//! JSON). A corrupt or hostile database must give an error or a state, never a
//! panic, within the fuzzer's limits.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use weft_provenance::base::{state_of, Extracted, Sources};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("weft-fuzz-sqlite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let copy = dir.join("db0.sqlite");
    std::fs::write(&copy, data).expect("write the copy");
    let src = "/data/app.db".to_string();
    let tables: BTreeSet<String> = ["t", "u", "sqlite_master", "sqlite_sequence"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let sources = Sources {
        sqlite: BTreeMap::from([(src.clone(), tables)]),
        ..Sources::default()
    };
    let x = Extracted {
        json: BTreeMap::new(),
        kv: BTreeMap::new(),
        sqlite: BTreeMap::from([(src.clone(), copy)]),
        found: BTreeMap::from([(src.clone(), src)]),
    };
    let _ = runtime().block_on(state_of(&x, &sources));
});
