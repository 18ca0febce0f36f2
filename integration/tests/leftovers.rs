//! What a weftd killed with SIGKILL leaves, and what the next weftd does with it.
//!
//! A real weftd is stopped at a named point (`WEFTD_CRASH_AT`, `WEFTD_HOLD_AT`, see
//! `agent/src/testpoints.rs`); everything else runs for real: qemu-storage-daemon,
//! the chunk store, the catalog, weave guests. Most tests need no guest boot: a stopped
//! environment is snapshotted through qemu-storage-daemon.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use weft::model::{Job, JobState, Snapshot};
use weft_integration::{guest_assets, make_data_disk, wait_until};

mod common;
use common::*;

const SHORT: Duration = Duration::from_secs(30);

/// Starts weftd with `vars` in its environment and waits until it answers.
async fn start(rig: &mut Rig, vars: &[(&str, String)]) -> anyhow::Result<()> {
    rig.start_weftd_with(vars).await
}

/// Starts weftd so that it kills itself at `point`.
async fn start_crashing_at(rig: &mut Rig, point: &str) -> anyhow::Result<()> {
    start(rig, &[("WEFTD_CRASH_AT", point.to_string())]).await
}

/// Waits until the weftd of `rig` has died (it killed itself at its crash point).
async fn wait_crashed(rig: &mut Rig) -> anyhow::Result<()> {
    let status = rig.weftd()?.wait_exited(SHORT).await?;
    ensure!(
        std::os::unix::process::ExitStatusExt::signal(&status) == Some(9),
        "weftd should have died of SIGKILL: {status:?}"
    );
    Ok(())
}

/// A stopped environment `name` on a 16 MiB raw disk that boots the test guest when
/// started.
async fn stopped_env(rig: &Rig, name: &str) -> anyhow::Result<PathBuf> {
    let assets = tokio::task::spawn_blocking(guest_assets).await??;
    let disk = rig.path(&format!("{name}.raw"));
    make_data_disk(&disk, 16)?;
    rig.weft_ok(&[
        "env",
        "create",
        name,
        "--memory",
        "128M",
        "--disk",
        disk.to_str().context("utf-8")?,
        "--kernel",
        assets.kernel.to_str().context("utf-8")?,
        "--initrd",
        assets.initrd.to_str().context("utf-8")?,
        "--append",
        "console=ttyS0 panic=-1 weft.workload=counter",
        "--no-start",
    ])?;
    Ok(disk)
}

/// Starts a snapshot job of `env` without waiting for it.
async fn snapshot_job(rig: &Rig, env: &str, resource: &str) -> anyhow::Result<Job> {
    Ok(rig
        .client()
        .post(
            &format!("/v1/environments/{env}/snapshots"),
            &serde_json::json!({ "resource": resource }),
        )
        .await?)
}

/// Processes whose command line mentions the test's directory and `what`.
fn processes(rig: &Rig, what: &str) -> Vec<u32> {
    let dir = rig.dir.path().to_string_lossy().into_owned();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false);
        if !zombie && cmdline.contains(&dir) && cmdline.contains(what) {
            out.push(pid);
        }
    }
    out
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A snapshot of a stopped environment runs in a qemu-storage-daemon, which outlives
/// a weftd killed mid-snapshot and holds the disk's write lock. The next weftd ends
/// it and its files, and the environment can be snapshotted again. Then a restore
/// killed midway: its temporary file is removed by the next weftd.
#[tokio::test]
async fn qemu_storage_daemon_left_by_a_killed_weftd_is_ended_on_restart() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    start_crashing_at(&mut rig, "snapshot.offline").await?;
    stopped_env(&rig, "lq").await?;
    // weftd may die before it answers.
    let _ = snapshot_job(&rig, "lq", "disk:vda").await;
    wait_crashed(&mut rig).await?;
    let daemons = processes(&rig, "qemu-storage-daemon");
    ensure!(
        !daemons.is_empty(),
        "the storage daemon outlives weftd's SIGKILL"
    );

    start(&mut rig, &[]).await?;
    ensure!(
        processes(&rig, "qemu-storage-daemon").is_empty(),
        "the storage daemon of the interrupted snapshot still runs after recovery"
    );
    let backup = rig.path("run/backup");
    ensure!(
        files_in(&backup).is_empty(),
        "left in {}: {:?}",
        backup.display(),
        files_in(&backup)
    );
    let jobs: Vec<Job> = rig.client().get("/v1/jobs").await?;
    ensure!(
        jobs.len() == 1 && jobs[0].state == JobState::Failed,
        "{jobs:?}"
    );
    // The disk is free again: a new snapshot opens it.
    let s = rig.snapshot("lq", "disk:vda").await?;

    // A restore killed with weftd leaves no temporary file beside its output.
    rig.kill_weftd();
    start_crashing_at(&mut rig, "restore.partial").await?;
    let out = rig.path("out.raw");
    let out_s = out.to_str().context("utf-8")?;
    let _ = rig.weft(&["restore", &s.id.to_string(), "--output", out_s]);
    wait_crashed(&mut rig).await?;
    let temps = |rig: &Rig| -> Vec<String> {
        files_in(rig.dir.path())
            .into_iter()
            .filter(|f| f.starts_with(".weft-tmp-"))
            .collect()
    };
    ensure!(
        temps(&rig).len() == 1 && !out.exists(),
        "the crash point is inside the restore: {:?}",
        temps(&rig)
    );
    start(&mut rig, &[]).await?;
    ensure!(
        temps(&rig).is_empty(),
        "the unfinished restore's temporary file is left: {:?}",
        temps(&rig)
    );
    // The CLI follows the job to its end.
    rig.weft_ok(&["restore", &s.id.to_string(), "--output", out_s])?;
    ensure!(out.exists() && temps(&rig).is_empty());
    rig.passed();
    Ok(())
}

