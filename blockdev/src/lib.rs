//! Block-device plumbing for weft: the NBD client that pulls backups out of QEMU
//! ([`nbd`]), the deduplicating, compressed, optionally encrypted chunk store
//! ([`store`]), snapshot block maps, the layered image reader ([`layers`]), the private
//! copy-on-write layer ([`cow`]), the qcow2 header reader ([`qcow2`]) and the `weft-blk`
//! vhost-user-blk backend ([`blk`]).
//!
//! Each module has its own error type (carrying path, offset and operation);
//! [`Error`] wraps them for callers that handle both.

pub mod blk;
pub mod cow;
pub mod layers;
pub mod nbd;
pub mod par;
pub mod pull;
pub mod qcow2;
pub mod restore;
pub mod store;

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the NBD client.
    #[error(transparent)]
    Nbd(#[from] nbd::Error),
    /// From the chunk store.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// From a pull of an export into the store.
    #[error(transparent)]
    Pull(#[from] pull::Error),
    /// From a restore out of the store.
    #[error(transparent)]
    Restore(#[from] restore::Error),
}
