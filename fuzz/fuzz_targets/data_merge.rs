//! Builds three application states out of guest-like log entries (as a guest's DPA
//! would send them: any source, table, key and value text), then checks what
//! compositions do with them: a state split into items and put back together is the
//! same state, and a key-level three-way merge takes each item from the side the rules
//! say, with a conflict exactly where all three differ. Nothing may panic; conflict
//! keys stay bounded.
//!
//! Input: lines; a line is one entry — byte 0: data type, byte 1: operation (0xff
//! instead ends the current state), then source, collection, key and new value
//! separated by tabs.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use weft_api::composition::{Rules, MAX_CONFLICTS};
use weft_api::snapshot::Snapshot;
use weft_compose::{instant_id, merge_data, MapSource};
use weft_provenance::item::{data_source_matches, Item, MAX_LABEL};
use weft_provenance::state::State;
use weft_blockdev::store::BlockMap;
use weft_dpa::{DataType, Entry, Operation};

struct States(Vec<State>);

impl MapSource for States {
    fn block_map(&self, _: &Snapshot) -> Result<BlockMap, String> {
        Err("no disks".into())
    }

    fn data_items(&self, pattern: &str, at: &str) -> Result<BTreeMap<Item, Value>, String> {
        let i = usize::try_from(instant_id(at)? / 1_000_000).map_err(|e| e.to_string())?;
        let s = self.0.get(i).ok_or("no such state")?;
        Ok(s.items(|src| data_source_matches(pattern, src)))
    }
}

fn at(i: usize) -> String {
    format!("1970-01-01T00:00:{i:02}.000000Z")
}

fuzz_target!(|data: &[u8]| {
    let mut states = Vec::new();
    let mut cur = State::default();
    for (seq, line) in data.split(|&b| b == b'\n').enumerate() {
        if states.len() == 3 {
            break;
        }
        let [t, o, rest @ ..] = line else { continue };
        if *o == 0xff {
            states.push(cur.clone());
            continue;
        }
        let mut f = rest
            .split(|&b| b == b'\t')
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let (source, collection, key, new) = (
            f.next().unwrap_or_default(),
            f.next().unwrap_or_default(),
            f.next().unwrap_or_default(),
            f.next(),
        );
        let e = Entry {
            seq: seq as u64 + 1,
            guest_time_us: seq as i64,
            data_type: [DataType::Sqlite, DataType::Json, DataType::Kv][usize::from(*t % 3)],
            op: [
                Operation::Insert,
                Operation::Update,
                Operation::Delete,
                Operation::Schema,
            ][usize::from(*o % 4)],
            source,
            collection,
            key,
            old: None,
            new,
            tx: None,
        };
        let _ = cur.apply(&e);
    }
    while states.len() < 3 {
        states.push(cur.clone());
    }
    for s in &states {
        let again = State::from_items(&s.items(|_| true));
        assert!(s.changes_to(&again).is_empty(), "items lost a change");
    }
    let items: Vec<BTreeMap<Item, Value>> = states.iter().map(|s| s.items(|_| true)).collect();
    let states = States(states);
    let sides = [at(1), at(2)];
    for (conflict, newer_wins) in [("merge-by-timestamp", true), ("prompt", false)] {
        let rules = Rules::parse(&format!("conflict = \"{conflict}\"")).unwrap();
        let m = merge_data(
            &rules,
            "data:*",
            &sides,
            &at(0),
            &Default::default(),
            &states,
        )
        .expect("states merge");
        let merged = m.items.expect("merged items");
        let (base, a, b) = (&items[0], &items[1], &items[2]);
        let keys: std::collections::BTreeSet<&Item> =
            base.keys().chain(a.keys()).chain(b.keys()).collect();
        let mut clashes = 0;
        for k in keys {
            let (x, y, z) = (base.get(k), a.get(k), b.get(k));
            let clash = y != z && x != y && x != z;
            let want = if y == z || x == z || (clash && !newer_wins) {
                y
            } else {
                z
            };
            assert_eq!(merged.get(k), want, "item {k:?}");
            clashes += usize::from(clash);
        }
        assert_eq!(m.conflicts.len(), clashes.min(MAX_CONFLICTS));
        assert!(m.conflicts.iter().all(|c| c.key.len() <= MAX_LABEL));
        let _ = State::from_items(&merged);
    }
});
