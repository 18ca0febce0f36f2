//! weave: the time from `POST /v1/environments/<env>/weaves` (`"source": "now"`) to the
//! weave's QEMU running, for a 1 GiB and a 64 GiB virtual disk, against the full-copy
//! alternative (`qemu-img convert` of the 1 GiB image).
//!
//! A private weftd runs on a scratch directory under `WEFT_BENCH_DIR` (`--data-dir`,
//! `--run-dir`, as the end-to-end tests start it). Two environments without a kernel
//! (QEMU runs SeaBIOS, which finds nothing to boot; guest boot is not part of the
//! measurement) get one disk each. Every round creates one weave of each (the order
//! alternates) through `weft_client::Client`, timed until weftd answers (it answers after
//! the weave's QEMU has answered on QMP), then deletes it (not timed). `weftd`, `weft` and
//! QEMU are killed and the scratch directory removed at the end, also on failure.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::json;
use weft::model::EnvState;
use weft::weaves::Weave;
use weft_client::Client;
use weft_qmp::image;
use weft_qmp::launch::{DiskFormat, LaunchPaths, VmConfig};
use weft_qmp::process::SpawnOptions;
use weft_rig::{find_bin, LogOnDrop, Weftd, WeftdBuilder};

use super::{bench_dir, drop_caches, median, min_max, qemu_binary, Pids, READY_TIMEOUT};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// The acceptance goals: median ms, and the 64 GiB / 1 GiB ratio.
const GOAL_MS: f64 = 150.0;
const GOAL_RATIO: f64 = 1.2;
/// Rounds of the `qemu-img convert` peer (each copies 1 GiB).
const CONVERT_ROUNDS: usize = 3;
/// The breakdown's network namespace (`weft-wbench`) and slot, clear of weftd's (from 0 up).
const BD_NETNS: &str = "wbench";
const BD_INDEX: u8 = 254;

/// One environment under test.
struct Disk {
    env: &'static str,
    tag: &'static str,
    label: &'static str,
    image: PathBuf,
}

pub async fn bench_weave(rounds: usize, pids: &mut Pids) -> Result<()> {
    let (dir, mut rig) = Rig::in_scratch("weave-")?;
    let result = run(&mut rig, rounds, pids).await;
    rig.finish(pids, dir).await;
    result
}

