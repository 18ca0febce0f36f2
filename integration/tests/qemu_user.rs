//! weftd's QEMU drops to `qemu_user` (`-runas`) under its seccomp filter: the guest
//! boots (vhost-user vsock, memfd memory), QEMU's uid is the user's, and what a running QEMU does for weftd after the
//! drop still works: a disk snapshot (scratch image and NBD socket made by QEMU), a
//! weave from now (overlays made by QEMU), and deleting the environment (its overlays
//! committed back into the image the test gave).

mod common;
use common::{Rig, MIB};

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use anyhow::{ensure, Context as _};
use weft_integration::make_data_disk;

const USER: &str = "weft-qemu-test";

/// The test user, made with `useradd --system` if the host lacks it; its uid.
fn test_user() -> anyhow::Result<u32> {
    let exists = |name: &str| nix::unistd::User::from_name(name).ok().flatten();
    if exists(USER).is_none() {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ])
            .output()?;
        // Another test run may have made it meanwhile.
        ensure!(
            out.status.success() || exists(USER).is_some(),
            "useradd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(exists(USER).context("the test user exists")?.uid.as_raw())
}

/// `(Uid line, Seccomp line)` of `/proc/<pid>/status`.
fn ids(pid: u64) -> anyhow::Result<(String, String)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .map(str::to_string)
            .unwrap_or_default()
    };
    Ok((line("Uid:"), line("Seccomp:")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_runs_as_qemu_user_under_the_sandbox() -> anyhow::Result<()> {
    let uid = test_user()?;
    let mut rig = Rig::new()?;
    // The test's directory stands for a host's /var/lib and /run: traversable.
    std::fs::set_permissions(rig.dir.path(), std::fs::Permissions::from_mode(0o711))?;
    let conf = rig.path("weftd.toml");
    std::fs::write(&conf, format!("qemu_user = \"{USER}\"\n"))?;
    rig.config = Some(conf);
    rig.start_weftd().await?;
    let disk = rig.path("qu.raw");
    make_data_disk(&disk, 64)?;
    rig.boot("qu", &[disk.as_path()]).await?;
    rig.ticks("qu", 5).await?;

    let env: serde_json::Value = rig.client().get("/v1/environments/qu").await?;
    let pid = env["pid"].as_u64().context("running")?;
    let (uid_line, seccomp) = ids(pid)?;
    eprintln!("qemu pid {pid}: {uid_line} / {seccomp}");
    ensure!(
        uid_line == format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}"),
        "QEMU runs as {uid_line:?}, want uid {uid} ({USER})"
    );
    ensure!(
        seccomp == "Seccomp:\t2",
        "QEMU is not sandboxed: {seccomp:?}"
    );
    // Its vsock is vhost-user (weftd's default with vhost-device-vsock), on memfd memory.
    let cmdline =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline"))?).replace('\0', " ");
    for device in ["vhost-user-vsock-pci", "memory-backend-memfd"] {
        ensure!(cmdline.contains(device), "{device} missing: {cmdline}");
    }
    let ps = Command::new("ps")
        .args(["-o", "user=", "-p", &pid.to_string()])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&ps.stdout).trim() == USER,
        "ps: {}",
        String::from_utf8_lossy(&ps.stdout)
    );

    // A snapshot of the running disk: QEMU, as the user, makes the scratch image and
    // the NBD socket.
    let snap = rig.snapshot("qu", "disk:vda").await?;
    ensure!(
        snap.bytes_read.unwrap_or(0) > 0 && snap.size == Some(64 * MIB),
        "{snap:?}"
    );
    // A weave from now: the environment's QEMU, as the user, makes both overlays; the
    // weave's own QEMU runs as the user too.
    rig.weft_ok(&["weave", "create", "qu", "--name", "quw"])?;
    rig.serial("quw")
        .wait_for("WEFT-READY", common::BOOT)
        .await?;
    let weave: serde_json::Value = rig.client().get("/v1/environments/quw").await?;
    let (weave_uid, _) = ids(weave["pid"].as_u64().context("weave running")?)?;
    ensure!(
        weave_uid.starts_with(&format!("Uid:\t{uid}\t")),
        "{weave_uid}"
    );
    rig.ticks("qu", 5).await?;
    rig.weft_ok(&["weave", "delete", "quw"])?;
    // Deleting the environment commits its overlay into the test's image.
    rig.weft_ok(&["env", "delete", "qu"])?;
    let log = weft_integration::read_ext4_file(&disk, "/counter.log")?;
    let ticks = String::from_utf8(log)?.lines().count();
    ensure!(
        ticks >= 10,
        "the image lacks the guest's writes: {ticks} ticks"
    );
    rig.passed();
    Ok(())
}
