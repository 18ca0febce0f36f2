//! `weft-bench blk`: reads from a guest, one run, same guest and disk content, through
//! (a) weft-blk over a 16-layer composition of chunk-store snapshots, (b)
//! `qemu-storage-daemon`'s vhost-user-blk export of an equal 16-deep qcow2 chain, (c)
//! QEMU's own virtio-blk on that chain. The guest (`weft-blkread`, `O_DIRECT`) reads
//! the whole 1 GiB disk in 1 MiB reads, then 4000 random 4 KiB reads, 4 in flight.
//!
//! Content: layer 0 writes the whole disk, layer i (1..16) its own 64 MiB region, all
//! incompressible (xorshift). The composition takes layer 0 whole and each later layer's
//! region (slot ranges), so it reads exactly as the top of the qcow2 chain. All three
//! serve it read-only; the host page cache is dropped before each guest.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use weft_blockdev::blk::spec::{DiskSpec, SPEC_VERSION};
use weft_blockdev::layers::LayerSpec;
use weft_blockdev::store::{BlockMap, ChunkStore, Slot, StoreConfig};
use weft_integration::{bin_path, xorshift_fill, Guest, GuestOpts};
use weft_qmp::launch::{DiskConfig, DiskFormat, VhostUserDisk};

use super::{bench_dir, drop_caches, median, min_max};

const LAYERS: usize = 16;
const SIZE: usize = 1 << 30;
const REGION: usize = SIZE / LAYERS;
const CHUNK: usize = 128 << 10;
/// Bump when the content or layout changes (the cache is rebuilt). v2: chunks with a CRC.
const VERSION: &str = "v2";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    WeftBlk,
    StorageDaemon,
    VirtioBlk,
}

impl Backend {
    fn label(self) -> &'static str {
        match self {
            Backend::WeftBlk => "(a) weft-blk, 16-layer composition",
            Backend::StorageDaemon => "(b) qemu-storage-daemon vhost-user-blk, 16-deep qcow2 chain",
            Backend::VirtioBlk => "(c) QEMU virtio-blk, 16-deep qcow2 chain",
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Builds (once) the store with 16 snapshot indexes and the 16-deep qcow2 chain;
/// returns the chain's top.
fn prepare(dir: &Path) -> Result<PathBuf> {
    let done = dir.join(format!("{VERSION}.done"));
    let top = dir.join(format!("layer{:02}.qcow2", LAYERS - 1));
    if done.exists() {
        return Ok(top);
    }
    eprintln!(
        "blk: building the store and the qcow2 chain (once, cached in {})",
        dir.display()
    );
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    let store = ChunkStore::create(
        &dir.join("store"),
        None,
        &StoreConfig::with_chunk_size(CHUNK as u32),
        None,
    )?;
    let mut image = vec![0u8; SIZE];
    xorshift_fill(&mut image, 1);
    let mut map = BlockMap::new(SIZE as u64, CHUNK as u32);
    let put_range = |image: &[u8], map: &mut BlockMap, from: usize, to: usize| -> Result<()> {
        for i in from / CHUNK..to / CHUNK {
            map.slots[i] = Slot::Data(store.put(&image[i * CHUNK..(i + 1) * CHUNK])?.id);
        }
        Ok(())
    };
    put_range(&image, &mut map, 0, SIZE)?;
    store.write_index("blk-bench/00", &map)?;
    let raw = dir.join("layer00.raw");
    std::fs::write(&raw, &image)?;
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(dir.join("layer00.qcow2")))?;
    std::fs::remove_file(&raw)?;
    for l in 1..LAYERS {
        let (from, to) = (l * REGION, (l + 1) * REGION);
        xorshift_fill(&mut image[from..to], 100 + l as u64);
        put_range(&image, &mut map, from, to)?;
        store.write_index(&format!("blk-bench/{l:02}"), &map)?;
        let region = dir.join("region.bin");
        std::fs::write(&region, &image[from..to])?;
        let this = dir.join(format!("layer{l:02}.qcow2"));
        let below = dir.join(format!("layer{:02}.qcow2", l - 1));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&below)
            .arg(&this))?;
        run(Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(&this)
            .arg("-c")
            .arg(format!("write -s {} {from} {REGION}", region.display())))?;
        std::fs::remove_file(&region)?;
    }
    std::fs::write(&done, b"")?;
    Ok(top)
}

