//! The planner and the merges over a small history: snapshots of two disks, the
//! configuration and a key-value source.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use weft_api::composition::{
    matches, Conflict, ConflictStrategy, Origin, Plan, Rules, MAX_RULES_BYTES,
};
use weft_api::snapshot::{Snapshot, SnapshotKind, SnapshotState};
use weft_api::vm::VmConfig;
use weft_blockdev::store::{BlockMap, ChunkId, Slot};
use weft_provenance::item::{data_source_matches, Item};
use weft_provenance::state::State;

use crate::*;

/// The instant the plans are made: after every snapshot of the history.
const NOW: &str = "2026-12-01T00:00:00Z";

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
        let mut state = State::default();
        for (t, changes) in steps {
            if instant_id(&format!("{t}Z"))? > instant_id(at)? {
                break;
            }
            let keys = state.kv.entry("/etc/app.kv".into()).or_default();
            for (k, v) in changes {
                keys.insert(k.to_string(), v.to_string());
            }
        }
        Ok(state.items(|src| data_source_matches(pattern, src)))
    }
}

fn kv_of(m: &Merged) -> Vec<(String, String)> {
    let state = State::from_items(m.items.as_ref().unwrap());
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
            now: NOW,
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
        now: NOW,
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
        now: NOW,
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
                now: NOW,
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
