//! Three-way merges of what rules chose for one resource: a disk slot by slot, a
//! configuration key by key (JSON leaves), application state item by item.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;
use weft_api::composition::{Conflict, ConflictStrategy, Origin, Rules, MAX_CONFLICTS};
use weft_api::snapshot::{Snapshot, SnapshotState};
use weft_blockdev::store::{BlockMap, Slot};
use weft_provenance::item::{flatten, unflatten, Item};

use crate::{MapSource, PlanInput};

/// The newest common ancestor of two disk snapshots along their parent links.
fn common_ancestor(a: &Snapshot, b: &Snapshot, snaps: &[Snapshot]) -> Option<i64> {
    let by_id: HashMap<i64, &Snapshot> = snaps.iter().map(|s| (s.id, s)).collect();
    let chain = |s: &Snapshot| {
        let mut ids = BTreeSet::new();
        let mut cur = Some(s.id);
        while let Some(id) = cur {
            if !ids.insert(id) {
                break;
            }
            cur = by_id.get(&id).and_then(|s| s.parent);
        }
        ids
    };
    let ca = chain(a);
    let cb = chain(b);
    ca.intersection(&cb)
        .filter_map(|id| by_id.get(id))
        .max_by(|x, y| x.taken_at.cmp(&y.taken_at).then(x.id.cmp(&y.id)))
        .map(|s| s.id)
}

/// The newest snapshot of `resource` taken before every side (structured resources
/// have no parent links): their common state.
fn state_before(resource: &str, sides: &[&Snapshot], snaps: &[Snapshot]) -> Option<i64> {
    let first = sides.iter().map(|s| s.taken_at.as_str()).min()?;
    snaps
        .iter()
        .filter(|s| s.resource == resource && s.state == SnapshotState::Complete)
        .filter(|s| s.taken_at.as_str() < first)
        .max_by(|a, b| a.taken_at.cmp(&b.taken_at).then(a.id.cmp(&b.id)))
        .map(|s| s.id)
}

/// The result of merging the snapshots rules chose for one resource.
#[derive(Debug, Clone)]
pub struct Merged {
    /// What the plan shows.
    pub origin: Origin,
    /// Conflicts (resolved or open).
    pub conflicts: Vec<Conflict>,
    /// The merged block map (disks).
    pub map: Option<BlockMap>,
    /// The merged JSON (`config`, `net`).
    pub value: Option<Value>,
    /// The merged application state (`data:`).
    pub items: Option<BTreeMap<Item, Value>>,
}

