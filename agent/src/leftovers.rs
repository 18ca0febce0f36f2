//! What a weftd that died (SIGKILL, power loss) leaves in its work directories, and
//! how the next one clears it before it serves.
//!
//! - **qemu-storage-daemons** (snapshots of stopped environments, qcow2 restores,
//!   overlays made for weaves) run in their own process group, so they outlive weftd;
//!   each writes a pid file next to its QMP socket. Each one still running is asked
//!   to `quit` (which stores its disk's bitmaps), else killed.
//! - Their work directories (`<run_dir>/backup`, `<run_dir>/restore`) only ever hold
//!   files of operations under way, and none is at start: they are emptied.
//! - A restore writes a temporary file (`.weft-tmp-<random>`, see `crate::confine`)
//!   beside its output and renames it when complete; it names that file in
//!   `<run_dir>/restore/*.output` while it runs, so that the file of one that died is
//!   removed.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::warn;
use weft_qmp::process::{Ended, Helper, Signature, Stop};

/// The binary whose processes weftd's pid files in work directories name.
const STORAGE_DAEMON: &str = "qemu-storage-daemon";

/// Ends every qemu-storage-daemon that a pid file in `dir` names, then empties `dir`.
/// Returns what was ended, for the log.
pub async fn clear_work_dir(dir: &Path) -> Vec<String> {
    let mut ended = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return ended;
    };
    let files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    for pid_file in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "pid"))
    {
        // A qemu-storage-daemon started with `--pidfile <pid_file>`, not a recycled pid.
        let ours = Signature::program(STORAGE_DAEMON).arg(pid_file);
        let Some(daemon) = Helper::from_pid_file(pid_file, &ours) else {
            continue;
        };
        let pid = daemon.pid();
        // `quit` closes the image cleanly (persistent bitmaps are stored); a daemon
        // that does not answer is killed.
        let qmp_socket = pid_file.with_extension("qmp");
        if let Ok(qmp) = weft_qmp::Qmp::connect_timeout(&qmp_socket, Duration::from_secs(2)).await {
            let _ = qmp.execute_raw("quit", None).await;
        }
        if !daemon.wait_gone(Duration::from_secs(10)).await
            && daemon.stop(Stop::kill(Duration::from_secs(5))).await == Ended::Stuck
        {
            warn!(pid, file = %pid_file.display(), "a qemu-storage-daemon left by a dead weftd does not exit");
            continue;
        }
        ended.push(format!("{STORAGE_DAEMON} {pid} ({})", pid_file.display()));
    }
    for record in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "output"))
    {
        if let Ok(temp) = std::fs::read(record) {
            let temp = Path::new(std::ffi::OsStr::from_bytes(&temp));
            if crate::confine::remove_leftover(temp) {
                ended.push(format!("the unfinished restore {}", temp.display()));
            }
        }
    }
    for f in files {
        let gone = if f.is_dir() {
            std::fs::remove_dir_all(&f)
        } else {
            std::fs::remove_file(&f)
        };
        match gone {
            // A daemon that quit above removed its own files.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(file = %f.display(), error = %e, "cannot remove a leftover work file")
            }
            Ok(()) => {}
        }
    }
    ended
}

/// Records in `work` that a restore of snapshot `id` writes temporary file `temp` (see
/// the module comment); returns the record, which the restore removes when it ends.
pub fn record_output(work: &Path, id: i64, temp: &Path) -> Result<PathBuf, crate::error::ApiError> {
    let internal = |e: std::io::Error| {
        crate::error::ApiError::io(format!("cannot record a restore in {}", work.display()), e)
    };
    std::fs::create_dir_all(work).map_err(internal)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let record = work.join(format!(
        "{}.output",
        crate::names::join(&[&id.to_string(), &stamp.to_string()])
    ));
    std::fs::write(&record, temp.as_os_str().as_bytes()).map_err(internal)?;
    Ok(record)
}

/// Whether store index `name` is an environment's snapshot block map
/// (`<env>/disk-<disk>/<10 digits>`, see `snapshots::index_name`).
pub fn is_snapshot_index(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    matches!(parts.as_slice(), [env, resource, id]
        if crate::names::check_name(env).is_ok()
            && resource.starts_with("disk-")
            && id.len() == 10
            && id.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_index_names_are_told_apart() {
        assert!(is_snapshot_index("web/disk-vda/0000000012"));
        assert!(!is_snapshot_index("_weaves/w1/vda"));
        assert!(!is_snapshot_index("web/disk-vda/12"));
        assert!(!is_snapshot_index("web/config/0000000012"));
        assert!(!is_snapshot_index("imported/thing"));
    }
}
