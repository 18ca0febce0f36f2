//! What must hold after every restart of weftd: the store verifies, complete snapshots
//! restore to their checksums, the guest's rows are in the provenance log exactly once,
//! and nothing is left that no live environment or weave owns.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use weft::model::{EnvState, Environment, Job, JobState, Snapshot, SnapshotState};
use weft::weaves::Weave;

use crate::world::{
    committed_rows, sh, sha256_file, utf8, World, COLD_ENV, DPA_ENV, SLOTS, WEAVE_PREFIX,
};

/// What the checks have seen so far, carried from round to round.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Snapshots restored and matched.
    pub restored: BTreeSet<i64>,
    /// `rlcold` disk snapshots → the SHA-256 of the image when they were taken.
    pub cold_expect: BTreeMap<i64, String>,
    /// The image's SHA-256 for `rlcold` snapshots not seen yet (set before each
    /// operation that may take one).
    pub cold_next: Option<String>,
    /// Restores made (each one read back and compared).
    pub restores: u64,
    /// The provenance log as read so far.
    pub dpa: DpaLedger,
}

/// The provenance log of `rldpa` as read so far.
#[derive(Debug, Default)]
pub struct DpaLedger {
    /// The last sequence number read (every one before it was read exactly once).
    pub after_seq: u64,
    /// Row numbers inserted, each seen once.
    pub rows: BTreeSet<u64>,
}

/// The store's chunk size and whether chunk ids are keyed (then only weftd can recompute
/// a checksum).
fn store_layout(data: &Path) -> Result<(u64, bool)> {
    let path = data.join("store/store.json");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?,
    )?;
    let chunk = v["chunk_size"]
        .as_u64()
        .with_context(|| format!("{} has no chunk_size", path.display()))?;
    Ok((chunk, v["encrypted"].as_bool().unwrap_or(false)))
}

/// The snapshot checksum of a raw image, computed here from `docs/store-format.md`
/// (SHA-256 over the slots: `0x00 ‖ length u32 LE` for an all-zero chunk, `0x01 ‖
/// SHA-256 of the chunk` for a data chunk), independently of weftd's code.
pub fn image_checksum(image: &Path, chunk_size: u64) -> Result<String> {
    let mut f = std::fs::File::open(image)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; usize::try_from(chunk_size)?];
    loop {
        let mut n = 0;
        while n < buf.len() {
            let got = f.read(&mut buf[n..])?;
            if got == 0 {
                break;
            }
            n += got;
        }
        if n == 0 {
            break;
        }
        let piece = &buf[..n];
        if piece.iter().all(|b| *b == 0) {
            ctx.update(&[0]);
            ctx.update(&u32::try_from(n)?.to_le_bytes());
        } else {
            ctx.update(&[1]);
            ctx.update(ring::digest::digest(&ring::digest::SHA256, piece).as_ref());
        }
        if n < buf.len() {
            break;
        }
    }
    Ok(crate::world::hex(ctx.finish().as_ref()))
}

/// `weft store verify` finds nothing wrong; returns "N chunks, M indexes".
pub fn store_verify(world: &World) -> Result<String> {
    let report: serde_json::Value = world.weft_json(&["store", "verify"])?;
    let bad = ["bad_chunks", "missing_chunks", "bad_indexes"]
        .iter()
        .filter_map(|k| {
            report[*k]
                .as_array()
                .filter(|a| !a.is_empty())
                .map(|a| format!("{k}: {}", serde_json::Value::Array(a.clone())))
        })
        .collect::<Vec<_>>();
    ensure!(bad.is_empty(), "store verify: {}", bad.join("; "));
    Ok(format!(
        "{} chunks, {} indexes",
        report["chunks_checked"], report["indexes_checked"]
    ))
}

/// Right after a restart nothing is under way: no running job, no pending snapshot.
pub fn nothing_under_way(world: &World) -> Result<()> {
    let jobs: Vec<Job> = world.weft_json(&["job", "list"])?;
    let running: Vec<String> = jobs
        .iter()
        .filter(|j| j.state == JobState::Running)
        .map(|j| format!("job {} ({} {})", j.id, j.kind, j.target))
        .collect();
    ensure!(
        running.is_empty(),
        "still running after restart: {running:?}"
    );
    for env in [DPA_ENV, COLD_ENV] {
        let pending: Vec<i64> = world
            .snapshots(env)?
            .iter()
            .filter(|s| s.state == SnapshotState::Pending)
            .map(|s| s.id)
            .collect();
        ensure!(
            pending.is_empty(),
            "snapshots of {env} still pending after restart: {pending:?}"
        );
    }
    Ok(())
}