/// gc with no grace at all, while a snapshot has put its chunks but not yet written
/// its block map: the chunks stay, and the snapshot verifies.
#[tokio::test]
async fn qemu_gc_never_frees_the_chunks_of_a_running_snapshot() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    let hold = rig.path("hold");
    std::fs::write(&hold, b"")?;
    start(
        &mut rig,
        &[(
            "WEFTD_HOLD_AT",
            format!("snapshot.pulled:{}", hold.display()),
        )],
    )
    .await?;
    stopped_env(&rig, "lg").await?;
    let job = snapshot_job(&rig, "lg", "disk:vda").await?;
    let reached = rig.path("hold.reached");
    wait_until(SHORT, "the snapshot to have pulled its chunks", || async {
        Ok(reached.exists().then_some(()))
    })
    .await?;
    let report: serde_json::Value = rig
        .client()
        .post("/v1/store/gc", &serde_json::json!({ "grace_secs": 0 }))
        .await?;
    std::fs::remove_file(&hold)?;
    let job = rig.wait_job(job.id).await?;
    let id = job
        .result
        .as_ref()
        .and_then(|r| r["snapshots"][0].as_i64())
        .context("snapshot id")?;
    let verify: serde_json::Value = rig
        .client()
        .post(
            &format!("/v1/snapshots/{id}/verify"),
            &serde_json::json!({}),
        )
        .await?;
    ensure!(
        verify["ok"] == true,
        "gc ({report}) freed chunks of the running snapshot: {verify}"
    );
    rig.passed();
    Ok(())
}

/// `snapshot delete` interrupted between its two steps: never a catalog row whose
/// block map is gone; the block map left without a row is removed on restart.
#[tokio::test]
async fn qemu_snapshot_delete_killed_midway_leaves_no_row_without_its_index() -> anyhow::Result<()>
{
    let mut rig = Rig::new()?;
    start_crashing_at(&mut rig, "snapshot.delete").await?;
    stopped_env(&rig, "ld").await?;
    let s = rig.snapshot("ld", "disk:vda").await?;
    let index = s
        .index_name
        .clone()
        .context("a disk snapshot has a block map")?;
    let _ = rig.weft(&["snapshot", "delete", &s.id.to_string()]);
    wait_crashed(&mut rig).await?;
    start(&mut rig, &[]).await?;
    let row = rig
        .client()
        .get::<Snapshot>(&format!("/v1/snapshots/{}", s.id))
        .await;
    ensure!(
        row.is_err(),
        "snapshot {} is still listed after its delete: {row:?}",
        s.id
    );
    let file = rig.path(&format!("data/store/indexes/{index}.idx"));
    let indexes = rig.path("data/store/indexes");
    ensure!(
        !file.exists() && !indexes.join(&index).exists(),
        "the block map {index} of the deleted snapshot is left in the store"
    );
    rig.passed();
    Ok(())
}

