//! `weft replay` in weftd (F26) and the state reconciliation of composed weaves
//! (F14): the replay engine of `weft-provenance` run against the catalog, the
//! snapshots and the DPA link. A replay's state goes out as files
//! ([`super::output`]) or into a running weave through its guest's DPA
//! ([`push_state`]).

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use serde_json::Value;
use weft_api::provenance::{parse_time, ReplayReport, ReplayRequest};
use weft_api::snapshot::SnapshotState;
use weft_blockdev::store::{BlockMap, ChunkStore};
use weft_provenance::base::{disks_state, BaseLimits, Found, Sources};
use weft_provenance::item::{data_source_matches, Item};
use weft_provenance::log::{ProvenanceLog, Query};
use weft_provenance::spill::Spilled;
use weft_provenance::state::{rebuild, State, Summary};

use super::output::{write_spilled, write_state, Output, OutputError, Written};
use crate::confine::ExportDirs;
use crate::envs::Manager;
use crate::error::{error_chain, one_line, ApiError};
use crate::snapshots::Snapshots;

/// Default of [`ReplayRequest::base_margin_secs`].
pub const BASE_MARGIN_SECS: u64 = 120;

/// Fills a report from what a replay applied and wrote.
fn set_report(report: &mut ReplayReport, summary: &Summary, written: Written) {
    report.applied = summary.applied;
    report.skipped = summary.skipped;
    report.last_seq = summary.last_seq;
    report.files = written
        .files
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    report.rows_skipped = written.rows_skipped;
}

/// Why `into` is not a weave of `env` (its parent in the catalog), or `None` when
/// it is one. A replay pushes an environment's state only into its own weaves
/// unless forced: anything else (the environment itself, another environment or
/// its weave, an attached guest) would have its data overwritten by a state that
/// never was its own. An `into` that does not exist is `NotFound`.
pub async fn not_a_weave_of(
    manager: &Manager,
    env: &str,
    into: &str,
) -> Result<Option<String>, ApiError> {
    let catalog = manager.catalog();
    if catalog.environment(into).await?.is_none() {
        return Err(ApiError::NotFound(into.to_string()));
    }
    Ok(match catalog.weave(into).await? {
        Some(w) if w.parent == env => None,
        Some(w) => Some(format!(
            "{into:?} is a weave of {:?}, not of {env:?}",
            w.parent
        )),
        None if into == env => Some(format!("{into:?} is the replayed environment itself")),
        None => Some(format!(
            "{into:?} is an environment, not a weave of {env:?}"
        )),
    })
}

/// Most changes sent to a DPA in one apply request.
const APPLY_CHUNK: usize = 512;