async fn run(rig: &mut Rig, rounds: usize, pids: &mut Pids) -> Result<()> {
    let t = Instant::now();
    let disks = [
        Disk {
            env: "e1g",
            tag: "1g",
            label: "1 GiB, all 1 GiB written",
            image: make_full_image(&rig.dir, GIB)?,
        },
        Disk {
            env: "e64g",
            tag: "64g",
            label: "64 GiB sparse, 64 MiB written",
            image: make_sparse_image(&rig.dir, 64 * GIB)?,
        },
    ];
    eprintln!(
        "weave: images built in {:.1} s under {}",
        t.elapsed().as_secs_f64(),
        rig.dir.display()
    );

    rig.start_weftd().await?;
    let client = rig.client();
    for d in &disks {
        let spec = format!("{},name=vda,format=qcow2", d.image.display());
        rig.weft(&[
            "env", "create", d.env, "--disk", &spec, "--memory", "128M", "--accel", "tcg",
        ])?;
        rig.envs.push(d.env.to_string());
    }

    // One uncounted weave of each first (page cache, QEMU's and the daemon's loading).
    for d in &disks {
        let name = format!("w{}r0", d.tag);
        create_weave(&client, d.env, &name).await?;
        delete_weave(&client, &name).await?;
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); disks.len()];
    let mut config: Option<VmConfig> = None;
    for round in 1..=rounds {
        for k in 0..disks.len() {
            let i = (k + round) % disks.len();
            let d = &disks[i];
            let name = format!("w{}r{round}", d.tag);
            let (ms, w) = create_weave(&client, d.env, &name).await?;
            eprintln!("  round {round} {}: {ms:.1} ms", d.label);
            times[i].push(ms);
            if i == 0 {
                config = w.env.and_then(|e| e.config);
            }
            delete_weave(&client, &name).await?;
        }
    }
    let config = config.context("no weave configuration seen")?;

    // The stages of a weave of the 1 GiB disk, each alone.
    let stages = breakdown(rig, &disks[0].image, &config, rounds, pids).await?;

    // The full-copy alternative.
    let cold_ok = drop_caches();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for round in 0..CONVERT_ROUNDS {
        if cold_ok {
            ensure!(drop_caches(), "cannot drop the page cache");
            let s = convert(
                &disks[0].image,
                &rig.dir.join(format!("copy-c{round}.qcow2")),
            )?;
            eprintln!("  convert round {round}, cold cache: {s:.2} s");
            cold.push(s);
        }
        let s = convert(
            &disks[0].image,
            &rig.dir.join(format!("copy-w{round}.qcow2")),
        )?;
        eprintln!("  convert round {round}, warm cache: {s:.2} s");
        warm.push(s);
    }

    let m1 = median(&times[0]);
    let m64 = median(&times[1]);
    println!();
    println!(
        "### weave: API call to the weave's QEMU running ({rounds} rounds, median; guest boot excluded)"
    );
    println!();
    println!("| disk | ms (median) | min | max |");
    println!("| --- | ---: | ---: | ---: |");
    for (d, xs) in disks.iter().zip(&times) {
        let (lo, hi) = min_max(xs);
        println!("| {} | {:.1} | {lo:.1} | {hi:.1} |", d.label, median(xs));
    }
    println!();
    println!("| peer: `qemu-img convert -O qcow2` of the 1 GiB image | s (median) | min | max |");
    println!("| --- | ---: | ---: | ---: |");
    for (what, xs) in [("cold page cache", &cold), ("warm page cache", &warm)] {
        if xs.is_empty() {
            println!("| {what} | (not root: cannot drop the cache) | | |");
            continue;
        }
        let (lo, hi) = min_max(xs);
        println!("| {what} | {:.2} | {lo:.2} | {hi:.2} |", median(xs));
    }
    println!();
    println!("| stage, alone (1 GiB disk, {rounds} rounds) | ms (median) | min | max |");
    println!("| --- | ---: | ---: | ---: |");
    let mut sum = 0.0;
    for (what, xs) in &stages {
        let (lo, hi) = min_max(xs);
        sum += median(xs);
        println!("| {what} | {:.1} | {lo:.1} | {hi:.1} |", median(xs));
    }
    println!("| sum of the stages | {sum:.1} | | |");
    println!(
        "| rest of the weave's time (weftd: HTTP, catalog, cgroups, QMP to the environment) | {:.1} | | |",
        m1 - sum
    );
    println!();
    println!("| figure | value | goal | |");
    println!("| --- | ---: | --- | --- |");
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    println!(
        "| weave, 1 GiB disk, median ms | **{m1:.1}** | ≤ {GOAL_MS:.0} | {} |",
        verdict(m1 <= GOAL_MS)
    );
    println!(
        "| weave, 64 GiB disk, median ms | **{m64:.1}** | ≤ {GOAL_MS:.0} | {} |",
        verdict(m64 <= GOAL_MS)
    );
    println!(
        "| ratio 64 GiB / 1 GiB | **{:.2}** | ≤ {GOAL_RATIO} | {} |",
        m64 / m1,
        verdict(m64 / m1 <= GOAL_RATIO)
    );
    if !cold.is_empty() {
        println!(
            "| ratio weave (1 GiB) / convert, cold cache | {:.3} | | |",
            m1 / 1e3 / median(&cold)
        );
    }
    println!(
        "| ratio weave (1 GiB) / convert, warm cache | {:.3} | | |",
        m1 / 1e3 / median(&warm)
    );
    Ok(())
}

