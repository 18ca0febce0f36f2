//! replay-rss: weftd's peak memory (VmHWM of the real weftd process) while it replays a
//! provenance log with `--out`, for a log much larger than its state and for a large
//! state. Not timed against a peer: the figure is memory against the log's and the
//! state's size, and the slope between sizes.
//!
//! Two cases, each on a fresh weftd under `WEFT_BENCH_DIR` whose log is written
//! beforehand through the library (weftd's default log options, no quota):
//!
//! - **log**: `--log-mib N` MiB of values (decompressed) that keep updating 64 keys of a
//!   key-value source (1 KiB values): the state stays at 64 KiB while the log grows;
//! - **state**: `--state-mib M` MiB of values, each a new key: the state is as large as
//!   the log.
//!
//! For each: weftd's VmHWM when idle, then `POST /v1/environments/bench/replay` with
//! `to = now` and `out`, its wall time, weftd's VmHWM after it, and the output's size.
//! A `--log-mib 0` or `--state-mib 0` skips that case.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use weft::catalog::{Catalog, NewEnvironment};
use weft::model::{EnvKind, EnvState};
use weft_api::provenance::{ReplayReport, ReplayRequest};
use weft_client::Client;
use weft_dpa::{DataType, Entry, Operation};
use weft_provenance::log::{LogOptions, ProvenanceLog};

use super::bench_dir;

const VM: &str = "bench";
/// Bytes of each value.
const VALUE: usize = 1024;
/// Keys the `log` case keeps updating.
const HOT_KEYS: u64 = 64;
/// Entries per append.
const BATCH: u64 = 4096;
const T0: i64 = 1_790_000_000_000_000;

/// One measured replay.
struct Run {
    case: &'static str,
    log_mib: f64,
    state_keys: usize,
    idle_kib: u64,
    peak_kib: u64,
    secs: f64,
    out_mib: f64,
}

/// `weft-bench replay-rss`.
pub async fn bench_replay_rss(log_mib: u64, state_mib: u64) -> Result<()> {
    let mut runs = Vec::new();
    if log_mib > 0 {
        runs.push(run_case("log", log_mib, HOT_KEYS).await?);
    }
    if state_mib > 0 {
        runs.push(run_case("state", state_mib, u64::MAX).await?);
    }
    println!("| case | log (MiB, decompressed) | keys in the state | weftd idle VmHWM (MiB) | weftd VmHWM after the replay (MiB) | replay (s) | output (MiB) |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &runs {
        println!(
            "| {} | {:.0} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.case,
            r.log_mib,
            r.state_keys,
            r.idle_kib as f64 / 1024.0,
            r.peak_kib as f64 / 1024.0,
            r.secs,
            r.out_mib
        );
    }
    Ok(())
}

/// The value of `seq`: 1 KiB that zstd compresses well, as the JSON string a key-value
/// entry carries.
fn value(seq: u64) -> String {
    let unit = format!("{seq:016x}");
    format!("\"{}\"", unit.repeat(VALUE / unit.len()))
}

