//! `weft-blk`: the vhost-user-blk backend that serves composed layers (F13).
//!
//! - [`BlockDevice`]: what a served disk can do (read, write, flush, discard,
//!   write-zeroes, id); [`disk::LayeredDisk`] is the real one: chunk-store layers
//!   flattened into one block map ([`crate::layers`]), a private copy-on-write layer
//!   ([`crate::cow`]) and a read trace ([`trace`]).
//! - [`request`]: parsing and executing virtio-blk requests from descriptor chains,
//!   generic over guest memory, so it is unit-tested with rust-vmm's mock queues.
//! - [`backend`]: the `vhost-user-backend` glue (features, config space, queues,
//!   EVENT_IDX) and the serve loop that outlives QEMU reconnecting.
//! - [`spec`]: the JSON disk spec weftd writes for each served disk.
//! - [`seccomp`]: the system calls weft-blk may make once it serves a guest.

pub mod backend;
pub mod disk;
pub mod request;
pub mod seccomp;
pub mod spec;
pub mod trace;

/// Why a device operation failed (reported to the guest as an I/O error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The disk is served read-only.
    #[error("the disk is read-only")]
    ReadOnly,
    /// A layer failed (store, write layer).
    #[error("{0}")]
    Io(String),
}

/// A disk as the virtio-blk device sees it. Offsets and lengths are in bytes and
/// already checked against [`BlockDevice::size`] by the caller.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError>;
    /// Makes the range read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError>;
    /// The guest no longer needs the range.
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), DeviceError>;
    /// The device id (GET_ID, at most 20 bytes are sent).
    fn id(&self) -> &str;
}
