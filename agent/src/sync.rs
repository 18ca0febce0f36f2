//! `weave sync` (F9, sync_volumes): copy into one weave (DST) the blocks of a volume that
//! another (SRC) changed since their common base.
//!
//! Both QEMUs are paused for the whole operation (so both sides hold still while their
//! changes are compared and copied), and each exports the volume read-only over NBD with
//! QEMU's `qemu:allocation-depth` context, which tells per extent in which layer of the
//! backing chain it is allocated.
//!
//! - **Common base.** The first image of SRC's backing chain that is also in DST's: for
//!   weaves from now, the environment's image frozen when the first of them branched.
//!   The changes of a side are the extents allocated above that image.
//! - Weaves from two different snapshots have no common image (each has its own
//!   restored base); their bases are compared through the snapshots' block maps in the
//!   chunk store: the chunk slots that differ count as changed on the side with the newer
//!   snapshot (the older one is the common ancestor), on top of each side's overlay.
//! - **Conflicts** are ranges both sides changed. Without `prefer` the sync is refused
//!   and lists them; with `prefer: src` SRC's blocks are copied there too, with
//!   `prefer: dst` DST keeps its own.
//! - **Copy.** DST's QEMU creates an empty qcow2 layer, SRC's blocks are written into it
//!   over NBD, the layer is put on top of DST's volume (`blockdev-snapshot`) and committed
//!   down into DST's own overlay (`block-commit`, active commit), so DST's configuration
//!   and files stay what they were. Nothing is written into DST before the comparison
//!   passed.
//! - A guest that has the volume mounted caches its file system; by default DST's guest is
//!   reset after the copy so that it reads the synced volume afresh (`reset: false` only
//!   resumes it, for volumes the guest does not cache).
//! - **Crashes.** Before pausing a QEMU the sync leaves a marker `<run_dir>/sync/<name>.paused`
//!   (removed once it resumed it). A weftd that starts after one died mid-sync removes
//!   what the sync had made in each marked QEMU that still runs (exports, NBD server,
//!   an uncommitted layer) and resumes it ([`recover`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use tracing::{info, warn};
use weft_blockdev::nbd::NbdClient;
use weft_blockdev::store::BlockMap;
use weft_qmp::export::{self, Export};
use weft_qmp::{backup, block, commit, Qmp};

use crate::envs::Manager;
use crate::error::{one_line, ApiError};
use crate::model::EnvKind;
use crate::snapshots::Snapshots;
pub use weft_api::weave::{Prefer, Range, SyncReport, SyncRequest};

/// The NBD metadata context that reports the backing-chain depth of each extent.
const DEPTH_CONTEXT: &str = "qemu:allocation-depth";
/// Export, node and job names weft uses inside the QEMUs during a sync.
const READ_EXPORT: &str = "weft-sync-r";
const WRITE_EXPORT: &str = "weft-sync-w";
const LAYER_FILE: &str = "weft-sync-file";
const LAYER: &str = "weft-sync-layer";
const COMMIT_JOB: &str = "weft-sync-commit";
/// Bytes per NBD request of the copy, and requests in flight.
const PIECE: u64 = 1 << 20;
const PARALLEL: usize = 8;
const JOB_DEADLINE: Duration = Duration::from_secs(600);
/// How long QEMU may take to remove an export.
const EXPORT_DEADLINE: Duration = Duration::from_secs(30);
/// Conflicting ranges named in an error (the count and bytes are always given).
const SHOWN_CONFLICTS: usize = 20;

/// Sorted, merged ranges `(offset, length)`.
type Ranges = Vec<(u64, u64)>;

/// Sorts and merges overlapping or touching ranges.
pub(crate) fn normalize(mut r: Ranges) -> Ranges {
    r.retain(|(_, l)| *l > 0);
    r.sort_unstable();
    let mut out: Ranges = Vec::with_capacity(r.len());
    for (o, l) in r {
        match out.last_mut() {
            Some((po, pl)) if o <= *po + *pl => *pl = (*pl).max(o + l - *po),
            _ => out.push((o, l)),
        }
    }
    out
}