async fn run_case(case: &'static str, mib: u64, keys: u64) -> Result<Run> {
    let base = bench_dir()?;
    let scratch = tempfile::Builder::new()
        .prefix("replay-rss-")
        .tempdir_in(&base)
        .with_context(|| format!("scratch directory in {}", base.display()))?;
    let dir = scratch.path();
    let data = dir.join("data");
    fs::create_dir_all(&data)?;
    let catalog = Catalog::open(&data.join("catalog.db")).await?;
    let config = weft_qmp::launch::VmConfig::default();
    catalog
        .insert_environment(&NewEnvironment {
            name: VM,
            kind: EnvKind::Managed,
            config: Some(&config),
            qmp_socket: &dir.join("run/bench.qmp"),
            state: EnvState::Stopped,
            pid: None,
        })
        .await?;
    catalog.close().await;

    let entries = mib * (1 << 20) / VALUE as u64;
    let t = Instant::now();
    let log_dir = data.join("provenance");
    let log_bytes =
        tokio::task::spawn_blocking(move || write_log(&log_dir, entries, keys)).await??;
    eprintln!(
        "replay-rss {case}: {entries} entries ({:.0} MiB) written in {:.1} s",
        log_bytes as f64 / f64::from(1 << 20),
        t.elapsed().as_secs_f64()
    );

    let mut weftd = Weftd::start(dir).await?;
    let result = async {
        let idle = weftd.vm_hwm_kib()?;
        let out = dir.join("out");
        let req = ReplayRequest {
            to: "now".into(),
            from: None,
            out: Some(out.clone()),
            into: None,
            force: false,
            base: None,
            base_margin_secs: None,
        };
        let t = Instant::now();
        let report: ReplayReport = Client::new(weftd.socket())
            .post(&format!("/v1/environments/{VM}/replay"), &req)
            .await
            .context("replay")?;
        let secs = t.elapsed().as_secs_f64();
        let peak = weftd.vm_hwm_kib()?;
        ensure!(
            report.applied == entries,
            "{} entries applied of {entries}",
            report.applied
        );
        let out_bytes = dir_bytes(&out)?;
        Ok(Run {
            case,
            log_mib: log_bytes as f64 / f64::from(1 << 20),
            state_keys: entries.min(keys) as usize,
            idle_kib: idle,
            peak_kib: peak,
            secs,
            out_mib: out_bytes as f64 / f64::from(1 << 20),
        })
    }
    .await;
    weftd.stop().await;
    if result.is_err() {
        eprintln!("weftd's log:\n{}", weftd.log());
    }
    result
}

/// Writes `entries` key-value updates of `keys` keys (each a new key once `keys` is
/// larger); returns the bytes of values written.
fn write_log(dir: &Path, entries: u64, keys: u64) -> Result<u64> {
    let log = ProvenanceLog::open(
        dir.to_path_buf(),
        LogOptions {
            quota_bytes: 0,
            ..LogOptions::default()
        },
    )?;
    let mut bytes = 0;
    let mut next = 1;
    while next <= entries {
        let last = (next + BATCH - 1).min(entries);
        let batch: Vec<Entry> = (next..=last)
            .map(|seq| {
                let k = if keys == u64::MAX { seq } else { seq % keys };
                let new = value(seq);
                bytes += new.len() as u64;
                Entry {
                    seq,
                    guest_time_us: T0 + seq as i64,
                    data_type: DataType::Kv,
                    op: Operation::Update,
                    source: "/etc/app.env".into(),
                    collection: String::new(),
                    key: format!("KEY_{k:010}"),
                    old: None,
                    new: Some(new),
                    tx: None,
                }
            })
            .collect();
        log.append(VM, T0, &batch)?;
        next = last + 1;
    }
    Ok(bytes)
}

fn dir_bytes(path: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(path).with_context(|| format!("list {}", path.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// A private weftd on a scratch directory.
struct Weftd(weft_rig::Weftd);

impl Weftd {
    async fn start(dir: &Path) -> Result<Weftd> {
        let weftd = weft_rig::WeftdBuilder::new(dir)
            .confined_to(&[dir])
            .start_timeout(Duration::from_secs(20))
            .log_on_drop(weft_rig::LogOnDrop::Panicking)
            .start()
            .await?;
        Ok(Weftd(weftd))
    }

    fn socket(&self) -> PathBuf {
        self.0.socket()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.0.log_path()).unwrap_or_default()
    }

    /// weftd's peak resident set so far (`VmHWM` in `/proc/<pid>/status`), KiB.
    fn vm_hwm_kib(&self) -> Result<u64> {
        let pid = self.0.pid().context("weftd is not running")?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in weftd's /proc status")
    }

    async fn stop(&mut self) {
        self.0.stop(Duration::from_secs(10));
    }
}
