//! Builds the test guest if needed and prints its asset directory
//! (holding `vmlinuz`, `initramfs.img` and `manifest.txt`) on stdout.
//!
//! Used by `make assets` and `scripts/demo.sh`; honours the same environment as the tests
//! (`WEFT_GUEST_ASSETS`, `WEFT_GUEST_KERNEL_PKG`, `WEFT_GUEST_MODULES`, `CARGO_TARGET_DIR`).

use std::process::ExitCode;

fn main() -> ExitCode {
    match weft_integration::guest_assets() {
        Ok(assets) => {
            println!("{}", assets.dir.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("weft-guest-assets: {err:#}");
            ExitCode::FAILURE
        }
    }
}
