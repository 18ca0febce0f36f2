//! The command lines of `qemu-system-x86_64` ([`command_line`]) and
//! `qemu-storage-daemon` ([`storage_daemon_command_line`]) for a configuration: pure,
//! apart from a `stat` per disk.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use super::SpawnOptions;
use super::{
    Accel, DiskConfig, DiskFormat, LaunchPaths, VmConfig, VsockDevice, BALLOON_ID, VSOCK_ID,
};

/// Escapes a value for QEMU's `key=value,...` option syntax (a comma is doubled).
fn opt_escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

fn accel_name(accel: Accel) -> &'static str {
    match accel {
        Accel::Tcg => "tcg",
        Accel::Kvm => "kvm",
        // spawn() resolves Auto first; a bare command line lets QEMU fall back itself.
        Accel::Auto => "kvm:tcg",
    }
}

/// The `-blockdev` values of a disk, in JSON syntax (no escaping trouble with commas or
/// '=' in paths): a file node and a format node per image, the lowest image of the
/// chain first, the disk's own (`<name>-file`, `<name>-fmt`) last. The driver of every
/// node is named (no format probing), and every qcow2 node names its backing node, or
/// `null`, so QEMU never opens a file named by an image's header. Images below the top
/// are opened read-only (their file nodes with `auto-read-only`, so that a commit can
/// reopen them for writing). A block device needs QEMU's `host_device` driver rather
/// than `file`.
fn blockdev_json(disk: &DiskConfig) -> Vec<String> {
    let file_driver = |path: &Path| {
        let is_blk = std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        if is_blk {
            "host_device"
        } else {
            "file"
        }
    };
    let mut out = Vec::with_capacity(2 * (disk.backing.len() + 1));
    let mut below: Option<String> = None;
    for (i, b) in disk.backing.iter().enumerate().rev() {
        let (file_node, fmt_node) = (
            format!("{}-b{i}f", disk.name),
            format!("{}-b{i}", disk.name),
        );
        let file = serde_json::json!({
            "driver": file_driver(&b.path),
            "node-name": file_node,
            "filename": b.path.to_string_lossy(),
            "auto-read-only": true,
        });
        let mut fmt = serde_json::json!({
            "driver": b.format.driver(),
            "node-name": fmt_node,
            "file": file_node,
            "read-only": true,
        });
        if b.format == DiskFormat::Qcow2 {
            fmt["backing"] = below.map_or(serde_json::Value::Null, serde_json::Value::from);
        }
        out.push(file.to_string());
        out.push(fmt.to_string());
        below = Some(fmt_node);
    }
    let file = serde_json::json!({
        "driver": file_driver(&disk.path),
        "node-name": disk.file_node(),
        "filename": disk.path.to_string_lossy(),
        "read-only": disk.read_only,
    });
    let mut fmt = serde_json::json!({
        "driver": disk.format.driver(),
        "node-name": disk.format_node(),
        "file": disk.file_node(),
        "read-only": disk.read_only,
    });
    if disk.format == DiskFormat::Qcow2 {
        fmt["backing"] = below.map_or(serde_json::Value::Null, serde_json::Value::from);
    }
    out.push(file.to_string());
    out.push(fmt.to_string());
    out
}

/// The `qemu-storage-daemon` arguments that open `disks` under the same node names
/// QEMU uses (so the backup recipe is the same) with a QMP monitor on
/// `paths.qmp_socket`. Used to back up disks of a VM that is not running.
pub fn storage_daemon_command_line(disks: &[DiskConfig], paths: &LaunchPaths) -> Vec<String> {
    let mut args = Vec::new();
    for disk in disks {
        for node in blockdev_json(disk) {
            args.push("--blockdev".to_string());
            args.push(node);
        }
    }
    args.push("--chardev".into());
    args.push(format!(
        "socket,id=qmp,path={},server=on,wait=off",
        opt_escape(&paths.qmp_socket)
    ));
    args.push("--monitor".into());
    args.push("chardev=qmp".into());
    if let Some(pid_file) = &paths.pid_file {
        args.push("--pidfile".into());
        args.push(pid_file.to_string_lossy().into_owned());
    }
    args
}

