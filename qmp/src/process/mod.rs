//! Processes weft starts and must find again:
//!
//! - QEMU and `qemu-storage-daemon` as supervised children ([`spawn`],
//!   [`spawn_storage_daemon`], [`QemuProcess`]);
//! - helpers that outlive their starter, found by a pid file or among all processes
//!   and checked against their command line ([`Signature`], [`Helper`]), and stopped
//!   with SIGTERM, then SIGKILL after a grace period ([`Helper::stop`]);
//! - what `/proc` tells about a pid ([`process_alive`], [`is_qemu_process`],
//!   [`start_time`]).

use std::io;
use std::path::Path;

mod helper;
mod qemu;

pub use crate::error::ExitInfo;
pub use crate::launch::SpawnOptions;
pub use helper::{read_pid_file, Ended, Helper, Signature, Stop};
pub use qemu::{spawn, spawn_storage_daemon, QemuProcess};

/// When process `pid` started (clock ticks after boot, field 22 of `/proc/<pid>/stat`):
/// with the pid, it tells a process apart from a later one that got the same pid.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    // Fields from the third (state) on; the start time is the 22nd overall.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether a process with this pid exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid_t) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid_t <= 0 {
        // 0 and negative values address process groups, not a process.
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks that the pid exists and
    // that we may signal it. pid_t is positive, so it names a single process.
    let r = unsafe { libc::kill(pid_t, 0) };
    let exists = r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !exists {
        return false;
    }
    // A zombie still has a pid but is dead; state is the field after "(comm)".
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
            None => true,
        },
        Err(_) => true,
    }
}

/// Whether `pid` is a running QEMU process: its executable (or, if that cannot be read,
/// its `argv[0]`) has a file name starting with `qemu`.
pub fn is_qemu_process(pid: u32) -> bool {
    if pid == 0 || !process_alive(pid) {
        return false;
    }
    let is_qemu = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().starts_with("qemu"))
            .unwrap_or(false)
    };
    if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
        // A replaced binary reads as "/usr/bin/qemu-system-x86_64 (deleted)".
        return is_qemu(&exe);
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
            is_qemu(Path::new(&*String::from_utf8_lossy(argv0)))
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_helpers() {
        let me = std::process::id();
        assert!(process_alive(me));
        assert!(!process_alive(0));
        assert!(!process_alive(u32::MAX));
        // The test binary is not QEMU.
        assert!(!is_qemu_process(me));
        assert!(!is_qemu_process(0));
        let started = start_time(me).expect("own start time");
        assert_eq!(start_time(me), Some(started));
        assert_eq!(start_time(0), None);
    }
}
