//! weft's provenance: the host's per-VM log of the semantic changes a guest's DPA
//! reports, the replay engine that folds it into application state, and the state a
//! disk snapshot holds, read straight out of the chunk store.
//!
//! - [`log`]: the append-only, indexed, compressed log ([`log::ProvenanceLog`]), with
//!   quotas, retention and weave lineage.
//! - [`state`]: [`state::State`], rebuilt from a log ([`state::rebuild`]), the changes
//!   between two states, and a state read back page by page ([`state::Pages`]).
//! - [`item`]: a state as items, what compositions merge key by key.
//! - [`spill`]: a replay larger than memory, its rows and keys in a scratch database.
//! - [`base`]: the application state inside a disk snapshot's ext4 file system.
//! - [`sql`]: the one place a guest's `CREATE TABLE` text or database file reaches
//!   SQLite on the host.
//! - [`view`]: a record as the API shows it.
//! - `test_util` (feature `test-util`): log and entry fixtures for tests here and in weftd.
//!
//! Everything here comes from a guest and is bounded and checked; nothing here knows
//! weftd (its catalog, environments, HTTP or confined output directories). Writing a
//! state out as files is the daemon's: it reads [`state::Pages`].

pub mod base;
pub mod error;
pub mod item;
pub mod link;
pub mod log;
pub mod spill;
pub mod sql;
pub mod state;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod view;
