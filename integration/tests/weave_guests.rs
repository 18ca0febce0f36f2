//! End-to-end tests of what a weave offers its guest: an address by DHCP from weftd
//! inside the weave's namespace, and memory limits that move the guest's balloon.
//! Real QEMU guests in real weaves; weftd hands out network slots 230-239 and the
//! tests route host ports 47230-47239.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use weft::weaves::Weave;
use weft_integration::wait_until;

mod common;
use common::*;

/// A rig whose weftd hands out weave network slots 230-239 only.
async fn rig() -> anyhow::Result<Rig> {
    let mut rig = Rig::new()?;
    let config = rig.path("weftd.toml");
    std::fs::write(&config, "[net]\nfirst_slot = 230\nlast_slot = 239\n")?;
    rig.config = Some(config);
    rig.start_weftd().await?;
    Ok(rig)
}

fn show(rig: &Rig, weave: &str) -> anyhow::Result<Weave> {
    let out = rig.weft_ok(&["--json", "weave", "show", weave])?;
    serde_json::from_str(&out).with_context(|| format!("weave show: {out}"))
}

/// Waits until `query-balloon` (through `weave show`) reports `mib` for the guest.
async fn balloon_reaches(
    rig: &Rig,
    weave: &str,
    mib: u64,
) -> anyhow::Result<weft::balloon::Balloon> {
    wait_until(
        Duration::from_secs(90),
        &format!("the balloon of {weave} to report {mib} MiB"),
        || async move {
            let b = show(rig, weave)?.balloon.context("no balloon")?;
            Ok((b.actual_mib == mib).then_some(b))
        },
    )
    .await
}

fn namespaces() -> anyhow::Result<String> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn qemu_a_weave_guest_gets_its_address_by_dhcp_and_serves_http() -> anyhow::Result<()> {
    let mut rig = rig().await?;
    let disk = qcow2_data_disk(&rig, "vda")?;
    // The environment runs in the root namespace, where nobody answers DHCP: its guest
    // carries on without an address (udhcpc keeps asking in the background).
    let tap = format!("wd{}", std::process::id() % 100_000);
    rig.boot_with(
        "web",
        &[&disk],
        "weft.workload=web weft.net=dhcp",
        &["--nic", &tap],
    )
    .await?;
    rig.weft_ok(&["weave", "create", "web", "--name", "dh"])?;
    let weave = show(&rig, "dh")?;
    ensure!(
        (230..=239).contains(&weave.net_index),
        "slot {}",
        weave.net_index
    );
    // The weave's guest boots the same image and asks by DHCP: weftd answers in the
    // weave's namespace with the weave plan.
    rig.serial("dh")
        .wait_for(
            "weft-init: eth0 192.168.100.2/24 via 192.168.100.1 (dhcp, lease 3600s)",
            BOOT,
        )
        .await?;
    let port: u16 = 47_230;
    rig.weft_ok(&[
        "weave",
        "route",
        "dh",
        "--guest-port",
        "80",
        "--host-port",
        &port.to_string(),
    ])?;
    wait_until(
        Duration::from_secs(60),
        &format!("a tick over HTTP on port {port}"),
        // The guest rewrites now.txt every second: a read can find it just truncated.
        || async move {
            Ok(http(port, "now.txt")
                .ok()
                .filter(|t| t.starts_with("tick ")))
        },
    )
    .await?;
    ensure!(
        !rig.serial("web").contents().contains("(dhcp, lease"),
        "the environment got a lease in the root namespace"
    );

    // weftd restarted: it serves DHCP in the weave's namespace again, and the guest,
    // booted anew, gets its address again.
    rig.weft_ok(&["weave", "stop", "dh"])?;
    rig.kill_weftd();
    rig.start_weftd().await?;
    rig.weft_ok(&["weave", "start", "dh"])?;
    rig.serial("dh")
        .wait_for(
            "weft-init: eth0 192.168.100.2/24 via 192.168.100.1 (dhcp, lease 3600s)",
            BOOT,
        )
        .await?;
    wait_until(
        Duration::from_secs(60),
        &format!("HTTP on port {port} after weftd restarted"),
        || async move { Ok(http(port, "now.txt").ok()) },
    )
    .await?;

    rig.weft_ok(&["weave", "delete", "dh"])?;
    ensure!(
        !namespaces()?.contains("weft-dh"),
        "namespace weft-dh left behind"
    );
    rig.weft_ok(&["env", "delete", "web"])?;
    rig.passed();
    Ok(())
}

#[tokio::test]
async fn qemu_a_weave_memory_limit_moves_its_balloon() -> anyhow::Result<()> {
    let mut rig = rig().await?;
    let disk = qcow2_data_disk(&rig, "vda")?;
    let tap = format!("wb{}", std::process::id() % 100_000);
    rig.boot_with(
        "web",
        &[&disk],
        "weft.workload=web weft.net=192.168.100.2/24,192.168.100.1",
        &["--nic", &tap],
    )
    .await?;
    rig.weft_ok(&["weave", "create", "web", "--name", "mb"])?;
    rig.serial("mb").wait_for("WEFT-READY", BOOT).await?;
    let before = show(&rig, "mb")?
        .balloon
        .context("a running weave has a balloon")?;
    ensure!(
        before.target_mib == 256 && before.actual_mib == 256,
        "{before:?}"
    );

    // Down: the balloon target follows the limit, and the guest gives the memory back.
    let out = rig.weft_ok(&["--json", "weave", "limits", "mb", "--memory", "224M"])?;
    let answer: Weave = serde_json::from_str(&out)?;
    ensure!(answer.balloon.map(|b| b.target_mib) == Some(224), "{out}");
    let b = balloon_reaches(&rig, "mb", 224).await?;
    ensure!(b.target_mib == 224, "{b:?}");
    // The cgroup limit is set too, after the balloon.
    let limit = weft::cgroups::groups("mb").memory_limit_mib();
    ensure!(limit == Some(224), "cgroup memory limit {limit:?}");

    // The limit removed (only a CPU limit given): the guest gets its memory back.
    rig.weft_ok(&["weave", "limits", "mb", "--cpu", "100%"])?;
    let b = balloon_reaches(&rig, "mb", 256).await?;
    ensure!(b.target_mib == 256, "{b:?}");
    ensure!(weft::cgroups::groups("mb").memory_limit_mib().is_none());

    // A limit above the configured memory: the target stays at the configured memory.
    let out = rig.weft_ok(&["--json", "weave", "limits", "mb", "--memory", "1G"])?;
    let answer: Weave = serde_json::from_str(&out)?;
    ensure!(answer.balloon.map(|b| b.target_mib) == Some(256), "{out}");

    // Stopped, it has no balloon to show.
    rig.weft_ok(&["weave", "stop", "mb"])?;
    ensure!(show(&rig, "mb")?.balloon.is_none());
    rig.weft_ok(&["weave", "delete", "mb"])?;
    rig.weft_ok(&["env", "delete", "web"])?;
    rig.passed();
    Ok(())
}