/// `POST /v1/environments/<env>/weaves` from now; returns the ms it took and the weave.
async fn create_weave(client: &Client, env: &str, name: &str) -> Result<(f64, Weave)> {
    let path = format!("/v1/environments/{env}/weaves");
    let body = json!({"name": name, "source": "now"});
    let t = Instant::now();
    let w: Weave = client
        .post(&path, &body)
        .await
        .with_context(|| format!("create weave {name} of {env}"))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let state = w.env.as_ref().map(|e| e.state);
    ensure!(
        state == Some(EnvState::Running),
        "weave {name} is {state:?} after its creation returned"
    );
    Ok((ms, w))
}

async fn delete_weave(client: &Client, name: &str) -> Result<()> {
    client
        .delete(&format!("/v1/weaves/{name}"))
        .await
        .with_context(|| format!("delete weave {name}"))
}

/// Times, alone and in weftd's order, what a weave from now does besides weftd's own work:
/// the environment's new top overlay and the weave's overlay (each made by the running
/// environment's QEMU, `image::create_overlay_in`; a `qemu-storage-daemon` started once
/// stands in for that QEMU here), the network namespace, and QEMU's start in it up to QMP.
async fn breakdown(
    rig: &Rig,
    image_path: &Path,
    config: &VmConfig,
    rounds: usize,
    pids: &mut Pids,
) -> Result<Vec<(&'static str, Vec<f64>)>> {
    let dir = rig.dir.join("breakdown");
    let work = dir.join("work");
    fs::create_dir_all(&work)?;
    let size = virtual_size(image_path)?;
    let netns = weft::weaves::netns_path(BD_NETNS);
    let maker_paths = LaunchPaths {
        qmp_socket: work.join("maker.qmp"),
        serial_log: work.join("maker.serial"),
        output_log: work.join("maker.log"),
        pid_file: None,
    };
    let maker =
        weft_qmp::process::spawn_storage_daemon(&[], &maker_paths, &SpawnOptions::default())
            .await
            .context("the storage daemon standing in for the environment's QEMU")?;
    pids.0.push(maker.pid());
    let maker_qmp = maker.qmp().clone();
    let result = async {
        let mut top_ms = Vec::new();
        let mut overlay_ms = Vec::new();
        let mut netns_ms = Vec::new();
        let mut qemu_ms = Vec::new();
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
        // Round 0 warms up and is not counted.
        for round in 0..=rounds {
            let top = dir.join(format!("top-{round}.qcow2"));
            let overlay = dir.join(format!("weave-{round}.qcow2"));
            let t = Instant::now();
            image::create_overlay_in(&maker_qmp, &top, image_path, DiskFormat::Qcow2, size).await?;
            let a = ms(t);
            let t = Instant::now();
            image::create_overlay_in(&maker_qmp, &overlay, image_path, DiskFormat::Qcow2, size).await?;
            let b = ms(t);
            let t = Instant::now();
            weft::weavenet::create(BD_NETNS, BD_INDEX, config)
                .await
                .map_err(|e| anyhow::anyhow!("network namespace: {e}"))?;
            let c = ms(t);
            let mut vm = config.clone();
            for disk in &mut vm.disks {
                disk.path.clone_from(&overlay);
                disk.format = DiskFormat::Qcow2;
            }
            let paths = LaunchPaths {
                qmp_socket: dir.join("qmp.sock"),
                serial_log: dir.join("serial.log"),
                output_log: dir.join("qemu.log"),
                pid_file: None,
            };
            let opts = SpawnOptions {
                binary: qemu_binary().into(),
                ready_timeout: READY_TIMEOUT,
                detached: false,
                netns: Some(netns.clone()),
                cgroups: Vec::new(),
                ..SpawnOptions::default()
            };
            let t = Instant::now();
            let spawned = weft_qmp::process::spawn(&vm, &paths, &opts).await;
            let d = ms(t);
            if let Ok(p) = &spawned {
                pids.0.push(p.pid());
                p.kill().await;
            }
            let gone = weft::weavenet::delete(BD_NETNS, BD_INDEX).await;
            spawned.context("QEMU in the breakdown's namespace")?;
            gone.map_err(|e| anyhow::anyhow!("network namespace: {e}"))?;
            fs::remove_file(&overlay)?;
            fs::remove_file(&top)?;
            if round > 0 {
                eprintln!(
                    "  breakdown round {round}: top {a:.1} ms, overlay {b:.1} ms, netns {c:.1} ms, qemu {d:.1} ms"
                );
                top_ms.push(a);
                overlay_ms.push(b);
                netns_ms.push(c);
                qemu_ms.push(d);
            }
        }
        Ok(vec![
            (
                "the environment's new top overlay (`image::create_overlay_in`: `blockdev-create` in the running QEMU)",
                top_ms,
            ),
            ("the weave's overlay (the same)", overlay_ms),
            (
                "network namespace, tap, veth, nftables (`weavenet::create`)",
                netns_ms,
            ),
            (
                "QEMU start to negotiated QMP in that namespace (`weft_qmp::process::spawn`, the weave's configuration)",
                qemu_ms,
            ),
        ])
    }
    .await;
    maker.kill().await;
    result
}

