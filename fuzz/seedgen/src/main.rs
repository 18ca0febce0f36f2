//! Writes seed inputs made by weft's own encoders: index and chunk files from a real
//! chunk store, DPA frames and guest streams from the DPA's encoder. Run by
//! `fuzz/seeds.sh`; the first argument is the corpus directory (`fuzz/corpus`).

use std::fs;
use std::path::{Path, PathBuf};

use weft_blockdev::store::{encode_index_file, BlockMap, ChunkStore, Slot, StoreConfig, StoreKeys};
use weft_dpa::proto::{
    caps, encode, Applied, Apply, DataType, Entry, Hello, Message, Operation, PROTOCOL_VERSION,
};

/// The chunk size the store targets use.
const CHUNK: u32 = 64 << 10;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).expect("corpus directory");
    fs::write(dir.join(name), bytes).expect("write a seed");
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Bytes that zstd cannot shrink (a xorshift stream).
fn noise(n: usize, mut x: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn store_seeds(corpus: &Path) {
    let root = std::env::temp_dir().join(format!("weft-seedgen-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).expect("store directory");
    let store = ChunkStore::create(&root, None, &StoreConfig::with_chunk_size(CHUNK), None)
        .expect("create a store");
    let text: Vec<u8> = b"weft fuzz seed: a compressible chunk\n"
        .iter()
        .copied()
        .cycle()
        .take(CHUNK as usize)
        .collect();
    // Short enough to keep the corpus small; the last slot of a disk is short too.
    let random = noise(8192, 0x9e37_79b9_7f4a_7c15);
    let short = b"the short last slot of a disk".to_vec();
    let a = store.put(&text).expect("put").id;
    let b = store.put(&random).expect("put").id;
    let c = store.put(&short).expect("put").id;

    // A disk of 4 full slots and a short one: data, zero, data again (dedup), other data.
    let mut map = BlockMap::new(4 * u64::from(CHUNK) + short.len() as u64, CHUNK);
    map.slots[0] = Slot::Data(a);
    map.slots[2] = Slot::Data(a);
    map.slots[3] = Slot::Data(b);
    map.slots[4] = Slot::Data(c);
    store.write_index("vda/1", &map).expect("write an index");
    store
        .write_index("empty", &BlockMap::new(8 * u64::from(CHUNK), CHUNK))
        .expect("write an index");
    let dir = corpus.join("store_index");
    for name in ["vda/1", "empty"] {
        let file = fs::read(root.join("indexes").join(format!("{name}.idx"))).expect("read index");
        let tag = name.replace('/', "-");
        write(&dir, &format!("plain-{tag}"), &cat(&[&[0], &file]));
        // Mode 2 appends the SHA-256 itself: the file without its checksum.
        write(
            &dir,
            &format!("sha-{tag}"),
            &cat(&[&[2], &file[..file.len() - 32]]),
        );
    }
    let keys = StoreKeys::derive(&[7; 32], &[9; 16]).expect("derive test keys");
    write(
        &dir,
        "hmac-vda-1",
        &cat(&[&[1], &encode_index_file(&map, Some(&keys))]),
    );

    // Chunk files as the store wrote them, behind the target's 6-byte head (plain, cut
    // and damage positions, mask).
    let dir = corpus.join("store_chunk");
    for (tag, id) in [("text", &a), ("random", &b), ("short", &c)] {
        // `<root>/chunks/ab/<64 hex>` (docs/store-format.md).
        let hex = id.to_hex();
        let file = fs::read(root.join("chunks").join(&hex[..2]).join(&hex)).expect("read a chunk");
        write(
            &dir,
            &format!("file-{tag}"),
            &cat(&[&[0, 20, 0, 0, 0, 1], &file]),
        );
    }
    write(
        &dir,
        "plain-text",
        &cat(&[&[0, 40, 0, 0, 0, 0x80], &text[..4096]]),
    );
    write(&dir, "enc-short", &cat(&[&[1, 7, 0, 0, 0, 3], &short]));
    drop(store);
    let _ = fs::remove_dir_all(&root);
}

fn entry(seq: u64, data_type: DataType, op: Operation, source: &str, key: &str) -> Entry {
    let (collection, old, new) = match (data_type, op) {
        (DataType::Sqlite, Operation::Schema) => (
            "items",
            None,
            Some(r#""CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, price REAL)""#),
        ),
        (DataType::Sqlite, Operation::Insert) => {
            ("items", None, Some(r#"{"id":1,"name":"tea","price":2.5}"#))
        }
        (DataType::Sqlite, Operation::Update) => (
            "items",
            Some(r#"{"id":1,"name":"tea","price":2.5}"#),
            Some(r#"{"id":1,"name":"tea","price":3.0}"#),
        ),
        (DataType::Sqlite, Operation::Delete) => {
            ("items", Some(r#"{"id":1,"name":"tea","price":3.0}"#), None)
        }
        (_, Operation::Insert) => ("", None, Some(r#""on""#)),
        (_, Operation::Update) => ("", Some(r#""on""#), Some(r#""off""#)),
        (_, _) => ("", Some(r#""off""#), None),
    };
    Entry {
        seq,
        guest_time_us: 1_764_000_000_000_000 + seq as i64 * 1000,
        data_type,
        op,
        source: source.into(),
        collection: collection.into(),
        key: key.into(),
        old: old.map(Into::into),
        new: new.map(Into::into),
        tx: (data_type == DataType::Sqlite).then_some(7),
    }
}

fn entries(from: u64) -> Vec<Entry> {
    use DataType::*;
    use Operation::*;
    [
        (Sqlite, Schema, "/data/app.db", ""),
        (Sqlite, Insert, "/data/app.db", "[1]"),
        (Sqlite, Update, "/data/app.db", "[1]"),
        (Json, Insert, "/etc/app.json", "/feature/dark"),
        (Json, Update, "/etc/app.json", "/feature/dark"),
        (Kv, Insert, "/etc/app.env", "MODE"),
        (Kv, Delete, "/etc/app.env", "MODE"),
        (Sqlite, Delete, "/data/app.db", "[1]"),
    ]
    .iter()
    .enumerate()
    .map(|(i, &(t, o, s, k))| entry(from + i as u64, t, o, s, k))
    .collect()
}

fn dpa_seeds(corpus: &Path) {
    let hello = encode(&Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        capabilities: [caps::SQLITE, caps::JSON, caps::KV, caps::APPLY]
            .map(String::from)
            .to_vec(),
        agent: "weft-dpa 0.1.0".into(),
    }));
    let batch1 = encode(&Message::Batch(entries(1)));
    let batch2 = encode(&Message::Batch(entries(9)));
    let again = encode(&Message::Batch(entries(5)));
    let applied = encode(&Message::Applied(Applied {
        id: 1,
        applied: 3,
        error: Some("table items: no such column".into()),
    }));
    let goodbye = encode(&Message::Goodbye {
        reason: "shutting down".into(),
    });

    let frames = corpus.join("dpa_frames");
    let every = [
        ("hello", hello.clone()),
        (
            "welcome",
            encode(&Message::Welcome(weft_dpa::proto::Welcome {
                version: 1,
                acked: 8,
            })),
        ),
        ("batch", batch1.clone()),
        ("ack", encode(&Message::Ack { upto: 8 })),
        (
            "apply",
            encode(&Message::Apply(Apply {
                id: 1,
                changes: entries(1),
            })),
        ),
        ("applied", applied.clone()),
        ("goodbye", goodbye.clone()),
    ];
    for (name, frame) in &every {
        write(&frames, name, &cat(&[&[255], frame]));
    }
    // A guest's session read in 7-byte pieces.
    write(
        &frames,
        "session-7",
        &cat(&[&[6], &hello, &batch1, &batch2, &goodbye]),
    );

    // What a guest's DPA sends on its connection.
    let conn = corpus.join("dpa_conn");
    write(&conn, "hello", &hello);
    write(&conn, "hello-batches", &cat(&[&hello, &batch1, &batch2]));
    write(
        &conn,
        "hello-resend",
        &cat(&[&hello, &batch1, &again, &batch2]),
    );
    write(
        &conn,
        "hello-applied-goodbye",
        &cat(&[&hello, &applied, &goodbye]),
    );
    write(&conn, "no-hello", &batch1);
}

fn main() {
    let corpus = PathBuf::from(std::env::args().nth(1).expect("usage: seedgen CORPUS_DIR"));
    store_seeds(&corpus);
    dpa_seeds(&corpus);
}
