//! Feeds a composition's rules file (TOML, or JSON when it starts with `{`), as
//! `weft compose create --rules FILE` and `POST /v1/compositions` take it, to
//! `weft_api::composition::Rules::parse` and then to `weft_compose::plan` over a fixed
//! history (a disk with a branch, config snapshots, one pending and one failed
//! snapshot, a `data:` source), as weftd does when it shows or applies a composition.
//!
//! Properties: a refusal is one line; accepted rules are checked already (`checked`
//! gives them back unchanged), and serialize to TOML and to JSON, each of which parses
//! back to the same rules; a plan is an error of one line or has at most one line per
//! resource of the environment, each from a complete snapshot of that resource (or
//! merged from such), with conflicts only for merged resources and none under
//! `last-write-wins`.
#![no_main]

use std::collections::{BTreeMap, BTreeSet, HashMap};

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use weft_api::composition::{ConflictStrategy, Origin, Rules};
use weft_api::snapshot::{Snapshot, SnapshotKind, SnapshotState};
use weft_compose::{instant_id, plan, MapSource, PlanInput};
use weft_provenance::item::{data_source_matches, Item};
use weft_provenance::state::State;
use weft_blockdev::store::{BlockMap, ChunkId, Slot};
use weft_api::vm::VmConfig;

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
        kind: match (resource.starts_with("disk:"), parent) {
            (true, None) => SnapshotKind::Full,
            (true, Some(_)) => SnapshotKind::Incremental,
            (false, _) if resource == "net" => SnapshotKind::Net,
            (false, _) => SnapshotKind::Config,
        },
        taken_at: format!("2026-11-{at}.000000Z"),
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

fn config_snap(id: i64, at: &str, memory_mib: u64, cpus: u32) -> Snapshot {
    let mut s = snap(id, "config", at, None, None);
    s.config = Some(VmConfig {
        memory_mib,
        cpus,
        ..VmConfig::default()
    });
    s
}

