//! How weftd starts `vhost-device-vsock` (a third-party program that handles the
//! guest's virtqueues and so must be taken for hostile once a guest has run): as a
//! user of its own, without capabilities, with no_new_privs, under a seccomp
//! deny-list, inside a directory that holds only its VM's sockets.
//!
//! Everything is prepared before the fork: the child only makes system calls
//! (chdir, setgroups, setgid, setuid, prctl, seccomp, execveat), none of which
//! allocate. The program is run from a descriptor opened by weftd (`execveat`), and
//! the device gets socket paths relative to its working directory, so that neither
//! the program's nor the sockets' parent directories need to be open to its user.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::Deserialize;

/// Who the vsock device runs as (`[dpa] device_user` in weftd.toml).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum DeviceUser {
    /// Each VM's device as a user of its own: uid and gid `device_id_base + CID`
    /// (no passwd entry needed). Devices of two VMs cannot reach each other's
    /// sockets or processes.
    #[default]
    PerVm,
    /// As root, as before confinement (still no_new_privs and the seccomp filter).
    Root,
    /// As this user (name or numeric uid) with its primary group. Devices of all
    /// VMs share it.
    Named(String),
}

impl TryFrom<String> for DeviceUser {
    type Error = String;
    fn try_from(s: String) -> Result<DeviceUser, String> {
        Ok(match s.as_str() {
            "per-vm" => DeviceUser::PerVm,
            "root" | "0" => DeviceUser::Root,
            "" => {
                return Err(
                    "dpa.device_user must not be empty: use \"per-vm\", a user name or \"root\""
                        .into(),
                )
            }
            _ => DeviceUser::Named(s),
        })
    }
}

/// A uid and gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl DeviceUser {
    /// The ids the device of the VM with `cid` runs as; `None` for root.
    pub fn ids(&self, id_base: u32, cid: u32) -> Result<Option<Ids>, String> {
        match self {
            DeviceUser::Root => Ok(None),
            DeviceUser::PerVm => {
                let id = id_base.checked_add(cid).filter(|id| *id < u32::MAX - 1).ok_or_else(|| {
                    format!("dpa.device_id_base {id_base} + CID {cid} is past the largest uid: lower device_id_base")
                })?;
                Ok(Some(Ids { uid: id, gid: id }))
            }
            DeviceUser::Named(name) => {
                let user = match name.parse::<u32>() {
                    Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
                    Err(_) => nix::unistd::User::from_name(name),
                }
                .map_err(|e| format!("cannot look up dpa.device_user {name:?}: {e}"))?
                .ok_or_else(|| {
                    format!("dpa.device_user {name:?} does not exist: create it or use \"per-vm\"")
                })?;
                if user.uid.is_root() {
                    return Ok(None);
                }
                Ok(Some(Ids {
                    uid: user.uid.as_raw(),
                    gid: user.gid.as_raw(),
                }))
            }
        }
    }
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Argument index below 6 and a 64-bit compare: always valid.
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .unwrap_or_else(|e| unreachable!("seccomp condition: {e}"))
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    // Never empty: always valid.
    SeccompRule::new(conds).unwrap_or_else(|e| unreachable!("seccomp rule: {e}"))
}

/// System calls the device never needs and that widen what a process taken over
/// can reach: other processes, the kernel's rarer interfaces, namespaces, mounts,
/// credentials, the clock, modules. They fail with EPERM.
const DENIED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_personality,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_capset,
    libc::SYS_fanotify_init,
    libc::SYS_vhangup,
];

/// The device's filters: the deny-list (EPERM), and `clone3` → ENOSYS so that
/// threads are made with `clone`, whose namespace flags the deny-list sees.
fn device_filters() -> Result<[BpfProgram; 2], seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    // Sockets of any family but AF_UNIX (the network, netlink, vsock).
    rules.insert(
        libc::SYS_socket,
        vec![rule(vec![cond(0, SeccompCmpOp::Ne, libc::AF_UNIX as u64)])],
    );
    // clone into new namespaces (a user namespace gives back capabilities there).
    let ns = [
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWNS,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWCGROUP,
    ];
    rules.insert(
        libc::SYS_clone,
        ns.iter()
            .map(|&f| rule(vec![cond(0, SeccompCmpOp::MaskedEq(f as u64), f as u64)]))
            .collect(),
    );
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?;
    Ok([clone3.try_into()?, deny.try_into()?])
}

/// A program ready to be run confined from a forked child ([`Jail::enter`]).
pub struct Jail {
    exe: OwnedFd,
    cwd: CString,
    // The strings the pointer arrays point into; never changed after `new`.
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
    ids: Option<Ids>,
    filters: Option<[BpfProgram; 2]>,
}

// SAFETY: the raw pointers point into the CStrings the Jail owns, which are never
// changed or moved (their heap buffers stay put) while the Jail lives; the Jail is
// only read after it is built.
unsafe impl Send for Jail {}
// SAFETY: as for Send: nothing is mutated through a shared reference.
unsafe impl Sync for Jail {}

impl std::fmt::Debug for Jail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jail")
            .field("cwd", &self.cwd)
            .field("ids", &self.ids)
            .field("seccomp", &self.filters.is_some())
            .finish_non_exhaustive()
    }
}

fn cstring(s: &OsStr) -> std::io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} holds a NUL byte", s.to_string_lossy()),
        )
    })
}

