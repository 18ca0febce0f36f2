//! Named points where end-to-end tests stop a real weftd, to check what recovery does
//! with what a crash at that point leaves.
//!
//! - `WEFTD_CRASH_AT=<point>`: weftd sends itself SIGKILL when it reaches `<point>`
//!   (exactly what `kill -9` does; nothing is flushed or cleaned).
//! - `WEFTD_HOLD_AT=<point>:<file>`: at `<point>` weftd creates `<file>.reached` and
//!   waits while `<file>` exists (the test removes it to let the operation go on).
//!
//! Both variables are read from weftd's own environment, which only whoever starts
//! weftd (root, systemd) controls; without them a point costs one lookup.

use std::path::PathBuf;
use std::time::Duration;

/// The variable naming the point at which weftd kills itself.
pub const CRASH_VAR: &str = "WEFTD_CRASH_AT";
/// The variable naming the point (and file) at which weftd waits.
pub const HOLD_VAR: &str = "WEFTD_HOLD_AT";

/// Crashes or waits at `point` if a test asked for it; otherwise returns at once.
pub async fn point(point: &str) {
    if std::env::var_os(CRASH_VAR).is_some_and(|v| v == point) {
        tracing::warn!(point, "{CRASH_VAR}: killing weftd");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    let Some(hold) = std::env::var(HOLD_VAR).ok() else {
        return;
    };
    let Some(file) = hold
        .split_once(':')
        .filter(|(p, _)| *p == point)
        .map(|(_, f)| PathBuf::from(f))
    else {
        return;
    };
    tracing::warn!(point, file = %file.display(), "{HOLD_VAR}: waiting while the file exists");
    let mut reached = file.clone().into_os_string();
    reached.push(".reached");
    let _ = std::fs::write(&reached, b"");
    while file.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