/// Disk vda: 1 (full, 20th) → 2 (21st, "nightly") → 3 (22nd, "security update"); 4
/// branches from 1 (23rd); 5 is pending, 6 failed. Disk vdb: 7 (a different size).
/// Config: 10 (20th), 11 (21st), 12 (22nd).
fn history() -> Vec<Snapshot> {
    let mut pending = snap(5, "disk:vda", "24T10:00:00", Some("nightly"), Some(4));
    pending.state = SnapshotState::Pending;
    let mut failed = snap(6, "disk:vda", "25T10:00:00", None, Some(4));
    failed.state = SnapshotState::Failed;
    vec![
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
        pending,
        failed,
        snap(7, "disk:vdb", "21T12:00:00", None, None),
        config_snap(10, "20T09:00:00", 256, 1),
        config_snap(11, "21T09:00:00", 512, 1),
        config_snap(12, "22T09:00:00", 256, 2),
    ]
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

struct Maps(HashMap<i64, BlockMap>);

impl MapSource for Maps {
    fn block_map(&self, s: &Snapshot) -> Result<BlockMap, String> {
        self.0
            .get(&s.id)
            .cloned()
            .ok_or_else(|| format!("no block map for snapshot {}", s.id))
    }

    /// Key-value source `/etc/app.kv`: {a=1, b=1, c=1} from the 20th, a=2 on the
    /// 21st, a=3 b=2 d=1 on the 22nd.
    fn data_items(&self, pattern: &str, at: &str) -> Result<BTreeMap<Item, Value>, String> {
        let steps: [(&str, &[(&str, &str)]); 3] = [
            (
                "2026-11-20T00:00:00Z",
                &[("a", "1"), ("b", "1"), ("c", "1")],
            ),
            ("2026-11-21T00:00:00Z", &[("a", "2")]),
            (
                "2026-11-22T00:00:00Z",
                &[("a", "3"), ("b", "2"), ("d", "1")],
            ),
        ];
        let mut state = State::default();
        let until = instant_id(at)?;
        for (t, changes) in steps {
            if instant_id(t)? > until {
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

fn one_line(s: &str) -> bool {
    !s.contains('\n') && !s.contains('\r')
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let rules = match Rules::parse(text) {
        Ok(r) => r,
        Err(e) => {
            assert!(one_line(&e.0), "a refusal of more than one line: {:?}", e.0);
            return;
        }
    };
    assert_eq!(
        rules.clone().checked().as_ref(),
        Ok(&rules),
        "checking accepted rules again changes them"
    );
    let toml_text = toml::to_string(&rules).expect("accepted rules serialize to TOML");
    match Rules::parse(&toml_text) {
        Ok(again) => assert_eq!(again, rules, "TOML round trip:\n{toml_text}"),
        Err(e) => panic!("accepted rules written as TOML are refused: {e}\n{toml_text}"),
    }
    let json_text = serde_json::to_string(&rules).expect("accepted rules serialize to JSON");
    match Rules::parse(&json_text) {
        Ok(again) => assert_eq!(again, rules, "JSON round trip: {json_text}"),
        Err(e) => panic!("accepted rules written as JSON are refused: {e}\n{json_text}"),
    }

    let snaps = history();
    let maps = Maps(HashMap::from([
        (1, map(&[1, 1, 1, 1, 0, 0])),
        (2, map(&[1, 2, 1, 1, 0, 0])),
        (3, map(&[1, 2, 3, 1, 0, 0])),
        (4, map(&[1, 1, 4, 4, 4, 0])),
        (7, map(&[7, 7])),
    ]));
    let resources: Vec<String> = ["disk:vda", "disk:vdb", "config", "net", "data:/etc/app.kv"]
        .map(String::from)
        .to_vec();
    let resolutions = HashMap::new();
    let input = PlanInput {
        resources: &resources,
        snapshots: &snaps,
        resolutions: &resolutions,
        now: "2026-12-01T00:00:00.000000Z",
    };
    let p = match plan(&rules, &input, &maps) {
        Ok(p) => p,
        Err(e) => {
            assert!(one_line(&e), "a plan error of more than one line: {e:?}");
            return;
        }
    };
    let usable = |id: i64, resource: &str| {
        snaps
            .iter()
            .any(|s| s.id == id && s.resource == resource && s.state == SnapshotState::Complete)
    };
    let mut seen = BTreeSet::new();
    let mut merged = BTreeSet::new();
    for c in &p.resources {
        assert!(
            resources.contains(&c.resource),
            "plan names {:?}",
            c.resource
        );
        assert!(
            seen.insert(c.resource.clone()),
            "{} twice in the plan",
            c.resource
        );
        assert!(one_line(&c.rule), "rule label {:?}", c.rule);
        match &c.origin {
            Origin::Snapshot { id, .. } => assert!(
                usable(*id, &c.resource),
                "{} from snapshot {id}, not a complete snapshot of it",
                c.resource
            ),
            Origin::Merge { sides, base } => {
                assert!(sides.len() >= 2, "a merge of {sides:?}");
                for id in sides.iter().chain(base) {
                    assert!(
                        usable(*id, &c.resource),
                        "{} merges snapshot {id}",
                        c.resource
                    );
                }
                merged.insert(c.resource.clone());
            }
            Origin::Instant { at } => {
                assert!(
                    c.resource.starts_with("data:"),
                    "{} at an instant",
                    c.resource
                );
                assert!(instant_id(at).is_ok(), "instant {at:?}");
            }
            Origin::DataMerge { instants, .. } => {
                assert!(
                    c.resource.starts_with("data:"),
                    "{} data-merged",
                    c.resource
                );
                assert!(instants.len() >= 2, "a data merge of {instants:?}");
                merged.insert(c.resource.clone());
            }
        }
    }
    for k in &p.conflicts {
        assert!(
            merged.contains(&k.resource),
            "a conflict on {} which was not merged",
            k.resource
        );
    }
    if rules.conflict == ConflictStrategy::LastWriteWins {
        assert!(p.conflicts.is_empty(), "conflicts under last-write-wins");
    }
});
