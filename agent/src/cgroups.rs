//! Control groups for weaves: one group per weave, CPU weight and limit, memory limit.
//!
//! Hosts mount cgroup v2 alone (`/sys/fs/cgroup/cgroup.controllers` lists `cpu` and
//! `memory`) or in a hybrid layout with v1 hierarchies for the controllers
//! (`/sys/fs/cgroup/cpu`, `/sys/fs/cgroup/memory`). Both are supported: a weave's group
//! is `weft/<name>` in each hierarchy that has the controller.
//!
//! weftd's logic reaches cgroups through the [`Cgroups`] trait, built once by the daemon
//! ([`crate::host::Host`]): [`Kernel`] writes `/sys/fs/cgroup`; [`Recorder`] is the
//! recording test double (it models which groups exist and can fail the Nth change).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

pub use weft_api::env::Limits;

/// The cgroups of weaves, by weave name: what weftd does with them.
pub trait Cgroups: Send + Sync + std::fmt::Debug {
    /// Creates weave `name`'s groups (an existing group is kept).
    fn create(&self, name: &str) -> std::io::Result<()>;
    /// Applies `limits` to weave `name`'s groups (an absent limit removes a previous one).
    fn apply(&self, name: &str, limits: &Limits) -> std::io::Result<()>;
    /// The memory limit in force on weave `name`, in MiB; none when unlimited or when
    /// it has no memory group.
    fn memory_limit_mib(&self, name: &str) -> Option<u64>;
    /// The group directories of weave `name` that exist (what its QEMU joins).
    fn dirs(&self, name: &str) -> Vec<PathBuf>;
    /// Removes weave `name`'s groups (they must be empty); a group the kernel still
    /// reports busy is tried again for up to `wait`. Blocks: call it off the runtime.
    fn remove(&self, name: &str, wait: Duration) -> std::io::Result<()>;
}

/// The real cgroups under `/sys/fs/cgroup` (v2, or v1 hierarchies for cpu and memory).
#[derive(Debug, Default, Clone, Copy)]
pub struct Kernel;

impl Cgroups for Kernel {
    fn create(&self, name: &str) -> std::io::Result<()> {
        groups(name).create()
    }

    fn apply(&self, name: &str, limits: &Limits) -> std::io::Result<()> {
        groups(name).apply(limits)
    }

    fn memory_limit_mib(&self, name: &str) -> Option<u64> {
        groups(name).memory_limit_mib()
    }

    fn dirs(&self, name: &str) -> Vec<PathBuf> {
        groups(name)
            .dirs()
            .into_iter()
            .filter(|d| d.is_dir())
            .collect()
    }

    fn remove(&self, name: &str, wait: Duration) -> std::io::Result<()> {
        groups(name).remove(wait)
    }
}

/// One call a [`Recorder`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// [`Cgroups::create`]
    Create(String),
    /// [`Cgroups::apply`]
    Apply(String, Limits),
    /// [`Cgroups::memory_limit_mib`]
    MemoryLimit(String),
    /// [`Cgroups::dirs`]
    Dirs(String),
    /// [`Cgroups::remove`]
    Remove(String),
}

impl Call {
    /// Whether the call changes something (reads do not).
    pub fn is_mutation(&self) -> bool {
        matches!(self, Call::Create(_) | Call::Apply(..) | Call::Remove(_))
    }
}

#[derive(Debug, Default)]
struct RecorderState {
    calls: Vec<Call>,
    mutations: usize,
    fail_nth: Option<usize>,
    /// The groups that exist, with the limits in force.
    groups: BTreeMap<String, Limits>,
}

/// A recording [`Cgroups`] double for unit tests (in the spirit of
/// `weft_netns::Recorder`): records every call, models which groups exist and their
/// limits, and fails the Nth change when told to. It touches nothing on the host; the
/// directories it reports are under a root that does not exist.
#[derive(Debug, Default)]
pub struct Recorder {
    state: Mutex<RecorderState>,
}

/// Where the [`Recorder`]'s groups claim to be (nothing is there).
const RECORDED_ROOT: &str = "/nonexistent/weft-recorded-cgroup";

impl Recorder {
    /// No groups yet.
    pub fn new() -> Recorder {
        Recorder::default()
    }