/// The ranges in both `a` and `b` (both normalized).
pub(crate) fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (ao, ae) = (a[i].0, a[i].0 + a[i].1);
        let (bo, be) = (b[j].0, b[j].0 + b[j].1);
        let (s, e) = (ao.max(bo), ae.min(be));
        if s < e {
            out.push((s, e - s));
        }
        if ae <= be {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The ranges of `a` not in `b` (both normalized).
pub(crate) fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    let mut out = Vec::new();
    let mut j = 0;
    for &(o, l) in a {
        let (mut at, end) = (o, o + l);
        while j < b.len() && b[j].0 + b[j].1 <= at {
            j += 1;
        }
        let mut k = j;
        while at < end && k < b.len() && b[k].0 < end {
            if b[k].0 > at {
                out.push((at, b[k].0 - at));
            }
            at = at.max(b[k].0 + b[k].1);
            k += 1;
        }
        if at < end {
            out.push((at, end - at));
        }
    }
    out
}

fn total(r: &[(u64, u64)]) -> u64 {
    r.iter().map(|(_, l)| l).sum()
}

/// The slots whose chunks differ between two block maps of the same disk, as ranges.
pub(crate) fn map_diff(a: &BlockMap, b: &BlockMap) -> Ranges {
    let ranges = a
        .slots
        .iter()
        .zip(&b.slots)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| (a.chunk_offset(i), u64::from(a.chunk_len(i))))
        .collect();
    normalize(ranges)
}

/// The image files of a volume's backing chain, top first (`query-block`).
async fn chain(qmp: &Qmp, volume: &str) -> Result<Vec<String>, ApiError> {
    let out: Vec<String> = block::device_chain(qmp, volume)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::BadRequest(format!("no volume {volume:?} with a medium")))?
        .iter()
        .map(|f| canonical(f))
        .collect();
    if out.is_empty() {
        return Err(ApiError::Qemu(format!(
            "query-block shows no image for volume {volume:?}"
        )));
    }
    Ok(out)
}

fn canonical(f: &str) -> String {
    std::fs::canonicalize(f)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| f.to_string())
}

/// The snapshot id of a weave base `<data_dir>/bases/snapshot-<id>.raw`.
fn base_snapshot(file: &str) -> Option<i64> {
    let name = Path::new(file).file_name()?.to_str()?;
    name.strip_prefix("snapshot-")?
        .strip_suffix(".raw")?
        .parse()
        .ok()
}

/// One side of a sync: its QEMU and what it exported.
struct Side {
    name: String,
    qmp: Qmp,
    root: String,
    socket: PathBuf,
    server: bool,
    export: bool,
}

impl Side {
    async fn export(&mut self) -> Result<NbdClient, ApiError> {
        let qemu = |e: weft_qmp::Error| ApiError::qmp("", e);
        let _ = std::fs::remove_file(&self.socket);
        if self.socket.to_str().is_none() {
            return Err(ApiError::Internal("socket path is not UTF-8".into()));
        }
        export::start_server(&self.qmp, &self.socket)
            .await
            .map_err(|e| {
                ApiError::Conflict(one_line(&format!(
                    "{}: cannot start an NBD server (is a snapshot running?): {e}",
                    self.name
                )))
            })?;
        self.server = true;
        let read = Export {
            allocation_depth: true,
            ..Export::read_only(READ_EXPORT, &self.root, READ_EXPORT)
        };
        export::add(&self.qmp, &read).await.map_err(qemu)?;
        self.export = true;
        NbdClient::connect_unix(&self.socket, READ_EXPORT, &[DEPTH_CONTEXT])
            .await
            .map_err(|e| ApiError::nbd(self.name.clone(), e))
    }

    async fn del_export(&self, id: &str) -> Result<(), weft_qmp::Error> {
        export::remove(&self.qmp, id, EXPORT_DEADLINE).await
    }

