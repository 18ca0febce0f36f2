//! Temporal compositions (F11, F12): rules that pick each resource of an environment
//! from a point in its history, and the plan they give.
//!
//! This module is pure: rules are parsed and checked, and [`plan`] computes, from the
//! environment's resources and snapshots (and the block maps of disk snapshots, read
//! through a [`MapSource`]), which snapshot each resource comes from, which rule chose
//! it, and what conflicts there are. Nothing is written. The rule schema is documented
//! in `docs/compositions.md`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;
use weft_blockdev::store::{BlockMap, Slot};

use crate::model::{Snapshot, SnapshotState};
pub use weft_api::composition::{
    matches, Choice, Conflict, ConflictStrategy, Origin, Plan, Rule, Rules, RulesError, Strategy,
    MAX_CONFLICTS, MAX_PATTERNS, MAX_RULES, MAX_RULES_BYTES, MAX_TEXT,
};
use weft_provenance::item::{flatten, unflatten, Item};

/// Reads what merges compare: block maps of disk snapshots (the chunk store, in
/// weftd) and application state at an instant (the provenance log).
pub trait MapSource {
    /// The block map of snapshot `s`.
    fn block_map(&self, s: &Snapshot) -> Result<BlockMap, String>;

    /// The application state at instant `at` (RFC 3339) of the sources `pattern`
    /// (`data:*`, `data:<glob>`) names, as items.
    fn data_items(&self, pattern: &str, at: &str) -> Result<BTreeMap<Item, Value>, String> {
        let _ = (pattern, at);
        Err("application data cannot be merged here: no provenance log".into())
    }
}

/// What a plan is computed from.
pub struct PlanInput<'a> {
    /// The environment's resources now (`disk:*`, `config`, `net`, `data:*`).
    pub resources: &'a [String],
    /// Its snapshots (any state; only complete ones are used).
    pub snapshots: &'a [Snapshot],
    /// Resolutions recorded so far: (resource, key) → the snapshot whose side wins.
    pub resolutions: &'a HashMap<(String, String), i64>,
}

fn admitted<'s>(rule: &Rule, resource: &str, snaps: &'s [Snapshot]) -> Vec<&'s Snapshot> {
    snaps
        .iter()
        .filter(|s| s.resource == resource && s.state == SnapshotState::Complete)
        .filter(|s| rule.pin.is_none_or(|p| s.id == p))
        .filter(|s| rule.from.as_ref().is_none_or(|f| s.taken_at >= *f))
        .filter(|s| rule.until.as_ref().is_none_or(|u| s.taken_at <= *u))
        .filter(|s| {
            rule.categories.is_empty()
                || s.category
                    .as_ref()
                    .is_some_and(|c| rule.categories.contains(c))
        })
        .filter(|s| {
            !s.category
                .as_ref()
                .is_some_and(|c| rule.exclude_categories.contains(c))
        })
        .collect()
}

fn micros(t: &str) -> i128 {
    humantime::parse_rfc3339_weak(t)
        .ok()
        .and_then(|st| st.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_micros() as i128)
        .unwrap_or(0)
}

fn choose<'s>(rule: &Rule, mut c: Vec<&'s Snapshot>) -> Option<&'s Snapshot> {
    c.sort_by(|a, b| a.taken_at.cmp(&b.taken_at).then(a.id.cmp(&b.id)));
    match rule.strategy {
        Strategy::Latest => c.last().copied(),
        Strategy::Earliest => c.first().copied(),
        Strategy::ClosestTo => {
            let t = micros(rule.closest_to.as_deref().unwrap_or_default());
            c.into_iter()
                .min_by_key(|s| (micros(&s.taken_at) - t).abs())
        }
    }
}

/// The instant a `data:` rule chooses: the end of its range for latest, the start for
/// earliest, its target for closest-to; `None` when it sets no bound that way.
fn data_instant(rule: &Rule) -> Option<String> {
    match rule.strategy {
        Strategy::Latest => rule.until.clone(),
        Strategy::Earliest => rule.from.clone(),
        Strategy::ClosestTo => rule.closest_to.clone(),
    }
}

