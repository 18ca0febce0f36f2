//! weft-blk end to end: a TCG guest boots with a disk that weft-blk composes from three
//! chunk-store snapshots (each taken with different content) plus the block merge of
//! two lines of history, reads it whole and writes to it; the guest's view matches the composition computed on the host, its
//! writes survive a SIGKILL of weft-blk and a restart of QEMU, and a second write
//! layer over the same snapshots (another weave) does not see them. weft-blk serves
//! under its seccomp filter throughout.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use ring::digest::{digest, SHA256};
use weft::model::Snapshot;
use weft_api::composition::Rules;
use weft_blockdev::blk::spec::DiskSpec;
use weft_blockdev::blk::trace::read_trace;
use weft_blockdev::blk::BlockDevice;
use weft_blockdev::layers::LayerSpec;
use weft_blockdev::store::{BlockMap, ChunkStore, Slot, StoreConfig};
use weft_compose::{merge, MapSource, PlanInput};
use weft_integration::{
    bin_path, wait_until_diagnosed, xorshift_fill, Diagnostics, Guest, GuestOpts,
};
use weft_qmp::launch::VhostUserDisk;

const MIB: usize = 1 << 20;
const DISK: usize = 64 * MIB;
const CHUNK: usize = 128 * 1024;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    hex(digest(&SHA256, data).as_ref())
}

/// Stores `image` chunk by chunk as the index `name` (all-zero chunks as zero slots).
fn store_image(store: &ChunkStore, name: &str, image: &[u8]) -> anyhow::Result<BlockMap> {
    let mut map = BlockMap::new(image.len() as u64, CHUNK as u32);
    for (i, chunk) in image.chunks(CHUNK).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        map.slots[i] = Slot::Data(store.put(chunk)?.id);
    }
    store.write_index(name, &map)?;
    Ok(map)
}