/// The QEMU arguments (without the binary) for `config` and `paths`.
///
/// Pure apart from one `stat` per disk (a block device needs QEMU's `host_device`
/// driver rather than `file`). `Accel::Auto` becomes `accel=kvm:tcg` here; [`spawn`](crate::process::spawn)
/// resolves it by probing first.
pub fn command_line(config: &VmConfig, paths: &LaunchPaths) -> Vec<String> {
    let mut args: Vec<String> = vec!["-nodefaults".into(), "-no-user-config".into()];
    let mut push = |a: &str, b: String| {
        args.push(a.to_owned());
        args.push(b);
    };
    push(
        "-machine",
        format!("{},accel={}", config.machine, accel_name(config.accel)),
    );
    if config.accel == Accel::Kvm {
        push("-cpu", "host".into());
    }
    push("-m", format!("{}M", config.memory_mib));
    push("-smp", config.cpus.to_string());
    if config.shared_memory || config.needs_shared_memory() {
        push(
            "-object",
            format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                config.memory_mib
            ),
        );
        push("-numa", "node,memdev=mem".into());
    }
    for disk in &config.disks {
        for node in blockdev_json(disk) {
            push("-blockdev", node);
        }
        push(
            "-device",
            format!(
                "virtio-blk-pci,drive={},id={}",
                disk.format_node(),
                disk.name
            ),
        );
    }
    for disk in &config.vhost_user_disks {
        push(
            "-chardev",
            format!(
                "socket,id={}-chr,path={},reconnect=1",
                disk.name,
                opt_escape(&disk.socket)
            ),
        );
        push(
            "-device",
            format!(
                "vhost-user-blk-pci,chardev={}-chr,id={},num-queues={}",
                disk.name, disk.name, disk.queues
            ),
        );
    }
    for nic in &config.nics {
        push(
            "-netdev",
            format!(
                "tap,id={},ifname={},script=no,downscript=no",
                nic.id, nic.tap
            ),
        );
        push(
            "-device",
            format!(
                "virtio-net-pci,netdev={},id={},mac={}",
                nic.id, nic.id, nic.mac
            ),
        );
    }
    if config.balloon {
        push("-device", format!("virtio-balloon-pci,id={BALLOON_ID}"));
    }
    match &config.vsock {
        None => {}
        Some(VsockDevice::Kernel { guest_cid }) => push(
            "-device",
            format!("vhost-vsock-pci,id={VSOCK_ID},guest-cid={guest_cid}"),
        ),
        Some(VsockDevice::VhostUser { socket }) => {
            push(
                "-chardev",
                format!("socket,id={VSOCK_ID}-chr,path={}", opt_escape(socket)),
            );
            push(
                "-device",
                format!("vhost-user-vsock-pci,id={VSOCK_ID},chardev={VSOCK_ID}-chr"),
            );
        }
    }
    push(
        "-chardev",
        format!("file,id=serial0,path={}", opt_escape(&paths.serial_log)),
    );
    push("-serial", "chardev:serial0".into());
    push(
        "-chardev",
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            opt_escape(&paths.qmp_socket)
        ),
    );
    push("-mon", "chardev=qmp,mode=control".into());
    if let Some(kernel) = &config.kernel {
        push("-kernel", kernel.to_string_lossy().into_owned());
    }
    if let Some(initrd) = &config.initrd {
        push("-initrd", initrd.to_string_lossy().into_owned());
    }
    if let Some(append) = &config.append {
        push("-append", append.clone());
    }
    if let Some(pid_file) = &paths.pid_file {
        push("-pidfile", pid_file.to_string_lossy().into_owned());
    }
    push("-display", "none".into());
    push("-vga", "none".into());
    args
}

