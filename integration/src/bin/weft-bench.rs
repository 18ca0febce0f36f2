//! weft-bench: benchmarks of weft's QEMU capabilities against a peer in the same run.
//!
//! ```text
//! weft-bench qmp    [--calls N] [--rounds R]   # QMP round trips: weft-qmp vs qemu.qmp (Python)
//! weft-bench launch [--rounds R]               # spawn to negotiated QMP: weft vs hand-rolled
//! weft-bench backup [--size-gib G] [--chunk-kib K] [--rounds R] [--breakdown]
//!                                              # disk backup: weft vs restic and borg
//! weft-bench weave  [--rounds R]               # weave from now: API call to QEMU running,
//!                                              # 1 GiB vs 64 GiB disk, vs qemu-img convert
//! weft-bench blk    [--rounds R]               # guest reads: weft-blk over 16 layers vs
//!                                              # qemu-storage-daemon and virtio-blk on a
//!                                              # 16-deep qcow2 chain
//! weft-bench compose [--rounds R]             # weave from a 16-layer composition (live)
//!                                              # vs a weave from now
//! weft-bench provenance [--entries N] [--rounds R]
//!                                              # provenance log appends and reads vs an
//!                                              # indexed SQLite table
//! weft-bench replay-rss [--log-mib N] [--state-mib M]
//!                                              # weftd's peak RSS replaying a large log
//!                                              # of few keys, and a large state, --out
//! ```
//!
//! Every benchmark runs weft and its peer alternately in the same process run (the machines
//! this runs on are noisy), prints a markdown table of medians and the ratio weft/peer, and
//! kills and reaps every QEMU it started. Results are recorded in `docs/benchmarks.md`.
//!
//! Environment: `WEFT_BENCH_QEMU` (default `qemu-system-x86_64`), `WEFT_BENCH_PYTHON`
//! (default `python3`, which must have `qemu.qmp` installed), `WEFT_BENCH_DIR` (default
//! `target/bench`, where `backup` caches its image and keeps its scratch files).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use tokio::task::JoinSet;
use weft_qmp::launch::{self, Accel, LaunchPaths, VmConfig};
use weft_qmp::process::SpawnOptions;
use weft_qmp::qapi::qmp;
use weft_qmp::Qmp;

#[path = "weft-bench/backup/mod.rs"]
mod backup;
#[path = "weft-bench/blk.rs"]
mod blk;
#[path = "weft-bench/provenance.rs"]
mod provenance;
#[path = "weft-bench/replay_rss.rs"]
mod replay_rss;
#[path = "weft-bench/weave.rs"]
mod weave;

/// Concurrent tasks (weft) or asyncio workers (peer) sharing one connection.
const WORKERS: usize = 8;
/// How long any QEMU may take to answer on its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The peer's poll period in the `launch` benchmark.
const PEER_POLL: Duration = Duration::from_millis(1);