fn spec(dir: &Path) -> DiskSpec {
    let slots = |l: usize| {
        (
            (l * REGION / CHUNK) as u64,
            ((l + 1) * REGION / CHUNK) as u64,
        )
    };
    DiskSpec {
        version: SPEC_VERSION,
        store: dir.join("store"),
        key_file: None,
        layers: (0..LAYERS)
            .map(|l| LayerSpec {
                index: format!("blk-bench/{l:02}"),
                slots: (l > 0).then(|| {
                    let (s, e) = slots(l);
                    vec![[s, e]]
                }),
            })
            .collect(),
        write_layer: None,
        trace: None,
        assembly: None,
        trace_limit_mib: 64,
        cache_mib: 64,
        id: "weft-bench".into(),
        queues: 1,
        queue_size: 256,
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(p: &Path, child: &mut Child) -> Result<()> {
    for _ in 0..2000 {
        if p.exists() {
            return Ok(());
        }
        if let Some(s) = child.try_wait()? {
            bail!(
                "the backend exited ({s}) before listening on {}",
                p.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("no socket {} after 20 s", p.display())
}

/// Starts a vhost-user-blk server with its output in `log` and waits until it
/// listens on `socket`.
fn serve(mut cmd: Command, socket: &Path, log: std::fs::File) -> Result<Proc> {
    let mut c = cmd
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()?;
    wait_socket(socket, &mut c)?;
    Ok(Proc(c))
}

/// One guest run: (seq MiB/s, random 4 KiB IOPS).
async fn one(backend: Backend, dir: &Path, top: &Path, work: &Path) -> Result<(f64, f64)> {
    ensure!(drop_caches(), "cannot drop the page cache (run as root)");
    let socket = work.join(format!("{backend:?}.sock"));
    let _ = std::fs::remove_file(&socket);
    let log = std::fs::File::create(work.join(format!("{backend:?}.log")))?;
    let _proc = match backend {
        Backend::WeftBlk => {
            let spec_path = work.join("spec.json");
            // As weftd serves a weave: the chunks read are kept in an assembly file.
            let spec = DiskSpec {
                assembly: Some(work.join("assembly")),
                ..spec(dir)
            };
            std::fs::write(&spec_path, serde_json::to_vec(&spec)?)?;
            let mut c = Command::new(bin_path("weft-blk"));
            c.arg("--spec").arg(&spec_path).arg("--socket").arg(&socket);
            Some(serve(c, &socket, log)?)
        }
        Backend::StorageDaemon => {
            let node = serde_json::json!({
                "driver": "qcow2", "node-name": "top", "read-only": true,
                "file": {"driver": "file", "filename": top, "read-only": true},
            });
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev").arg(node.to_string()).arg("--export").arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=top,addr.type=unix,addr.path={},writable=off,num-queues=1",
                socket.display()
            ));
            Some(serve(c, &socket, log)?)
        }
        Backend::VirtioBlk => None,
    };
    let mut opts = GuestOpts {
        workload: "blkbench".into(),
        extra_append: "weft.data=none weft.workload_args=/dev/vdb".into(),
        ready_timeout: Duration::from_secs(120),
        ..GuestOpts::default()
    };
    match backend {
        Backend::VirtioBlk => opts.extra_disks.push(DiskConfig {
            name: "vdb".into(),
            path: top.to_path_buf(),
            format: DiskFormat::Qcow2,
            read_only: true,
            backing: Vec::new(),
        }),
        _ => opts.vhost_user_disks.push(VhostUserDisk {
            name: "vdb".into(),
            socket: socket.clone(),
            queues: 1,
        }),
    }
    let guest = Guest::boot(opts).await?;
    guest
        .serial()
        .wait_for("weft-blkbench: done", Duration::from_secs(600))
        .await?;
    let text = guest.serial().contents();
    guest.shutdown().await?;
    let field = |mode: &str, key: &str| -> Result<f64> {
        text.lines()
            .find(|l| l.contains(&format!("weft-blkread: mode={mode} ")))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                    .and_then(|v| v.parse().ok())
            })
            .with_context(|| format!("no {mode} {key} in the guest's output"))
    };
    Ok((field("seq", "mib_s")?, field("rand", "iops")?))
}

pub(crate) async fn bench_blk(rounds: usize) -> Result<()> {
    let dir = bench_dir()?.join("blk");
    std::fs::create_dir_all(&dir)?;
    let top = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || prepare(&dir)
    })
    .await??;
    let work = tempfile::Builder::new()
        .prefix("weft-bench-blk")
        .tempdir()?;
    let order = [Backend::WeftBlk, Backend::StorageDaemon, Backend::VirtioBlk];
    let mut seq: [Vec<f64>; 3] = Default::default();
    let mut rand: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        for k in 0..3 {
            let i = (k + round) % 3;
            let b = order[i];
            let (s, r) = one(b, &dir, &top, work.path()).await?;
            eprintln!(
                "  round {round} {}: seq {s:.0} MiB/s, random 4 KiB {r:.0} IOPS",
                b.label()
            );
            seq[i].push(s);
            rand[i].push(r);
        }
    }
    println!("### blk: guest reads through three block backends ({rounds} rounds, median)\n");
    println!("1 GiB disk; 16 layers (chunk store: 128 KiB chunks, zstd; qcow2: 64 KiB clusters); TCG guest, `O_DIRECT`.\n");
    println!(
        "| backend | seq 1 MiB MiB/s | min | max | random 4 KiB IOPS (4 in flight) | min | max |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for i in 0..3 {
        let (sl, sh) = min_max(&seq[i]);
        let (rl, rh) = min_max(&rand[i]);
        println!(
            "| {} | {:.0} | {sl:.0} | {sh:.0} | {:.0} | {rl:.0} | {rh:.0} |",
            order[i].label(),
            median(&seq[i]),
            median(&rand[i])
        );
    }
    let r = |v: &[Vec<f64>; 3], a: usize, b: usize| median(&v[a]) / median(&v[b]);
    println!("\n| ratio | value | goal | |\n| --- | ---: | --- | --- |");
    let yes = |ok: bool| if ok { "met" } else { "**missed**" };
    println!(
        "| sequential, (a) / (b) | **{:.2}** | ≥ 1.0 | {} |",
        r(&seq, 0, 1),
        yes(r(&seq, 0, 1) >= 1.0)
    );
    println!(
        "| random 4 KiB, (a) / (b) | **{:.2}** | ≥ 1.0 | {} |",
        r(&rand, 0, 1),
        yes(r(&rand, 0, 1) >= 1.0)
    );
    println!("| sequential, (a) / (c) | {:.2} | | |", r(&seq, 0, 2));
    println!("| random 4 KiB, (a) / (c) | {:.2} | | |", r(&rand, 0, 2));
    Ok(())
}