/// The virtual size of a qcow2 image, from `qemu-img info`.
fn virtual_size(path: &Path) -> Result<u64> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .context("qemu-img info")?;
    ensure!(out.status.success(), "qemu-img info: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["virtual-size"]
        .as_u64()
        .context("qemu-img info has no virtual-size")
}

/// `qemu-img convert -O qcow2 src dst` (qemu-img flushes the copy before it exits); returns
/// seconds and removes the copy.
fn convert(src: &Path, dst: &Path) -> Result<f64> {
    let t = Instant::now();
    run_tool(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(src)
            .arg(dst),
    )?;
    let s = t.elapsed().as_secs_f64();
    fs::remove_file(dst)?;
    Ok(s)
}

fn run_tool(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    Ok(())
}

/// A qcow2 image of `size` bytes of deterministic pseudo-random data (xorshift64), except
/// its first MiB, which is zero (SeaBIOS then finds no boot sector and just waits).
fn make_full_image(dir: &Path, size: u64) -> Result<PathBuf> {
    let raw = dir.join("full.raw");
    let qcow2 = dir.join("full-1g.qcow2");
    let mut out = BufWriter::with_capacity(4 * MIB as usize, File::create(&raw)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; MIB as usize];
    out.write_all(&buf)?;
    for _ in 1..size / MIB {
        for word in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        out.write_all(&buf)?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    run_tool(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow2),
    )?;
    fs::remove_file(&raw)?;
    Ok(qcow2)
}

/// A sparse qcow2 image of `size` bytes with 1 MiB of data written at every GiB past the
/// first (`qemu-io`), so that it has allocated clusters all over but is mostly empty.
fn make_sparse_image(dir: &Path, size: u64) -> Result<PathBuf> {
    let qcow2 = dir.join("sparse-64g.qcow2");
    run_tool(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&qcow2)
            .arg(size.to_string()),
    )?;
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for (i, off) in (GIB..size).step_by(GIB as usize).enumerate() {
        cmd.arg("-c")
            .arg(format!("write -q -P {} {off} {MIB}", 1 + i % 250));
    }
    // The last MiB too, so that the image reaches the end of the disk.
    cmd.arg("-c")
        .arg(format!("write -q -P 7 {} {MIB}", size - MIB));
    run_tool(cmd.arg(&qcow2))?;
    Ok(qcow2)
}

/// The private weftd and what it holds; everything is torn down by [`Rig::shutdown`].
struct Rig {
    dir: PathBuf,
    weftd: Option<Weftd>,
    envs: Vec<String>,
    /// Pids of processes killed at the end, for the caller's check.
    killed: Vec<u32>,
}