const USAGE: &str = "usage: weft-bench qmp [--calls N] [--rounds R]
       weft-bench launch [--rounds R]
       weft-bench backup [--size-gib G] [--chunk-kib K] [--rounds R] [--breakdown]
       weft-bench weave [--rounds R]
       weft-bench blk [--rounds R]
       weft-bench compose [--rounds R]
       weft-bench provenance [--entries N] [--rounds R]
       weft-bench replay-rss [--log-mib N] [--state-mib M]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut pids = Pids::default();
    let result = rt.block_on(run(&args, &mut pids));
    drop(rt);
    let left = pids.still_running();
    if !left.is_empty() {
        eprintln!("weft-bench: QEMU processes still running: {left:?}");
        return ExitCode::FAILURE;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &[String], pids: &mut Pids) -> Result<()> {
    let Some((cmd, rest)) = args.split_first() else {
        bail!("{USAGE}");
    };
    let opts = Opts::parse(rest)?;
    match cmd.as_str() {
        "qmp" => {
            ensure!(
                opts.size_gib.is_none() && opts.chunk_kib.is_none() && !opts.breakdown,
                "qmp takes only --calls and --rounds\n{USAGE}"
            );
            bench_qmp(opts.calls.unwrap_or(2000), opts.rounds.unwrap_or(5), pids).await
        }
        "launch" => {
            ensure!(
                opts.calls.is_none()
                    && opts.size_gib.is_none()
                    && opts.chunk_kib.is_none()
                    && !opts.breakdown,
                "launch takes only --rounds\n{USAGE}"
            );
            bench_launch(opts.rounds.unwrap_or(20), pids).await
        }
        "backup" => {
            ensure!(opts.calls.is_none(), "backup takes no --calls\n{USAGE}");
            backup::bench_backup(
                opts.size_gib.unwrap_or(2) as u64,
                match opts.chunk_kib {
                    Some(k) => u32::try_from(k).context("--chunk-kib is too large")?,
                    None => backup::DEFAULT_CHUNK_KIB,
                },
                opts.rounds.unwrap_or(3),
                opts.breakdown,
                pids,
            )
            .await
        }
        "weave" => {
            ensure!(
                opts.calls.is_none()
                    && opts.size_gib.is_none()
                    && opts.chunk_kib.is_none()
                    && !opts.breakdown,
                "weave takes only --rounds\n{USAGE}"
            );
            weave::bench_weave(opts.rounds.unwrap_or(10), pids).await
        }
        "blk" => {
            ensure!(
                opts.calls.is_none()
                    && opts.size_gib.is_none()
                    && opts.chunk_kib.is_none()
                    && !opts.breakdown,
                "blk takes only --rounds\n{USAGE}"
            );
            blk::bench_blk(opts.rounds.unwrap_or(3)).await
        }
        "compose" => {
            ensure!(
                opts.calls.is_none()
                    && opts.size_gib.is_none()
                    && opts.chunk_kib.is_none()
                    && !opts.breakdown,
                "compose takes only --rounds\n{USAGE}"
            );
            weave::bench_compose(opts.rounds.unwrap_or(10), pids).await
        }
        "provenance" => {
            ensure!(
                opts.calls.is_none()
                    && opts.size_gib.is_none()
                    && opts.chunk_kib.is_none()
                    && !opts.breakdown,
                "provenance takes only --entries and --rounds\n{USAGE}"
            );
            provenance::bench_provenance(opts.entries.unwrap_or(200_000), opts.rounds.unwrap_or(3))
        }
        "replay-rss" => {
            ensure!(
                opts.calls.is_none()
                    && opts.rounds.is_none()
                    && opts.size_gib.is_none()
                    && opts.chunk_kib.is_none()
                    && opts.entries.is_none()
                    && !opts.breakdown,
                "replay-rss takes only --log-mib and --state-mib\n{USAGE}"
            );
            replay_rss::bench_replay_rss(
                opts.log_mib.unwrap_or(1024) as u64,
                opts.state_mib.unwrap_or(2048) as u64,
            )
            .await
        }
        "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown benchmark {other:?}\n{USAGE}"),
    }
}

#[derive(Default)]
struct Opts {
    calls: Option<usize>,
    rounds: Option<usize>,
    size_gib: Option<usize>,
    chunk_kib: Option<usize>,
    entries: Option<usize>,
    log_mib: Option<usize>,
    state_mib: Option<usize>,
    breakdown: bool,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let mut opts = Opts::default();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--breakdown" {
                opts.breakdown = true;
                continue;
            }
            let mut value = || -> Result<usize> {
                let v = it.next().with_context(|| format!("{flag} needs a value"))?;
                let n: usize = v.parse().with_context(|| format!("{flag} {v:?}"))?;
                // `--log-mib 0` / `--state-mib 0` skip that case of replay-rss.
                ensure!(n > 0 || flag.ends_with("-mib"), "{flag} must be positive");
                Ok(n)
            };
            match flag.as_str() {
                "--calls" => opts.calls = Some(value()?),
                "--rounds" => opts.rounds = Some(value()?),
                "--size-gib" => opts.size_gib = Some(value()?),
                "--chunk-kib" => opts.chunk_kib = Some(value()?),
                "--entries" => opts.entries = Some(value()?),
                "--log-mib" => opts.log_mib = Some(value()?),
                "--state-mib" => opts.state_mib = Some(value()?),
                _ => bail!("unknown option {flag:?}\n{USAGE}"),
            }
        }
        Ok(opts)
    }
}

