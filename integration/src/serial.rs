//! The guest's serial console, as the file QEMU writes it to.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;

use weft_rig::{wait_until, Diagnostics};

/// Marker the guest's init prints when setup failed (then it powers off).
pub const ERROR_MARKER: &str = "WEFT-ERROR";
/// Lines that mean the guest kernel is gone.
const PANIC_MARKERS: &[&str] = &["Kernel panic", "end Kernel panic"];
/// What the DPA workload prints when it stops on an error.
const WORKLOAD_FAILED: &str = "weft-dpa-workload: failed";

/// The serial console log of a guest (QEMU's `-serial file:`/chardev log file).
#[derive(Debug, Clone)]
pub struct SerialLog(PathBuf);

impl SerialLog {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Everything the guest wrote so far (lossy UTF-8; empty if the file does not exist yet).
    pub fn contents(&self) -> String {
        std::fs::read(&self.0)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until `needle` appears in the log.
    ///
    /// Fails at once when the guest reports `WEFT-ERROR: …`, the DPA workload fails, or
    /// the kernel panics
    /// (unless that is what `needle` asks for), and after `timeout`.
    pub async fn wait_for(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        self.wait_for_diagnosed(needle, timeout, &Diagnostics::new())
            .await
    }

    /// [`SerialLog::wait_for`]; when it fails, the error carries the log's size and `diag`'s
    /// report (the QEMU and helper processes, sockets and logs a test registered) as they
    /// are at that moment.
    pub async fn wait_for_diagnosed(
        &self,
        needle: &str,
        timeout: Duration,
        diag: &Diagnostics,
    ) -> anyhow::Result<()> {
        let what = format!(
            "{needle:?} on the guest serial console ({})",
            self.0.display()
        );
        wait_until(timeout, &what, || async {
            let text = tokio::fs::read(&self.0).await.unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            if text.contains(needle) {
                return Ok(Some(()));
            }
            if let Some(line) = failure_line(&text) {
                bail!("guest failed: {line}");
            }
            Ok(None)
        })
        .await
        .map_err(|e| {
            let size = match std::fs::metadata(&self.0) {
                Ok(m) => format!("{} bytes", m.len()),
                Err(err) => format!("missing ({err})"),
            };
            let report = diag.report(&format!(
                "stalled: {e:#}\n---- guest serial log {}: {size}",
                self.0.display()
            ));
            e.context(report)
        })
    }
}

/// The first line of `text` that reports a guest setup error or a kernel panic.
pub(crate) fn failure_line(text: &str) -> Option<&str> {
    text.lines()
        .map(|l| l.trim_matches(|c: char| c.is_whitespace() || c.is_control()))
        .find(|l| {
            l.contains(ERROR_MARKER)
                || l.contains(WORKLOAD_FAILED)
                || PANIC_MARKERS.iter().any(|m| l.contains(m))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_error_and_panic_lines() {
        assert_eq!(
            failure_line("boot\r\nWEFT-ERROR: data disk /dev/vdz not found\r\n"),
            Some("WEFT-ERROR: data disk /dev/vdz not found")
        );
        assert_eq!(
            failure_line("[ 1.0] Kernel panic - not syncing: VFS\n"),
            Some("[ 1.0] Kernel panic - not syncing: VFS")
        );
        assert_eq!(failure_line("WEFT-READY\nweft-counter: tick 1\n"), None);
    }

    #[tokio::test]
    async fn wait_for_sees_needle_and_fails_fast_on_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = SerialLog::new(dir.path().join("serial.log"));
        assert_eq!(log.contents(), "");
        std::fs::write(log.path(), "hello\nWEFT-READY\n").expect("write");
        log.wait_for("WEFT-READY", Duration::from_secs(1))
            .await
            .expect("needle present");

        std::fs::write(log.path(), "WEFT-ERROR: nope\n").expect("write");
        let err = log
            .wait_for("WEFT-READY", Duration::from_secs(30))
            .await
            .expect_err("guest reported an error");
        assert!(format!("{err:#}").contains("WEFT-ERROR: nope"), "{err:#}");
        log.wait_for("WEFT-ERROR", Duration::from_secs(1))
            .await
            .expect("asked for the error");
    }
}