/// A `--live` weave create that dies after its disk specs are written: on restart no
/// half-made weave serves (and so pins) the snapshot, which can then be deleted.
#[tokio::test]
async fn qemu_failed_live_weave_create_leaves_no_index_in_use() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    start(&mut rig, &[]).await?;
    stopped_env(&rig, "ll").await?;
    let s = rig.snapshot("ll", "all").await?;
    rig.kill_weftd();
    start_crashing_at(&mut rig, "weave.assembled").await?;
    let _ = rig.weft(&[
        "weave",
        "create",
        "ll",
        "--snapshot",
        &s.id.to_string(),
        "--name",
        "llw",
        "--live",
    ]);
    wait_crashed(&mut rig).await?;
    start(&mut rig, &[]).await?;
    ensure!(
        !rig.path("data/blk/llw").exists(),
        "the half-made weave's disk specs are left"
    );
    let snaps: Vec<Snapshot> = rig.client().get("/v1/environments/ll/snapshots").await?;
    for s in snaps.iter().filter(|s| s.index_name.is_some()) {
        rig.weft_ok(&["snapshot", "delete", &s.id.to_string()])?;
    }
    rig.passed();
    Ok(())
}

/// A weave delete that dies once the weave's rows are gone (its QEMU stopped): the
/// next weftd removes the rest, cgroups included, which it used to leave.
#[tokio::test]
async fn qemu_weave_delete_killed_midway_leaves_no_cgroup() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    let conf = rig.path("weftd.toml");
    std::fs::write(&conf, "[net]\nfirst_slot = 194\nlast_slot = 195\n")?;
    rig.config = Some(conf);
    start(&mut rig, &[]).await?;
    stopped_env(&rig, "lk").await?;
    let s = rig.snapshot("lk", "all").await?;
    let name = "lkdel";
    rig.weft_ok(&[
        "weave",
        "create",
        "lk",
        "--snapshot",
        &s.id.to_string(),
        "--name",
        name,
    ])?;
    rig.kill_weftd();
    start_crashing_at(&mut rig, "weave.delete").await?;
    let _ = rig.weft(&["weave", "delete", name]);
    wait_crashed(&mut rig).await?;
    let groups = weft::cgroups::groups(name).dirs();
    ensure!(
        groups.iter().any(|d| d.exists()),
        "the crash point is before the cgroups go: {groups:?}"
    );
    start(&mut rig, &[]).await?;
    let left: Vec<_> = groups.iter().filter(|d| d.exists()).collect();
    ensure!(left.is_empty(), "cgroups left after recovery: {left:?}");
    ensure!(
        !rig.path(&format!("data/weaves/{name}")).exists(),
        "the weave's directory is left"
    );
    ensure!(
        !Path::new(&format!("/run/netns/weft-{name}")).exists(),
        "the weave's namespace is left"
    );
    rig.weft_ok(&["env", "delete", "lk"])?;
    rig.passed();
    Ok(())
}

/// A snapshot of a running environment killed with weftd after its pull leaves a
/// backup job, an NBD export and fleece nodes in QEMU. The next weftd removes them at
/// start: a weave from now (which needs the disk) works at once, without waiting for
/// the next snapshot to clean up.
#[tokio::test]
async fn qemu_backup_left_in_qemu_by_a_killed_weftd_is_removed_on_restart() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    let conf = rig.path("weftd.toml");
    std::fs::write(&conf, "[net]\nfirst_slot = 190\nlast_slot = 191\n")?;
    rig.config = Some(conf);
    start_crashing_at(&mut rig, "snapshot.pulled").await?;
    // The backup needs QEMU running, not its guest booted.
    stopped_env(&rig, "lq2").await?;
    rig.weft_ok(&["env", "start", "lq2"])?;
    let _ = snapshot_job(&rig, "lq2", "disk:vda").await;
    wait_crashed(&mut rig).await?;
    start(&mut rig, &[]).await?;
    rig.weft_ok(&["weave", "create", "lq2", "--name", "lq2w"])
        .context("a weave from now right after recovery")?;
    rig.weft_ok(&["weave", "delete", "lq2w"])?;
    // And the next snapshot is a clean one.
    rig.snapshot("lq2", "disk:vda").await?;
    rig.weft_ok(&["env", "delete", "lq2"])?;
    rig.passed();
    Ok(())
}

