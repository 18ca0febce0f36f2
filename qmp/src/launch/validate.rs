//! Checks of a [`VmConfig`] before any of it reaches QEMU's command line: names, ids,
//! interface names, MAC addresses, machine types and users that could add options of
//! their own, and disks and backing chains that must exist and fit together.

use std::os::unix::fs::FileTypeExt;

use super::{DiskConfig, DiskFormat, NicConfig, VmConfig, VsockDevice, MAX_CPUS, MIN_MEMORY_MIB};
use crate::Error;

fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn valid_machine(machine: &str) -> bool {
    !machine.is_empty()
        && machine
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `id` can name a QEMU device or backend: 1 to 32 of `A-Z a-z 0-9 _ -`
/// (QEMU ids start with a letter).
pub fn valid_device_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id.as_bytes()[0].is_ascii_alphabetic()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `name` is a valid Linux interface name that is also safe in a QEMU option
/// value: 1 to 15 bytes of printable ASCII, none of `/ : , =` or whitespace, and not
/// `.` or `..`.
pub fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b':' | b',' | b'='))
}

/// Whether `mac` is a unicast MAC address written as exactly six pairs of hex digits
/// separated by `:` (a multicast address, low bit of the first octet set, or all
/// zeros is refused).
pub fn valid_mac(mac: &str) -> bool {
    let octets: Vec<&str> = mac.split(':').collect();
    octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
        && u8::from_str_radix(octets[0], 16).is_ok_and(|b| b & 1 == 0)
        && octets.iter().any(|o| *o != "00")
}

/// Checks a configuration before QEMU sees it (QEMU options are built from it).
pub trait Validate {
    /// `Ok` if QEMU may be given this configuration, else [`Error::InvalidConfig`]
    /// saying what is wrong.
    fn validate(&self) -> Result<(), Error>;
}

impl Validate for NicConfig {
    /// Checks the id, tap and MAC before any of them is put into QEMU's `-netdev` and
    /// `-device` options (where a `,` would add options of the caller's choosing).
    fn validate(&self) -> Result<(), Error> {
        if !valid_device_id(&self.id) {
            return Err(Error::InvalidConfig(format!(
                "NIC id {:?} must be 1 to 32 characters of A-Z, a-z, 0-9, '_' and '-', starting with a letter",
                self.id
            )));
        }
        if !valid_ifname(&self.tap) {
            return Err(Error::InvalidConfig(format!(
                "NIC {} tap {:?} must be an interface name of 1 to 15 printable characters without '/', ':', ',', '=' or spaces",
                self.id, self.tap
            )));
        }
        if !valid_mac(&self.mac) {
            return Err(Error::InvalidConfig(format!(
                "NIC {} MAC {:?} must be six hex pairs separated by ':' (a unicast address, e.g. 52:54:00:12:34:56)",
                self.id, self.mac
            )));
        }
        Ok(())
    }
}

impl Validate for VmConfig {
    /// Checks the configuration before QEMU sees it: disk names match `[a-z0-9_-]{1,32}`
    /// and are unique, memory is at least 16 MiB, 1 to 64 vCPUs, disk images exist and
    /// are regular files or block devices, kernel and initrd exist if given, a vsock
    /// device has a usable CID or an absolute socket path.
    fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if !valid_machine(&self.machine) {
            return bad(format!(
                "machine type {:?} must be non-empty and contain only letters, digits, '-', '_' and '.'",
                self.machine
            ));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return bad(format!(
                "memory of {} MiB is below the minimum of {MIN_MEMORY_MIB} MiB",
                self.memory_mib
            ));
        }
        // QEMU's -m takes the size in MiB with a suffix; keep it far from overflow.
        if self.memory_mib > (1 << 30) {
            return bad(format!("memory of {} MiB is too large", self.memory_mib));
        }
        if !(1..=MAX_CPUS).contains(&self.cpus) {
            return bad(format!(
                "{} vcpus is outside the range 1 to {MAX_CPUS}",
                self.cpus
            ));
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            return bad("an initrd was given without a kernel".into());
        }
        if self.append.is_some() && self.kernel.is_none() {
            return bad("a kernel command line was given without a kernel".into());
        }
        for (what, path) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if let Some(path) = path {
                match std::fs::metadata(path) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => {
                        return bad(format!("{what} {} is not a regular file", path.display()))
                    }
                    Err(e) => return bad(format!("{what} {}: {e}", path.display())),
                }
            }
        }
        match &self.vsock {
            Some(VsockDevice::Kernel { guest_cid }) if !(3..u32::MAX).contains(guest_cid) => {
                return bad(format!(
                    "vsock guest CID {guest_cid} is reserved; use 3 to {}",
                    u32::MAX - 1
                ));
            }
            Some(VsockDevice::VhostUser { socket }) if !socket.is_absolute() => {
                return bad(format!(
                    "vsock vhost-user socket {} is not an absolute path",
                    socket.display()
                ));
            }
            _ => {}
        }
        let mut seen = std::collections::HashSet::new();
        // Disk names: valid, and unique across both kinds of disk.
        let mut check_name = |name: &str| -> Result<(), Error> {
            if !valid_name(name) {
                return Err(Error::InvalidConfig(format!(
                    "disk name {name:?} must be 1 to 32 characters of a-z, 0-9, '_' and '-'"
                )));
            }
            if !seen.insert(name.to_string()) {
                return Err(Error::InvalidConfig(format!(
                    "disk name {name:?} is used twice"
                )));
            }
            Ok(())
        };
        for disk in &self.disks {
            check_name(&disk.name)?;
            check_chain(disk)?;
            match std::fs::metadata(&disk.path) {
                Ok(m) if m.is_file() || m.file_type().is_block_device() => {}
                Ok(_) => {
                    return bad(format!(
                        "disk {} image {} is neither a regular file nor a block device",
                        disk.name,
                        disk.path.display()
                    ))
                }
                Err(e) => {
                    return bad(format!(
                        "disk {} image {}: {e}",
                        disk.name,
                        disk.path.display()
                    ))
                }
            }
        }
        let (mut ids, mut taps) = (
            std::collections::HashSet::new(),
            std::collections::HashSet::new(),
        );
        for nic in &self.nics {
            nic.validate()?;
            if !ids.insert(&nic.id) {
                return bad(format!("NIC id {:?} is used twice", nic.id));
            }
            if !taps.insert(&nic.tap) {
                return bad(format!("tap {:?} is used by two NICs", nic.tap));
            }
        }
        for disk in &self.vhost_user_disks {
            check_name(&disk.name)?;
            if !disk.socket.is_absolute() {
                return bad(format!(
                    "disk {} vhost-user socket {} is not an absolute path",
                    disk.name,
                    disk.socket.display()
                ));
            }
            if !(1..=64).contains(&disk.queues) {
                return bad(format!(
                    "disk {}: {} queues is outside the range 1 to 64",
                    disk.name, disk.queues
                ));
            }
        }
        Ok(())
    }
}

