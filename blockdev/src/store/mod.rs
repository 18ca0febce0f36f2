//! The chunk store (being written).
/// Errors of the chunk store.
#[derive(Debug, thiserror::Error)]
pub enum Error {}