/// Computes the plan of `rules` over `input`.
pub fn plan(rules: &Rules, input: &PlanInput<'_>, maps: &dyn MapSource) -> Result<Plan, String> {
    let mut out = Plan::default();
    for resource in input.resources {
        // Each rule that names the resource and admits something makes a choice.
        let mut picks: Vec<(usize, Origin, Option<&Snapshot>)> = Vec::new();
        let mut named = false;
        for (i, rule) in rules.rules.iter().enumerate() {
            if !rule.resources.iter().any(|p| matches(p, resource)) {
                continue;
            }
            named = true;
            if resource.starts_with("data:") {
                let at = data_instant(rule).unwrap_or_else(crate::catalog::now);
                picks.push((i, Origin::Instant { at }, None));
            } else if let Some(s) = choose(rule, admitted(rule, resource, input.snapshots)) {
                picks.push((i, origin_of(s), Some(s)));
            }
        }
        if !named {
            let default = default_choice(rules, resource, input.snapshots);
            if let Some(origin) = default {
                out.resources.push(Choice {
                    resource: resource.clone(),
                    origin,
                    rule: "default".into(),
                    settled: None,
                });
            }
            continue;
        }
        if picks.is_empty() {
            return Err(format!(
                "no snapshot of {resource} satisfies the rules that name it ({})",
                rules
                    .rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.resources.iter().any(|p| matches(p, resource)))
                    .map(|(i, _)| rules.label(i))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        // Distinct choices, oldest first.
        let mut distinct: Vec<(Vec<usize>, Origin, Option<&Snapshot>)> = Vec::new();
        for (i, o, s) in picks {
            match distinct.iter_mut().find(|(_, d, _)| *d == o) {
                Some((who, _, _)) => who.push(i),
                None => distinct.push((vec![i], o, s)),
            }
        }
        distinct.sort_by_key(|d| origin_time(&d.1));
        let labels = |who: &[usize]| {
            who.iter()
                .map(|&i| rules.label(i))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if distinct.len() == 1 {
            let (who, origin, _) = distinct.remove(0);
            out.resources.push(Choice {
                resource: resource.clone(),
                origin,
                rule: labels(&who),
                settled: None,
            });
            continue;
        }
        let all_rules: Vec<usize> = distinct.iter().flat_map(|d| d.0.clone()).collect();
        let newest = distinct.last().cloned();
        match newest {
            Some((who, origin, _)) if rules.conflict == ConflictStrategy::LastWriteWins => {
                out.resources.push(Choice {
                    resource: resource.clone(),
                    origin,
                    rule: labels(&who),
                    settled: Some(format!(
                        "rules disagree ({}); the newest choice wins",
                        labels(&all_rules),
                    )),
                });
            }
            _ => {
                let Merged {
                    origin, conflicts, ..
                } = if resource.starts_with("data:") {
                    let instants: Vec<String> = distinct
                        .iter()
                        .filter_map(|d| match &d.1 {
                            Origin::Instant { at } => Some(at.clone()),
                            _ => None,
                        })
                        .collect();
                    let base = data_base(rules, &all_rules, &instants);
                    merge_data(rules, resource, &instants, &base, input.resolutions, maps)?
                } else {
                    let sides: Vec<i64> =
                        distinct.iter().filter_map(|d| d.2.map(|s| s.id)).collect();
                    merge(rules, resource, &sides, input, maps)?
                };
                let open = conflicts.iter().filter(|c| c.resolved.is_none()).count();
                out.resources.push(Choice {
                    resource: resource.clone(),
                    origin,
                    rule: labels(&all_rules),
                    settled: Some(match rules.conflict {
                        ConflictStrategy::Prompt if open > 0 => {
                            format!("merged; {open} conflict(s) to resolve")
                        }
                        ConflictStrategy::Prompt => "merged; every conflict resolved".into(),
                        _ => format!(
                            "merged; {} conflict(s) taken from the newer side",
                            conflicts.len()
                        ),
                    }),
                });
                out.conflicts.extend(conflicts);
            }
        }
    }
    Ok(out)
}

/// The common state a `data:` merge compares its instants against: the earliest
/// `from` of the disagreeing rules (`who`), or the earliest chosen instant if that is
/// earlier or no rule sets `from` — a log is one line of history, so without a start
/// the older state is the common one and the newest wins.
fn data_base(rules: &Rules, who: &[usize], instants: &[String]) -> String {
    who.iter()
        .filter_map(|&i| rules.rules[i].from.clone())
        .chain(instants.iter().cloned())
        .min()
        .unwrap_or_else(crate::catalog::now)
}

fn origin_of(s: &Snapshot) -> Origin {
    Origin::Snapshot {
        id: s.id,
        taken_at: s.taken_at.clone(),
        category: s.category.clone(),
    }
}

fn origin_time(o: &Origin) -> String {
    match o {
        Origin::Snapshot { taken_at, .. } => taken_at.clone(),
        Origin::Instant { at } => at.clone(),
        Origin::Merge { .. } => String::new(),
        Origin::DataMerge { instants, .. } => instants.last().cloned().unwrap_or_default(),
    }
}

fn default_choice(rules: &Rules, resource: &str, snaps: &[Snapshot]) -> Option<Origin> {
    if resource.starts_with("data:") {
        return Some(Origin::Instant {
            at: rules.at.clone().unwrap_or_else(crate::catalog::now),
        });
    }
    snaps
        .iter()
        .filter(|s| s.resource == resource && s.state == SnapshotState::Complete)
        .filter(|s| rules.at.as_ref().is_none_or(|t| s.taken_at <= *t))
        .max_by(|a, b| a.taken_at.cmp(&b.taken_at).then(a.id.cmp(&b.id)))
        .map(origin_of)
}

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
    let d = humantime::parse_rfc3339_weak(t)
        .map_err(|e| format!("instant {t:?}: {e}"))?
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("instant {t:?} is before 1970"))?;
    i64::try_from(d.as_micros()).map_err(|_| format!("instant {t:?} is out of range"))
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

#[cfg(test)]
mod tests {
    use weft_blockdev::store::ChunkId;
    use weft_qmp::launch::VmConfig;

    use super::*;
    use crate::model::SnapshotKind;

    fn snap(
        id: i64,
        resource: &str,
        at: &str,
        category: Option<&str>,
        parent: Option<i64>,
    ) -> Snapshot {
        Snapshot {
            id,
            env: "web".into(),
            resource: resource.into(),
            state: SnapshotState::Complete,
            kind: if resource.starts_with("disk:") {
                if parent.is_some() {
                    SnapshotKind::Incremental
                } else {
                    SnapshotKind::Full
                }
            } else {
                SnapshotKind::Config
            },
            taken_at: format!("2026-11-{at}Z"),
            finished_at: None,
            actor: "t".into(),
            category: category.map(Into::into),
            note: None,
            parent,
            size: None,
            checksum: None,
            index_name: None,
            checkpoint: None,
            bytes_read: None,
            bytes_new: None,
            bytes_marked: None,
            reason: None,
            error: None,
            config: None,
            net: None,
        }
    }

    fn config_snap(id: i64, at: &str, memory: u64, cpus: u32) -> Snapshot {
        let mut s = snap(id, "config", at, None, None);
        s.config = Some(VmConfig {
            memory_mib: memory,
            cpus,
            ..VmConfig::default()
        });
        s
    }

    struct Maps(HashMap<i64, BlockMap>);
    impl MapSource for Maps {
        fn block_map(&self, s: &Snapshot) -> Result<BlockMap, String> {
            self.0
                .get(&s.id)
                .cloned()
                .ok_or_else(|| format!("no map for {}", s.id))
        }

        /// Key-value source `/etc/app.kv`: {a=1, b=1, c=1} from the 20th,
        /// a=2 on the 21st, a=3 b=2 d=1 on the 22nd.
        fn data_items(&self, pattern: &str, at: &str) -> Result<BTreeMap<Item, Value>, String> {
            let steps: [(&str, &[(&str, &str)]); 3] = [
                ("2026-11-20T00:00:00", &[("a", "1"), ("b", "1"), ("c", "1")]),
                ("2026-11-21T00:00:00", &[("a", "2")]),
                ("2026-11-22T00:00:00", &[("a", "3"), ("b", "2"), ("d", "1")]),
            ];
            let mut state = weft_provenance::state::State::default();
            for (t, changes) in steps {
                if instant_id(&format!("{t}Z"))? > instant_id(at)? {
                    break;
                }
                let keys = state.kv.entry("/etc/app.kv".into()).or_default();
                for (k, v) in changes {
                    keys.insert(k.to_string(), v.to_string());
                }
            }
            Ok(state.items(|src| weft_provenance::item::data_source_matches(pattern, src)))
        }
    }

    fn kv_of(m: &Merged) -> Vec<(String, String)> {
        let state = weft_provenance::state::State::from_items(m.items.as_ref().unwrap());
        state.kv["/etc/app.kv"]
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn map(slots: &[u8]) -> BlockMap {
        let mut m = BlockMap::new(slots.len() as u64 * 65536, 65536);
        for (i, &n) in slots.iter().enumerate() {
            m.slots[i] = if n == 0 {
                Slot::Zero
            } else {
                Slot::Data(ChunkId([n; 32]))
            };
        }
        m
    }

    fn ids(m: &BlockMap) -> Vec<u8> {
        m.slots
            .iter()
            .map(|s| match s {
                Slot::Zero => 0,
                Slot::Data(id) => id.0[0],
            })
            .collect()
    }

    /// Disk vda: 1 (full, 20th) → 2 (21st, "nightly") → 3 (22nd, "security update");
    /// 4 is a branch from 1 (23rd). Config 10 (20th), 11 (21st), 12 (22nd).
    fn history() -> (Vec<Snapshot>, Maps) {
        let snaps = vec![
            snap(1, "disk:vda", "20T10:00:00", None, None),
            snap(2, "disk:vda", "21T10:00:00", Some("nightly"), Some(1)),
            snap(
                3,
                "disk:vda",
                "22T10:00:00",
                Some("security update"),
                Some(2),
            ),
            snap(4, "disk:vda", "23T10:00:00", Some("nightly"), Some(1)),
            config_snap(10, "20T09:00:00", 256, 1),
            config_snap(11, "21T09:00:00", 512, 1),
            config_snap(12, "22T09:00:00", 256, 2),
        ];
        let maps = Maps(HashMap::from([
            (1, map(&[1, 1, 1, 1, 0, 0])),
            (2, map(&[1, 2, 1, 1, 0, 0])),
            (3, map(&[1, 2, 3, 1, 0, 0])),
            (4, map(&[1, 1, 4, 4, 4, 0])),
        ]));
        (snaps, maps)
    }

    fn run(text: &str, res: &HashMap<(String, String), i64>) -> Result<Plan, String> {
        let (snaps, maps) = history();
        let rules = Rules::parse(text).map_err(|e| e.0)?;
        let resources = ["disk:vda".to_string(), "config".into(), "data:app".into()];
        plan(
            &rules,
            &PlanInput {
                resources: &resources,
                snapshots: &snaps,
                resolutions: res,
            },
            &maps,
        )
    }

    fn origin_id(p: &Plan, r: &str) -> Option<i64> {
        p.resources
            .iter()
            .find(|c| c.resource == r)
            .and_then(|c| match c.origin {
                Origin::Snapshot { id, .. } => Some(id),
                _ => None,
            })
    }

    #[test]
    fn rules_parse_from_toml_and_json_and_bad_ones_say_why() {
        let r = Rules::parse(
            r#"
            conflict = "prompt"
            [[rule]]
            name = "db"
            resources = ["disk:v*", "config"]
            from = "2026-11-20T00:00:00Z"
            until = "2026-11-21T23:00:00Z"
            categories = ["nightly"]
            "#,
        )
        .unwrap();
        assert_eq!(r.conflict, ConflictStrategy::Prompt);
        assert_eq!(
            r.rules[0].from.as_deref(),
            Some("2026-11-20T00:00:00.000000Z")
        );
        let j = Rules::parse(r#"{"rule": [{"resources": ["net"], "pin": 3}]}"#).unwrap();
        assert_eq!(j.rules[0].pin, Some(3));
        for (text, needle) in [
            (
                r#"[[rule]]
resources = ["disks:*"]"#,
                "resource pattern",
            ),
            (
                r#"[[rule]]
resources = ["config"]
from = "2026-11-22T00:00:00Z"
until = "2026-11-21T00:00:00Z""#,
                "is after until",
            ),
            (
                r#"[[rule]]
resources = ["config"]
pin = 3
from = "2026-11-22T00:00:00Z""#,
                "pin takes no other filter",
            ),
            (
                r#"[[rule]]
resources = ["config"]
strategy = "closest-to""#,
                "needs closest_to",
            ),
            (
                r#"[[rule]]
resources = ["config"]
colour = "red""#,
                "unknown field",
            ),
            (
                r#"[[rule]]
resources = []"#,
                "resources",
            ),
            (
                r#"[[rule]]
resources = ["config"]
until = "yesterday""#,
                "RFC 3339",
            ),
        ] {
            let e = Rules::parse(text).unwrap_err().0;
            assert!(e.contains(needle), "{text}: {e}");
        }
        assert!(Rules::parse(&"#".repeat(MAX_RULES_BYTES + 1)).is_err());
    }

    /// Refusals are one line, whatever the file holds (found by the rules_toml fuzz
    /// target: toml quotes the file over several lines, and a rule's name labels its
    /// errors).
    #[test]
    fn refusals_are_one_line() {
        for (text, needle) in [
            (
                "[[rule]]\nresources = [\"config\", \"con\0fig\"]\n",
                "at line 2, column",
            ),
            ("conflict = \n", "at line 1, column"),
            (
                "[[rule]]\nname = \"a\\nb\"\nresources = [\"config\"]\n",
                "rule 1: name",
            ),
            (
                "[[rule]]\nresources = [\"config\"]\n\"a\\nb\" = 1\n",
                "unknown field",
            ),
            (
                r#"{"rule": [{"resources": ["config"], "a\nb": 1}]}"#,
                "unknown field",
            ),
        ] {
            let e = Rules::parse(text).unwrap_err().0;
            assert!(!e.contains('\n') && !e.contains('\r'), "{text:?}: {e}");
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(matches("disk:*", "disk:vda"));
        assert!(matches("disk:v?a", "disk:vda"));
        assert!(!matches("disk:v?a", "disk:vdab"));
        assert!(matches("data:*.db", "data:/srv/app.db"));
        // Names with wildcard characters of their own (found by fuzzing).
        assert!(matches("data:*", "data:****"));
        assert!(matches("data:a*b", "data:a*xb"));
        assert!(!matches("data:a*b", "data:a*x"));
        assert!(!matches("disk:*", "data:x"));
        assert!(matches("config", "config"));
        assert!(!matches("config", "net"));
        assert!(matches("*", "net"));
        assert!(matches("data:a*b*c", "data:axxbyyc") && !matches("data:a*b*c", "data:axxbyy"));
    }

    #[test]
    fn each_resource_from_its_own_instant() {
        let p = run(
            r#"
            [[rule]]
            name = "disk from the 21st"
            resources = ["disk:*"]
            until = "2026-11-21T23:59:59Z"
            [[rule]]
            name = "config before the update"
            resources = ["config"]
            strategy = "closest-to"
            closest_to = "2026-11-21T12:00:00Z"
            [[rule]]
            resources = ["data:*"]
            until = "2026-11-20T12:00:00Z"
            "#,
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(origin_id(&p, "disk:vda"), Some(2));
        assert_eq!(origin_id(&p, "config"), Some(11));
        let data = p
            .resources
            .iter()
            .find(|c| c.resource == "data:app")
            .unwrap();
        assert_eq!(
            data.origin,
            Origin::Instant {
                at: "2026-11-20T12:00:00.000000Z".into()
            }
        );
        assert!(p.conflicts.is_empty());
        // Categories include and exclude; pins.
        let p = run(
            r#"
            [[rule]]
            resources = ["disk:vda"]
            exclude_categories = ["security update", "nightly"]
            [[rule]]
            resources = ["config"]
            pin = 10
            "#,
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(origin_id(&p, "disk:vda"), Some(1));
        assert_eq!(origin_id(&p, "config"), Some(10));
        // No rule names config: its newest at or before `at`.
        let p = run(
            r#"
            at = "2026-11-21T12:00:00Z"
            [[rule]]
            resources = ["disk:vda"]
            strategy = "earliest"
            categories = ["nightly"]
            "#,
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(origin_id(&p, "disk:vda"), Some(2));
        assert_eq!(origin_id(&p, "config"), Some(11));
        assert_eq!(
            p.resources
                .iter()
                .find(|c| c.resource == "config")
                .unwrap()
                .rule,
            "default"
        );
        // A rule that admits nothing is an error naming it.
        let e = run(
            r#"
            [[rule]]
            name = "too early"
            resources = ["disk:vda"]
            until = "2026-01-01T00:00:00Z"
            "#,
            &HashMap::new(),
        )
        .unwrap_err();
        assert!(e.contains("too early"), "{e}");
    }

    const DISAGREE: &str = r#"
        [[rule]]
        name = "security"
        resources = ["disk:vda", "config"]
        categories = ["security update"]
        [[rule]]
        name = "branch"
        resources = ["disk:vda"]
        pin = 4
        [[rule]]
        name = "old config"
        resources = ["config"]
        pin = 11
    "#;

    #[test]
    fn disagreeing_rules_last_write_wins() {
        let p = run(DISAGREE, &HashMap::new()).unwrap();
        assert_eq!(origin_id(&p, "disk:vda"), Some(4));
        // "security" names config but admits none of its snapshots (no category):
        // only "old config" chooses.
        assert_eq!(origin_id(&p, "config"), Some(11));
        let c = p
            .resources
            .iter()
            .find(|c| c.resource == "disk:vda")
            .unwrap();
        assert!(
            c.settled.as_ref().unwrap().contains("newest choice wins"),
            "{c:?}"
        );
    }

    #[test]
    fn merge_by_timestamp_merges_blocks_and_keys() {
        let text = format!("conflict = \"merge-by-timestamp\"\n{DISAGREE}");
        let p = run(&text, &HashMap::new()).unwrap();
        let disk = p
            .resources
            .iter()
            .find(|c| c.resource == "disk:vda")
            .unwrap();
        assert_eq!(
            disk.origin,
            Origin::Merge {
                sides: vec![3, 4],
                base: Some(1)
            }
        );
        // Slot 2 changed on both sides: one conflict, taken from the newer side (4).
        assert_eq!(
            p.conflicts
                .iter()
                .filter(|c| c.resource == "disk:vda")
                .collect::<Vec<_>>(),
            vec![&Conflict {
                resource: "disk:vda".into(),
                key: "slots 2..3".into(),
                sides: [3, 4],
                resolved: Some(4)
            }]
        );
        let (snaps, maps) = history();
        let rules = Rules::parse(&text).unwrap();
        let none = HashMap::new();
        let input = PlanInput {
            resources: &[],
            snapshots: &snaps,
            resolutions: &none,
        };
        let m = merge(&rules, "disk:vda", &[3, 4], &input, &maps).unwrap();
        assert_eq!(ids(m.map.as_ref().unwrap()), vec![1, 2, 4, 4, 4, 0]);
        // Config: 11 (512 MiB, 1 cpu) and 12 (256 MiB, 2 cpus) against 10 (256, 1):
        // each changed one key, no conflict.
        let m = merge(&rules, "config", &[11, 12], &input, &maps).unwrap();
        assert!(m.conflicts.is_empty(), "{:?}", m.conflicts);
        let v: VmConfig = serde_json::from_value(m.value.unwrap()).unwrap();
        assert_eq!((v.memory_mib, v.cpus), (512, 2));
    }

    #[test]
    fn prompt_leaves_conflicts_open_until_resolved() {
        let text = format!("conflict = \"prompt\"\n{DISAGREE}");
        let p = run(&text, &HashMap::new()).unwrap();
        let open: Vec<_> = p.open_conflicts().collect();
        assert_eq!(open.len(), 1);
        assert_eq!(
            (open[0].key.as_str(), open[0].sides),
            ("slots 2..3", [3, 4])
        );
        let res = HashMap::from([(("disk:vda".to_string(), "slots 2..3".to_string()), 3)]);
        let p = run(&text, &res).unwrap();
        assert_eq!(p.open_conflicts().count(), 0);
        let (snaps, maps) = history();
        let input = PlanInput {
            resources: &[],
            snapshots: &snaps,
            resolutions: &res,
        };
        let m = merge(
            &Rules::parse(&text).unwrap(),
            "disk:vda",
            &[3, 4],
            &input,
            &maps,
        )
        .unwrap();
        assert_eq!(ids(m.map.as_ref().unwrap()), vec![1, 2, 3, 4, 4, 0]);
        // A resolution naming neither side does not count.
        let res = HashMap::from([(("disk:vda".to_string(), "slots 2..3".to_string()), 99)]);
        assert_eq!(run(&text, &res).unwrap().open_conflicts().count(), 1);
    }

    #[test]
    fn data_merges_key_by_key_against_the_rules_start() {
        let two = |conflict: &str, from: &str| {
            format!(
                "conflict = \"{conflict}\"\n\
                 [[rule]]\nname = \"tuesday\"\nresources = [\"data:*\"]\n{from}until = \"2026-11-21T12:00:00Z\"\n\
                 [[rule]]\nname = \"later\"\nresources = [\"data:*\"]\nuntil = \"2026-11-22T12:00:00Z\"\n"
            )
        };
        let from = "from = \"2026-11-20T06:00:00Z\"\n";
        let data = |p: &Plan| {
            p.resources
                .iter()
                .find(|c| c.resource == "data:app")
                .cloned()
                .unwrap()
        };
        let (tue, later) = (
            instant_id("2026-11-21T12:00:00Z").unwrap(),
            instant_id("2026-11-22T12:00:00Z").unwrap(),
        );
        let resources = ["data:*".to_string()];
        let merged = |text: &str, res: &HashMap<(String, String), i64>| {
            let rules = Rules::parse(text).unwrap();
            let p = plan(
                &rules,
                &PlanInput {
                    resources: &resources,
                    snapshots: &[],
                    resolutions: res,
                },
                &history().1,
            )
            .unwrap();
            let Origin::DataMerge { instants, base } = &p.resources[0].origin else {
                panic!("not a data merge: {p:?}")
            };
            let m = merge_data(&rules, "data:*", instants, base, res, &history().1).unwrap();
            (p, m)
        };

        // Last write wins: the newest instant, nothing merged.
        let p = run(
            &two("last-write-wins", from).replace("data:*", "data:app"),
            &HashMap::new(),
        )
        .unwrap();
        assert!(
            matches!(data(&p).origin, Origin::Instant { ref at } if at.starts_with("2026-11-22T12"))
        );

        // Merge by timestamp against the state at `from`: `a` changed on both sides
        // (1 → 2, then 3) and the newer side wins; `b` and `d` changed on one side.
        let (p, m) = merged(&two("merge-by-timestamp", from), &HashMap::new());
        assert_eq!(
            p.conflicts,
            vec![Conflict {
                resource: "data:*".into(),
                key: "/etc/app.kv a".into(),
                sides: [tue, later],
                resolved: Some(later),
            }]
        );
        let kv = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            kv_of(&m),
            kv(&[("a", "3"), ("b", "2"), ("c", "1"), ("d", "1")])
        );

        // Prompt: open until resolved; the older side keeps a = 2, the rest merges.
        let (p, _) = merged(&two("prompt", from), &HashMap::new());
        assert_eq!(p.open_conflicts().count(), 1);
        let key = ("data:*".to_string(), "/etc/app.kv a".to_string());
        let (p, m) = merged(&two("prompt", from), &HashMap::from([(key.clone(), tue)]));
        assert_eq!(p.open_conflicts().count(), 0);
        assert_eq!(
            kv_of(&m),
            kv(&[("a", "2"), ("b", "2"), ("c", "1"), ("d", "1")])
        );
        // A resolution that named a newer "now" than this plan's still takes the newer.
        let (p, m) = merged(&two("prompt", from), &HashMap::from([(key, later + 5)]));
        assert_eq!(p.open_conflicts().count(), 0);
        assert_eq!(kv_of(&m)[0], ("a".to_string(), "3".to_string()));

        // Without a start the older state is the common one: the newest, no conflict.
        let (p, m) = merged(&two("prompt", ""), &HashMap::new());
        assert!(p.conflicts.is_empty());
        assert_eq!(
            kv_of(&m),
            kv(&[("a", "3"), ("b", "2"), ("c", "1"), ("d", "1")])
        );
    }
}
