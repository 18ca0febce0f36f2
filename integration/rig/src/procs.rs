//! Processes as `/proc` shows them: whether one lives, what state it and its threads
//! are in, and which processes a test's directory left behind.

use std::path::Path;

/// One line of `/proc/<pid>/stat` (or of a thread's), the fields a stall report needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// The command name (`comm`, at most 15 bytes).
    pub comm: String,
    /// The state letter: `R` running, `S` sleeping, `D` in uninterruptible sleep, `Z`
    /// zombie, `T` stopped, `t` traced.
    pub state: char,
}

impl Stat {
    /// Parses a `stat` line; the command name may hold spaces and parentheses, so it is
    /// what lies between the first `(` and the last `)`.
    pub fn parse(line: &str) -> Option<Stat> {
        let open = line.find('(')?;
        let close = line.rfind(')')?;
        let comm = line.get(open + 1..close)?.to_string();
        let state = line.get(close + 1..)?.trim_start().chars().next()?;
        Some(Stat { comm, state })
    }
}

/// The `stat` of a process (or, with `/task/<tid>`, of a thread), if it exists.
pub fn stat(pid: u32) -> Option<Stat> {
    read_stat(&Path::new("/proc").join(pid.to_string()))
}

fn read_stat(dir: &Path) -> Option<Stat> {
    Stat::parse(&std::fs::read_to_string(dir.join("stat")).ok()?)
}

/// Whether `pid` runs: it exists and is not a zombie (a zombie has exited; only its parent
/// has not reaped it yet).
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z')
}

/// The kernel function `dir` (a process or a thread under `/proc`) sleeps in, or `-`.
fn wchan(dir: &Path) -> String {
    match std::fs::read_to_string(dir.join("wchan")) {
        Ok(w) if !w.trim().is_empty() && w.trim() != "0" => w.trim().to_string(),
        _ => "-".into(),
    }
}

/// The command line of `pid`, its arguments joined by spaces (empty if it is gone).
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .split('\0')
                .filter(|a| !a.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// `pid` for a report: alive or not, its state and wchan, and the same for each of its
/// threads (a stalled QEMU shows which thread waits where: a vCPU in TCG, the main loop
/// on a vhost-user socket ...).
pub fn describe(pid: u32) -> String {
    let dir = Path::new("/proc").join(pid.to_string());
    let Some(st) = read_stat(&dir) else {
        return format!("pid {pid}: gone");
    };
    let mut out = format!(
        "pid {pid} ({}): {}, state {}, wchan {}",
        st.comm,
        if st.state == 'Z' {
            "exited (zombie)"
        } else {
            "alive"
        },
        st.state,
        wchan(&dir)
    );
    let mut tids: Vec<u32> = std::fs::read_dir(dir.join("task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|tid| *tid != pid)
        .collect();
    tids.sort_unstable();
    for tid in tids {
        let task = dir.join("task").join(tid.to_string());
        if let Some(t) = read_stat(&task) {
            out += &format!(
                "\n    thread {tid} ({}): state {}, wchan {}",
                t.comm,
                t.state,
                wchan(&task)
            );
        }
    }
    out
}

/// This process and its ancestors (whose command lines may name a test's directory; never
/// to be killed as strays).
pub fn this_and_ancestors() -> Vec<u32> {
    let mut out = vec![std::process::id()];
    while let Some(&pid) = out.last() {
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u32>()
                    .ok()
            })
            .unwrap_or(0);
        if ppid <= 1 || out.contains(&ppid) {
            break;
        }
        out.push(ppid);
    }
    out
}

/// Whether `text` (a command line, its arguments separated by spaces or NULs) names `dir`
/// or a path below it: `/t/w` names `/t/w/run/x.pid`, not `/t/w2`.
pub fn names_path(text: &str, dir: &str) -> bool {
    text.match_indices(dir).any(|(i, _)| {
        matches!(
            text[i + dir.len()..].chars().next(),
            None | Some('/') | Some(' ') | Some('"') | Some(',') | Some('\0')
        )
    })
}

/// Processes (not zombies, not this one or its ancestors) whose command line names
/// `dir` or that work in it: what a test's QEMUs and helpers are, whoever started them
/// (vhost-device-vsock is given paths relative to its own directory).
pub fn processes_in(dir: &Path) -> Vec<u32> {
    scan(dir, true)
}

/// Processes (not zombies, not this one or its ancestors) whose command line names `path`.
pub fn processes_naming(path: &Path) -> Vec<u32> {
    scan(path, false)
}

fn scan(path: &Path, or_working_in: bool) -> Vec<u32> {
    let needle = path.to_string_lossy().into_owned();
    let mine = this_and_ancestors();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if mine.contains(&pid) || !alive(pid) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let works_here = or_working_in
            && std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(path));
        if names_path(&String::from_utf8_lossy(&cmdline), &needle) || works_here {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// SIGKILL to `pid`, if it still exists.
pub fn kill(pid: u32) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(raw),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Kills every process of [`processes_in`]`(dir)`; returns their pids.
pub fn kill_processes_in(dir: &Path) -> Vec<u32> {
    let pids = processes_in(dir);
    for pid in &pids {
        kill(*pid);
    }
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        assert_eq!(
            Stat::parse("42 (qemu (main) x) S 1 42 42 0"),
            Some(Stat {
                comm: "qemu (main) x".into(),
                state: 'S'
            })
        );
        assert_eq!(Stat::parse("garbage"), None);
    }

    #[test]
    fn a_path_is_named_only_whole() {
        assert!(names_path("qemu -pidfile /t/w/run/x.pid", "/t/w"));
        assert!(names_path("/t/w", "/t/w"));
        assert!(names_path("a=/t/w\0b", "/t/w"));
        assert!(!names_path("qemu /t/w2/run", "/t/w"));
    }

    #[test]
    fn this_process_is_described_alive_with_its_threads() {
        let _t = std::thread::spawn(std::thread::park);
        let me = std::process::id();
        assert!(alive(me));
        let text = describe(me);
        assert!(text.contains("alive"), "{text}");
        assert!(text.contains("thread "), "{text}");
        assert!(describe(u32::MAX).ends_with("gone"));
    }

    #[test]
    fn a_process_in_a_directory_is_found_and_killed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .current_dir(dir.path())
            .spawn()
            .expect("sleep runs");
        assert_eq!(processes_in(dir.path()), vec![child.id()]);
        assert_eq!(kill_processes_in(dir.path()), vec![child.id()]);
        let status = child.wait().expect("reaped");
        assert!(!status.success());
        assert!(processes_in(dir.path()).is_empty());
    }
}