impl Rig {
    /// A rig on a new scratch directory under the benchmark directory.
    fn in_scratch(prefix: &str) -> Result<(tempfile::TempDir, Rig)> {
        let base = bench_dir()?;
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&base)
            .with_context(|| format!("scratch directory in {}", base.display()))?;
        let rig = Rig {
            dir: dir.path().to_path_buf(),
            weftd: None,
            envs: Vec::new(),
            killed: Vec::new(),
        };
        Ok((dir, rig))
    }

    /// Tears everything down, hands the killed pids to the caller's check, waits for
    /// init to reap them, and removes the scratch directory.
    async fn finish(&mut self, pids: &mut Pids, dir: tempfile::TempDir) {
        self.shutdown().await;
        pids.0.extend(self.killed.iter().copied());
        // Killed processes are reaped by init, not by us: give it a moment.
        let t = Instant::now();
        while !pids.still_running().is_empty() && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(dir);
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/weftd.sock")
    }

    fn client(&self) -> Client {
        Client::new(self.socket())
    }

    async fn start_weftd(&mut self) -> Result<()> {
        let weftd = WeftdBuilder::new(&self.dir)
            .confined_to(&[self.dir.as_path()])
            .start_timeout(Duration::from_secs(20))
            .log_on_drop(LogOnDrop::Panicking)
            // `shutdown` kills what is left, and hands the pids to the caller's check.
            .clean_on_drop(false)
            .start()
            .await?;
        self.weftd = Some(weftd);
        Ok(())
    }

    /// Runs the `weft` CLI against the private weftd (set-up and tear-down only).
    fn weft(&self, args: &[&str]) -> Result<()> {
        run_tool(
            Command::new(find_bin("weft")?)
                .arg("--socket")
                .arg(self.socket())
                .args(args),
        )
    }

    /// Deletes weaves and environments, stops weftd (SIGTERM) and kills any process
    /// left that mentions the scratch directory.
    async fn shutdown(&mut self) {
        if self.weftd.is_some() {
            let client = self.client();
            for env in std::mem::take(&mut self.envs) {
                let path = format!("/v1/environments/{env}/weaves");
                if let Ok(ws) = client.get::<Vec<Weave>>(&path).await {
                    for w in ws {
                        if let Err(e) = delete_weave(&client, &w.name).await {
                            eprintln!("weave: cleanup: {e:#}");
                        }
                    }
                }
                if let Err(e) = self.weft(&["env", "delete", &env]) {
                    eprintln!("weave: cleanup: {e:#}");
                }
            }
        }
        if let Some(mut weftd) = self.weftd.take() {
            weftd.stop(Duration::from_secs(10));
        }
        if weft::weaves::netns_path(BD_NETNS).exists() {
            let _ = weft::weavenet::delete(BD_NETNS, BD_INDEX).await;
        }
        for pid in weft_rig::procs::kill_processes_in(&self.dir) {
            eprintln!("weave: killed leftover process {pid}");
            self.killed.push(pid);
        }
    }
}

/// `weft-bench compose`: the time from the API call to the weave's QEMU running for a
/// weave applied from a 16-layer composition (16 disk snapshots of one 1 GiB disk merged
/// by `merge-by-timestamp`, served live by weft-blk: nothing restored), against a weave
/// from now of the same environment. The environment has no guest kernel, so the 16
/// snapshots hold the same bytes: the merge still reads and compares 16 block maps and
/// stores the result as an index; what it does not exercise is conflict bookkeeping.
pub async fn bench_compose(rounds: usize, pids: &mut Pids) -> Result<()> {
    let (dir, mut rig) = Rig::in_scratch("compose-")?;
    let result = compose_run(&mut rig, rounds).await;
    rig.finish(pids, dir).await;
    result
}

const LAYERS: usize = 16;
/// The acceptance goal: composition weave / weave from now.
const GOAL_COMPOSE_RATIO: f64 = 1.5;

