//! weft-blk's seccomp filter: once its files are open and its socket listens, the
//! process may make only the system calls that serving a disk needs (firecracker's
//! approach, with rust-vmm's `seccompiler`). A guest that takes over weft-blk through
//! a bug in request handling cannot open a network socket, start a program, create a
//! process, trace or signal another process, mount, load a module or change its
//! credentials: any system call outside the list kills the process (`Kill`), or is
//! logged by the kernel and allowed (`Log`, to find a call the list misses).
//!
//! Before any of that, at its start, weft-blk drops every capability
//! ([`drop_capabilities`]): it stays uid 0, owner of the files it serves.
//!
//! What it still may do: read and write files (the chunk store's chunk files are
//! opened as reads need them, the write layer's journal is rewritten), accept QEMU on
//! the socket it already listens on, map the guest memory QEMU sends, and start
//! threads.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a system call outside the list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The process is killed (SIGSYS): the default.
    #[default]
    Kill,
    /// The kernel logs the call (audit log / kernel log) and it goes ahead.
    Log,
    /// No filter.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "kill" => Ok(Mode::Kill),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(format!(
                "seccomp mode {other:?}: use \"kill\", \"log\" or \"off\""
            )),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Kill => "kill",
            Mode::Log => "log",
            Mode::Off => "off",
        })
    }
}

/// Why the filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter does not compile (a bug in the list).
    #[error("seccomp filter: {0}")]
    Build(#[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter (run with --seccomp off on a kernel without seccomp): {0}")]
    Install(#[source] seccompiler::Error),
}

/// System calls allowed whatever their arguments.
const ALLOWED: &[libc::c_long] = &[
    // files: the chunk store (chunks opened as read), the write layer, the trace
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_openat,
    libc::SYS_close,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_getdents64,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_flock,
    libc::SYS_readlink,
    libc::SYS_getcwd,
    // the vhost-user socket it listens on, and QEMU's connection (fds passed in)
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    // event loops
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pipe2,
    // memory, including the guest's (QEMU's memfds)
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    // threads (clone itself is allowed only for threads, below)
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    // signals (SIGTERM/SIGINT handling, panics)
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_restart_syscall,
    // time, randomness
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    // the end
    libc::SYS_exit,
    libc::SYS_exit_group,
];

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(SeccompError::Build)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conds).map_err(SeccompError::Build)
}

/// The allow-list filter; `clone3` passes it (the first filter answers it).
fn allow_list(mode: Mode) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    // clone: threads only (CLONE_THREAD set), never a new process.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    rules.insert(libc::SYS_clone3, Vec::new());
    // prctl: naming threads only.
    rules.insert(
        libc::SYS_prctl,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::Eq,
            libc::PR_SET_NAME as u64,
        )?])?],
    );
    // tgkill: to itself only (abort on a panic raises SIGABRT).
    let me = std::process::id() as u64;
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![cond(0, SeccompCmpOp::Eq, me)?])?],
    );
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .and_then(BpfProgram::try_from)
        .map_err(SeccompError::Build)
}

/// `clone3` fails with ENOSYS, so that the C library creates threads with `clone`,
/// whose flags the allow-list can check (`clone3` passes them in memory).
fn clone3_enosys() -> Result<BpfProgram, SeccompError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(SeccompError::Build)
}

/// Installs the filter on every thread of the process (and so on every thread it
/// starts later). Sets no_new_privs. `Mode::Off` installs nothing.
pub fn install(mode: Mode) -> Result<(), SeccompError> {
    if mode == Mode::Off {
        return Ok(());
    }
    // Both are built before either is installed: building allocates, and nothing
    // should fail half-way.
    let first = clone3_enosys()?;
    let list = allow_list(mode)?;
    seccompiler::apply_filter_all_threads(&first).map_err(SeccompError::Install)?;
    seccompiler::apply_filter_all_threads(&list).map_err(SeccompError::Install)?;
    Ok(())
}

/// `capset`'s header and data (linux/capability.h, version 3: two 32-bit words).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const CAP_VERSION_3: u32 = 0x2008_0522;

/// Drops every capability of the calling thread: bounding set (when it may), ambient,
/// effective, permitted and inheritable. weft-blk stays uid 0, so it still reads and
/// writes root's own files (the store, the write layers: owner permissions need no
/// capability), but it can no longer override file permissions, trace or open the
/// memory of root's other processes (`/proc/<pid>/mem` of a process with more
/// capabilities needs CAP_SYS_PTRACE), or act on anything that needs a capability.
/// Threads started afterwards inherit this; call it before starting any.
pub fn drop_capabilities() -> std::io::Result<()> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                // Past the last capability this kernel knows.
                Some(libc::EINVAL) => break,
                // Without CAP_SETPCAP (not root): the empty sets below still hold.
                Some(libc::EPERM) => break,
                _ => return Err(std::io::Error::last_os_error()),
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: header and data are valid for the kernel to read (version 3 reads two
    // data structs); pid 0 is the calling thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_filters_build() {
        for m in ["kill", "log", "off"] {
            assert_eq!(m.parse::<Mode>().unwrap().to_string(), m);
        }
        assert!("allow".parse::<Mode>().is_err());
        assert!(!allow_list(Mode::Kill).unwrap().is_empty());
        assert!(!allow_list(Mode::Log).unwrap().is_empty());
        assert!(!clone3_enosys().unwrap().is_empty());
        // Nothing that makes a process, a network socket or runs a program.
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_ptrace,
            libc::SYS_kill,
            libc::SYS_mount,
            libc::SYS_setuid,
        ] {
            assert!(!ALLOWED.contains(&nr), "{nr}");
        }
    }
}