/// Complete disk snapshots of both environments, oldest first.
fn disk_snapshots(world: &World) -> Result<Vec<Snapshot>> {
    let mut all = Vec::new();
    for env in [DPA_ENV, COLD_ENV] {
        all.extend(
            world
                .snapshots(env)?
                .into_iter()
                .filter(|s| s.state == SnapshotState::Complete && s.index_name.is_some()),
        );
    }
    all.sort_by_key(|s| s.id);
    Ok(all)
}

/// Restores `s` into the exports directory and compares it with its checksum (and, for
/// `rlcold`, with the image as it was when the snapshot was taken).
fn restore_one(
    world: &World,
    ledger: &mut Ledger,
    s: &Snapshot,
    layout: (u64, bool),
) -> Result<()> {
    let exports = world.exports();
    std::fs::create_dir_all(&exports)?;
    let out = exports.join(format!("restore-{}.raw", s.id));
    let _ = std::fs::remove_file(&out);
    world
        .weft_ok(&["restore", &s.id.to_string(), "--output", utf8(&out)?])
        .with_context(|| {
            format!(
                "snapshot {} ({} of {}) does not restore",
                s.id, s.resource, s.env
            )
        })?;
    let result = (|| {
        let want = s
            .checksum
            .as_deref()
            .context("a complete snapshot has a checksum")?;
        if !layout.1 {
            let got = image_checksum(&out, layout.0)?;
            ensure!(
                got == want,
                "snapshot {} ({} of {}) restored to checksum {got}, the catalog says {want}",
                s.id,
                s.resource,
                s.env
            );
        }
        if s.env == COLD_ENV {
            if let Some(expect) = ledger.cold_expect.get(&s.id) {
                let got = sha256_file(&out)?;
                ensure!(
                    &got == expect,
                    "snapshot {} of {COLD_ENV} restored to an image (sha256 {got}) that is not the disk when it was taken ({expect})",
                    s.id
                );
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&out);
    ledger.restores += 1;
    result
}

/// Records what the `rlcold` disk snapshots not seen yet must restore to: the image as
/// it was before the operation that took them (`cold_next`).
pub fn note_cold(world: &World, ledger: &mut Ledger) -> Result<()> {
    let Some(h) = &ledger.cold_next else {
        return Ok(());
    };
    for s in disk_snapshots(world)?.iter().filter(|s| s.env == COLD_ENV) {
        ledger.cold_expect.entry(s.id).or_insert_with(|| h.clone());
    }
    Ok(())
}

/// Restores every complete disk snapshot not restored yet, plus the older one `pick`
/// chooses; returns how many were restored.
pub fn restore_new(world: &World, ledger: &mut Ledger, pick: Option<u64>) -> Result<usize> {
    let layout = store_layout(&world.data)?;
    note_cold(world, ledger)?;
    let snaps = disk_snapshots(world)?;
    let mut todo: Vec<&Snapshot> = snaps
        .iter()
        .filter(|s| !ledger.restored.contains(&s.id))
        .collect();
    let older: Vec<&Snapshot> = snaps
        .iter()
        .filter(|s| ledger.restored.contains(&s.id))
        .collect();
    if let (Some(p), false) = (pick, older.is_empty()) {
        todo.push(older[(p % older.len() as u64) as usize]);
    }
    let mut errors = Vec::new();
    for s in &todo {
        match restore_one(world, ledger, s, layout) {
            Ok(()) => {
                ledger.restored.insert(s.id);
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    ensure!(errors.is_empty(), "{}", errors.join("; "));
    Ok(todo.len())
}

/// Restores every complete disk snapshot (the final sweep).
pub fn restore_all(world: &World, ledger: &mut Ledger) -> Result<usize> {
    ledger.restored.clear();
    restore_new(world, ledger, None)
}

/// Reads the provenance log of `rldpa` past what was read, checking that sequence
/// numbers follow each other and that no row is inserted twice; then waits until every
/// row the guest says it committed has arrived. Returns the rows committed.
pub async fn dpa_rows(world: &World, dpa: &mut DpaLedger) -> Result<u64> {
    let committed = committed_rows(&world.serial(DPA_ENV).contents());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        read_log(world, dpa).await?;
        let missing = (1..=committed).find(|n| !dpa.rows.contains(n));
        let Some(first_missing) = missing else {
            return Ok(committed);
        };
        if tokio::time::Instant::now() >= deadline {
            let absent = (1..=committed).filter(|n| !dpa.rows.contains(n)).count();
            bail!(
                "the guest committed rows 1..={committed}; {absent} are not in the provenance log after 120 s (first: {first_missing}; log read to seq {})",
                dpa.after_seq
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn read_log(world: &World, dpa: &mut DpaLedger) -> Result<()> {
    let client = world.client();
    loop {
        let page: serde_json::Value = client
            .get(&format!(
                "/v1/environments/{DPA_ENV}/provenance?after_seq={}",
                dpa.after_seq
            ))
            .await
            .context("read the provenance log")?;
        let records = page["records"].as_array().context("records")?;
        for r in records {
            let seq = r["seq"].as_u64().context("seq")?;
            ensure!(
                seq == dpa.after_seq + 1,
                "provenance log: seq {seq} follows {} (a gap or a duplicate)",
                dpa.after_seq
            );
            dpa.after_seq = seq;
            match (r["op"].as_str(), r["collection"].as_str()) {
                (Some("insert"), Some("items")) => {
                    let key = r["key"].as_str().unwrap_or_default();
                    let n: u64 = key
                        .trim_matches(|c| c == '[' || c == ']')
                        .parse()
                        .with_context(|| format!("seq {seq}: key {key:?}"))?;
                    ensure!(
                        dpa.rows.insert(n),
                        "provenance log: row {n} inserted twice (again at seq {seq})"
                    );
                }
                (Some("schema"), _) => {}
                (op, table) => bail!("provenance log: unexpected {op:?} on {table:?} at seq {seq}"),
            }
        }
        if page["next_after_seq"].is_null() || records.is_empty() {
            return Ok(());
        }
    }
}

/// Environments and weaves the catalog lists.
pub struct Live {
    pub envs: Vec<Environment>,
    pub weaves: Vec<Weave>,
}

impl Live {
    pub async fn read(world: &World) -> Result<Live> {
        let client = world.client();
        let envs: Vec<Environment> = client.get("/v1/environments").await?;
        let mut weaves = Vec::new();
        for parent in [DPA_ENV, COLD_ENV] {
            if envs.iter().any(|e| e.name == parent) {
                let w: Vec<Weave> = client
                    .get(&format!("/v1/environments/{parent}/weaves"))
                    .await?;
                weaves.extend(w);
            }
        }
        Ok(Live { envs, weaves })
    }

    fn env(&self, name: &str) -> Option<&Environment> {
        self.envs.iter().find(|e| e.name == name)
    }

    fn weave(&self, name: &str) -> Option<&Weave> {
        self.weaves.iter().find(|w| w.name == name)
    }

    fn slot_owner(&self, slot: u8) -> Option<&Weave> {
        self.weaves.iter().find(|w| w.net_index == slot)
    }
}

fn lines_of(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&sh(cmd)?.stdout).into_owned())
}

/// Chain names of an nftables table in the root namespace (none when it does not exist).
fn nft_chains(family: &str, table: &str) -> Vec<String> {
    let Ok(out) = Command::new("nft")
        .args(["list", "table", family, table])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chain "))
        .map(|c| c.trim_end_matches(" {").trim().to_string())
        .collect()
}

/// The slot a weave-owned root object is named after (`wh<slot>`, `w<slot>-in`,
/// `p<port>-w<slot>-g…`), if it is one of ours.
fn our_slot(name: &str) -> Option<u8> {
    let digits = |s: &str| {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
    };
    let slot = if let Some(rest) = name.strip_prefix("wh") {
        let d = digits(rest);
        (d.len() == rest.len()).then_some(d)
    } else if let Some(rest) = name.strip_prefix('w') {
        let d = digits(rest);
        rest[d.len()..].starts_with('-').then_some(d)
    } else {
        name.split('-')
            .find_map(|part| {
                part.strip_prefix('w')
                    .filter(|d| d.chars().all(|c| c.is_ascii_digit()))
            })
            .map(str::to_string)
    }?;
    slot.parse::<u8>().ok().filter(|s| SLOTS.contains(s))
}

/// One process whose command line or working directory is in the work directory.
struct Proc {
    pid: u32,
    exe: String,
    args: Vec<String>,
    cwd: PathBuf,
}

fn our_processes(world: &World) -> Vec<Proc> {
    let dir = world.dir.to_string_lossy().into_owned();
    let data = world.data.to_string_lossy().into_owned();
    let mine = crate::world::this_and_ancestors();
    let weftd = world.weftd_pid();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if mine.contains(&pid) || Some(pid) == weftd {
            continue;
        }
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true);
        if zombie {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let cwd = std::fs::read_link(entry.path().join("cwd")).unwrap_or_default();
        let mentions = args
            .iter()
            .any(|a| crate::world::names_path(a, &dir) || crate::world::names_path(a, &data))
            || cwd.starts_with(&world.dir)
            || cwd.starts_with(&world.data);
        if !mentions {
            continue;
        }
        let exe = args
            .first()
            .and_then(|a| Path::new(a).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push(Proc {
            pid,
            exe,
            args,
            cwd,
        });
    }
    out
}

/// The component after `marker` in `path` (`…/blk/<vm>/…` → `<vm>`).
fn component_after(path: &str, marker: &str) -> Option<String> {
    let mut parts = Path::new(path)
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    parts.by_ref().find(|c| c == marker)?;
    parts.next()
}

/// Everything in the kernel, the process table and the work directories that no live
/// environment or weave owns (and every weave missing part of itself). Empty is good.
pub async fn leftovers(world: &World) -> Result<Vec<String>> {
    let live = Live::read(world).await?;
    let mut found = Vec::new();

    // Namespaces: `weft-<weave>` for ours; each weave has its own.
    let netns = lines_of(Command::new("ip").args(["netns", "list"]))?;
    let netns: BTreeSet<String> = netns
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let prefix = format!("weft-{WEAVE_PREFIX}");
    for ns in netns.iter().filter(|n| n.starts_with(&prefix)) {
        if live.weave(&ns["weft-".len()..]).is_none() {
            found.push(format!("namespace {ns} (no such weave)"));
        }
    }
    for w in &live.weaves {
        if !netns.contains(&format!("weft-{}", w.name)) {
            found.push(format!("weave {} has no namespace", w.name));
        }
    }

    // Root links and nftables chains named after our slots.
    let links = lines_of(Command::new("ip").args(["-o", "link", "show"]))?;
    let links: BTreeSet<String> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect();
    for l in &links {
        if let Some(slot) = our_slot(l) {
            if live.slot_owner(slot).is_none() {
                found.push(format!("link {l} (slot {slot} has no weave)"));
            }
        }
    }
    for w in &live.weaves {
        if !links.contains(&format!("wh{}", w.net_index)) {
            found.push(format!(
                "weave {} has no host link wh{}",
                w.name, w.net_index
            ));
        }
    }
    for (family, table) in [("inet", "weft-filter"), ("ip", "weft")] {
        for chain in nft_chains(family, table) {
            if let Some(slot) = our_slot(&chain) {
                if live.slot_owner(slot).is_none() {
                    found.push(format!(
                        "nftables chain {family} {table} {chain} (slot {slot} has no weave)"
                    ));
                }
            }
        }
    }

    // Cgroups `weft/<weave>` in every hierarchy.
    for root in ["weft", "unified/weft", "cpu/weft", "memory/weft"] {
        let dir = Path::new("/sys/fs/cgroup").join(root);
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(WEAVE_PREFIX) && e.path().is_dir() && live.weave(&name).is_none() {
                found.push(format!("cgroup {}", e.path().display()));
            }
        }
    }

    // Processes.
    let procs = our_processes(world);
    for p in &procs {
        let owner = match p.exe.as_str() {
            "qemu-system-x86_64" => live
                .envs
                .iter()
                .find(|e| e.pid == Some(p.pid) && e.state == EnvState::Running)
                .map(|e| e.name.clone()),
            "weft-blk" => p
                .args
                .iter()
                .find_map(|a| component_after(a, "blk"))
                .filter(|vm| live.env(vm).is_some()),
            "vhost-device-vsock" => p
                .cwd
                .to_str()
                .and_then(|c| component_after(c, "vsock"))
                .filter(|vm| live.env(vm).is_some_and(|e| e.state == EnvState::Running)),
            _ => None,
        };
        if owner.is_none() {
            found.push(format!(
                "process {} {} ({}; in {})",
                p.pid,
                p.exe,
                p.args.join(" "),
                p.cwd.display()
            ));
        }
    }
    for e in live.envs.iter().filter(|e| e.state == EnvState::Running) {
        let alive = e.pid.is_some_and(|pid| {
            procs
                .iter()
                .any(|p| p.pid == pid && p.exe.starts_with("qemu-system"))
        });
        if !alive {
            found.push(format!(
                "environment {} is running but its QEMU ({:?}) is not",
                e.name, e.pid
            ));
        }
    }

    // Work files.
    let names = |d: PathBuf| -> Vec<String> {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    for w in names(world.data.join("weaves")) {
        if live.weave(&w).is_none() {
            found.push(format!(
                "{}/weaves/{w} (no such weave)",
                world.data.display()
            ));
        }
    }
    for w in names(world.data.join("blk")) {
        if live.env(&w).is_none() {
            found.push(format!("{}/blk/{w} (no such weave)", world.data.display()));
        }
    }
    for f in names(world.data.join("bases")) {
        if f.ends_with(".partial") {
            found.push(format!("{}/bases/{f}", world.data.display()));
        }
    }
    for work in ["backup", "restore"] {
        for f in names(world.run.join(work)) {
            found.push(format!("{}/{work}/{f}", world.run.display()));
        }
    }
    // `<vm>/` and `<vm>.vsock.pid`.
    for f in names(world.run.join("vsock")) {
        let vm = f.split('.').next().unwrap_or_default();
        if !live.env(vm).is_some_and(|e| e.state == EnvState::Running) {
            found.push(format!(
                "{}/vsock/{f} (not a running environment)",
                world.run.display()
            ));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_recognised() {
        assert_eq!(our_slot("wh183"), Some(183));
        assert_eq!(our_slot("w181-in"), Some(181));
        assert_eq!(our_slot("p8080-w185-g80-in"), Some(185));
        assert_eq!(our_slot("wh12"), None);
        assert_eq!(our_slot("wlan0"), None);
        assert_eq!(our_slot("wh183x"), None);
        assert_eq!(our_slot("postrouting"), None);
    }

    #[test]
    fn checksum_follows_the_store_format() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("i.raw");
        let mut data = vec![0u8; 3 * 1024];
        data[1500] = 7;
        std::fs::write(&img, &data).unwrap();
        // Chunks of 1 KiB: zero, data, zero; by hand from the format.
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&[0]);
        ctx.update(&1024u32.to_le_bytes());
        ctx.update(&[1]);
        ctx.update(ring::digest::digest(&ring::digest::SHA256, &data[1024..2048]).as_ref());
        ctx.update(&[0]);
        ctx.update(&1024u32.to_le_bytes());
        let want = crate::world::hex(ctx.finish().as_ref());
        assert_eq!(image_checksum(&img, 1024).unwrap(), want);
    }

    /// The checksum computed here from the format document agrees with weftd's own
    /// (a short last chunk, an all-zero one, data ones).
    #[test]
    fn checksum_agrees_with_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("i.raw");
        let mut data = vec![0u8; 3 * 1024 + 500];
        weft_integration::xorshift_fill(&mut data[..1024], 9);
        weft_integration::xorshift_fill(&mut data[2048..], 11);
        std::fs::write(&img, &data).unwrap();
        let theirs = weft_blockdev::pull::digest_of_data(&data, 1024, |p| {
            let d = ring::digest::digest(&ring::digest::SHA256, p);
            weft_blockdev::store::ChunkId(d.as_ref().try_into().unwrap())
        });
        assert_eq!(image_checksum(&img, 1024).unwrap(), theirs);
    }

    #[test]
    fn component_after_finds_the_vm() {
        assert_eq!(
            component_after("/x/data/blk/rlw3/vda.spec", "blk").as_deref(),
            Some("rlw3")
        );
        assert_eq!(
            component_after("/x/run/vsock/rldpa", "vsock").as_deref(),
            Some("rldpa")
        );
        assert_eq!(component_after("/x/run", "vsock"), None);
    }
}