    /// Removes the export and the NBD server (best effort, logged).
    async fn unexport(&mut self) {
        if self.export {
            if let Err(e) = self.del_export(READ_EXPORT).await {
                warn!(env = %self.name, error = %e, "sync: cannot remove the NBD export");
            }
            self.export = false;
        }
        if self.server {
            if let Err(e) = export::stop_server(&self.qmp).await {
                warn!(env = %self.name, error = %e, "sync: cannot stop the NBD server");
            }
            self.server = false;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The marker of a QEMU a sync holds paused.
fn paused_marker(work: &Path, name: &str) -> PathBuf {
    work.join(format!("{}.paused", crate::names::join(&[name, "sync"])))
}

/// The layer a sync writes into DST's QEMU.
fn layer_file(dst: &str) -> String {
    format!("{}.qcow2", crate::names::join(&[dst, "layer"]))
}

/// After a restart: every QEMU a sync held paused when weftd died is cleaned of what
/// the sync made in it and resumed; files of the sync that nothing uses are removed.
/// Runs before weftd serves, so no sync runs meanwhile.
pub async fn recover(manager: &Arc<Manager>) -> Result<(), ApiError> {
    let work = manager.config().run_dir.join("sync");
    let Ok(entries) = std::fs::read_dir(&work) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(name) = file.strip_suffix(&format!("{}sync.paused", crate::names::SEP)) else {
            continue;
        };
        let detail = match manager.live_qmp(name) {
            None => "not running any more".to_string(),
            Some(qmp) => {
                let layer = work.join(layer_file(name));
                // Most are absent, depending on where the sync was.
                for id in [WRITE_EXPORT, READ_EXPORT] {
                    let _ = export::remove(&qmp, id, EXPORT_DEADLINE).await;
                }
                for node in [LAYER, LAYER_FILE] {
                    let _ = block::delete_node(&qmp, node).await;
                }
                let _ = export::stop_server(&qmp).await;
                // A layer the QEMU still holds (committed into its chain, or not yet
                // removable) keeps the guest's writes: it stays.
                let held = block::file_in_use(&qmp, &layer).await.unwrap_or(true);
                if !held {
                    let _ = std::fs::remove_file(&layer);
                }
                match qmp.execute_raw("cont", None).await {
                    Ok(_) => "resumed".to_string(),
                    Err(e) => format!("cannot resume: {}", one_line(&e.to_string())),
                }
            }
        };
        warn!(env = name, %detail, "a weave sync was interrupted by a restart");
        manager
            .catalog()
            .audit("weftd", "sync.recover", Some(name), Some(&detail), "ok")
            .await?;
        let _ = std::fs::remove_file(e.path());
        let _ = std::fs::remove_file(work.join(format!("{name}.nbd")));
    }
    Ok(())
}

/// Changed extents of one export: allocated at a depth in `1..=above` (the layers
/// above the common base).
async fn changed(nbd: &NbdClient, above: usize) -> Result<Ranges, ApiError> {
    let extents = nbd
        .block_status_all(DEPTH_CONTEXT)
        .await
        .map_err(|e| ApiError::nbd("", e))?;
    Ok(normalize(
        extents
            .iter()
            .filter(|e| e.flags >= 1 && (e.flags as usize) <= above)
            .map(|e| (e.offset, e.length))
            .collect(),
    ))
}

/// Runs a sync of `req.volume` from `src` into `req.dst`.
pub async fn sync(
    manager: &Arc<Manager>,
    snapshots: &Arc<Snapshots>,
    src: &str,
    req: &SyncRequest,
) -> Result<SyncReport, ApiError> {
    let dst = req.dst.as_str();
    if src == dst {
        return Err(ApiError::BadRequest(
            "source and destination are the same".into(),
        ));
    }
    let catalog = manager.catalog();
    let family = |name: &str| {
        let name = name.to_string();
        async move {
            let env = catalog.environment(&name).await?.ok_or_else(|| {
                ApiError::Missing(format!("no weave named {name:?} (see `weft weave list`)"))
            })?;
            // A weave verb: it writes into weaves only, never into an environment.
            let Some(parent) = catalog.weave(&name).await?.map(|w| w.parent) else {
                return Err(ApiError::Conflict(format!(
                    "{name:?} is an environment, not a weave: weave sync copies between weaves of one environment; nothing was changed"
                )));
            };
            if env.kind != EnvKind::Managed {
                return Err(ApiError::BadRequest(format!(
                    "{name:?} is not a managed environment"
                )));
            }
            let served = env
                .config
                .as_ref()
                .is_some_and(|c| c.vhost_user_disks.iter().any(|d| d.name == req.volume));
            if served {
                return Err(ApiError::Conflict(format!(
                    "volume {:?} of {name:?} is served live by weft-blk (a weave made with --live); \
                     weave sync copies between volumes QEMU's block layer holds, so it does not \
                     take served volumes yet: make the weave without --live",
                    req.volume
                )));
            }
            let has_disk = env
                .config
                .as_ref()
                .is_some_and(|c| c.disks.iter().any(|d| d.name == req.volume));
            if !has_disk {
                return Err(ApiError::BadRequest(format!(
                    "{name:?} has no volume {:?}",
                    req.volume
                )));
            }
            Ok::<_, ApiError>(parent)
        }
    };
    let (fs, fd) = (family(src).await?, family(dst).await?);
    if fs != fd {
        return Err(ApiError::BadRequest(format!(
            "{src:?} and {dst:?} are not weaves of the same environment"
        )));
    }
    // Both locked, in name order (no deadlock with another sync).
    let (first, second) = if src < dst { (src, dst) } else { (dst, src) };
    let _l1 = manager.lock_env(first).await;
    let _l2 = manager.lock_env(second).await;
    let live = |name: &str| {
        manager
            .live_qmp(name)
            .ok_or_else(|| ApiError::Conflict(format!("{name:?} is not running: start it first")))
    };
    let (qs, qd) = (live(src)?, live(dst)?);
    let work = manager.config().run_dir.join("sync");
    std::fs::create_dir_all(&work)
        .map_err(|e| ApiError::io(format!("cannot create {}", work.display()), e))?;
    let qemu = |e: weft_qmp::Error| ApiError::qmp("", e);
    let mut s = Side {
        name: src.to_string(),
        root: backup::device_root_node(&qs, &req.volume)
            .await
            .map_err(qemu)?,
        qmp: qs,
        socket: work.join(format!("{src}.nbd")),
        server: false,
        export: false,
    };
    let mut d = Side {
        name: dst.to_string(),
        root: backup::device_root_node(&qd, &req.volume)
            .await
            .map_err(qemu)?,
        qmp: qd,
        socket: work.join(format!("{dst}.nbd")),
        server: false,
        export: false,
    };

    // Paused from here to the end, whatever happens; the markers say so to the next
    // weftd should this one die meanwhile.
    let (ms, md) = (paused_marker(&work, src), paused_marker(&work, dst));
    for m in [&ms, &md] {
        std::fs::write(m, b"")
            .map_err(|e| ApiError::io(format!("cannot write {}", m.display()), e))?;
    }
    let unmark = || {
        let _ = std::fs::remove_file(&ms);
        let _ = std::fs::remove_file(&md);
    };
    if let Err(e) = d.qmp.execute_raw("stop", None).await {
        unmark();
        return Err(qemu(e));
    }
    if let Err(e) = s.qmp.execute_raw("stop", None).await {
        let _ = d.qmp.execute_raw("cont", None).await;
        unmark();
        return Err(qemu(e));
    }
    crate::testpoints::point("sync.paused").await;
    let result = run(snapshots, &mut s, &mut d, req).await;
    s.unexport().await;
    d.unexport().await;
    if let Err(e) = s.qmp.execute_raw("cont", None).await {
        warn!(env = %src, error = %e, "sync: cannot resume the source");
    }
    let reset = req.reset && matches!(&result, Ok(r) if r.copied_bytes > 0);
    if reset {
        if let Err(e) = d.qmp.execute_raw("system_reset", None).await {
            warn!(env = %dst, error = %e, "sync: cannot reset the destination");
        }
    }
    if let Err(e) = d.qmp.execute_raw("cont", None).await {
        warn!(env = %dst, error = %e, "sync: cannot resume the destination");
    }
    unmark();
    let mut report = result?;
    report.reset = reset;
    info!(src, dst, volume = %req.volume, copied = report.copied_bytes,
        conflicts = report.conflicts.len(), "volume synced");
    Ok(report)
}

/// The part of a sync that runs with both QEMUs paused.
async fn run(
    snapshots: &Arc<Snapshots>,
    s: &mut Side,
    d: &mut Side,
    req: &SyncRequest,
) -> Result<SyncReport, ApiError> {
    let (cs, cd) = (
        chain(&s.qmp, &req.volume).await?,
        chain(&d.qmp, &req.volume).await?,
    );
    let src_nbd = s.export().await?;
    let dst_nbd = d.export().await?;
    if src_nbd.size() != dst_nbd.size() {
        return Err(ApiError::BadRequest(format!(
            "volume {} is {} bytes in {} and {} bytes in {}",
            req.volume,
            src_nbd.size(),
            s.name,
            dst_nbd.size(),
            d.name
        )));
    }
    let common = cs
        .iter()
        .enumerate()
        .find_map(|(i, f)| cd.iter().position(|g| g == f).map(|j| (i, j)));
    let (base, src_changed, dst_changed) = match common {
        Some((i, j)) => (
            format!("image {}", cs[i]),
            changed(&src_nbd, i).await?,
            changed(&dst_nbd, j).await?,
        ),
        None => {
            let (a, b) = match (
                cs.last().and_then(|f| base_snapshot(f)),
                cd.last().and_then(|f| base_snapshot(f)),
            ) {
                (Some(a), Some(b)) => (a, b),
                _ => {
                    return Err(ApiError::Conflict(format!(
                        "{} and {} share no base for volume {}: sync works between weaves \
                         from now, from snapshots, or a weave from now and its environment",
                        s.name, d.name, req.volume
                    )))
                }
            };
            let (sa, sb) = (snapshots.get(a).await?, snapshots.get(b).await?);
            if sa.resource != sb.resource {
                return Err(ApiError::BadRequest(format!(
                    "the bases are snapshots of different disks ({} and {})",
                    sa.resource, sb.resource
                )));
            }
            let diff = map_diff(
                &snapshots.block_map(a).await?,
                &snapshots.block_map(b).await?,
            );
            let mut src_changed = changed(&src_nbd, cs.len() - 1).await?;
            let mut dst_changed = changed(&dst_nbd, cd.len() - 1).await?;
            // The older snapshot is the common ancestor; the newer side changed the diff.
            let src_newer = (sa.taken_at.as_str(), sa.id) > (sb.taken_at.as_str(), sb.id);
            if src_newer {
                src_changed.extend_from_slice(&diff);
                src_changed = normalize(src_changed);
            } else {
                dst_changed.extend_from_slice(&diff);
                dst_changed = normalize(dst_changed);
            }
            let older = if src_newer { &sb } else { &sa };
            (
                format!("snapshot {} ({})", older.id, older.taken_at),
                src_changed,
                dst_changed,
            )
        }
    };
    let _ = dst_nbd.disconnect().await;
    let conflicts = intersect(&src_changed, &dst_changed);
    let conflict_bytes = total(&conflicts);
    if !conflicts.is_empty() && req.prefer.is_none() {
        let shown: Vec<String> = conflicts
            .iter()
            .take(SHOWN_CONFLICTS)
            .map(|(o, l)| format!("{o}+{l}"))
            .collect();
        let more = conflicts.len().saturating_sub(SHOWN_CONFLICTS);
        return Err(ApiError::Conflict(format!(
            "{} and {} both changed {} range(s) of {} ({} bytes) since {base}: {}{}; \
             nothing was copied: choose a side with --prefer src|dst",
            s.name,
            d.name,
            conflicts.len(),
            req.volume,
            conflict_bytes,
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        )));
    }
    let copy = match req.prefer {
        Some(Prefer::Dst) => subtract(&src_changed, &dst_changed),
        _ => src_changed.clone(),
    };
    let copied_bytes = total(&copy);
    if !copy.is_empty() {
        copy_into(d, &src_nbd, &copy, src_nbd.size()).await?;
    }
    let _ = src_nbd.disconnect().await;
    Ok(SyncReport {
        src: s.name.clone(),
        dst: d.name.clone(),
        volume: req.volume.clone(),
        base,
        src_changed_bytes: total(&src_changed),
        dst_changed_bytes: total(&dst_changed),
        conflicts: conflicts
            .iter()
            .map(|&(offset, length)| Range { offset, length })
            .collect(),
        conflict_bytes,
        prefer: req.prefer,
        copied_bytes,
        reset: false,
    })
}

/// Writes `copy` from SRC into a new layer in DST's QEMU, then puts that layer on DST's
/// volume and commits it down.
async fn copy_into(
    d: &Side,
    src_nbd: &NbdClient,
    copy: &[(u64, u64)],
    size: u64,
) -> Result<(), ApiError> {
    let qemu = |e: weft_qmp::Error| ApiError::qmp(format!("sync into {}", d.name), e);
    let layer = d.socket.with_file_name(layer_file(&d.name));
    let _ = std::fs::remove_file(&layer);
    backup::create_file_node(&d.qmp, &layer, LAYER_FILE)
        .await
        .map_err(qemu)?;
    let mut snapshotted = false;
    let result = async {
        backup::create_qcow2_node(&d.qmp, LAYER_FILE, LAYER, size, None)
            .await
            .map_err(qemu)?;
        export::add(&d.qmp, &Export::writable(WRITE_EXPORT, LAYER, WRITE_EXPORT))
            .await
            .map_err(qemu)?;
        let written = async {
            let out = NbdClient::connect_unix(&d.socket, WRITE_EXPORT, &[])
                .await
                .map_err(|e| ApiError::nbd(d.name.clone(), e))?;
            let step = PIECE
                .min(u64::from(src_nbd.max_request()))
                .min(u64::from(out.max_request()));
            let pieces: Vec<(u64, u64)> = copy
                .iter()
                .flat_map(|&(o, l)| {
                    (0..l.div_ceil(step)).map(move |k| (o + k * step, step.min(l - k * step)))
                })
                .collect();
            let out_ref = &out;
            stream::iter(pieces)
                .map(|(o, l)| async move {
                    // l <= step <= max_request (a u32).
                    let data = src_nbd
                        .read(o, l as u32)
                        .await
                        .map_err(|e| ApiError::nbd(format!("read {o}+{l}"), e))?;
                    out_ref
                        .write(o, &data)
                        .await
                        .map_err(|e| ApiError::nbd(format!("write {o}+{l}"), e))
                })
                .buffer_unordered(PARALLEL)
                .try_collect::<Vec<()>>()
                .await?;
            out.flush().await.map_err(|e| ApiError::nbd("flush", e))?;
            let _ = out.disconnect().await;
            Ok::<(), ApiError>(())
        }
        .await;
        d.del_export(WRITE_EXPORT).await.map_err(qemu)?;
        written?;
        // The layer goes on top of DST's volume, then is committed into it.
        block::snapshot(&d.qmp, &[(d.root.as_str(), LAYER)])
            .await
            .map_err(qemu)?;
        snapshotted = true;
        commit::active_commit(&d.qmp, COMMIT_JOB, LAYER, None, JOB_DEADLINE)
            .await
            .map_err(|e| {
                ApiError::qmp(format!("committing the synced blocks into {}", d.name), e)
            })?;
        snapshotted = false;
        Ok::<(), ApiError>(())
    }
    .await;
    if snapshotted {
        // The layer is DST's active image now: removing it would lose the copy.
        warn!(weave = %d.name, layer = %layer.display(),
            "sync: the commit failed; the synced blocks stay in a layer on top of the volume");
        return result;
    }
    for node in [LAYER, LAYER_FILE] {
        if let Err(e) = block::delete_node(&d.qmp, node).await {
            warn!(weave = %d.name, node, error = %e, "sync: cannot remove a node");
        }
    }
    let _ = std::fs::remove_file(&layer);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_blockdev::store::Slot;

    #[test]
    fn range_algebra() {
        let a = normalize(vec![(10, 10), (0, 5), (5, 5), (40, 10)]);
        assert_eq!(a, [(0, 20), (40, 10)]);
        let b = normalize(vec![(15, 30)]);
        assert_eq!(intersect(&a, &b), [(15, 5), (40, 5)]);
        assert_eq!(subtract(&a, &b), [(0, 15), (45, 5)]);
        assert_eq!(subtract(&b, &a), [(20, 20)]);
        assert!(intersect(&a, &[]).is_empty());
        assert_eq!(subtract(&a, &[]), a);
        // A range of b covering several of a.
        assert_eq!(subtract(&a, &[(0, 100)]), Vec::<(u64, u64)>::new());
        assert_eq!(intersect(&[(0, 100)], &a), a);
    }

    #[test]
    fn diff_of_block_maps_is_the_differing_slots() {
        let id = |n: u8| {
            let mut b = [0u8; 32];
            b[0] = n;
            Slot::Data(weft_blockdev::store::ChunkId(b))
        };
        let mut a = BlockMap::new(5 << 16, 1 << 16);
        let mut b = a.clone();
        a.slots[1] = id(1);
        b.slots[1] = id(1);
        a.slots[2] = id(2);
        b.slots[3] = id(3);
        b.slots[4] = id(4);
        assert_eq!(map_diff(&a, &b), [(2 << 16, 3 << 16)]);
    }

    #[test]
    fn base_snapshot_ids_come_from_base_file_names() {
        assert_eq!(
            base_snapshot("/var/lib/weft/bases/snapshot-12.raw"),
            Some(12)
        );
        assert_eq!(base_snapshot("/x/snapshot-.raw"), None);
        assert_eq!(base_snapshot("/x/disk.qcow2"), None);
    }
}
