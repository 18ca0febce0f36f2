//! What a test prints when a wait times out: enough to tell a stall (a process asleep on
//! a socket, a guest that never wrote a byte) from a slow machine.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::procs;

/// How much of a log a report shows.
pub const TAIL_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone)]
enum Item {
    Process {
        label: String,
        pid: u32,
    },
    ProcessesNaming {
        label: String,
        needle: PathBuf,
    },
    CommandLine {
        label: String,
        pid: u32,
        known: String,
    },
    LogTail {
        label: String,
        path: PathBuf,
    },
    Socket {
        label: String,
        path: PathBuf,
    },
    FileSize {
        label: String,
        path: PathBuf,
    },
}

/// A list of things to look at when a wait fails, cheap to clone and to add to as a test
/// goes (a helper started later, a guest booted).
///
/// [`Diagnostics::report`] reads them when it is called: process states, files and logs
/// as they are at the moment of the failure.
#[derive(Debug, Clone, Default)]
pub struct Diagnostics(Arc<Mutex<Vec<Item>>>);

impl Diagnostics {
    pub fn new() -> Diagnostics {
        Diagnostics::default()
    }

    fn push(&self, item: Item) -> &Self {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(item);
        self
    }

    /// Adds what `other` lists now (a test's helpers, to a guest's own list).
    pub fn include(&self, other: &Diagnostics) -> &Self {
        if Arc::ptr_eq(&self.0, &other.0) {
            return self;
        }
        let theirs = other
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(theirs);
        self
    }

    /// Process `pid`: alive or not, its state and wchan and its threads'.
    pub fn process(&self, label: &str, pid: u32) -> &Self {
        self.push(Item::Process {
            label: label.into(),
            pid,
        })
    }

    /// Every live process whose command line names `path` (a helper found by the socket
    /// it serves), as [`Diagnostics::process`] shows one.
    pub fn processes_naming(&self, label: &str, path: &Path) -> &Self {
        self.push(Item::ProcessesNaming {
            label: label.into(),
            needle: path.to_path_buf(),
        })
    }

    /// The command line of `pid`: read from `/proc` when the report is made, else `known`
    /// (what it was started with).
    pub fn command_line(&self, label: &str, pid: u32, known: &str) -> &Self {
        self.push(Item::CommandLine {
            label: label.into(),
            pid,
            known: known.into(),
        })
    }

    /// The last [`TAIL_BYTES`] of a log file.
    pub fn log_tail(&self, label: &str, path: &Path) -> &Self {
        self.push(Item::LogTail {
            label: label.into(),
            path: path.to_path_buf(),
        })
    }

    /// Whether a unix socket exists (and is a socket).
    pub fn socket(&self, label: &str, path: &Path) -> &Self {
        self.push(Item::Socket {
            label: label.into(),
            path: path.to_path_buf(),
        })
    }

    /// A file's size (a serial log that stayed at 0 bytes says the guest never ran).
    pub fn file_size(&self, label: &str, path: &Path) -> &Self {
        self.push(Item::FileSize {
            label: label.into(),
            path: path.to_path_buf(),
        })
    }

    /// Everything listed, as it is now, under `headline`.
    pub fn report(&self, headline: &str) -> String {
        let items = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut out = format!("==== {headline}\n");
        for item in items {
            match item {
                Item::Process { label, pid } => {
                    let _ = writeln!(out, "---- {label}: {}", procs::describe(pid));
                }
                Item::ProcessesNaming { label, needle } => {
                    let pids = procs::processes_naming(&needle);
                    if pids.is_empty() {
                        let _ = writeln!(
                            out,
                            "---- {label}: no live process names {}",
                            needle.display()
                        );
                    }
                    for pid in pids {
                        let _ = writeln!(
                            out,
                            "---- {label}: {}\n    command line: {}",
                            procs::describe(pid),
                            procs::cmdline(pid)
                        );
                    }
                }
                Item::CommandLine { label, pid, known } => {
                    let now = procs::cmdline(pid);
                    let line = if now.is_empty() { known } else { now };
                    let _ = writeln!(out, "---- {label} command line: {line}");
                }
                Item::LogTail { label, path } => {
                    let _ = writeln!(
                        out,
                        "---- {label} ({}, tail) ----\n{}",
                        path.display(),
                        tail(&path, TAIL_BYTES).trim_end()
                    );
                }
                Item::Socket { label, path } => {
                    use std::os::unix::fs::FileTypeExt as _;
                    let state = match std::fs::metadata(&path) {
                        Ok(m) if m.file_type().is_socket() => "exists".to_string(),
                        Ok(m) => format!("exists but is not a socket ({:?})", m.file_type()),
                        Err(e) => format!("missing ({e})"),
                    };
                    let _ = writeln!(out, "---- {label} socket {}: {state}", path.display());
                }
                Item::FileSize { label, path } => {
                    let size = match std::fs::metadata(&path) {
                        Ok(m) => format!("{} bytes", m.len()),
                        Err(e) => format!("missing ({e})"),
                    };
                    let _ = writeln!(out, "---- {label} {}: {size}", path.display());
                }
            }
        }
        out + "==== end"
    }
}

/// The last `max` bytes of a file (lossy UTF-8, from a character boundary); empty if
/// it cannot be read.
pub fn tail(path: &Path, max: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(max)..]).into_owned();
    text.trim_start_matches('\u{fffd}').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_shows_processes_sockets_sizes_and_logs_as_they_are_now() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("helper.log");
        let serial = dir.path().join("serial.log");
        let socket = dir.path().join("vhost.sock");
        let diag = Diagnostics::new();
        diag.process("this test", std::process::id())
            .socket("vhost-user", &socket)
            .file_size("serial log", &serial)
            .log_tail("helper", &log);
        let before = diag.report("waited for nothing");
        assert!(before.contains("vhost.sock: missing"), "{before}");
        assert!(before.contains("serial.log: missing"), "{before}");

        std::fs::write(&log, format!("{}\nlast line\n", "x".repeat(3 * TAIL_BYTES))).expect("log");
        std::fs::write(&serial, b"").expect("serial");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let after = diag.report("waited for nothing");
        assert!(after.starts_with("==== waited for nothing\n"), "{after}");
        assert!(after.contains("vhost.sock: exists"), "{after}");
        assert!(after.contains("serial.log: 0 bytes"), "{after}");
        assert!(after.contains("last line"), "{after}");
        assert!(
            after.len() < 2 * TAIL_BYTES,
            "only the tail: {}",
            after.len()
        );
        assert!(
            after.contains(&format!("pid {}", std::process::id())),
            "{after}"
        );
    }
}
