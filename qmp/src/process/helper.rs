//! Helper processes that outlive the process that started them (QEMU found again after
//! a restart, `qemu-storage-daemon`, `weft-blk`, `vhost-device-vsock`): found by a pid
//! file or among all processes, and stopped, SIGTERM first and SIGKILL after a grace
//! period.
//!
//! A pid is taken for a helper only if the process's command line matches the helper's
//! [`Signature`], so a pid file naming a recycled pid never leads to a signal. Once
//! matched, a [`Helper`] holds a pidfd (`pidfd_open`): every later signal and wait is
//! about that process and no other, even if it exits and its pid is used again. Where
//! the kernel has no pidfds (before Linux 5.3), the process's start time stands in.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tracing::debug;

use super::{is_qemu_process, process_alive, start_time};

/// How often a helper is looked at while waiting for it to end, without a pidfd.
const POLL: Duration = Duration::from_millis(10);

/// The program a [`Signature`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Program {
    /// Any.
    Any,
    /// `argv[0]`'s file name is this.
    Named(OsString),
    /// A QEMU binary ([`is_qemu_process`]).
    Qemu,
}

/// What a process's command line (`/proc/<pid>/cmdline`) and working directory must
/// show for the process to be taken for a helper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    program: Program,
    args: Vec<OsString>,
    contains: Vec<OsString>,
    cwd: Option<PathBuf>,
}

impl Signature {
    /// A process whose `argv[0]` has the file name `name` (e.g. `qemu-storage-daemon`).
    pub fn program(name: impl AsRef<OsStr>) -> Signature {
        Signature {
            program: Program::Named(name.as_ref().to_owned()),
            ..Signature::any()
        }
    }

    /// A QEMU process: its executable (or `argv[0]`) is named `qemu…`.
    pub fn qemu() -> Signature {
        Signature {
            program: Program::Qemu,
            ..Signature::any()
        }
    }

    /// Any program; the other conditions decide.
    pub fn any() -> Signature {
        Signature {
            program: Program::Any,
            args: Vec::new(),
            contains: Vec::new(),
            cwd: None,
        }
    }

    /// One of its arguments is exactly `arg`.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Signature {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Its command line contains `text` (inside an argument, such as a path in QEMU's
    /// `-chardev socket,path=…`).
    pub fn containing(mut self, text: impl AsRef<OsStr>) -> Signature {
        self.contains.push(text.as_ref().to_owned());
        self
    }

    /// Its working directory is `dir`.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Signature {
        self.cwd = Some(dir.into());
        self
    }

    /// Whether `pid` is a live process (not a zombie) that matches.
    pub fn matches(&self, pid: u32) -> bool {
        if !process_alive(pid) {
            return false;
        }
        if self.program == Program::Qemu && !is_qemu_process(pid) {
            return false;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if let Program::Named(name) = &self.program {
            let argv0 = argv.first().map(|a| Path::new(OsStr::from_bytes(a)));
            if argv0.and_then(Path::file_name) != Some(name.as_os_str()) {
                return false;
            }
        }
        let has = |needle: &[u8]| cmdline.windows(needle.len()).any(|w| w == needle);
        self.args.iter().all(|a| argv.contains(&a.as_bytes()))
            && self.contains.iter().all(|t| has(t.as_bytes()))
            && self.cwd.as_ref().is_none_or(|dir| {
                std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == *dir)
            })
    }
}

/// The pid a pid file holds (a decimal number, whitespace around it allowed).
pub fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|pid| *pid > 0)
}

/// How to stop a helper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop {
    /// How long it has to exit after SIGTERM before SIGKILL; `None`: SIGKILL at once.
    pub grace: Option<Duration>,
    /// How long it may take to be gone after SIGKILL before it is reported stuck.
    pub kill_wait: Duration,
}

