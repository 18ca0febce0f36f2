//! Which snapshots a retention rule keeps (`weft snapshot prune`, policies).
//!
//! Like restic's `forget`: the newest `last` snapshots are kept, and for each period
//! (hour, day, ISO week, month) the newest snapshot of each of the newest N periods that
//! have one. The newest snapshot of a resource is always kept: it carries the
//! checkpoint the next incremental starts from. Every block map is complete on its own,
//! so removing any other snapshot never breaks the ones that remain.

use std::collections::HashSet;
use std::time::UNIX_EPOCH;

pub use weft_api::snapshot::Keep;

/// Period keys of an RFC 3339 UTC time: hour, day, ISO week, month.
fn periods(taken_at: &str) -> Option<[String; 4]> {
    let t = weft_api::resource::Timestamp::parse(taken_at).ok()?;
    let secs = t.system_time().duration_since(UNIX_EPOCH).ok()?.as_secs();
    let days = secs / 86_400;
    // 1970-01-01 was a Thursday: shifting by 3 days makes weeks start on Monday.
    let week = (days + 3) / 7;
    Some([
        taken_at.get(..13)?.to_string(),
        taken_at.get(..10)?.to_string(),
        format!("w{week}"),
        taken_at.get(..7)?.to_string(),
    ])
}

/// The ids to keep among `snapshots` (`(id, taken_at)` of one resource, any order).
pub fn keep(snapshots: &[(i64, String)], rule: &Keep) -> HashSet<i64> {
    let mut newest_first: Vec<&(i64, String)> = snapshots.iter().collect();
    newest_first.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let mut kept = HashSet::new();
    if let Some((id, _)) = newest_first.first() {
        kept.insert(*id);
    }
    for (id, _) in newest_first.iter().take(rule.last as usize) {
        kept.insert(*id);
    }
    for (slot, count) in [rule.hourly, rule.daily, rule.weekly, rule.monthly]
        .into_iter()
        .enumerate()
    {
        let mut seen = HashSet::new();
        for (id, taken_at) in &newest_first {
            if seen.len() >= count as usize {
                break;
            }
            // An unparsable time is never pruned by a period rule's mistake: keep it.
            let Some(keys) = periods(taken_at) else {
                kept.insert(*id);
                continue;
            };
            if seen.insert(keys[slot].clone()) {
                kept.insert(*id);
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snaps(times: &[&str]) -> Vec<(i64, String)> {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| (i as i64 + 1, t.to_string()))
            .collect()
    }

    fn sorted(set: HashSet<i64>) -> Vec<i64> {
        let mut v: Vec<i64> = set.into_iter().collect();
        v.sort();
        v
    }

    #[test]
    fn newest_is_always_kept() {
        let s = snaps(&["2026-11-20T10:00:00Z", "2026-11-21T10:00:00Z"]);
        assert_eq!(sorted(keep(&s, &Keep::default())), [2]);
        assert!(keep(&[], &Keep::default()).is_empty());
    }

    #[test]
    fn last_and_daily() {
        let s = snaps(&[
            "2026-11-20T09:00:00Z",
            "2026-11-20T18:00:00Z",
            "2026-11-21T09:00:00Z",
            "2026-11-21T18:00:00Z",
            "2026-11-22T09:00:00Z",
        ]);
        let rule = Keep {
            last: 1,
            daily: 2,
            ..Keep::default()
        };
        // Newest; newest of 22nd (5) and of 21st (4).
        assert_eq!(sorted(keep(&s, &rule)), [4, 5]);
        let rule = Keep {
            daily: 3,
            ..Keep::default()
        };
        assert_eq!(sorted(keep(&s, &rule)), [2, 4, 5]);
    }

    #[test]
    fn hourly_weekly_monthly() {
        let s = snaps(&[
            "2026-10-31T23:30:00Z", // Saturday, October
            "2026-11-01T00:10:00Z", // Sunday: same ISO week, new month
            "2026-11-02T00:10:00Z", // Monday: new ISO week
            "2026-11-02T00:40:00Z",
        ]);
        let weekly = Keep {
            weekly: 5,
            ..Keep::default()
        };
        assert_eq!(sorted(keep(&s, &weekly)), [2, 4]);
        let monthly = Keep {
            monthly: 5,
            ..Keep::default()
        };
        assert_eq!(sorted(keep(&s, &monthly)), [1, 4]);
        let hourly = Keep {
            hourly: 2,
            ..Keep::default()
        };
        assert_eq!(sorted(keep(&s, &hourly)), [2, 4]);
    }
}
