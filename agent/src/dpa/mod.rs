//! The host side of the DPA link (issue 5, F24): guests' data provenance agents
//! reach weftd over virtio-vsock, CID 2, port [`DPA_PORT`].
//!
//! - [`VsockHost`] gives every environment and weave weftd launches a vsock device:
//!   the kernel's vhost-vsock (one CID per VM, one AF_VSOCK listener for all) or a
//!   `vhost-device-vsock` process per VM whose guest connections arrive on the unix
//!   socket `<uds-path>_5150`, where weftd listens for that VM alone.
//! - [`DpaLink`] serves the connections: the VM is known from the listener, never
//!   from the payload; frames are read through the bounded [`proto::Decoder`];
//!   batches go to the provenance log and are acknowledged cumulatively; each VM has
//!   a rate limit and a storage quota that slow that VM only; anything malformed
//!   closes that one connection. [`DpaLink::apply`] pushes changes into a guest for
//!   the replay engine.
//!
//! `docs/provenance-protocol.md` describes the protocol, `docs/provenance-transport.md`
//! the host side for operators.

mod cids;
pub mod confine;
pub(crate) mod device;
mod vsock;

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
pub use weft_dpa::proto::{self, Applied, Entry, DPA_PORT};

pub use cids::{CidError, CidTable};
pub use confine::DeviceUser;
pub use device::{VsockHost, VsockPaths};
pub use weft_provenance::link::{ApplyError, DpaLink, EntrySink, LinkLimits, VmStats};

/// Default first id of the per-VM device users: well above the ids distributions
/// hand out (below 60000) and the usual subordinate ranges of containers, and below
/// 2^31 (some tools take ids as signed).
pub const DEFAULT_DEVICE_ID_BASE: u32 = 2_000_000_000;

/// How guests' vsock devices are provided (`[dpa] vsock` in weftd.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VsockMode {
    /// The kernel's vhost-vsock when `/dev/vhost-vsock` exists, else `vhost-user`
    /// when the `vhost-device-vsock` binary is found, else off (with a warning).
    #[default]
    Auto,
    /// The kernel's vhost-vsock (`/dev/vhost-vsock`): `vhost-vsock-pci` with a CID
    /// per VM, one AF_VSOCK listener on port 5150.
    Kernel,
    /// One `vhost-device-vsock` process per VM (`vhost-user-vsock-pci`, shared guest
    /// memory), weftd listening on its `<uds-path>_5150` socket.
    VhostUser,
    /// No vsock device: guests' DPAs cannot reach weftd.
    Off,
}

/// The DPA link's settings (`[dpa]` in weftd.toml).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpaSettings {
    /// How guests get their vsock device.
    pub vsock: VsockMode,
    /// The `vhost-device-vsock` binary (rust-vmm); a bare name is looked up in `PATH`.
    pub vhost_device_vsock: PathBuf,
    /// First guest CID handed out (at least 3). CIDs are host-wide with the kernel's
    /// vhost-vsock: several weftds (or other hypervisors) on one host need disjoint ranges.
    pub first_cid: u32,
    /// Last guest CID handed out.
    pub last_cid: u32,
    /// Entries per second one VM may send; more slows that VM (0: no limit).
    pub rate_entries: u64,
    /// Bytes per second weftd reads from one VM's connection (0: no limit).
    pub rate_bytes: u64,
    /// Seconds a new connection has to send its hello.
    pub hello_timeout_secs: u64,
    /// Seconds weftd stops reading a VM whose provenance log is at its quota before
    /// it tries again.
    pub quota_pause_secs: u64,
    /// Seconds an apply (replay into a weave) waits for the guest's answer.
    pub apply_timeout_secs: u64,
    /// Who `vhost-device-vsock` runs as: `"per-vm"` (uid and gid
    /// `device_id_base + CID`, the default), a user name or uid, or `"root"`.
    pub device_user: DeviceUser,
    /// First id of the range per-VM device users take (`device_id_base + CID`):
    /// no user or group of the host may have an id in it.
    pub device_id_base: u32,
    /// Start `vhost-device-vsock` under a seccomp filter that refuses what it never
    /// needs (ptrace, namespaces, mounts, non-unix sockets, modules, …).
    pub device_seccomp: bool,
}

impl Default for DpaSettings {
    fn default() -> Self {
        DpaSettings {
            vsock: VsockMode::Auto,
            vhost_device_vsock: "vhost-device-vsock".into(),
            first_cid: 3,
            last_cid: 65535,
            rate_entries: 50_000,
            rate_bytes: 16 << 20,
            hello_timeout_secs: 10,
            quota_pause_secs: 30,
            apply_timeout_secs: 60,
            device_user: DeviceUser::PerVm,
            device_id_base: DEFAULT_DEVICE_ID_BASE,
            device_seccomp: true,
        }
    }
}

impl DpaSettings {
    /// Checks what the types cannot: a usable CID range and non-zero timeouts.
    pub fn check(&self) -> Result<(), String> {
        if self.first_cid < 3 || self.last_cid == u32::MAX || self.first_cid > self.last_cid {
            return Err(format!(
                "dpa.first_cid..dpa.last_cid ({}..{}) must be a range within 3..{}",
                self.first_cid,
                self.last_cid,
                u32::MAX - 1
            ));
        }
        if self.device_user == DeviceUser::PerVm
            && (self.device_id_base < 65536
                || self
                    .device_id_base
                    .checked_add(self.last_cid)
                    .is_none_or(|id| id >= i32::MAX as u32))
        {
            return Err(format!(
                "dpa.device_id_base ({}) + dpa.last_cid ({}) must stay within 65536..{}: pick an id range no host user or group has",
                self.device_id_base,
                self.last_cid,
                i32::MAX
            ));
        }
        if self.hello_timeout_secs == 0 || self.apply_timeout_secs == 0 {
            return Err("dpa timeouts must be at least one second".into());
        }
        Ok(())
    }

    /// The limits the connection handler applies.
    pub fn limits(&self) -> LinkLimits {
        LinkLimits {
            entries_per_sec: self.rate_entries,
            bytes_per_sec: self.rate_bytes,
            hello_timeout: Duration::from_secs(self.hello_timeout_secs),
            quota_pause: Duration::from_secs(self.quota_pause_secs),
            apply_timeout: Duration::from_secs(self.apply_timeout_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_settings_give_the_links_default_limits() {
        assert_eq!(DpaSettings::default().limits(), LinkLimits::default());
    }

    #[test]
    fn settings_parse_and_check() {
        let s: DpaSettings = toml::from_str("vsock = \"vhost-user\"\nfirst_cid = 100\n").unwrap();
        assert_eq!(s.vsock, VsockMode::VhostUser);
        assert_eq!(s.first_cid, 100);
        assert!(s.check().is_ok());
        assert!(toml::from_str::<DpaSettings>("vsock = \"vmci\"").is_err());
        for bad in [
            "first_cid = 2",
            "first_cid = 9\nlast_cid = 8",
            "last_cid = 4294967295",
        ] {
            let s: DpaSettings = toml::from_str(bad).unwrap();
            assert!(s.check().is_err(), "{bad}");
        }
        assert!(DpaSettings::default().check().is_ok());
    }
}