impl Stop {
    /// SIGTERM, and SIGKILL if it has not exited after `grace`.
    pub fn term_then_kill(grace: Duration, kill_wait: Duration) -> Stop {
        Stop {
            grace: Some(grace),
            kill_wait,
        }
    }

    /// SIGKILL at once (for a process that cannot be asked to end, such as a QEMU that
    /// does not answer on QMP).
    pub fn kill(kill_wait: Duration) -> Stop {
        Stop {
            grace: None,
            kill_wait,
        }
    }
}

/// How [`Helper::stop`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It was gone before any signal.
    AlreadyGone,
    /// It exited after SIGTERM.
    Exited,
    /// It was killed with SIGKILL.
    Killed,
    /// It is still there after SIGKILL and the wait.
    Stuck,
}

/// A running helper process, matched against its [`Signature`] once and followed by a
/// pidfd from then on.
#[derive(Debug)]
pub struct Helper {
    pid: u32,
    pidfd: Option<OwnedFd>,
    /// The start time seen when it was matched (for kernels without pidfds).
    started: Option<u64>,
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no
    // memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the pidfd reports its process ended (readable), without waiting.
fn pidfd_ended(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a count of 1, and no waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

impl Helper {
    /// The process `pid` if it runs and matches `signature`.
    pub fn find(pid: u32, signature: &Signature) -> Option<Helper> {
        // Opened before the check: if the check passes while the pidfd's process still
        // runs, the two are the same process (a pid is not reused while its process
        // exists).
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => None,
            Err(_) => return None,
        };
        let started = start_time(pid);
        if !signature.matches(pid) {
            return None;
        }
        let helper = Helper {
            pid,
            pidfd,
            started,
        };
        (!helper.is_gone()).then_some(helper)
    }

    /// The process the pid file `path` names, if it runs and matches `signature`.
    pub fn from_pid_file(path: &Path, signature: &Signature) -> Option<Helper> {
        Helper::find(read_pid_file(path)?, signature)
    }

    /// The first process that matches `signature`, whatever its pid file says (for a
    /// helper whose starter died before it wrote the pid file).
    pub fn search(signature: &Signature) -> Option<Helper> {
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| signature.matches(*pid))
            .find_map(|pid| Helper::find(pid, signature))
    }