async fn compose_run(rig: &mut Rig, rounds: usize) -> Result<()> {
    let image = make_full_image(&rig.dir, GIB)?;
    rig.start_weftd().await?;
    let client = rig.client();
    let spec = format!("{},name=vda,format=qcow2", image.display());
    rig.weft(&[
        "env", "create", "c1g", "--disk", &spec, "--memory", "128M", "--accel", "tcg",
    ])?;
    rig.envs.push("c1g".into());
    let t = Instant::now();
    let mut ids = Vec::new();
    for i in 0..LAYERS {
        let job: weft::model::Job = client
            .post(
                "/v1/environments/c1g/snapshots",
                &json!({"resource": "disk:vda", "category": format!("layer {i}")}),
            )
            .await?;
        let job = loop {
            let j: weft::model::Job = client.get(&format!("/v1/jobs/{}", job.id)).await?;
            if j.state != weft::model::JobState::Running {
                break j;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        ensure!(
            job.state == weft::model::JobState::Succeeded,
            "snapshot {i} failed: {:?}",
            job.error
        );
        ids.push(
            job.result
                .as_ref()
                .and_then(|r| r["snapshots"][0].as_i64())
                .context("no snapshot id")?,
        );
    }
    eprintln!(
        "compose: {LAYERS} snapshots in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let rules: Vec<serde_json::Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| json!({"name": format!("layer {i}"), "resources": ["disk:vda"], "pin": id}))
        .collect();
    let _: serde_json::Value = client
        .post(
            "/v1/compositions",
            &json!({"name": "c16", "env": "c1g", "rules": {"conflict": "merge-by-timestamp", "rule": rules}}),
        )
        .await
        .context("create the composition")?;
    // One uncounted weave of each first.
    let apply = |name: String| {
        let client = client.clone();
        async move {
            let t = Instant::now();
            let w: Weave = client
                .post(
                    "/v1/compositions/c16/apply",
                    &json!({"weave": name, "live": true}),
                )
                .await
                .with_context(|| format!("apply c16 as {name}"))?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let state = w.env.as_ref().map(|e| e.state);
            ensure!(
                state == Some(EnvState::Running),
                "weave {name} is {state:?} after apply returned"
            );
            Ok::<f64, anyhow::Error>(ms)
        }
    };
    apply("cw0".into()).await?;
    delete_weave(&client, "cw0").await?;
    create_weave(&client, "c1g", "nw0").await?;
    delete_weave(&client, "nw0").await?;
    let (mut composed, mut now) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        for k in 0..2 {
            if (k + round) % 2 == 0 {
                let name = format!("cw{round}");
                let ms = apply(name.clone()).await?;
                eprintln!("  round {round} composition ({LAYERS} layers, live): {ms:.1} ms");
                composed.push(ms);
                delete_weave(&client, &name).await?;
            } else {
                let name = format!("nw{round}");
                let (ms, _) = create_weave(&client, "c1g", &name).await?;
                eprintln!("  round {round} from now: {ms:.1} ms");
                now.push(ms);
                delete_weave(&client, &name).await?;
            }
        }
    }
    println!();
    println!("### compose: API call to the weave's QEMU running ({rounds} rounds, median; guest boot excluded)");
    println!();
    println!("| weave | ms (median) | min | max |");
    println!("| --- | ---: | ---: | ---: |");
    for (what, xs) in [
        (
            format!(
                "from a {LAYERS}-layer composition (merge-by-timestamp, served live by weft-blk)"
            ),
            &composed,
        ),
        (
            "from now (live external snapshot, qcow2 overlays)".to_string(),
            &now,
        ),
    ] {
        let (lo, hi) = min_max(xs);
        println!("| {what} | {:.1} | {lo:.1} | {hi:.1} |", median(xs));
    }
    let ratio = median(&composed) / median(&now);
    println!();
    println!("| figure | value | goal | |");
    println!("| --- | ---: | --- | --- |");
    println!(
        "| composition / now | **{ratio:.2}** | ≤ {GOAL_COMPOSE_RATIO} | {} |",
        if ratio <= GOAL_COMPOSE_RATIO {
            "met"
        } else {
            "**missed**"
        }
    );
    Ok(())
}