/// Runs a replay for weftd's API.
pub async fn run(
    manager: &Manager,
    snapshots: &Snapshots,
    env: &str,
    req: &ReplayRequest,
) -> Result<ReplayReport, ApiError> {
    if manager.catalog().environment(env).await?.is_none() {
        return Err(ApiError::NotFound(env.to_string()));
    }
    if req.out.is_none() && req.into.is_none() {
        return Err(ApiError::BadRequest(
            "say where the state goes: --out DIR or --into WEAVE".into(),
        ));
    }
    if req.force && req.into.is_none() {
        return Err(ApiError::BadRequest(
            "--force only applies to --into WEAVE".into(),
        ));
    }
    if let Some(into) = &req.into {
        if let Some(why) = not_a_weave_of(manager, env, into).await? {
            if !req.force {
                return Err(ApiError::Conflict(format!(
                    "replay pushes only into weaves of {env:?}: {why}; give --force to push anyway (audited)"
                )));
            }
        }
    }
    let to_us = if req.to == "now" {
        now_us()
    } else {
        parse_time("to", &req.to).map_err(ApiError::BadRequest)?
    };
    let from_us = req
        .from
        .as_deref()
        .map(|f| parse_time("from", f))
        .transpose()
        .map_err(ApiError::BadRequest)?;
    if from_us.is_some_and(|f| f > to_us) {
        return Err(ApiError::BadRequest("--from is after --to".into()));
    }
    let log = manager
        .provenance()
        .ok_or_else(|| ApiError::Conflict("weftd has no provenance log".into()))?
        .clone();
    if req.base.is_some() && req.from.is_some() {
        return Err(ApiError::BadRequest(
            "--base and --from both say where to start: give one".into(),
        ));
    }
    // The output directory, opened (and made) below an export directory before any
    // work: a refused path is the request's answer.
    let output = match &req.out {
        None => None,
        Some(out) => {
            let config = manager.config();
            let dir = ExportDirs::new(config).open_dir("--out", out, true)?;
            Some(std::sync::Arc::new(Output::new(dir, &config.work_dir())?))
        }
    };
    let margin = req.base_margin_secs.unwrap_or(BASE_MARGIN_SECS);
    let limits = manager.config().replay.base_limits();
    // The base (a disk snapshot's application state) and where the log applies from.
    let based = match req.base {
        None => None,
        Some(id) => Some((
            id,
            base_of(snapshots, &log, env, id, margin, to_us, &limits).await?,
        )),
    };
    let mut report = ReplayReport {
        env: env.to_string(),
        to_us,
        applied: 0,
        skipped: 0,
        rows_skipped: 0,
        last_seq: 0,
        files: Vec::new(),
        into: req.into.clone(),
        changes_made: 0,
        base: based.as_ref().map(|b| b.0),
        base_found: based
            .as_ref()
            .map(|b| b.1.found.clone())
            .unwrap_or_default(),
        base_log_from_us: based.as_ref().map(|b| b.1.log_from),
    };
    let (log, vm) = (log.clone(), env.to_string());
    let base_query = move |b: &Base| Query {
        from_us: Some(b.log_from),
        to_us: Some(to_us),
        ..Default::default()
    };
    if let (Some(out), None) = (&output, &req.into) {
        // Written out only: the rows and keys go to disk as the log streams in, so
        // weftd's memory does not grow with the state (see `weft_provenance::spill`).
        let (out, handle) = (out.clone(), tokio::runtime::Handle::current());
        let (summary, written) = tokio::task::spawn_blocking(move || {
            let mut spilled = Spilled::create(out.work())?;
            let summary = match based {
                None => spilled.rebuild(&log, &vm, from_us, to_us)?,
                Some((_, base)) => {
                    let q = base_query(&base);
                    spilled.load(base.state)?;
                    spilled.apply_log(&log, &vm, &q, base.seen)?.0
                }
            };
            let written = handle.block_on(write_spilled(&mut spilled, &out))?;
            Ok::<_, OutputError>((summary, written))
        })
        .await
        .map_err(ApiError::from)??;
        set_report(&mut report, &summary, written);
        return Ok(report);
    }
    let (state, summary) = tokio::task::spawn_blocking(move || match based {
        None => rebuild(&log, &vm, from_us, to_us),
        Some((_, base)) => {
            let q = base_query(&base);
            let mut state = base.state;
            let mut summary = Summary::default();
            log.scan(&vm, &q, |r| {
                if r.entry.seq > base.seen {
                    return ControlFlow::Break(());
                }
                state.apply_counted(&r, &mut summary);
                ControlFlow::Continue(())
            })
            .map(|()| (state, summary))
        }
    })
    .await
    .map_err(ApiError::from)?
    .map_err(|e| ApiError::provenance("", e))?;
    set_report(&mut report, &summary, Written::default());
    if let Some(out) = &output {
        let written = write_state(&state, out).await?;
        set_report(&mut report, &summary, written);
    }
    if let Some(weave) = &req.into {
        if manager.catalog().environment(weave).await?.is_none() {
            return Err(ApiError::NotFound(weave.clone()));
        }
        if req.from.is_some() {
            return Err(ApiError::BadRequest(
                "--into pushes a whole state: leave out --from".into(),
            ));
        }
        let state = &state;
        report.changes_made = push_state(manager, weave, None, |_| state.clone()).await?;
    }
    Ok(report)
}

/// Pushes a state into running weave `weave` through its guest's DPA: `target` gets
/// what the weave holds — `holds`, or else what its own log (its lineage included)
/// says — and says what it should hold; only the difference is sent. Returns the
/// changes the DPA made.
pub async fn push_state(
    manager: &Manager,
    weave: &str,
    holds: Option<&State>,
    target: impl FnOnce(&State) -> State,
) -> Result<u64, ApiError> {
    let log = manager
        .provenance()
        .ok_or_else(|| ApiError::Conflict("weftd has no provenance log".into()))?
        .clone();
    let link = manager
        .vsock()
        .ok_or_else(|| ApiError::Conflict("weftd has no DPA transport".into()))?
        .link()
        .clone();
    let current = match holds {
        Some(state) => state.clone(),
        None => {
            let weave = weave.to_string();
            tokio::task::spawn_blocking(move || rebuild(&log, &weave, None, i64::MAX))
                .await
                .map_err(ApiError::from)?
                .map_err(|e| ApiError::provenance("", e))?
                .0
        }
    };
    let changes = current.changes_to(&target(&current));
    let mut made = 0;
    for chunk in changes.chunks(APPLY_CHUNK) {
        let mut chunk = chunk.to_vec();
        for (i, c) in chunk.iter_mut().enumerate() {
            c.seq = i as u64 + 1;
        }
        let applied = link
            .apply(weave, chunk)
            .await
            .map_err(|e| ApiError::Conflict(e.to_string()))?;
        made += applied.applied;
        if let Some(error) = applied.error {
            return Err(ApiError::Conflict(format!(
                "the DPA of {weave} stopped after {made} changes: {error}"
            )));
        }
    }
    Ok(made)
}