/// The benchmarks' cache and scratch directory: `WEFT_BENCH_DIR`, else `target/bench`.
fn bench_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("WEFT_BENCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            // target/<profile>/weft-bench → target/bench
            let exe = std::env::current_exe()?;
            exe.parent()
                .and_then(Path::parent)
                .context("cannot find the target directory")?
                .join("bench")
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`; false when not allowed (not root).
fn drop_caches() -> bool {
    let synced = Command::new("sync").status().is_ok_and(|s| s.success());
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn qemu_binary() -> String {
    std::env::var("WEFT_BENCH_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

fn python() -> String {
    std::env::var("WEFT_BENCH_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The pids of every QEMU this run started, to check at the end that none is left.
#[derive(Default)]
struct Pids(Vec<u32>);

impl Pids {
    fn still_running(&self) -> Vec<u32> {
        self.0
            .iter()
            .copied()
            .filter(|&pid| weft_qmp::process::is_qemu_process(pid))
            .collect()
    }
}

/// A QEMU started with `std::process::Command`; killed and reaped when dropped.
struct QemuChild(Child);

impl QemuChild {
    fn start(args: &[String], log: &Path, pids: &mut Pids) -> Result<QemuChild> {
        let out = File::create(log)?;
        let child = Command::new(qemu_binary())
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", qemu_binary()))?;
        pids.0.push(child.id());
        Ok(QemuChild(child))
    }

    /// Fails with QEMU's output if it has exited.
    fn check_alive(&mut self, log: &Path) -> Result<()> {
        if let Some(status) = self.0.try_wait()? {
            let output = std::fs::read_to_string(log).unwrap_or_default();
            bail!("qemu exited ({status}): {}", output.trim_end());
        }
        Ok(())
    }
}

impl Drop for QemuChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min_max(xs: &[f64]) -> (f64, f64) {
    xs.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

// ---------------------------------------------------------------------------------------
// qmp: round-trip throughput on one connection
// ---------------------------------------------------------------------------------------

/// Picks one figure out of a [`QmpRound`].
type Metric = fn(&QmpRound) -> f64;

/// One client's timings in one round.
struct QmpRound {
    sequential_per_s: f64,
    concurrent_per_s: f64,
}

async fn bench_qmp(calls: usize, rounds: usize, pids: &mut Pids) -> Result<()> {
    ensure!(
        calls >= WORKERS,
        "--calls must be at least {WORKERS} (the concurrent part splits it over {WORKERS} workers)"
    );
    let calls = calls / WORKERS * WORKERS;
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("qmp.sock");
    let log = dir.path().join("qemu.log");
    let args: Vec<String> = [
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-display",
        "none",
        "-nodefaults",
        "-m",
        "64",
        "-S",
        "-qmp",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("unix:{},server=on,wait=off", sock.display())])
    .collect();
    let mut qemu = QemuChild::start(&args, &log, pids)?;

    // Wait for the socket, and check that the VM is what we think (paused, prelaunch).
    let start = Instant::now();
    let qmp = loop {
        qemu.check_alive(&log)?;
        match Qmp::connect(&sock).await {
            Ok(q) => break q,
            Err(e) if start.elapsed() > READY_TIMEOUT => {
                return Err(e).context("qemu's qmp socket never answered")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let status = qmp.execute(qmp::query_status {}).await?;
    let version = qmp.version();
    drop(qmp);
    eprintln!(
        "qmp: QEMU {}.{}.{} status {:?}; {calls} calls x {rounds} rounds per client",
        version.0, version.1, version.2, status.status
    );

    // Warm up both clients once (page cache, Python imports); not counted.
    weft_qmp_round(&sock, calls.min(200)).await?;
    let peer_name = peer_qmp_round(&sock, calls.min(200)).await?.1;

    let mut weft = Vec::new();
    let mut peer = Vec::new();
    let mut weft_raw = Vec::new();
    for round in 0..rounds {
        // Alternate who goes first so that neither always follows the other.
        for first in [round % 2 == 0, round % 2 != 0] {
            if first {
                let (r, raw) = weft_qmp_round(&sock, calls).await?;
                eprintln!(
                    "  round {round} weft-qmp: {:.0} seq/s, {:.0} conc/s",
                    r.sequential_per_s, r.concurrent_per_s
                );
                weft.push(r);
                weft_raw.push(raw);
            } else {
                let (r, _) = peer_qmp_round(&sock, calls).await?;
                eprintln!(
                    "  round {round} peer:     {:.0} seq/s, {:.0} conc/s",
                    r.sequential_per_s, r.concurrent_per_s
                );
                peer.push(r);
            }
        }
        qemu.check_alive(&log)?;
    }
    drop(qemu);

    let col = |v: &[QmpRound], f: Metric| v.iter().map(f).collect::<Vec<f64>>();
    println!();
    println!(
        "### qmp: `query-status` round trips on one connection ({calls} calls, {rounds} rounds, median)"
    );
    println!();
    println!("| client | mode | calls/s (median) | min | max | µs/call |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    let modes: [(&str, Metric); 2] = [
        ("sequential", |r| r.sequential_per_s),
        ("8 concurrent tasks", |r| r.concurrent_per_s),
    ];
    for (mode, f) in modes {
        for (name, v) in [("weft-qmp", &weft), (peer_name.as_str(), &peer)] {
            let xs = col(v, f);
            let (lo, hi) = min_max(&xs);
            let m = median(&xs);
            println!(
                "| {name} | {mode} | {m:.0} | {lo:.0} | {hi:.0} | {:.1} |",
                1e6 / m
            );
        }
    }
    let (lo, hi) = min_max(&weft_raw);
    let m = median(&weft_raw);
    println!(
        "| weft-qmp `execute_raw` (untyped, no `arguments` member) | sequential | {m:.0} | {lo:.0} | {hi:.0} | {:.1} |",
        1e6 / m
    );
    println!();
    println!("| mode | ratio weft-qmp / {peer_name} (calls/s, >1 = weft faster) |");
    println!("| --- | ---: |");
    for (mode, f) in modes {
        println!(
            "| {mode} | {:.2} |",
            median(&col(&weft, f)) / median(&col(&peer, f))
        );
    }
    Ok(())
}

/// One weft-qmp round: connect, N sequential typed calls, N calls from 8 tasks, then N/4
/// sequential untyped calls, close. Only the calls are timed.
///
/// The untyped calls are a diagnostic: `execute` sends `"arguments":{}` (qapi serializes
/// the empty command struct), `execute_raw` with `None` sends no `arguments` member, and
/// QEMU's side of the round trip is measurably cheaper without it.
async fn weft_qmp_round(sock: &Path, calls: usize) -> Result<(QmpRound, f64)> {
    let qmp = Qmp::connect(sock).await.context("weft-qmp connect")?;

    let t = Instant::now();
    for _ in 0..calls {
        qmp.execute(qmp::query_status {}).await?;
    }
    let sequential = t.elapsed();

    let per_task = calls / WORKERS;
    let t = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..WORKERS {
        let qmp = qmp.clone();
        tasks.spawn(async move {
            for _ in 0..per_task {
                qmp.execute(qmp::query_status {}).await?;
            }
            Ok::<_, weft_qmp::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let concurrent = t.elapsed();

    let raw_calls = (calls / 4).max(1);
    let t = Instant::now();
    for _ in 0..raw_calls {
        qmp.execute_raw("query-status", None).await?;
    }
    let raw = t.elapsed();

    drop(qmp);
    Ok((
        QmpRound {
            sequential_per_s: calls as f64 / sequential.as_secs_f64(),
            concurrent_per_s: (per_task * WORKERS) as f64 / concurrent.as_secs_f64(),
        },
        raw_calls as f64 / raw.as_secs_f64(),
    ))
}

fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/qmp_peer.py")
}

/// One round of the Python peer; returns its timings and its name.
async fn peer_qmp_round(sock: &Path, calls: usize) -> Result<(QmpRound, String)> {
    let out = tokio::process::Command::new(python())
        .arg(peer_script())
        .arg("--socket")
        .arg(sock)
        .arg("--calls")
        .arg(calls.to_string())
        .arg("--workers")
        .arg(WORKERS.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {}", python()))?;
    if !out.status.success() {
        bail!(
            "the qemu.qmp peer failed ({}); is `qemu.qmp` installed (`{} -m pip install qemu.qmp`)?\n{}",
            out.status,
            python(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "peer output is not json: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let num = |k: &str| {
        v.get(k)
            .and_then(Value::as_f64)
            .with_context(|| format!("peer output lacks {k}"))
    };
    let name = v
        .get("peer")
        .and_then(Value::as_str)
        .unwrap_or("qemu.qmp")
        .to_owned();
    Ok((
        QmpRound {
            sequential_per_s: num("sequential_calls")? / num("sequential_s")?,
            concurrent_per_s: num("concurrent_calls")? / num("concurrent_s")?,
        },
        name,
    ))
}

// ---------------------------------------------------------------------------------------
// launch: spawn to a negotiated QMP connection
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Launcher {
    /// `weft_qmp::process::spawn`.
    Weft,
    /// `std::process::Command`, then poll `connect()` on the socket every 1 ms and
    /// negotiate by hand.
    PeerPoll,
    /// libvirt's way: bind the listening socket first and hand QEMU its fd
    /// (`-chardev socket,fd=N`), so the client connects at once and blocks on the greeting.
    PeerFd,
}

impl Launcher {
    fn name(self) -> &'static str {
        match self {
            Launcher::Weft => "weft `weft_qmp::process::spawn`",
            Launcher::PeerPoll => "peer 1: Command + connect poll (1 ms) + raw handshake",
            Launcher::PeerFd => "peer 2: pre-bound socket fd (libvirt style) + raw handshake",
        }
    }
}

async fn bench_launch(rounds: usize, pids: &mut Pids) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = VmConfig {
        machine: "q35".into(),
        accel: Accel::Tcg,
        memory_mib: 64,
        cpus: 1,
        ..VmConfig::default()
    };
    let paths = LaunchPaths {
        qmp_socket: dir.path().join("qmp.sock"),
        serial_log: dir.path().join("serial.log"),
        output_log: dir.path().join("qemu.log"),
        pid_file: None,
    };
    let spawn_opts = SpawnOptions {
        binary: qemu_binary().into(),
        ready_timeout: READY_TIMEOUT,
        detached: false,
        ..SpawnOptions::default()
    };
    // The peers run exactly weft's command line.
    let args = launch::command_line(&config, &paths);
    eprintln!("launch: {} {}", qemu_binary(), args.join(" "));

    let all = [Launcher::Weft, Launcher::PeerPoll, Launcher::PeerFd];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); all.len()];
    // Round 0 warms up (page cache, dynamic loader) and is not counted.
    for round in 0..=rounds {
        // Rotate the order so that none always runs right after another.
        for k in 0..all.len() {
            let i = (k + round) % all.len();
            let d = match all[i] {
                Launcher::Weft => {
                    let t = Instant::now();
                    let p = weft_qmp::process::spawn(&config, &paths, &spawn_opts).await?;
                    let d = t.elapsed();
                    pids.0.push(p.pid());
                    p.qmp().execute(qmp::query_status {}).await?;
                    p.kill().await;
                    d
                }
                who => {
                    let args = args.clone();
                    let paths = paths.clone();
                    let mut started = Pids::default();
                    let r = tokio::task::spawn_blocking(move || {
                        let r = peer_launch(who, &args, &paths, &mut started);
                        (r, started)
                    })
                    .await?;
                    pids.0.extend(r.1 .0);
                    r.0?
                }
            };
            if round > 0 {
                eprintln!(
                    "  round {round} {}: {:.1} ms",
                    all[i].name(),
                    d.as_secs_f64() * 1e3
                );
                times[i].push(d.as_secs_f64() * 1e3);
            }
        }
    }

    println!();
    println!("### launch: spawn to negotiated QMP ({rounds} rounds, median)");
    println!();
    println!("| launcher | ms (median) | min | max | ratio weft / this (time, <1 = weft faster) |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let weft_median = median(&times[0]);
    for (i, who) in all.iter().enumerate() {
        let (lo, hi) = min_max(&times[i]);
        let m = median(&times[i]);
        println!(
            "| {} | {m:.1} | {lo:.1} | {hi:.1} | {:.2} |",
            who.name(),
            weft_median / m
        );
    }
    Ok(())
}

/// Starts QEMU the peer's way, times it until `qmp_capabilities` has returned, then kills
/// and reaps it.
fn peer_launch(
    who: Launcher,
    args: &[String],
    paths: &LaunchPaths,
    pids: &mut Pids,
) -> Result<Duration> {
    let sock = &paths.qmp_socket;
    match std::fs::remove_file(sock) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let t = Instant::now();
    let (mut qemu, stream) = if who == Launcher::PeerFd {
        let listener = UnixListener::bind(sock)?;
        let fd = listener.as_raw_fd();
        // Let QEMU inherit the listening socket. Nothing else spawns meanwhile.
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )?;
        let mut args = args.to_vec();
        let chardev = args
            .iter_mut()
            .find(|a| a.starts_with("socket,id=qmp,"))
            .context("no qmp chardev in weft's command line")?;
        *chardev = format!("socket,id=qmp,fd={fd},server=on,wait=off");
        let qemu = QemuChild::start(&args, &paths.output_log, pids)?;
        drop(listener);
        let stream = UnixStream::connect(sock)?;
        (qemu, stream)
    } else {
        let mut qemu = QemuChild::start(args, &paths.output_log, pids)?;
        let stream = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    qemu.check_alive(&paths.output_log)?;
                    ensure!(t.elapsed() < READY_TIMEOUT, "qmp socket never answered");
                    std::thread::sleep(PEER_POLL);
                }
                Err(e) => return Err(e.into()),
            }
        };
        (qemu, stream)
    };
    if let Err(e) = negotiate(stream) {
        qemu.check_alive(&paths.output_log)?;
        return Err(e.context("raw qmp handshake"));
    }
    let d = t.elapsed();
    qemu.check_alive(&paths.output_log)?;
    drop(qemu);
    Ok(d)
}

/// Reads the greeting, sends `qmp_capabilities` and reads its reply, by hand.
fn negotiate(stream: UnixStream) -> Result<()> {
    stream.set_read_timeout(Some(READY_TIMEOUT))?;
    let mut rd = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    rd.read_line(&mut line)?;
    ensure!(line.starts_with("{\"QMP\""), "not a qmp greeting: {line:?}");
    (&stream).write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
    loop {
        line.clear();
        ensure!(
            rd.read_line(&mut line)? > 0,
            "qmp closed during negotiation"
        );
        if line.starts_with("{\"return\"") {
            return Ok(());
        }
        ensure!(
            !line.starts_with("{\"error\""),
            "qmp_capabilities failed: {line}"
        );
    }
}