/// Merges snapshots `sides` (ids, oldest first) of `resource` three-way, folding
/// them in order: for a disk slot by slot against the sides' newest common ancestor
/// along parent links, for `config` and `net` key by key against the newest snapshot
/// taken before them all. What only one side changed is taken from it; what both
/// changed differently is a conflict, settled by `rules.conflict`.
pub fn merge(
    rules: &Rules,
    resource: &str,
    sides: &[i64],
    input: &PlanInput<'_>,
    maps: &dyn MapSource,
) -> Result<Merged, String> {
    let snaps = input.snapshots;
    let find = |id: i64| snaps.iter().find(|s| s.id == id);
    let sides: Vec<&Snapshot> = sides
        .iter()
        .map(|id| find(*id).ok_or_else(|| format!("snapshot {id} is gone")))
        .collect::<Result<_, _>>()?;
    let ids: Vec<i64> = sides.iter().map(|s| s.id).collect();
    let first = *sides.first().ok_or("nothing to merge")?;
    if resource.starts_with("disk:") {
        let mut acc = maps.block_map(first)?;
        let mut origin = vec![first.id; acc.slots.len()];
        let mut base_id = None;
        let mut conflicts = Vec::new();
        for next in &sides[1..] {
            let theirs = maps.block_map(next)?;
            if theirs.disk_size != acc.disk_size || theirs.chunk_size != acc.chunk_size {
                return Err(format!(
                    "{resource}: snapshots {} and {} have different sizes and cannot be merged; \
                     use conflict = \"last-write-wins\"",
                    first.id, next.id
                ));
            }
            base_id = common_ancestor(first, next, snaps);
            let base = match base_id.and_then(find) {
                Some(b) => Some(maps.block_map(b)?),
                None => None,
            };
            conflicts.extend(block_merge(
                rules.conflict,
                resource,
                (&mut acc, &mut origin),
                (&theirs, next.id),
                base.as_ref(),
                input.resolutions,
            ));
        }
        return Ok(Merged {
            origin: Origin::Merge {
                sides: ids,
                base: base_id,
            },
            conflicts,
            map: Some(acc),
            value: None,
            items: None,
        });
    }
    let value = |s: &Snapshot| -> Value {
        match resource {
            "config" => serde_json::to_value(&s.config).unwrap_or(Value::Null),
            _ => serde_json::to_value(&s.net).unwrap_or(Value::Null),
        }
    };
    let base_id = state_before(resource, &sides, snaps);
    let base = base_id.and_then(find).map(|b| flatten(&value(b)));
    let versions = sides.iter().map(|s| (s.id, flatten(&value(s)))).collect();
    let (acc, conflicts) = merge_keys(
        rules.conflict,
        resource,
        versions,
        base.as_ref(),
        |k: &String| k.clone(),
        input.resolutions,
    );
    Ok(Merged {
        origin: Origin::Merge {
            sides: ids,
            base: base_id,
        },
        conflicts,
        map: None,
        value: Some(unflatten(&acc)),
        items: None,
    })
}

/// Three-way merge of keyed versions (`(side, version)`, oldest first) folded in
/// order against `base` (none: every difference is a change on both sides): what only
/// one side changed comes from it; what both changed differently is a conflict (named
/// by `label`), settled by `strategy`. Returns the merged version and the conflicts.
fn merge_keys<K: Ord + Clone>(
    strategy: ConflictStrategy,
    resource: &str,
    versions: Vec<(i64, BTreeMap<K, Value>)>,
    base: Option<&BTreeMap<K, Value>>,
    label: impl Fn(&K) -> String,
    resolutions: &HashMap<(String, String), i64>,
) -> (BTreeMap<K, Value>, Vec<Conflict>) {
    let mut versions = versions.into_iter();
    let Some((first, mut acc)) = versions.next() else {
        return (BTreeMap::new(), Vec::new());
    };
    let mut origin: BTreeMap<K, i64> = acc.keys().map(|k| (k.clone(), first)).collect();
    let mut conflicts = Vec::new();
    for (next, theirs) in versions {
        let keys: BTreeSet<K> = acc.keys().chain(theirs.keys()).cloned().collect();
        for k in keys {
            let (o, t) = (acc.get(&k).cloned(), theirs.get(&k).cloned());
            if o == t {
                continue;
            }
            let b = base.map(|m| m.get(&k).cloned());
            let take_theirs = if b.as_ref() == Some(&o) {
                true
            } else if b.as_ref() == Some(&t) {
                false
            } else {
                let ours = origin.get(&k).copied().unwrap_or(first);
                let c = conflict(strategy, resource, label(&k), [ours, next], resolutions);
                let wins = c.resolved == Some(next);
                if conflicts.len() < MAX_CONFLICTS {
                    conflicts.push(c);
                }
                wins
            };
            if take_theirs {
                match t {
                    Some(v) => acc.insert(k.clone(), v),
                    None => acc.remove(&k),
                };
                origin.insert(k, next);
            }
        }
    }
    (acc, conflicts)
}

/// The µs since the Unix epoch of RFC 3339 instant `t`: how a `data:` merge names its
/// sides in conflicts (they are instants, not snapshots).
pub fn instant_id(t: &str) -> Result<i64, String> {
    use weft_api::resource::{TimeError, Timestamp};
    let ts = Timestamp::parse(t).map_err(|e| format!("instant {t:?}: {e}"))?;
    ts.micros().map_err(|e| match e {
        TimeError::OutOfRange => format!("instant {t:?} is out of range"),
        e => format!("instant {t:?} {e}"),
    })
}