/// vhost-device-vsock processes working in the test's directory (they are given
/// relative paths).
fn vsock_devices(rig: &Rig) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains("vhost-device-vsock")
                && std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .is_ok_and(|cwd| cwd.starts_with(rig.dir.path()))
        })
        .collect()
}

/// weftd killed after starting an environment's vsock device and before writing its
/// pid file: the next weftd still ends the device (it is found by its directory).
#[tokio::test]
async fn qemu_vsock_device_started_by_a_killed_weftd_is_ended_on_restart() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    let conf = rig.path("weftd.toml");
    std::fs::write(&conf, "[dpa]\nvsock = \"vhost-user\"\n")?;
    rig.config = Some(conf);
    start(&mut rig, &[]).await?;
    stopped_env(&rig, "lv").await?;
    rig.kill_weftd();
    start_crashing_at(&mut rig, "vsock.spawned").await?;
    let _ = rig.weft(&["env", "start", "lv"]);
    wait_crashed(&mut rig).await?;
    ensure!(
        !vsock_devices(&rig).is_empty(),
        "the crash point is after the device started"
    );
    start(&mut rig, &[]).await?;
    ensure!(
        vsock_devices(&rig).is_empty(),
        "a vsock device outlives recovery: {:?}",
        vsock_devices(&rig)
    );
    // The environment starts again, with a device of its own.
    rig.weft_ok(&["env", "start", "lv"])?;
    ensure!(vsock_devices(&rig).len() == 1, "{:?}", vsock_devices(&rig));
    rig.weft_ok(&["env", "delete", "lv"])?;
    ensure!(vsock_devices(&rig).is_empty());
    rig.passed();
    Ok(())
}

/// weftd killed after starting a live weave's weft-blk and before writing its pid
/// file: the next weftd still ends it (found by its socket).
#[tokio::test]
async fn qemu_weft_blk_started_by_a_killed_weftd_is_ended_on_restart() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    let conf = rig.path("weftd.toml");
    std::fs::write(&conf, "[net]\nfirst_slot = 192\nlast_slot = 193\n")?;
    rig.config = Some(conf);
    start(&mut rig, &[]).await?;
    stopped_env(&rig, "lx").await?;
    let s = rig.snapshot("lx", "all").await?;
    rig.kill_weftd();
    start_crashing_at(&mut rig, "blk.spawned").await?;
    let _ = rig.weft(&[
        "weave",
        "create",
        "lx",
        "--snapshot",
        &s.id.to_string(),
        "--name",
        "lxblk",
        "--live",
    ]);
    wait_crashed(&mut rig).await?;
    ensure!(
        !processes(&rig, "weft-blk").is_empty(),
        "the crash point is after weft-blk started"
    );
    start(&mut rig, &[]).await?;
    ensure!(
        processes(&rig, "weft-blk").is_empty(),
        "a weft-blk outlives recovery: {:?}",
        processes(&rig, "weft-blk")
    );
    let weaves: Vec<serde_json::Value> = rig.client().get("/v1/environments/lx/weaves").await?;
    for w in weaves {
        if let Some(name) = w["name"].as_str() {
            rig.weft_ok(&["weave", "delete", name])?;
        }
    }
    rig.weft_ok(&["env", "delete", "lx"])?;
    rig.passed();
    Ok(())
}

/// A weave base whose restore died with weftd leaves no `.partial` behind it (which
/// would refuse every later weave from that snapshot), and the base goes with the
/// last weave that uses it. While the weave runs, the state directories hold only
/// private files (see [`check_private`]).
#[tokio::test]
async fn qemu_weave_base_partial_is_cleaned_and_the_base_goes_with_its_last_weave(
) -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    let conf = rig.path("weftd.toml");
    std::fs::write(
        &conf,
        "socket_group = \"daemon\"\n[net]\nfirst_slot = 196\nlast_slot = 197\n",
    )?;
    rig.config = Some(conf);
    start(&mut rig, &[]).await?;
    stopped_env(&rig, "lb").await?;
    let s = rig.snapshot("lb", "all").await?;
    rig.kill_weftd();
    start_crashing_at(&mut rig, "restore.partial").await?;
    let create = [
        "weave",
        "create",
        "lb",
        "--snapshot",
        &s.id.to_string(),
        "--name",
        "lbw",
    ];
    let _ = rig.weft(&create);
    wait_crashed(&mut rig).await?;
    let bases = rig.path("data/bases");
    ensure!(
        files_in(&bases).iter().any(|f| f.ends_with(".partial")),
        "the crash point is inside the base's restore: {:?}",
        files_in(&bases)
    );
    start(&mut rig, &[]).await?;
    ensure!(
        !files_in(&bases).iter().any(|f| f.ends_with(".partial")),
        "a .partial base is left after recovery: {:?}",
        files_in(&bases)
    );
    rig.weft_ok(&create)?;
    rig.serial("lbw").wait_for("WEFT-READY", BOOT).await?;
    ensure!(
        files_in(&bases).len() == 1,
        "one base: {:?}",
        files_in(&bases)
    );
    // With a snapshot, a restored base and a running weave made, nothing is readable
    // by others.
    check_private(&rig, "daemon")?;
    rig.weft_ok(&["weave", "delete", "lbw"])?;
    ensure!(
        files_in(&bases).is_empty(),
        "the base outlives its last weave: {:?}",
        files_in(&bases)
    );
    rig.passed();
    Ok(())
}

