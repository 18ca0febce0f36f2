//! Put/get throughput of the chunk store on 256 MiB of mixed data (a third
//! random, a third zeros, a third compressible text), plain versus encrypted,
//! against a peer in the same run: writing and reading the same bytes as one
//! fsynced file per chunk (the store's I/O floor).
//!
//! `cargo test --release -p weft-blockdev --test store_throughput -- --ignored --nocapture`

use std::fs;
use std::io::Write;
use std::time::{Duration, Instant};

use weft_blockdev::store::{ChunkStore, StoreConfig};

mod common;
use common::*;

const TOTAL: usize = 256 << 20;
const CS: usize = 4 << 20;

fn chunks() -> Vec<Vec<u8>> {
    (0..TOTAL / CS)
        .map(|i| match i % 3 {
            0 => noise(i as u64, CS),
            1 => vec![0u8; CS],
            _ => format!("chunk {i}: a log line that repeats with small changes, level=info\n")
                .into_bytes()
                .into_iter()
                .cycle()
                .take(CS)
                .collect(),
        })
        .collect()
}

fn mibs(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn run_store(encrypted: bool, data: &[Vec<u8>]) -> (f64, f64, u64) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let key = tmp.path().join("key");
    let config = StoreConfig {
        chunk_size: CS as u32,
        encrypted,
        zstd_level: 3,
    };
    let store = ChunkStore::create(
        &tmp.path().join("s"),
        None,
        &config,
        encrypted.then_some(key.as_path()),
    )
    .unwrap();
    let t = Instant::now();
    let ids: Vec<_> = data.iter().map(|c| store.put(c).unwrap().id).collect();
    let put = t.elapsed();
    let t = Instant::now();
    let mut n = 0;
    for id in &ids {
        n += store.get(id).unwrap().len();
    }
    let get = t.elapsed();
    assert_eq!(n, TOTAL);
    let stats = store.stats().unwrap();
    (mibs(TOTAL, put), mibs(TOTAL, get), stats.hot_bytes)
}

fn run_peer(data: &[Vec<u8>]) -> (f64, f64) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let t = Instant::now();
    for (i, c) in data.iter().enumerate() {
        let p = tmp.path().join(i.to_string());
        let mut f = fs::File::create(&p).unwrap();
        f.write_all(c).unwrap();
        f.sync_all().unwrap();
    }
    fs::File::open(tmp.path()).unwrap().sync_all().unwrap();
    let put = t.elapsed();
    let t = Instant::now();
    let mut n = 0;
    for i in 0..data.len() {
        n += fs::read(tmp.path().join(i.to_string())).unwrap().len();
    }
    let get = t.elapsed();
    assert_eq!(n, TOTAL);
    (mibs(TOTAL, put), mibs(TOTAL, get))
}

#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn store_throughput_256mib_mixed() {
    let data = chunks();
    let (peer_put, peer_get) = run_peer(&data);
    let (pp, pg, pbytes) = run_store(false, &data);
    let (ep, eg, ebytes) = run_store(true, &data);
    println!("256 MiB mixed (1/3 random, 1/3 zeros, 1/3 text), 4 MiB chunks, zstd 3, one thread");
    println!("peer (file per chunk, fsync): put {peer_put:8.1} MiB/s  get {peer_get:8.1} MiB/s");
    println!(
        "plain store:                  put {pp:8.1} MiB/s  get {pg:8.1} MiB/s  stored {:.1} MiB  (put {:.2}x, get {:.2}x of peer)",
        pbytes as f64 / (1 << 20) as f64,
        pp / peer_put,
        pg / peer_get
    );
    println!(
        "encrypted store:              put {ep:8.1} MiB/s  get {eg:8.1} MiB/s  stored {:.1} MiB  (put {:.2}x, get {:.2}x of plain)",
        ebytes as f64 / (1 << 20) as f64,
        ep / pp,
        eg / pg
    );
}