    fn lock(&self) -> MutexGuard<'_, RecorderState> {
        // A panicking test must not hide the calls from the others.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the `n`th change from now on (1-based: create, apply, remove) fail with EIO.
    pub fn fail_nth_mutation(&self, n: usize) {
        let mut st = self.lock();
        st.fail_nth = Some(st.mutations + n);
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The weaves whose groups exist.
    pub fn groups(&self) -> Vec<String> {
        self.lock().groups.keys().cloned().collect()
    }

    /// The limits in force on weave `name`'s groups, if they exist.
    pub fn limits(&self, name: &str) -> Option<Limits> {
        self.lock().groups.get(name).copied()
    }

    /// Records `call`; a change counts towards (and may hit) the injected failure.
    fn record(&self, call: Call) -> Result<MutexGuard<'_, RecorderState>, std::io::Error> {
        let mut st = self.lock();
        let mutation = call.is_mutation();
        st.calls.push(call);
        if mutation {
            st.mutations += 1;
            if st.fail_nth == Some(st.mutations) {
                st.fail_nth = None;
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
        }
        Ok(st)
    }
}

fn missing(name: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{RECORDED_ROOT}/weft/{name}: no such group"),
    )
}

impl Cgroups for Recorder {
    fn create(&self, name: &str) -> std::io::Result<()> {
        let mut st = self.record(Call::Create(name.to_string()))?;
        st.groups.entry(name.to_string()).or_default();
        Ok(())
    }

    fn apply(&self, name: &str, limits: &Limits) -> std::io::Result<()> {
        let mut st = self.record(Call::Apply(name.to_string(), *limits))?;
        let group = st.groups.get_mut(name).ok_or_else(|| missing(name))?;
        *group = *limits;
        Ok(())
    }

    fn memory_limit_mib(&self, name: &str) -> Option<u64> {
        let st = self.record(Call::MemoryLimit(name.to_string())).ok()?;
        st.groups.get(name)?.memory_mib
    }

    fn dirs(&self, name: &str) -> Vec<PathBuf> {
        match self.record(Call::Dirs(name.to_string())) {
            Ok(st) if st.groups.contains_key(name) => {
                vec![Path::new(RECORDED_ROOT).join("weft").join(name)]
            }
            _ => Vec::new(),
        }
    }

    fn remove(&self, name: &str, _wait: Duration) -> std::io::Result<()> {
        let mut st = self.record(Call::Remove(name.to_string()))?;
        st.groups.remove(name);
        Ok(())
    }
}

/// A weave's groups, one per hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Groups {
    /// v2: the one group; hybrid: the cpu hierarchy's group.
    pub cpu: Option<PathBuf>,
    /// Hybrid: the memory hierarchy's group (v2: same as `cpu`).
    pub memory: Option<PathBuf>,
    /// Cgroup v2 layout.
    pub unified: bool,
}

const ROOT: &str = "/sys/fs/cgroup";

/// A memory limit file's content in MiB: `max` (v2) and v1's "unlimited" (a page-rounded
/// `i64::MAX`, or more) mean none.
fn parse_limit(text: &str) -> Option<u64> {
    let bytes: u64 = text.trim().parse().ok()?;
    (bytes < 1 << 62).then_some(bytes / (1024 * 1024))
}

fn has_controller(root: &Path, name: &str) -> bool {
    std::fs::read_to_string(root.join("cgroup.controllers"))
        .map(|c| c.split_whitespace().any(|x| x == name))
        .unwrap_or(false)
}

/// The groups of weave `name` under `/sys/fs/cgroup` (they may not exist yet); what
/// [`Kernel`] works on.
pub fn groups(name: &str) -> Groups {
    let root = Path::new(ROOT);
    if has_controller(root, "cpu") && has_controller(root, "memory") {
        let g = root.join("weft").join(name);
        return Groups {
            cpu: Some(g.clone()),
            memory: Some(g),
            unified: true,
        };
    }
    let v1 = |c: &str| {
        let h = root.join(c);
        h.join("cgroup.procs")
            .exists()
            .then(|| h.join("weft").join(name))
    };
    Groups {
        cpu: v1("cpu"),
        memory: v1("memory"),
        unified: false,
    }
}