struct Blk {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Blk {
    fn start(spec: &Path, socket: &Path, log: &Path) -> anyhow::Result<Blk> {
        let _ = std::fs::remove_file(socket);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(bin_path("weft-blk"))
            .arg("--spec")
            .arg(spec)
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawn weft-blk")?;
        Ok(Blk {
            child,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    /// weft-blk's process (state, wchan, threads), its socket and its log's tail, for
    /// whatever waits on it or on a guest it serves.
    fn diagnostics(&self) -> Diagnostics {
        let diag = Diagnostics::new();
        diag.process("weft-blk", self.child.id())
            .socket("weft-blk", &self.socket)
            .log_tail("weft-blk log", &self.log);
        diag
    }

    async fn ready(&mut self) -> anyhow::Result<()> {
        let socket = self.socket.clone();
        let log = self.log.clone();
        let pid = self.child.id();
        let diag = self.diagnostics();
        let exited = &mut self.child;
        wait_until_diagnosed(
            Duration::from_secs(20),
            "weft-blk's socket and seccomp filter",
            &diag,
            || {
                // It serves the guest confined: filter mode once it listens.
                let there = socket.exists()
                    && std::fs::read_to_string(format!("/proc/{pid}/status"))
                        .is_ok_and(|s| s.lines().any(|l| l == "Seccomp:\t2"));
                let status = exited.try_wait().ok().flatten();
                let log = log.clone();
                async move {
                    if let Some(s) = status {
                        anyhow::bail!(
                            "weft-blk exited ({s}): {}",
                            std::fs::read_to_string(&log).unwrap_or_default()
                        );
                    }
                    Ok(there.then_some(()))
                }
            },
        )
        .await
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- weft-blk log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// Boots the test guest with the weft-blk disk as `/dev/vdb` running `blkcheck`, and
/// returns the sums it printed (`sha256`, and `after` when it wrote).
async fn check_in_guest(blk: &Blk, write: bool) -> anyhow::Result<(String, Option<String>)> {
    let socket = &blk.socket;
    let args = if write { "/dev/vdb,write" } else { "/dev/vdb" };
    let guest = Guest::boot(GuestOpts {
        workload: "blkcheck".into(),
        extra_append: format!("weft.data=none weft.workload_args={args}"),
        vhost_user_disks: vec![VhostUserDisk {
            name: "vdb".into(),
            socket: socket.to_path_buf(),
            queues: 2,
        }],
        ready_timeout: Duration::from_secs(120),
        // A stalled boot reports weft-blk's state and log next to QEMU's.
        diagnostics: blk.diagnostics(),
        ..GuestOpts::default()
    })
    .await?;
    let grab = |text: &str, key: &str| -> Option<String> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("weft-blkcheck: {key} ")))
            .map(|s| s.trim().to_string())
    };
    let text = guest.serial().contents();
    let sum = grab(&text, "sha256").context("the guest printed no checksum")?;
    let after = if write {
        Some(grab(&text, "after").context("the guest printed no checksum after writing")?)
    } else {
        None
    };
    guest.shutdown().await?;
    Ok((sum, after))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_weft_blk_serves_composed_layers_and_keeps_guest_writes() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("weft-blk-e2e").tempdir()?;
    let root = dir.path().join("store");
    let store = ChunkStore::create(
        &root,
        None,
        &StoreConfig::with_chunk_size(CHUNK as u32),
        None,
    )?;

    // Three snapshots of one disk, as taken at three instants.
    let mut t1 = vec![0u8; DISK];
    xorshift_fill(&mut t1[..40 * MIB], 1); // the rest stays zero
    let mut t2 = t1.clone();
    xorshift_fill(&mut t2[4 * MIB..12 * MIB], 2);
    t2[30 * MIB..32 * MIB].fill(0);
    let mut t3 = t2.clone();
    xorshift_fill(&mut t3[16 * MIB..24 * MIB], 3);
    xorshift_fill(&mut t3[48 * MIB..50 * MIB], 33);
    let m1 = store_image(&store, "e2e-t1", &t1)?;
    store_image(&store, "e2e-t2", &t2)?;
    store_image(&store, "e2e-t3", &t3)?;
    // A branch from T1 (another weave's line): its own change at 36..40 MiB.
    let mut t4 = t1.clone();
    xorshift_fill(&mut t4[36 * MIB..40 * MIB], 4);
    store_image(&store, "e2e-t4", &t4)?;

    // The block merge of T3 (line T1 -> T2 -> T3) and T4 (T1 -> T4) against their common
    // ancestor T1, as a composition computes it, stored as a resolution map.
    let snap = |id: i64, index: &str, at: &str, parent: Option<i64>| -> anyhow::Result<Snapshot> {
        Ok(serde_json::from_value(serde_json::json!({
            "id": id, "env": "e2e", "resource": "disk:vdb", "state": "complete",
            "kind": if parent.is_some() { "incremental" } else { "full" },
            "taken_at": at, "actor": "e2e", "parent": parent, "index_name": index,
        }))?)
    };
    let history = vec![
        snap(1, "e2e-t1", "2026-11-20T00:00:00Z", None)?,
        snap(2, "e2e-t2", "2026-11-21T00:00:00Z", Some(1))?,
        snap(3, "e2e-t3", "2026-11-22T00:00:00Z", Some(2))?,
        snap(4, "e2e-t4", "2026-11-22T01:00:00Z", Some(1))?,
    ];
    struct Maps<'a>(&'a ChunkStore);
    impl MapSource for Maps<'_> {
        fn block_map(&self, s: &Snapshot) -> Result<BlockMap, String> {
            self.0
                .read_index(s.index_name.as_deref().unwrap_or_default())
                .map_err(|e| e.to_string())
        }
    }
    let rules = Rules::parse("conflict = \"prompt\"\n")?;
    let merged = merge(
        &rules,
        "disk:vdb",
        &[3, 4],
        &PlanInput {
            resources: &[],
            snapshots: &history,
            resolutions: &Default::default(),
            now: "2026-12-01T00:00:00Z",
        },
        &Maps(&store),
    )
    .map_err(anyhow::Error::msg)?;
    ensure!(merged.conflicts.is_empty(), "{:?}", merged.conflicts);
    store.write_index(
        "e2e-merge-t3-t4",
        merged.map.as_ref().context("no merged map")?,
    )?;