/// Merges the application state of `resource` (`data:*`, `data:<glob>`) at
/// `instants` (oldest first) key by key — rows, JSON leaves, key-value keys — against
/// its state at `base`, folding them in order. A conflict's sides are the instants as
/// µs since the Unix epoch ([`instant_id`]).
pub fn merge_data(
    rules: &Rules,
    resource: &str,
    instants: &[String],
    base: &str,
    resolutions: &HashMap<(String, String), i64>,
    maps: &dyn MapSource,
) -> Result<Merged, String> {
    let mut versions = Vec::new();
    for at in instants {
        versions.push((instant_id(at)?, maps.data_items(resource, at)?));
    }
    let base_items = maps.data_items(resource, base)?;
    let (acc, conflicts) = merge_keys(
        rules.conflict,
        resource,
        versions,
        Some(&base_items),
        Item::label,
        resolutions,
    );
    Ok(Merged {
        origin: Origin::DataMerge {
            instants: instants.to_vec(),
            base: base.to_string(),
        },
        conflicts,
        map: None,
        value: None,
        items: Some(acc),
    })
}

/// A conflict on `key` between `sides`, resolved as the strategy says: the newer side
/// for merge-by-timestamp, the recorded resolution (if any) for prompt.
fn conflict(
    strategy: ConflictStrategy,
    resource: &str,
    key: String,
    sides: [i64; 2],
    resolutions: &HashMap<(String, String), i64>,
) -> Conflict {
    let resolved = match strategy {
        ConflictStrategy::Prompt => resolutions
            .get(&(resource.to_string(), key.clone()))
            .copied()
            .and_then(|r| {
                if sides.contains(&r) {
                    Some(r)
                } else if resource.starts_with("data:") {
                    // A side that is "now" moves between plans: a resolution still
                    // names the older side or the newer one.
                    Some(if r <= sides[0] { sides[0] } else { sides[1] })
                } else {
                    None
                }
            }),
        _ => Some(sides[1]),
    };
    Conflict {
        resource: resource.to_string(),
        key,
        sides,
        resolved,
    }
}

/// Three-way merge of `theirs` into `acc` slot by slot (`origin`: the snapshot each
/// slot of `acc` came from); conflicting runs of adjacent slots are returned and
/// applied as resolved.
fn block_merge(
    strategy: ConflictStrategy,
    resource: &str,
    (acc, origin): (&mut BlockMap, &mut [i64]),
    (theirs, theirs_id): (&BlockMap, i64),
    base: Option<&BlockMap>,
    resolutions: &HashMap<(String, String), i64>,
) -> Vec<Conflict> {
    let mut runs: Vec<(usize, usize, i64)> = Vec::new();
    for (i, t) in theirs.slots.iter().copied().enumerate() {
        let o = acc.slots[i];
        if o == t {
            continue;
        }
        let b: Option<Slot> = base.map(|m| m.slots[i]);
        if b == Some(o) {
            acc.slots[i] = t;
            origin[i] = theirs_id;
        } else if b != Some(t) {
            match runs.last_mut() {
                Some((_, e, ours)) if *e == i && *ours == origin[i] => *e = i + 1,
                _ => runs.push((i, i + 1, origin[i])),
            }
        }
    }
    let mut conflicts = Vec::new();
    for (s, e, ours) in runs {
        let c = conflict(
            strategy,
            resource,
            format!("slots {s}..{e}"),
            [ours, theirs_id],
            resolutions,
        );
        if c.resolved == Some(theirs_id) {
            acc.slots[s..e].copy_from_slice(&theirs.slots[s..e]);
            origin[s..e].fill(theirs_id);
        }
        if conflicts.len() < MAX_CONFLICTS {
            conflicts.push(c);
        }
    }
    conflicts
}