/// What a composed weave's `data:` resource takes (state reconciliation, F14).
#[derive(Debug, Clone)]
pub enum DataPick {
    /// The parent's state at an instant, of the sources `pattern` names.
    Instant {
        /// The resource pattern (`data:*`, `data:<glob>`).
        pattern: String,
        /// The instant (RFC 3339).
        at: String,
    },
    /// A merged state, of the sources `pattern` names.
    Merged {
        /// The resource pattern.
        pattern: String,
        /// The merged items.
        items: BTreeMap<Item, Value>,
    },
}

/// The items `picks` choose, each with its pattern, read from `parent`'s log where a
/// pick names an instant; and how many log entries were applied for them.
pub async fn chosen_items(
    manager: &Manager,
    parent: &str,
    picks: &[DataPick],
) -> Result<(Vec<(String, BTreeMap<Item, Value>)>, u64), ApiError> {
    let log = manager
        .provenance()
        .ok_or_else(|| ApiError::Conflict("weftd has no provenance log".into()))?;
    let mut out = Vec::new();
    let mut applied = 0;
    for pick in picks {
        match pick {
            DataPick::Instant { pattern, at } => {
                let log = log.clone();
                let to_us = parse_time("at", at).map_err(ApiError::BadRequest)?;
                let (vm, pat) = (parent.to_string(), pattern.clone());
                let (items, summary) = tokio::task::spawn_blocking(move || {
                    rebuild(&log, &vm, None, to_us).map(|(state, summary)| {
                        (state.items(|src| data_source_matches(&pat, src)), summary)
                    })
                })
                .await
                .map_err(ApiError::from)?
                .map_err(|e| ApiError::provenance("", e))?;
                applied += summary.applied;
                out.push((pattern.clone(), items));
            }
            DataPick::Merged { pattern, items } => out.push((pattern.clone(), items.clone())),
        }
    }
    Ok((out, applied))
}

/// What the disks `maps` hold of the sources `vm`'s log names (see
/// [`disks_state`]).
pub async fn disk_state(
    manager: &Manager,
    store: &ChunkStore,
    vm: &str,
    maps: Vec<BlockMap>,
) -> Result<(State, Found), String> {
    let log = manager
        .provenance()
        .ok_or("weftd has no provenance log")?
        .clone();
    let vm = vm.to_string();
    let (sources, _) = tokio::task::spawn_blocking(move || Sources::of_log(&log, &vm, None))
        .await
        .map_err(|e| error_chain(&e))?
        .map_err(|e| error_chain(&e))?;
    let limits = manager.config().replay.base_limits();
    disks_state(store, maps, &sources, &limits)
        .await
        .map_err(|e| error_chain(&e))
}

/// The application state inside a disk snapshot, and how the log applies on it.
struct Base {
    /// The state the snapshot's file systems hold.
    state: State,
    /// Where each source was found (guest path → path in the file system).
    found: BTreeMap<String, String>,
    /// The log applies on the base from this instant (the snapshot's, less the margin).
    log_from: i64,
    /// ... up to this seq: the last entry whose source the base was read for.
    seen: u64,
}

/// The application state inside disk snapshot `id` of `env` (for the sources its log
/// names up to `to_us`), and where the log applies on it from: `margin_secs` before
/// the snapshot's instant.
async fn base_of(
    snapshots: &Snapshots,
    log: &ProvenanceLog,
    env: &str,
    id: i64,
    margin_secs: u64,
    to_us: i64,
    limits: &BaseLimits,
) -> Result<Base, ApiError> {
    let snap = snapshots.get(id).await?;
    if snap.env != env {
        return Err(ApiError::BadRequest(format!(
            "snapshot {id} is of {}, not of {env}",
            snap.env
        )));
    }
    if !snap.resource.starts_with("disk:") {
        return Err(ApiError::BadRequest(format!(
            "snapshot {id} is of {}: --base takes a disk snapshot",
            snap.resource
        )));
    }
    if snap.state != SnapshotState::Complete {
        return Err(ApiError::Conflict(format!("snapshot {id} is not complete")));
    }
    let taken_us = parse_time("taken_at", &snap.taken_at).map_err(ApiError::Internal)?;
    if to_us < taken_us {
        return Err(ApiError::BadRequest(format!(
            "--to is before base snapshot {id} ({})",
            snap.taken_at
        )));
    }
    let log_from = taken_us.saturating_sub(
        i64::try_from(margin_secs)
            .unwrap_or(i64::MAX / 2)
            .saturating_mul(1_000_000),
    );
    let map = snapshots.block_map(id).await?;
    let (l, vm) = (log.clone(), env.to_string());
    let (sources, seen) =
        tokio::task::spawn_blocking(move || Sources::of_log(&l, &vm, Some(to_us)))
            .await
            .map_err(ApiError::from)?
            .map_err(|e| ApiError::provenance("", e))?;
    let (state, found) = disks_state(snapshots.store(), vec![map], &sources, limits)
        .await
        .map_err(|e| {
            ApiError::BadRequest(one_line(&format!(
                "base snapshot {id}: {}",
                error_chain(&e)
            )))
        })?;
    Ok(Base {
        state,
        found,
        log_from,
        seen,
    })
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
