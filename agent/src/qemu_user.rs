//! QEMU as an unprivileged user (`qemu_user` in weftd.toml).
//!
//! QEMU starts as root (it creates taps, opens `/dev/kvm`, the disks, the vhost-user and
//! QMP sockets) and drops to the user with `-runas` before the guest runs, as libvirt's
//! QEMU does. After the drop QEMU can only create files where that user may: weftd gives
//! the user the directories in which a running QEMU makes files on weftd's behalf (new
//! overlays of the environment and of its weaves, backup scratch images and NBD sockets,
//! sync layers), and lets it traverse (`o+x`, never list) the directories above them.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// The user QEMU runs as, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuUser {
    /// What `-runas` gets: the configured name or `uid:gid`.
    pub spec: String,
    /// Its uid.
    pub uid: u32,
    /// Its (primary) gid.
    pub gid: u32,
}

impl QemuUser {
    /// Resolves `spec` (a user name, or `uid:gid`): it must be a valid `-runas` value,
    /// exist on this host (a name), and not be root.
    pub fn resolve(spec: &str) -> Result<QemuUser, String> {
        if !weft_qmp::launch::valid_run_as(spec) {
            return Err(format!("qemu_user {spec:?} must be a user name or uid:gid"));
        }
        let (uid, gid) = match spec.split_once(':') {
            Some((u, g)) => (
                u.parse().map_err(|_| format!("qemu_user {spec:?}: bad uid"))?,
                g.parse().map_err(|_| format!("qemu_user {spec:?}: bad gid"))?,
            ),
            None => match nix::unistd::User::from_name(spec) {
                Ok(Some(u)) => (u.uid.as_raw(), u.gid.as_raw()),
                Ok(None) => {
                    return Err(format!(
                        "qemu_user {spec:?} is not a user on this host: create it (useradd --system {spec}) or change qemu_user"
                    ))
                }
                Err(e) => return Err(format!("qemu_user {spec:?}: cannot look it up: {e}")),
            },
        };
        if uid == 0 || gid == 0 {
            return Err(format!(
                "qemu_user {spec:?} is root (uid or gid 0); name an unprivileged user"
            ));
        }
        Ok(QemuUser {
            spec: spec.to_string(),
            uid,
            gid,
        })
    }

    /// The configured user, if any.
    pub fn of(setting: Option<&str>) -> Result<Option<QemuUser>, String> {
        setting.map(QemuUser::resolve).transpose()
    }

    /// Creates `dir` if needed and gives it to this user (0700), so that a QEMU running
    /// as the user can create files in it; the directories from `root` (included) down
    /// to `dir` get `o+x`, so the user can reach it without listing them. `dir` must
    /// lie under `root`.
    pub fn give_dir(&self, root: &Path, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let rel = dir.strip_prefix(root).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not under {}", dir.display(), root.display()),
            )
        })?;
        let mut at = root.to_path_buf();
        let mut parts = rel.components().peekable();
        while parts.peek().is_some() {
            let m = std::fs::metadata(&at)?;
            if m.mode() & 0o001 == 0 {
                std::fs::set_permissions(
                    &at,
                    std::fs::Permissions::from_mode((m.mode() & 0o7777) | 0o001),
                )?;
            }
            if let Some(p) = parts.next() {
                at.push(p);
            }
        }
        std::os::unix::fs::chown(dir, Some(self.uid), Some(self.gid))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_names_and_ids() {
        let nobody = QemuUser::resolve("nobody").unwrap();
        assert_eq!((nobody.uid, nobody.spec.as_str()), (65534, "nobody"));
        assert_eq!(QemuUser::resolve("107:108").unwrap().gid, 108);
        for bad in ["root", "0:5", "5:0", "no-such-user-here", "a b", ""] {
            assert!(QemuUser::resolve(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn give_dir_owns_the_leaf_and_opens_only_traversal_above() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
        let leaf = root.join("environments/e");
        let user = QemuUser::resolve("65534:65534").unwrap();
        user.give_dir(&root, &leaf).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&root), 0o701);
        assert_eq!(mode(&root.join("environments")) & 0o001, 0o001);
        let m = std::fs::metadata(&leaf).unwrap();
        assert_eq!((m.uid(), m.gid(), mode(&leaf)), (65534, 65534, 0o700));
        assert!(user.give_dir(&root, tmp.path()).is_err());
    }
}
