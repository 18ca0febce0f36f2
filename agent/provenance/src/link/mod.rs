//! The DPA link: the host's side of the guest's provenance protocol. Each VM's
//! connection (its hello, its batches, their sequence numbers) is checked and its
//! entries appended to the provenance log, within per-VM rate limits, with pauses
//! while a VM is at its quota; [`DpaLink::apply`] pushes changes into a guest for a
//! replay. Where the connections come from (vsock devices, listeners) is weftd's.

mod conn;
pub mod rate;

use std::time::Duration;

use weft_dpa::proto::Entry;

use crate::log::{ProvenanceError, ProvenanceLog};

pub use conn::{ApplyError, DpaLink, VmStats};

/// Where the entries of a VM go: the provenance log. A trait so the link can be
/// tested on its own; [`ProvenanceLog`] is the real one.
pub trait EntrySink: Send + Sync + 'static {
    /// Appends `entries` of `vm`, durable on return; returns the VM's highest durable
    /// seq. Entries at or below it are skipped, a first new seq beyond it + 1 is
    /// [`ProvenanceError::Gap`], and a VM over its storage quota gets
    /// [`ProvenanceError::Quota`].
    fn append(
        &self,
        vm: &str,
        host_time_us: i64,
        entries: &[Entry],
    ) -> Result<u64, ProvenanceError>;
    /// The VM's highest durable seq (0 for none).
    fn last_seq(&self, vm: &str) -> Result<u64, ProvenanceError>;
}

impl EntrySink for ProvenanceLog {
    fn append(
        &self,
        vm: &str,
        host_time_us: i64,
        entries: &[Entry],
    ) -> Result<u64, ProvenanceError> {
        ProvenanceLog::append(self, vm, host_time_us, entries)
    }

    fn last_seq(&self, vm: &str) -> Result<u64, ProvenanceError> {
        ProvenanceLog::last_seq(self, vm)
    }
}

/// Per-VM limits and timeouts of [`DpaLink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkLimits {
    /// Entries per second per VM (0: no limit).
    pub entries_per_sec: u64,
    /// Bytes per second read from a VM (0: no limit).
    pub bytes_per_sec: u64,
    /// How long a new connection has to say hello.
    pub hello_timeout: Duration,
    /// How long reading a VM pauses when its log is at its quota.
    pub quota_pause: Duration,
    /// How long [`DpaLink::apply`] waits for the guest.
    pub apply_timeout: Duration,
}

impl Default for LinkLimits {
    /// The limits of a default `[dpa]` section in weftd.toml.
    fn default() -> Self {
        LinkLimits {
            entries_per_sec: 50_000,
            bytes_per_sec: 16 << 20,
            hello_timeout: Duration::from_secs(10),
            quota_pause: Duration::from_secs(30),
            apply_timeout: Duration::from_secs(60),
        }
    }
}