impl Groups {
    /// The distinct group directories.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self.cpu.iter().chain(self.memory.iter()).cloned().collect();
        out.dedup();
        out
    }

    /// Creates the groups (and, on v2, enables cpu and memory for the children of `weft`).
    pub fn create(&self) -> std::io::Result<()> {
        for d in self.dirs() {
            std::fs::create_dir_all(&d)?;
        }
        if self.unified {
            let parent = Path::new(ROOT).join("weft");
            // Best effort: the controllers may already be enabled.
            let _ = std::fs::write(
                Path::new(ROOT).join("cgroup.subtree_control"),
                "+cpu +memory",
            );
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+cpu +memory");
        }
        Ok(())
    }

    /// Applies limits (an absent limit removes a previous one).
    pub fn apply(&self, limits: &Limits) -> std::io::Result<()> {
        const PERIOD: u64 = 100_000;
        if let Some(cpu) = &self.cpu {
            let quota = limits
                .cpu_percent
                .map(|p| u64::from(p.max(1)) * PERIOD / 100);
            if self.unified {
                let v = quota.map_or("max".to_string(), |q| q.to_string());
                std::fs::write(cpu.join("cpu.max"), format!("{v} {PERIOD}"))?;
            } else {
                std::fs::write(cpu.join("cpu.cfs_period_us"), PERIOD.to_string())?;
                let v = quota.map_or("-1".to_string(), |q| q.to_string());
                std::fs::write(cpu.join("cpu.cfs_quota_us"), v)?;
            }
        }
        if let Some(mem) = &self.memory {
            let bytes = limits.memory_mib.map(|m| m.saturating_mul(1024 * 1024));
            if self.unified {
                let v = bytes.map_or("max".to_string(), |b| b.to_string());
                std::fs::write(mem.join("memory.max"), v)?;
            } else {
                let v = bytes.map_or("-1".to_string(), |b| b.to_string());
                std::fs::write(mem.join("memory.limit_in_bytes"), v)?;
            }
        }
        Ok(())
    }

    /// The memory limit in force, in MiB (rounded down); none when unlimited or when
    /// there is no memory group.
    pub fn memory_limit_mib(&self) -> Option<u64> {
        let mem = self.memory.as_ref()?;
        let file = if self.unified {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        parse_limit(&std::fs::read_to_string(mem.join(file)).ok()?)
    }

    /// Removes the groups (they must be empty: QEMU has exited). A group the kernel
    /// still reports busy (an exited process not yet torn down, on a loaded host) is
    /// tried again for up to `wait`.
    pub fn remove(&self, wait: std::time::Duration) -> std::io::Result<()> {
        let deadline = std::time::Instant::now() + wait;
        for d in self.dirs() {
            loop {
                match std::fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY)
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => {
                        let procs = std::fs::read_to_string(d.join("cgroup.procs"))
                            .unwrap_or_default()
                            .split_whitespace()
                            .collect::<Vec<_>>()
                            .join(" ");
                        return Err(std::io::Error::new(
                            e.kind(),
                            format!("{}: {e} (processes still in it: {procs})", d.display()),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_limits_read_back() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("268435456\n"), Some(256));
        assert_eq!(parse_limit("268435457"), Some(256));
        assert_eq!(parse_limit("garbage"), None);
        let dir = tempfile::tempdir().expect("tempdir");
        let g = Groups {
            cpu: Some(dir.path().to_path_buf()),
            memory: Some(dir.path().to_path_buf()),
            unified: true,
        };
        assert_eq!(g.memory_limit_mib(), None);
        g.apply(&Limits {
            cpu_percent: Some(50),
            memory_mib: Some(128),
        })
        .expect("apply");
        assert_eq!(g.memory_limit_mib(), Some(128));
        g.apply(&Limits::default()).expect("apply");
        assert_eq!(g.memory_limit_mib(), None);
    }

    #[test]
    fn the_recorder_models_groups_and_fails_the_nth_change() {
        let rec = Recorder::new();
        let limits = Limits {
            cpu_percent: Some(50),
            memory_mib: Some(128),
        };
        // Limits need the group.
        assert_eq!(
            rec.apply("w1", &limits).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        assert!(rec.dirs("w1").is_empty());
        rec.create("w1").expect("create");
        rec.apply("w1", &limits).expect("apply");
        assert_eq!(rec.memory_limit_mib("w1"), Some(128));
        assert_eq!(rec.dirs("w1").len(), 1);
        assert!(
            !rec.dirs("w1")[0].exists(),
            "the double touches no real group"
        );
        rec.fail_nth_mutation(2);
        rec.create("w2").expect("first change");
        assert_eq!(
            rec.remove("w1", Duration::ZERO).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert_eq!(rec.groups(), ["w1", "w2"]);
        rec.remove("w1", Duration::ZERO).expect("remove");
        assert_eq!(rec.groups(), ["w2"]);
        assert_eq!(rec.limits("w2"), Some(Limits::default()));
        assert_eq!(rec.calls().first(), Some(&Call::Apply("w1".into(), limits)));
        assert_eq!(rec.calls().last(), Some(&Call::Remove("w1".into())));
    }
}
