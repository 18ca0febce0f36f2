//! Control groups for weaves: one group per weave, CPU weight and limit, memory limit.
//!
//! Hosts mount cgroup v2 alone (`/sys/fs/cgroup/cgroup.controllers` lists `cpu` and
//! `memory`) or in a hybrid layout with v1 hierarchies for the controllers
//! (`/sys/fs/cgroup/cpu`, `/sys/fs/cgroup/memory`). Both are supported: a weave's group
//! is `weft/<name>` in each hierarchy that has the controller.

use std::path::{Path, PathBuf};
pub use weft_api::env::Limits;

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

/// The groups of weave `name` (they may not exist yet).
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
}
