//! Temporal compositions (F11, F12): rules that pick each resource of an environment
//! from a point in its history, the plan they give, and the three-way merges of
//! disks (block maps), configurations (JSON) and application state (items) when
//! rules disagree.
//!
//! This crate is pure: rules are parsed and checked (`weft_api::composition`), and
//! [`plan`] computes, from the environment's resources and snapshots (and the block
//! maps of disk snapshots and the application state at an instant, read through a
//! [`MapSource`]), which snapshot each resource comes from, which rule chose it, and
//! what conflicts there are; [`merge`] and [`merge_data`] give a merged resource.
//! Nothing is written and no clock is read: "now" is part of the [`PlanInput`]. The
//! rule schema is documented in `docs/compositions.md`.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use weft_api::snapshot::Snapshot;
use weft_blockdev::store::BlockMap;
use weft_provenance::item::Item;

mod merge;
mod plan;

pub use merge::{instant_id, merge, merge_data, Merged};
pub use plan::plan;

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
    /// The instant the plan is made (RFC 3339): a `data:` resource no rule bounds is
    /// taken as of then.
    pub now: &'a str,
}

#[cfg(test)]
mod tests;
