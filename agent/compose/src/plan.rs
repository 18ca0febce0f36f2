//! The plan: for each resource, the snapshot (or, for `data:`, the instant) the rules
//! choose, the rule that chose it, and how disagreeing rules are settled.

use weft_api::composition::{
    matches, Choice, ConflictStrategy, Origin, Plan, Rule, Rules, Strategy,
};
use weft_api::snapshot::{Snapshot, SnapshotState};

use crate::merge::{merge, merge_data, Merged};
use crate::{MapSource, PlanInput};

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
    weft_api::resource::Timestamp::parse(t)
        .ok()
        .and_then(|ts| ts.micros().ok())
        .map(i128::from)
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
                let at = data_instant(rule).unwrap_or_else(|| input.now.to_string());
                picks.push((i, Origin::Instant { at }, None));
            } else if let Some(s) = choose(rule, admitted(rule, resource, input.snapshots)) {
                picks.push((i, origin_of(s), Some(s)));
            }
        }
        if !named {
            let default = default_choice(rules, resource, input.snapshots, input.now);
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
                    let base = data_base(rules, &all_rules, &instants, input.now);
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
fn data_base(rules: &Rules, who: &[usize], instants: &[String], now: &str) -> String {
    who.iter()
        .filter_map(|&i| rules.rules[i].from.clone())
        .chain(instants.iter().cloned())
        .min()
        .unwrap_or_else(|| now.to_string())
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

fn default_choice(rules: &Rules, resource: &str, snaps: &[Snapshot], now: &str) -> Option<Origin> {
    if resource.starts_with("data:") {
        return Some(Origin::Instant {
            at: rules.at.clone().unwrap_or_else(|| now.to_string()),
        });
    }
    snaps
        .iter()
        .filter(|s| s.resource == resource && s.state == SnapshotState::Complete)
        .filter(|s| rules.at.as_ref().is_none_or(|t| s.taken_at <= *t))
        .max_by(|a, b| a.taken_at.cmp(&b.taken_at).then(a.id.cmp(&b.id)))
        .map(origin_of)
}