    /// A child this process started and has not reaped (`pid` from
    /// `Child::id`): followed without a signature check, as its pid cannot have been
    /// reused.
    pub fn child(pid: u32) -> Option<Helper> {
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => None,
            Err(_) => return None,
        };
        Some(Helper {
            pid,
            pidfd,
            started: start_time(pid),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process has ended (a zombie counts as ended).
    pub fn is_gone(&self) -> bool {
        match &self.pidfd {
            Some(fd) => pidfd_ended(fd),
            None => !process_alive(self.pid) || start_time(self.pid) != self.started,
        }
    }

    /// Sends `signal` to the process; nothing if it has ended.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        let r = match &self.pidfd {
            // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo (null) and no
            // flags.
            Some(fd) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    signal,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            },
            None => {
                if self.is_gone() {
                    return Ok(());
                }
                let pid = libc::pid_t::try_from(self.pid)
                    .map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
                // SAFETY: kill on a positive pid (one process) just checked to be the
                // one matched: alive, with the start time it had then.
                i64::from(unsafe { libc::kill(pid, signal) })
            }
        };
        if r == 0 {
            return Ok(());
        }
        match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            e => Err(e),
        }
    }

    /// Waits up to `timeout` for the process to end; true if it did.
    pub async fn wait_gone(&self, timeout: Duration) -> bool {
        if self.is_gone() {
            return true;
        }
        if let Some(fd) = &self.pidfd {
            // A descriptor of our own for the reactor, so that waits never share one.
            // SAFETY: the duplicate is owned by the AsyncFd alone, which neither replaces
            // nor closes it while registered.
            let registered = fd
                .try_clone()
                .ok()
                .and_then(|dup| unsafe { AsyncFd::register(dup) }.ok());
            if let Some(readable) = registered {
                return tokio::time::timeout(timeout, readable.readable())
                    .await
                    .is_ok_and(|r| r.is_ok());
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_gone() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
        true
    }

    /// Stops the process as `how` says: SIGTERM and up to the grace period to exit,
    /// then SIGKILL and up to `kill_wait` to be gone.
    pub async fn stop(&self, how: Stop) -> Ended {
        if self.is_gone() {
            return Ended::AlreadyGone;
        }
        if let Some(grace) = how.grace {
            if let Err(e) = self.signal(libc::SIGTERM) {
                debug!(pid = self.pid, error = %e, "SIGTERM failed");
            }
            if self.wait_gone(grace).await {
                return Ended::Exited;
            }
        }
        if let Err(e) = self.signal(libc::SIGKILL) {
            debug!(pid = self.pid, error = %e, "SIGKILL failed");
        }
        if self.wait_gone(how.kill_wait).await {
            Ended::Killed
        } else {
            Ended::Stuck
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    use super::*;

    const T: Duration = Duration::from_secs(5);

    /// A shell blocked reading its stdin (kept open by the test; it exits 0 when that
    /// closes), named by `marker` (its `$0`); with `ignore_term` it ignores SIGTERM.
    /// Returned once it runs its script.
    fn helper(marker: &str, ignore_term: bool) -> Child {
        use std::io::BufRead;
        let trap = if ignore_term { "trap '' TERM; " } else { "" };
        let mut child = Command::new("sh")
            .args(["-c", &format!("{trap}echo ready; read x; exit 0"), marker])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("ready line");
        assert_eq!(line, "ready\n");
        child
    }

    fn marker(test: &str) -> String {
        format!("weft-helper-test-{test}-{}", std::process::id())
    }

    fn signature(marker: &str) -> Signature {
        Signature::program("sh").arg("-c").arg(marker)
    }

    #[tokio::test]
    async fn a_helper_that_ignores_sigterm_is_killed_after_the_grace() {
        let m = marker("ignores");
        let mut child = helper(&m, true);
        let h = Helper::find(child.id(), &signature(&m)).expect("found");
        assert!(h.pidfd.is_some(), "these kernels have pidfds");
        let grace = Duration::from_millis(300);
        let start = Instant::now();
        assert_eq!(h.stop(Stop::term_then_kill(grace, T)).await, Ended::Killed);
        assert!(start.elapsed() >= grace, "{:?}", start.elapsed());
        assert_eq!(child.wait().expect("reap").signal(), Some(libc::SIGKILL));
        assert!(h.is_gone());
        // A helper that ended is never signalled again, reaped or not.
        h.signal(libc::SIGKILL).expect("nothing to do");
        assert_eq!(h.stop(Stop::kill(T)).await, Ended::AlreadyGone);
    }

    #[tokio::test]
    async fn a_helper_that_exits_on_sigterm_is_not_killed() {
        let m = marker("exits");
        let mut child = helper(&m, false);
        let h = Helper::find(child.id(), &signature(&m)).expect("found");
        assert_eq!(
            h.stop(Stop::term_then_kill(T, T)).await,
            Ended::Exited,
            "no SIGKILL"
        );
        assert_eq!(child.wait().expect("reap").signal(), Some(libc::SIGTERM));
    }

    #[tokio::test]
    async fn kill_sends_no_sigterm_first() {
        let m = marker("kill");
        let mut child = helper(&m, false);
        let h = Helper::find(child.id(), &signature(&m)).expect("found");
        assert_eq!(h.stop(Stop::kill(T)).await, Ended::Killed);
        assert_eq!(child.wait().expect("reap").signal(), Some(libc::SIGKILL));
    }

    #[tokio::test]
    async fn a_pid_file_naming_a_process_that_does_not_match_never_leads_to_a_signal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("helper.pid");
        let m = marker("other");
        // Some other process now has the pid the file names.
        let mut other = helper(&m, false);
        std::fs::write(&pid_file, format!("{}\n", other.id())).expect("pid file");
        for wrong in [
            Signature::program("weft-blk").arg(&m),
            Signature::program("sh").arg("/run/weft/blk/vm.vda.sock"),
            signature(&m).cwd("/nonexistent"),
            signature(&m).containing("qmp.sock"),
            Signature::qemu().arg(&m),
        ] {
            assert!(
                Helper::from_pid_file(&pid_file, &wrong).is_none(),
                "{wrong:?}"
            );
        }
        // Still running, untouched: it dies of the first SIGTERM it gets.
        assert!(process_alive(other.id()));
        assert_eq!(other.try_wait().expect("try_wait"), None);
        // The right signature finds it, in its directory too.
        let cwd = std::env::current_dir().expect("cwd");
        let found = Helper::from_pid_file(&pid_file, &signature(&m).cwd(&cwd)).expect("ours");
        assert_eq!(found.pid(), other.id());
        other.kill().expect("kill");
        other.wait().expect("reap");
        // Its pid file now names nothing.
        assert!(Helper::from_pid_file(&pid_file, &signature(&m)).is_none());
    }

    #[tokio::test]
    async fn a_helper_is_found_without_its_pid_file() {
        let m = marker("search");
        let mut child = helper(&m, false);
        let h = Helper::search(&signature(&m)).expect("found among all processes");
        assert_eq!(h.pid(), child.id());
        assert!(Helper::search(&signature(&marker("nobody"))).is_none());
        child.kill().expect("kill");
        assert!(h.wait_gone(T).await, "a zombie has ended");
        child.wait().expect("reap");
    }

    #[tokio::test]
    async fn without_a_pidfd_the_start_time_follows_the_process() {
        let m = marker("nopidfd");
        let mut child = helper(&m, true);
        let mut h = Helper::find(child.id(), &signature(&m)).expect("found");
        h.pidfd = None;
        assert!(!h.is_gone());
        // Another process under the same pid would have another start time.
        let real = h.started;
        h.started = real.map(|s| s + 1);
        assert!(h.is_gone(), "a recycled pid is not the helper");
        h.signal(libc::SIGKILL).expect("nothing sent");
        assert_eq!(child.try_wait().expect("try_wait"), None, "still running");
        h.started = real;
        assert_eq!(
            h.stop(Stop::term_then_kill(Duration::from_millis(100), T))
                .await,
            Ended::Killed
        );
        assert_eq!(child.wait().expect("reap").signal(), Some(libc::SIGKILL));
    }

    #[tokio::test]
    async fn a_child_is_followed_from_its_start() {
        let mut child = helper(&marker("child"), false);
        let h = Helper::child(child.id()).expect("pidfd");
        assert!(!h.wait_gone(Duration::from_millis(50)).await);
        drop(child.stdin.take());
        // `read` sees the end of its input and the shell exits by itself.
        assert!(h.wait_gone(T).await);
        assert!(child.wait().expect("reap").success());
    }

    #[test]
    fn signatures_and_pid_files() {
        let me = std::process::id();
        let exe = std::env::current_exe().expect("exe");
        let name = exe.file_name().expect("name");
        assert!(Signature::program(name).matches(me));
        assert!(Signature::any().matches(me));
        assert!(!Signature::program("sh").matches(me));
        assert!(!Signature::qemu().matches(me));
        assert!(!Signature::any().matches(0));
        assert!(!Signature::any().matches(u32::MAX));
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("x.pid");
        for (text, want) in [
            ("1234\n", Some(1234)),
            (" 77 ", Some(77)),
            ("0\n", None),
            ("-5\n", None),
            ("12ab\n", None),
            ("", None),
        ] {
            std::fs::write(&f, text).expect("write");
            assert_eq!(read_pid_file(&f), want, "{text:?}");
        }
        assert_eq!(read_pid_file(&dir.path().join("none.pid")), None);
    }
}