/// The hardening arguments of `opts` (appended by [`spawn`](crate::process::spawn)):
/// `-sandbox on,obsolete=deny,elevateprivileges=…,spawn=deny,resourcecontrol=deny`
/// and `-runas USER`. QEMU 7.2 installs its filter before it drops to the `-runas`
/// user, so with `run_as` the privilege changes that drop needs stay allowed
/// (`elevateprivileges=allow`); once dropped, QEMU has no capabilities, runs with
/// `no_new_privs`, and cannot execute a set-uid program (`spawn=deny`), so those calls
/// give it nothing.
pub fn sandbox_args(opts: &SpawnOptions) -> Vec<String> {
    let mut args = Vec::new();
    if opts.sandbox {
        let elevate = if opts.run_as.is_some() {
            "allow"
        } else {
            "deny"
        };
        args.push("-sandbox".to_string());
        args.push(format!(
            "on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny"
        ));
    }
    if let Some(user) = &opts.run_as {
        args.push("-runas".to_string());
        args.push(user.clone());
    }
    args
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::launch::validate::check_chain;
    use crate::launch::Validate;
    use crate::launch::{valid_run_as, BackingImage, NicConfig, VhostUserDisk, MAX_BACKING_CHAIN};
    use crate::Error;

    fn paths() -> LaunchPaths {
        LaunchPaths {
            qmp_socket: "/run/weft/vm1/qmp.sock".into(),
            serial_log: "/var/log/weft/vm,1/serial.log".into(),
            output_log: "/var/log/weft/vm1/qemu.log".into(),
            pid_file: Some("/run/weft/vm1/qemu.pid".into()),
        }
    }

    fn has_pair(args: &[String], a: &str, b: &str) -> bool {
        args.windows(2).any(|w| w[0] == a && w[1] == b)
    }

    #[test]
    fn command_line_basics() {
        let cfg = VmConfig {
            memory_mib: 512,
            cpus: 2,
            ..VmConfig::default()
        };
        let args = command_line(&cfg, &paths());
        assert!(has_pair(&args, "-machine", "q35,accel=tcg"), "{args:?}");
        assert!(has_pair(&args, "-m", "512M"));
        assert!(has_pair(&args, "-smp", "2"));
        assert!(has_pair(&args, "-display", "none"));
        assert!(has_pair(&args, "-vga", "none"));
        assert!(args.iter().any(|a| a == "-nodefaults"));
        assert!(args.iter().any(|a| a == "-no-user-config"));
        assert!(has_pair(
            &args,
            "-chardev",
            "socket,id=qmp,path=/run/weft/vm1/qmp.sock,server=on,wait=off"
        ));
        assert!(has_pair(&args, "-mon", "chardev=qmp,mode=control"));
        // Commas in option values are doubled.
        assert!(has_pair(
            &args,
            "-chardev",
            "file,id=serial0,path=/var/log/weft/vm,,1/serial.log"
        ));
        assert!(has_pair(&args, "-serial", "chardev:serial0"));
        assert!(has_pair(&args, "-pidfile", "/run/weft/vm1/qemu.pid"));
        assert!(has_pair(&args, "-device", "virtio-balloon-pci,id=balloon0"));
        let no_balloon = VmConfig {
            balloon: false,
            ..cfg.clone()
        };
        assert!(!command_line(&no_balloon, &paths())
            .iter()
            .any(|a| a.contains("virtio-balloon")));
        for absent in [
            "-kernel",
            "-initrd",
            "-append",
            "-object",
            "-numa",
            "-blockdev",
            "-netdev",
            "-cpu",
        ] {
            assert!(!args.iter().any(|a| a == absent), "{absent} in {args:?}");
        }
    }

    #[test]
    fn command_line_nics() {
        let config = VmConfig {
            nics: vec![NicConfig {
                id: "net0".into(),
                tap: "weft-tap0".into(),
                mac: "52:54:00:12:34:56".into(),
            }],
            ..VmConfig::default()
        };
        let paths = LaunchPaths {
            qmp_socket: "/run/q.sock".into(),
            serial_log: "/tmp/s.log".into(),
            output_log: "/tmp/o.log".into(),
            pid_file: None,
        };
        let args = command_line(&config, &paths);
        let joined = args.join(" ");
        assert!(
            joined.contains("-netdev tap,id=net0,ifname=weft-tap0,script=no,downscript=no"),
            "{joined}"
        );
        assert!(
            joined.contains("-device virtio-net-pci,netdev=net0,id=net0,mac=52:54:00:12:34:56"),
            "{joined}"
        );
        // Configs stored before NICs existed still read.
        let old: VmConfig = serde_json::from_str(r#"{"memory_mib": 64, "disks": []}"#).unwrap();
        assert!(old.nics.is_empty());
        // ... and get the balloon device.
        assert!(old.balloon);
    }

    #[test]
    fn command_line_vhost_user_disks() {
        let config = VmConfig {
            vhost_user_disks: vec![VhostUserDisk {
                name: "vdb".into(),
                socket: "/run/weft/blk/w1,vdb.sock".into(),
                queues: 2,
            }],
            ..VmConfig::default()
        };
        config.validate().unwrap();
        let args = command_line(&config, &paths());
        assert!(has_pair(
            &args,
            "-chardev",
            "socket,id=vdb-chr,path=/run/weft/blk/w1,,vdb.sock,reconnect=1"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "vhost-user-blk-pci,chardev=vdb-chr,id=vdb,num-queues=2"
        ));
        // vhost-user needs guest memory in a shared memfd.
        assert!(
            args.iter().any(|a| a.starts_with("memory-backend-memfd")),
            "{args:?}"
        );
        let bad = |d: VhostUserDisk| {
            VmConfig {
                vhost_user_disks: vec![d],
                ..VmConfig::default()
            }
            .validate()
            .unwrap_err()
            .to_string()
        };
        let d = config.vhost_user_disks[0].clone();
        assert!(bad(VhostUserDisk {
            socket: "rel.sock".into(),
            ..d.clone()
        })
        .contains("absolute"));
        assert!(bad(VhostUserDisk {
            queues: 0,
            ..d.clone()
        })
        .contains("queues"));
        assert!(bad(VhostUserDisk {
            name: "A B".into(),
            ..d
        })
        .contains("disk name"));
        // Stored configurations without the field still read.
        let old: VmConfig = serde_json::from_str(r#"{"memory_mib": 64}"#).unwrap();
        assert!(old.vhost_user_disks.is_empty());
    }

    #[test]
    fn command_line_vsock() {
        let none = command_line(&VmConfig::default(), &paths());
        assert!(!none.iter().any(|a| a.contains("vsock")), "{none:?}");
        let kernel = VmConfig {
            vsock: Some(VsockDevice::Kernel { guest_cid: 42 }),
            ..VmConfig::default()
        };
        let args = command_line(&kernel, &paths());
        assert!(has_pair(
            &args,
            "-device",
            "vhost-vsock-pci,id=vsock0,guest-cid=42"
        ));
        // The kernel device reads guest memory itself: no memfd needed.
        assert!(!args.iter().any(|a| a == "-numa"), "{args:?}");
        let user = VmConfig {
            vsock: Some(VsockDevice::VhostUser {
                socket: "/run/weft/vsock/a,b.vhost".into(),
            }),
            ..VmConfig::default()
        };
        let args = command_line(&user, &paths());
        assert!(has_pair(
            &args,
            "-chardev",
            "socket,id=vsock0-chr,path=/run/weft/vsock/a,,b.vhost"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "vhost-user-vsock-pci,id=vsock0,chardev=vsock0-chr"
        ));
        // vhost-user needs shared guest memory even when the config did not ask for it.
        assert!(has_pair(
            &args,
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on"
        ));
        assert!(has_pair(&args, "-numa", "node,memdev=mem"));

        user.validate().expect("valid");
        kernel.validate().expect("valid");
        for cid in [0, 2, u32::MAX] {
            let bad = VmConfig {
                vsock: Some(VsockDevice::Kernel { guest_cid: cid }),
                ..VmConfig::default()
            };
            assert!(matches!(bad.validate(), Err(Error::InvalidConfig(m)) if m.contains("CID")));
        }
        let relative = VmConfig {
            vsock: Some(VsockDevice::VhostUser {
                socket: "vsock.sock".into(),
            }),
            ..VmConfig::default()
        };
        assert!(relative.validate().is_err());

        // Stored without the field: no device; with it, it round-trips; absent is not written.
        let old: VmConfig = serde_json::from_str(r#"{"memory_mib": 64}"#).expect("reads");
        assert_eq!(old.vsock, None);
        assert!(!serde_json::to_string(&old).expect("ser").contains("vsock"));
        let json = serde_json::to_string(&user).expect("ser");
        assert!(json.contains(r#""kind":"vhost-user""#), "{json}");
        assert_eq!(serde_json::from_str::<VmConfig>(&json).expect("de"), user);
    }

    #[test]
    fn command_line_accel() {
        let mut cfg = VmConfig {
            accel: Accel::Kvm,
            ..VmConfig::default()
        };
        let args = command_line(&cfg, &paths());
        assert!(has_pair(&args, "-machine", "q35,accel=kvm"));
        assert!(has_pair(&args, "-cpu", "host"));
        cfg.accel = Accel::Auto;
        assert!(has_pair(
            &command_line(&cfg, &paths()),
            "-machine",
            "q35,accel=kvm:tcg"
        ));
        assert_ne!(crate::launch::resolve_accel(Accel::Auto), Accel::Auto);
    }

    #[test]
    fn command_line_shared_memory_kernel_and_disks() {
        let cfg = VmConfig {
            memory_mib: 1024,
            shared_memory: true,
            kernel: Some("/boot/vmlinuz".into()),
            initrd: Some("/boot/initrd.img".into()),
            append: Some("console=ttyS0 quiet".into()),
            disks: vec![
                DiskConfig {
                    name: "vda".into(),
                    path: "/images/a,b.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    read_only: false,
                    backing: Vec::new(),
                },
                DiskConfig {
                    name: "vdb".into(),
                    path: "/images/data.raw".into(),
                    format: DiskFormat::Raw,
                    read_only: true,
                    backing: Vec::new(),
                },
            ],
            ..VmConfig::default()
        };
        let args = command_line(&cfg, &paths());
        assert!(has_pair(
            &args,
            "-object",
            "memory-backend-memfd,id=mem,size=1024M,share=on"
        ));
        assert!(has_pair(&args, "-numa", "node,memdev=mem"));
        assert!(has_pair(&args, "-kernel", "/boot/vmlinuz"));
        assert!(has_pair(&args, "-initrd", "/boot/initrd.img"));
        assert!(has_pair(&args, "-append", "console=ttyS0 quiet"));
        assert!(has_pair(
            &args,
            "-device",
            "virtio-blk-pci,drive=vda-fmt,id=vda"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "virtio-blk-pci,drive=vdb-fmt,id=vdb"
        ));
        let blockdevs: Vec<serde_json::Value> = args
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).expect("blockdev is json"))
            .collect();
        assert_eq!(
            blockdevs,
            vec![
                serde_json::json!({"driver": "file", "node-name": "vda-file", "filename": "/images/a,b.qcow2", "read-only": false}),
                serde_json::json!({"driver": "qcow2", "node-name": "vda-fmt", "file": "vda-file", "read-only": false, "backing": null}),
                serde_json::json!({"driver": "file", "node-name": "vdb-file", "filename": "/images/data.raw", "read-only": true}),
                serde_json::json!({"driver": "raw", "node-name": "vdb-fmt", "file": "vdb-file", "read-only": true}),
            ]
        );
        // Disk nodes come before the devices that use them.
        let pos = |s: &str| args.iter().position(|a| a == s).expect("present");
        assert!(pos("-blockdev") < pos("-device"));
    }

    /// Every node of a chain is named, lowest first; each qcow2 names its backing node
    /// or null, so QEMU opens nothing an image's header names.
    #[test]
    fn command_line_pins_backing_chains() {
        let top = DiskConfig {
            name: "vda".into(),
            path: "/d/top.qcow2".into(),
            format: DiskFormat::Qcow2,
            read_only: false,
            backing: vec![
                BackingImage {
                    path: "/d/mid.qcow2".into(),
                    format: DiskFormat::Qcow2,
                },
                BackingImage {
                    path: "/img/base.raw".into(),
                    format: DiskFormat::Raw,
                },
            ],
        };
        let cfg = VmConfig {
            disks: vec![top.clone()],
            ..VmConfig::default()
        };
        let nodes: Vec<serde_json::Value> = command_line(&cfg, &paths())
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).expect("json"))
            .collect();
        assert_eq!(
            nodes,
            vec![
                serde_json::json!({"driver": "file", "node-name": "vda-b1f", "filename": "/img/base.raw", "auto-read-only": true}),
                serde_json::json!({"driver": "raw", "node-name": "vda-b1", "file": "vda-b1f", "read-only": true}),
                serde_json::json!({"driver": "file", "node-name": "vda-b0f", "filename": "/d/mid.qcow2", "auto-read-only": true}),
                serde_json::json!({"driver": "qcow2", "node-name": "vda-b0", "file": "vda-b0f", "read-only": true, "backing": "vda-b1"}),
                serde_json::json!({"driver": "file", "node-name": "vda-file", "filename": "/d/top.qcow2", "read-only": false}),
                serde_json::json!({"driver": "qcow2", "node-name": "vda-fmt", "file": "vda-file", "read-only": false, "backing": "vda-b0"}),
            ]
        );
        // The storage daemon opens the same nodes.
        let daemon = storage_daemon_command_line(std::slice::from_ref(&top), &paths());
        assert_eq!(daemon.iter().filter(|a| *a == "--blockdev").count(), 6);
        // Rebasing after a commit keeps what lies below; a new top goes over all.
        let committed = top.rebased_to(Path::new("/d/mid.qcow2")).expect("in chain");
        assert_eq!(committed.path, Path::new("/d/mid.qcow2"));
        assert_eq!(committed.backing, top.backing[1..].to_vec());
        assert!(top.rebased_to(Path::new("/elsewhere")).is_none());
        let over = top.under(Path::new("/d/new.qcow2"));
        assert_eq!(over.backing.len(), 3);
        assert_eq!(over.backing[0].path, Path::new("/d/top.qcow2"));
        // A raw image cannot have a backing; chains are bounded and absolute.
        let bad = |d: DiskConfig| check_chain(&d).unwrap_err().to_string();
        let raw_top = DiskConfig {
            format: DiskFormat::Raw,
            ..top.clone()
        };
        assert!(bad(raw_top).contains("raw image cannot"));
        let mut relative = top.clone();
        relative.backing[0].path = "mid.qcow2".into();
        assert!(bad(relative).contains("absolute"));
        let mut long = top.clone();
        long.backing = vec![top.backing[0].clone(); MAX_BACKING_CHAIN + 1];
        assert!(bad(long).contains("at most"));
        // Stored without the field: no chain, and it is not written when empty.
        let old: DiskConfig = serde_json::from_str(r#"{"name":"vda","path":"/x"}"#).expect("reads");
        assert!(old.backing.is_empty());
        assert!(!serde_json::to_string(&old)
            .expect("ser")
            .contains("backing"));
    }

    #[test]
    fn sandbox_and_run_as_arguments() {
        assert!(sandbox_args(&SpawnOptions::default()).is_empty());
        let sandboxed = SpawnOptions {
            sandbox: true,
            ..SpawnOptions::default()
        };
        assert_eq!(
            sandbox_args(&sandboxed),
            vec![
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ]
        );
        let dropped = SpawnOptions {
            run_as: Some("weft-qemu".into()),
            ..sandboxed
        };
        assert_eq!(
            sandbox_args(&dropped),
            vec![
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
                "-runas",
                "weft-qemu"
            ]
        );
        for ok in ["weft-qemu", "qemu", "_q1", "107:107", "machine$"] {
            assert!(valid_run_as(ok), "{ok}");
        }
        for bad in [
            "",
            "Qemu",
            "a,b",
            "1:",
            ":1",
            "-x",
            "a b",
            "root:0",
            &"a".repeat(33),
        ] {
            assert!(!valid_run_as(bad), "{bad}");
        }
    }
}