/// Every file weftd, QEMU, the store, the catalog and the provenance log made under
/// the state directories is private (0600/0700, weave bases 0400) except the API
/// socket (0660, group `group` from weftd.toml) and its directory (0750, same group),
/// and the default image and export directories (0750, root's group: an operator may
/// give them to a group).
fn check_private(rig: &Rig, group: &str) -> anyhow::Result<()> {
    let gid = nix::unistd::Group::from_name(group)?
        .context("the group exists")?
        .gid
        .as_raw();
    let bases = rig.path("data/bases");
    let socket = rig.socket();
    let run = rig.path("run");
    let mut wrong = Vec::new();
    for root in [rig.path("data"), run.clone()] {
        for (path, meta) in walk(&root) {
            let mode = meta.permissions().mode() & 0o7777;
            let shared = [
                run.clone(),
                rig.path("data/images"),
                rig.path("data/exports"),
            ];
            let want: &[u32] = if path == socket {
                &[0o660]
            } else if shared.contains(&path) {
                &[0o750]
            } else if meta.is_dir() {
                &[0o700]
            } else if meta.file_type().is_socket() {
                // bind(2) makes a socket 0777 less the umask.
                &[0o600, 0o700]
            } else if path.starts_with(&bases) {
                &[0o400]
            } else {
                &[0o600]
            };
            if !want.contains(&mode) {
                wrong.push(format!("{} {mode:o}", path.display()));
            }
            if (path == socket || path == run) && meta.gid() != gid {
                wrong.push(format!("{} group {}", path.display(), meta.gid()));
            }
        }
    }
    ensure!(wrong.is_empty(), "files not private: {wrong:#?}");
    Ok(())
}

/// Every file and directory under `root` (not following symlinks), with `root`.
fn walk(root: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                stack.push(e.path());
            }
        }
        out.push((p, meta));
    }
    out
}

/// weftd killed while `weave sync` holds both QEMUs paused: the next weftd resumes them.
#[tokio::test]
async fn qemu_guests_paused_by_a_killed_sync_are_resumed_on_restart() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    let conf = rig.path("weftd.toml");
    std::fs::write(&conf, "[net]\nfirst_slot = 198\nlast_slot = 199\n")?;
    rig.config = Some(conf);
    start_crashing_at(&mut rig, "sync.paused").await?;
    // The sync needs both QEMUs running, not their guests booted.
    stopped_env(&rig, "ls").await?;
    rig.weft_ok(&["env", "start", "ls"])?;
    // A sync copies between two weaves of one environment (never into the environment).
    rig.weft_ok(&["weave", "create", "ls", "--name", "lsw"])?;
    rig.weft_ok(&["weave", "create", "ls", "--name", "lsv"])?;
    let _ = rig.weft(&["weave", "sync", "lsw", "lsv", "--volume", "vda"]);
    wait_crashed(&mut rig).await?;
    start(&mut rig, &[]).await?;
    for env in ["lsw", "lsv"] {
        let v: serde_json::Value = rig.client().get(&format!("/v1/environments/{env}")).await?;
        ensure!(
            v["runstate"] == "running",
            "{env} is not running after recovery: {}",
            v["runstate"]
        );
    }
    rig.weft_ok(&["weave", "delete", "lsw"])?;
    rig.weft_ok(&["weave", "delete", "lsv"])?;
    rig.weft_ok(&["env", "delete", "ls"])?;
    rig.passed();
    Ok(())
}