impl Jail {
    /// `binary` (opened now) run with `args` in `cwd`, as `ids` (None: stay root),
    /// under the device's seccomp filters when `seccomp`. The environment is weftd's.
    pub fn new(
        binary: &Path,
        args: &[OsString],
        cwd: &Path,
        ids: Option<Ids>,
        seccomp: bool,
    ) -> std::io::Result<Jail> {
        let exe = OwnedFd::from(std::fs::File::open(binary)?);
        let mut argv = vec![cstring(binary.as_os_str())?];
        for a in args {
            argv.push(cstring(a)?);
        }
        let mut envp = Vec::new();
        for (k, v) in std::env::vars_os() {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            envp.push(cstring(&kv)?);
        }
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        let filters = if seccomp {
            Some(device_filters().map_err(std::io::Error::other)?)
        } else {
            None
        };
        Ok(Jail {
            exe,
            cwd: cstring(cwd.as_os_str())?,
            argv_ptrs: ptrs(&argv),
            envp_ptrs: ptrs(&envp),
            _argv: argv,
            _envp: envp,
            ids,
            filters,
        })
    }

    /// In the forked child: enters the directory, drops to the ids (supplementary
    /// groups cleared; a uid other than 0 keeps no capability), sets no_new_privs,
    /// installs the filters and runs the program. Returns only on failure.
    ///
    /// # Safety
    /// Only between fork and exec (a `pre_exec` hook): it replaces the process.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        let check = |rc: libc::c_long| {
            if rc < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: system calls on valid, NUL-terminated strings and null-terminated
        // pointer arrays that `self` owns; no allocation.
        unsafe {
            check(libc::chdir(self.cwd.as_ptr()).into())?;
            if let Some(ids) = self.ids {
                check(libc::setgroups(0, std::ptr::null()).into())?;
                check(libc::setgid(ids.gid).into())?;
                check(libc::setuid(ids.uid).into())?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into())?;
            if let Some(filters) = &self.filters {
                for f in filters {
                    // The failure's errno, without allocating.
                    seccompiler::apply_filter(f).map_err(|_| std::io::Error::last_os_error())?;
                }
            }
            libc::syscall(
                libc::SYS_execveat,
                self.exe.as_raw_fd(),
                c"".as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.envp_ptrs.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
        }
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_parse_and_map_to_ids() {
        let u = |s: &str| DeviceUser::try_from(s.to_string());
        assert_eq!(u("per-vm"), Ok(DeviceUser::PerVm));
        assert_eq!(u("root"), Ok(DeviceUser::Root));
        assert!(u("").is_err());
        assert_eq!(
            DeviceUser::PerVm.ids(2_000_000_000, 7),
            Ok(Some(Ids {
                uid: 2_000_000_007,
                gid: 2_000_000_007
            }))
        );
        assert!(DeviceUser::PerVm.ids(u32::MAX - 3, 7).is_err());
        assert_eq!(DeviceUser::Root.ids(0, 7), Ok(None));
        assert_eq!(u("root").and_then(|d| d.ids(0, 3)), Ok(None));
        let nobody = DeviceUser::Named("nobody".into())
            .ids(0, 3)
            .unwrap()
            .unwrap();
        assert_eq!(nobody.uid, 65534);
        assert!(DeviceUser::Named("no-such-user-weft".into())
            .ids(0, 3)
            .is_err());
        assert!(device_filters().is_ok());
    }

    /// A real program (python3) run through the jail as weftd runs the device:
    /// its user, its directory, no capabilities, and the filter's refusals.
    #[test]
    fn a_jailed_program_gets_its_user_and_the_filter_refuses_what_it_denies() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let ids = DeviceUser::PerVm.ids(2_000_000_000, 7).unwrap();
        let i = ids.unwrap();
        std::os::unix::fs::lchown(dir.path(), Some(i.uid), Some(i.gid)).unwrap();
        let script = r#"
import ctypes, os, socket
print("ids", os.getuid(), os.getgid(), os.getgroups(), os.getcwd())
print("caps", [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0])
def tryit(name, f):
    try:
        f()
        print(name, "ok")
    except OSError as e:
        print(name, e.errno)
tryit("inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
tryit("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
tryit("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
libc = ctypes.CDLL(None, use_errno=True)
for name, call in [("unshare", lambda: libc.unshare(0x10000000)),
                   ("ptrace", lambda: libc.ptrace(16, 1, 0, 0)),
                   ("setuid", lambda: libc.setuid(0))]:
    rc = call()
    print(name, rc, ctypes.get_errno())
open("made-here", "w").write("x")
"#;
        let args: Vec<OsString> = vec!["-c".into(), script.into()];
        let python = Path::new("/usr/bin/python3");
        let jail = Jail::new(python, &args, dir.path(), ids, true).unwrap();
        let mut cmd = std::process::Command::new(python);
        cmd.args(&args);
        // SAFETY: `enter` only makes system calls on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || jail.enter());
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = format!(
            "ids 2000000007 2000000007 [] {}\ncaps 0000000000000000\n\
             inet 1\nnetlink 1\nunix ok\nunshare -1 1\nptrace -1 1\nsetuid -1 1\n",
            dir.path().display()
        );
        assert_eq!(text, want);
        assert!(dir.path().join("made-here").is_file());
    }
}
