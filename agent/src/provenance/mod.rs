//! weftd's side of provenance. The log, the replay engine and base extraction are the
//! `weft-provenance` crate; here they meet the catalog, the API and the DPA link.
//!
//! - [`service`]: the API's queries over the log, weave branches, periodic retention.
//! - [`replay`]: `weft replay` and the state reconciliation of composed weaves.
//! - [`output`]: a replayed state written out as files in a confined directory.

pub mod output;
pub mod replay;
pub mod service;
