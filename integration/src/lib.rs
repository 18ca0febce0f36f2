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
mod paths;
mod serial;
mod wait;

pub use assets::{guest_assets, GuestAssets};
pub use disk::{make_data_disk, read_ext4_file, xorshift_fill};
pub use guest::{Guest, GuestOpts, DATA_DISK_NAME};
pub use paths::{bin_path, confined_dirs_toml, target_dir};
pub use serial::SerialLog;
pub use wait::wait_until;
