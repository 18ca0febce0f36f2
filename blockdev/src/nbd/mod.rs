//! The NBD client (being written).
/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum Error {}
