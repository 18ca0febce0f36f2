//! What QEMU runs and how it is started: the VM configuration ([`VmConfig`], plain
//! serde data that callers store to build the same VM again later), its checks
//! ([`Validate`]), the command line built from it ([`command_line`]), and, from
//! [`crate::process`], [`spawn`], which starts QEMU with it, waits for its QMP socket
//! and supervises the process.

mod command_line;
mod config;
mod validate;

pub use command_line::{command_line, sandbox_args, storage_daemon_command_line};
pub use config::{
    detect_format, kvm_probe, kvm_usable, resolve_accel, Accel, BackingImage, DiskConfig,
    DiskFormat, LaunchPaths, NicConfig, SpawnOptions, VhostUserDisk, VmConfig, VsockDevice,
    BALLOON_ID, MAX_CPUS, MIN_MEMORY_MIB, VSOCK_ID,
};
pub use validate::{
    valid_device_id, valid_ifname, valid_mac, valid_run_as, Validate, MAX_BACKING_CHAIN,
};
