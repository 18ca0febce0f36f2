//! The weft QEMU test rig.
//!
//! It owns the test guest (a Debian cloud kernel and a busybox initramfs, built from
//! Debian packages by `assets/build-guest.sh` and cached under `target/guest-assets/`),
//! boots it under QEMU through [`weft_qmp::launch`], and gives tests small helpers that
//! wait on conditions with a deadline instead of sleeping.
//!
//! Tests that start QEMU are named `qemu_*`; `.config/nextest.toml` runs them one at a time.

mod assets;
mod disk;
mod guest;
mod serial;

pub use assets::{guest_assets, GuestAssets};
pub use disk::{make_data_disk, read_ext4_file, xorshift_fill};
pub use guest::{Guest, GuestOpts, DATA_DISK_NAME};
pub use serial::SerialLog;
// The rig's lookups, waits and reports, where the end-to-end tests have always found them.
pub use weft_rig::{
    bin_path, confined_dirs_toml, find_bin, procs, target_dir, wait_until, wait_until_diagnosed,
    Diagnostics, LogOnDrop, Weftd, WeftdBuilder,
};