    // The composition: T1 whole, T2's slots 0..96 (the first 12 MiB) and T3's slots
    // 128..192 and 384..400 (16..24 MiB and 48..50 MiB).
    let slot = |mib: usize| (mib * MIB / CHUNK) as u64;
    let layers = vec![
        LayerSpec {
            index: "e2e-t1".into(),
            slots: None,
        },
        LayerSpec {
            index: "e2e-t2".into(),
            slots: Some(vec![[0, slot(12)]]),
        },
        LayerSpec {
            index: "e2e-t3".into(),
            slots: Some(vec![[slot(16), slot(24)], [slot(48), slot(50)]]),
        },
        // The merge provides 36..40 MiB (T4's change; T3's line left it as T1 had it).
        LayerSpec {
            index: "e2e-merge-t3-t4".into(),
            slots: Some(vec![[slot(36), slot(40)]]),
        },
    ];
    let mut want = t1.clone();
    want[..12 * MIB].copy_from_slice(&t2[..12 * MIB]);
    want[16 * MIB..24 * MIB].copy_from_slice(&t3[16 * MIB..24 * MIB]);
    want[48 * MIB..50 * MIB].copy_from_slice(&t3[48 * MIB..50 * MIB]);
    want[36 * MIB..40 * MIB].copy_from_slice(&t4[36 * MIB..40 * MIB]);
    // The merge itself holds both lines' changes.
    let mut both = t3.clone();
    both[36 * MIB..40 * MIB].copy_from_slice(&t4[36 * MIB..40 * MIB]);
    ensure!(
        merged.map.as_ref().map(|m| m.slots.clone())
            == Some(store_image(&store, "e2e-both", &both)?.slots),
        "the merge of T3 and T4 is not T3 with T4's change"
    );
    ensure!(m1.disk_size == DISK as u64);

    let spec_for = |weave: &str| DiskSpec {
        version: 1,
        store: root.clone(),
        key_file: None,
        layers: layers.clone(),
        write_layer: Some(dir.path().join(format!("{weave}.cow"))),
        trace: Some(dir.path().join(format!("{weave}.trace"))),
        assembly: Some(dir.path().join(format!("{weave}.assembly"))),
        trace_limit_mib: 8,
        cache_mib: 16,
        id: format!("weft-{weave}-vdb"),
        queues: 2,
        queue_size: 256,
    };
    let spec_path = dir.path().join("w1.json");
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec_for("w1"))?)?;
    let socket = dir.path().join("w1.sock");
    let log = dir.path().join("w1.log");

    // Boot 1: the guest reads the composition and writes.
    let mut blk = Blk::start(&spec_path, &socket, &log)?;
    blk.ready().await?;
    let (sum, after) = check_in_guest(&blk, true).await?;
    assert_eq!(
        sum,
        sha256_hex(&want),
        "the guest read something else than the composition"
    );
    let mut written = want.clone();
    written[8 * MIB..9 * MIB].fill(b'W');
    written[10 * MIB..10 * MIB + 512].fill(b'w');
    assert_eq!(after.as_deref(), Some(sha256_hex(&written).as_str()));

    // The reads were traced.
    let trace = read_trace(&dir.path().join("w1.trace"))?;
    let read: u64 = trace.iter().map(|r| r.len).sum();
    assert!(
        read >= DISK as u64,
        "trace holds {read} bytes of reads: {}",
        trace.len()
    );
    assert!(trace.iter().all(|r| r.offset + r.len <= DISK as u64));

    // SIGKILL weft-blk (the guest flushed), start it again, boot a new QEMU.
    blk.kill();
    let mut blk = Blk::start(&spec_path, &socket, &log)?;
    blk.ready().await?;
    let (sum, _) = check_in_guest(&blk, false).await?;
    assert_eq!(
        sum,
        sha256_hex(&written),
        "the guest's writes did not survive the restarts"
    );
    blk.kill();

    // Another weave over the same layers does not see them; w1's layer does.
    let other = spec_for("w2").open()?;
    let mut buf = vec![0u8; DISK];
    other.read_at(&mut buf, 0)?;
    assert_eq!(sha256_hex(&buf), sha256_hex(&want));
    let again = spec_for("w1").open()?;
    let dev: Arc<dyn BlockDevice> = again;
    dev.read_at(&mut buf, 0)?;
    assert_eq!(sha256_hex(&buf), sha256_hex(&written));
    Ok(())
}