/// The most images below a disk's top ([`DiskConfig::backing`]).
pub const MAX_BACKING_CHAIN: usize = 64;

/// A disk's chain: formats that can have a backing above the ones below, and a bound.
pub(crate) fn check_chain(disk: &DiskConfig) -> Result<(), Error> {
    let bad = |msg: String| Err(Error::InvalidConfig(msg));
    if disk.backing.len() > MAX_BACKING_CHAIN {
        return bad(format!(
            "disk {} has {} backing images; at most {MAX_BACKING_CHAIN}",
            disk.name,
            disk.backing.len()
        ));
    }
    let mut above = disk.format;
    for b in &disk.backing {
        if above == DiskFormat::Raw {
            return bad(format!(
                "disk {}: a raw image cannot have a backing image ({})",
                disk.name,
                b.path.display()
            ));
        }
        if !b.path.is_absolute() {
            return bad(format!(
                "disk {}: backing image {} is not an absolute path",
                disk.name,
                b.path.display()
            ));
        }
        above = b.format;
    }
    Ok(())
}

/// Whether `user` can be given to QEMU's `-runas`: a user name (`[a-z_][a-z0-9_-]*`,
/// at most 32 characters, optionally ending in `$`) or `uid:gid` in digits. Nothing else
/// reaches the command line.
pub fn valid_run_as(user: &str) -> bool {
    let name = |s: &str| {
        let s = s.strip_suffix('$').unwrap_or(s);
        (1..=32).contains(&s.len())
            && s.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    };
    let digits = |s: &str| (1..=10).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    match user.split_once(':') {
        Some((u, g)) => digits(u) && digits(g),
        None => name(user),
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::path::{Path, PathBuf};

    use super::*;

    #[test]
    fn nic_validation_refuses_qemu_option_injection() {
        let nic = |id: &str, tap: &str, mac: &str| NicConfig {
            id: id.into(),
            tap: tap.into(),
            mac: mac.into(),
        };
        nic("net0", "weft-tap0", "52:54:00:12:34:56")
            .validate()
            .expect("valid");
        nic("Net_1-a", "tap.x@1", "02:AB:cd:00:00:01")
            .validate()
            .expect("valid");
        for mac in [
            "52:54:00:12:34:56,romfile=/etc/hostname",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52-54-00-12-34-56",
            "52:54:00:12:34:5g",
            "525:4:00:12:34:56",
            "+2:54:00:12:34:56",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
            "",
        ] {
            assert!(
                nic("net0", "tap0", mac).validate().is_err(),
                "MAC {mac:?} was accepted"
            );
        }
        for tap in [
            "",
            ".",
            "..",
            "a/b",
            "tap0,script=/x",
            "tap=1",
            "tap 0",
            "tap\t0",
            "eth0:1",
            "sixteen-bytes-xx",
            "tāp",
        ] {
            assert!(
                nic("net0", tap, "52:54:00:12:34:56").validate().is_err(),
                "tap {tap:?} was accepted"
            );
        }
        for id in [
            "",
            "0net",
            "net0,romfile=/x",
            "net.0",
            "n e t",
            &"n".repeat(33),
        ] {
            assert!(
                nic(id, "tap0", "52:54:00:12:34:56").validate().is_err(),
                "id {id:?} was accepted"
            );
        }
        // Twice the same id or tap in one configuration.
        let twice = |a: NicConfig, b: NicConfig| VmConfig {
            nics: vec![a, b],
            ..VmConfig::default()
        };
        let mac = "52:54:00:12:34:56";
        assert!(twice(nic("net0", "t0", mac), nic("net0", "t1", mac))
            .validate()
            .is_err());
        assert!(twice(nic("net0", "t0", mac), nic("net1", "t0", mac))
            .validate()
            .is_err());
        twice(nic("net0", "t0", mac), nic("net1", "t1", mac))
            .validate()
            .expect("valid");
        let bad = VmConfig {
            nics: vec![nic(
                "net0",
                "tap0",
                "52:54:00:12:34:56,romfile=/etc/hostname",
            )],
            ..VmConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    fn disk_file(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        File::create(&p)
            .expect("create")
            .set_len(1 << 20)
            .expect("set_len");
        p
    }

    #[test]
    fn validate_accepts_good_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = VmConfig {
            disks: vec![
                DiskConfig {
                    name: "vda".into(),
                    path: disk_file(dir.path(), "a.raw"),
                    format: DiskFormat::Raw,
                    read_only: false,
                    backing: Vec::new(),
                },
                DiskConfig {
                    name: "data_1-x".into(),
                    path: disk_file(dir.path(), "b.raw"),
                    format: DiskFormat::Raw,
                    read_only: true,
                    backing: Vec::new(),
                },
            ],
            ..VmConfig::default()
        };
        cfg.validate().expect("valid");
        VmConfig::default().validate().expect("default is valid");
    }

    #[test]
    fn validate_rejects_bad_configs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = disk_file(dir.path(), "a.raw");
        let disk = |name: &str, path: &Path| DiskConfig {
            name: name.into(),
            path: path.to_owned(),
            format: DiskFormat::Raw,
            read_only: false,
            backing: Vec::new(),
        };
        let cases: Vec<(&str, VmConfig)> = vec![
            (
                "memory",
                VmConfig {
                    memory_mib: 15,
                    ..VmConfig::default()
                },
            ),
            (
                "vcpus",
                VmConfig {
                    cpus: 0,
                    ..VmConfig::default()
                },
            ),
            (
                "vcpus",
                VmConfig {
                    cpus: 65,
                    ..VmConfig::default()
                },
            ),
            (
                "machine",
                VmConfig {
                    machine: "q35,accel=kvm".into(),
                    ..VmConfig::default()
                },
            ),
            (
                "machine",
                VmConfig {
                    machine: String::new(),
                    ..VmConfig::default()
                },
            ),
            (
                "disk name",
                VmConfig {
                    disks: vec![disk("VDA", &good)],
                    ..VmConfig::default()
                },
            ),
            (
                "disk name",
                VmConfig {
                    disks: vec![disk("", &good)],
                    ..VmConfig::default()
                },
            ),
            (
                "disk name",
                VmConfig {
                    disks: vec![disk(&"a".repeat(33), &good)],
                    ..VmConfig::default()
                },
            ),
            (
                "disk name",
                VmConfig {
                    disks: vec![disk("a,b", &good)],
                    ..VmConfig::default()
                },
            ),
            (
                "used twice",
                VmConfig {
                    disks: vec![disk("vda", &good), disk("vda", &good)],
                    ..VmConfig::default()
                },
            ),
            (
                "missing.raw",
                VmConfig {
                    disks: vec![disk("vda", &dir.path().join("missing.raw"))],
                    ..VmConfig::default()
                },
            ),
            (
                "neither",
                VmConfig {
                    disks: vec![disk("vda", dir.path())],
                    ..VmConfig::default()
                },
            ),
            (
                "kernel",
                VmConfig {
                    kernel: Some(dir.path().join("nokernel")),
                    ..VmConfig::default()
                },
            ),
            (
                "initrd",
                VmConfig {
                    kernel: Some(good.clone()),
                    initrd: Some(dir.path().join("noinitrd")),
                    ..VmConfig::default()
                },
            ),
            (
                "without a kernel",
                VmConfig {
                    initrd: Some(good.clone()),
                    ..VmConfig::default()
                },
            ),
            (
                "without a kernel",
                VmConfig {
                    append: Some("quiet".into()),
                    ..VmConfig::default()
                },
            ),
        ];
        for (needle, cfg) in cases {
            match cfg.validate() {
                Err(Error::InvalidConfig(msg)) => {
                    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}")
                }
                other => panic!("{cfg:?} gave {other:?}, want InvalidConfig({needle})"),
            }
        }
        // The longest allowed name is fine.
        VmConfig {
            disks: vec![disk(&"a".repeat(32), &good)],
            ..VmConfig::default()
        }
        .validate()
        .expect("32-character name");
    }
}
