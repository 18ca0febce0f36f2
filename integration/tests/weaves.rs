//! End-to-end tests of weaves: an environment's guest serves a page from its disk that
//! changes over time; weaves branch from past snapshots and from now, run side by side
//! in their own network namespaces, are reached through host ports, and leave nothing
//! behind when deleted.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use weft_integration::wait_until;

mod common;
use common::*;

/// The guest's network settings every weave keeps.
const NET: &str = "weft.workload=web weft.net=192.168.100.2/24,192.168.100.1";

/// The tick after which the guest behind `port` last booted (boots.txt's last line).
fn booted_after(port: u16) -> anyhow::Result<u64> {
    let text = http(port, "boots.txt")?;
    let last = text.lines().last().context("boots.txt is empty")?;
    last.trim()
        .strip_prefix("boot after tick ")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected boots.txt line {last:?}"))
}

async fn wait_http(port: u16) -> anyhow::Result<()> {
    wait_until(
        Duration::from_secs(60),
        &format!("HTTP on port {port}"),
        || async move { Ok(http(port, "now.txt").ok().map(drop)) },
    )
    .await
}

fn leftovers(rig: &Rig, weaves: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    let ns = Command::new("ip").args(["netns", "list"]).output()?;
    for w in weaves {
        if String::from_utf8_lossy(&ns.stdout).contains(&format!("weft-{w}")) {
            found.push(format!("namespace weft-{w}"));
        }
        let dir = rig.path(&format!("data/weaves/{w}"));
        if dir.exists() {
            found.push(format!("files of {w}"));
        }
        // No process still names the weave's files (its QEMU, a storage daemon).
        let needle = dir.to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) {
                found.push(format!("process {:?}: {cmdline}", entry.file_name()));
            }
        }
    }
    let rules = Command::new("nft").args(["list", "ruleset"]).output()?;
    let rules = String::from_utf8_lossy(&rules.stdout);
    if rules.contains("table ip weft") {
        found.push(format!("nftables: {rules}"));
    }
    Ok(found)
}

/// A weftd with the environment `web` (the web workload, a NIC on a tap named
/// `<prefix><pid>`) up to its fifth tick, and a snapshot of all its resources.
async fn web_env(tap_prefix: &str) -> anyhow::Result<(Rig, weft::model::Snapshot)> {
    let mut rig = Rig::new()?;
    rig.start_weftd().await?;
    let disk = qcow2_data_disk(&rig, "vda")?;
    let tap = format!("{tap_prefix}{}", std::process::id() % 100_000);
    rig.boot_with("web", &[&disk], NET, &["--nic", &tap])
        .await?;
    rig.serial("web").wait_for("weft-web: tick 5", BOOT).await?;
    let s = rig.snapshot("web", "all").await?;
    Ok((rig, s))
}

#[tokio::test]
async fn qemu_weaves_branch_serve_route_activate_and_leave_nothing() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    rig.start_weftd().await?;
    let disk = qcow2_data_disk(&rig, "vda")?;
    let tap = format!("wt{}", std::process::id() % 100_000);
    rig.boot_with("web", &[&disk], NET, &["--nic", &tap])
        .await?;

    // Two snapshots, the page changing between them.
    rig.serial("web").wait_for("weft-web: tick 5", BOOT).await?;
    let s1 = rig.snapshot("web", "all").await?;
    rig.serial("web")
        .wait_for("weft-web: tick 15", BOOT)
        .await?;
    let s2 = rig.snapshot("web", "all").await?;

    rig.weft_ok(&[
        "weave",
        "create",
        "web",
        "--snapshot",
        &s1.id.to_string(),
        "--name",
        "w1",
    ])?;
    rig.weft_ok(&[
        "weave",
        "create",
        "web",
        "--snapshot",
        &s2.id.to_string(),
        "--name",
        "w2",
    ])?;
    // Deleting an environment with weaves is refused.
    let out = rig.weft(&["env", "delete", "web"]);
    ensure!(!out.status.success(), "env delete with weaves must fail");

    let base = 48_000 + (std::process::id() % 1000) as u16 * 3;
    let (p1, p2, published) = (base, base + 1, base + 2);
    rig.weft_ok(&[
        "weave",
        "route",
        "w1",
        "--guest-port",
        "80",
        "--host-port",
        &p1.to_string(),
    ])?;
    rig.weft_ok(&[
        "weave",
        "route",
        "w2",
        "--guest-port",
        "80",
        "--host-port",
        &p2.to_string(),
    ])?;
    wait_http(p1).await?;
    wait_http(p2).await?;
    // Each serves its own disk: branched at different instants, both running at once.
    let (a, b) = (booted_after(p1)?, booted_after(p2)?);
    ensure!((5..15).contains(&a), "w1 branched after tick {a}");
    ensure!(b >= 15 && b > a, "w2 branched after tick {b}");
    // A write in w1 (its boot line) is not in w2.
    let w2_boots = http(p2, "boots.txt")?;
    ensure!(
        !w2_boots.contains(&format!("boot after tick {a}\n")) || a == b,
        "w2 sees w1's write: {w2_boots}"
    );

    // A published port moves from w1 to w2 at once.
    rig.weft_ok(&[
        "weave",
        "route",
        "w1",
        "--guest-port",
        "80",
        "--host-port",
        &published.to_string(),
    ])?;
    wait_http(published).await?;
    ensure!(booted_after(published)? == a);
    rig.weft_ok(&["weave", "activate", "w2"])?;
    ensure!(
        booted_after(published)? == b,
        "activate moved the port to w2"
    );

    // Nothing a weave wrote reached the environment's disk: its boots.txt holds only
    // its own boot.
    let now = rig.snapshot("web", "disk:vda").await?;
    let image = rig.path("web-now.raw");
    rig.weft_ok(&[
        "restore",
        &now.id.to_string(),
        "--output",
        image.to_str().context("utf-8")?,
    ])?;
    let boots = weft_integration::read_ext4_file(&image, "/www/boots.txt")?;
    let boots = String::from_utf8_lossy(&boots);
    ensure!(
        boots.lines().count() == 1,
        "the environment saw a weave's write: {boots:?}"
    );

    // A weave from now: the environment keeps running on a new overlay.
    rig.weft_ok(&["weave", "create", "web", "--name", "w3"])?;
    let p3 = base + 2000;
    rig.weft_ok(&[
        "weave",
        "route",
        "w3",
        "--guest-port",
        "80",
        "--host-port",
        &p3.to_string(),
    ])?;
    wait_http(p3).await?;
    ensure!(
        booted_after(p3)? >= b,
        "w3 branched now, after w2's instant"
    );
    rig.ticks("web", 5).await?;

    // Limits change at runtime.
    rig.weft_ok(&["weave", "limits", "w3", "--cpu", "50%", "--memory", "512M"])?;

    let list = rig.weft_ok(&["weave", "list", "web"])?;
    ensure!(list.lines().count() == 4, "{list}");
    for w in ["w1", "w2", "w3"] {
        rig.weft_ok(&["weave", "delete", w])?;
    }
    let left = leftovers(&rig, &["w1", "w2", "w3"])?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    // The environment still runs and can be deleted now.
    rig.ticks("web", 5).await?;
    rig.weft_ok(&["env", "delete", "web"])?;
    rig.passed();
    Ok(())
}

#[tokio::test]
async fn qemu_eight_weaves_run_at_once_each_behind_its_own_route() -> anyhow::Result<()> {
    // The environment only needs to exist with a snapshot: branch all eight from it.
    let (mut rig, s) = web_env("wu").await?;
    rig.weft_ok(&["env", "stop", "web"])?;

    let base = 49_000 + (std::process::id() % 1000) as u16 * 8;
    let names: Vec<String> = (1..=8).map(|i| format!("e{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        rig.weft_ok(&[
            "weave",
            "create",
            "web",
            "--snapshot",
            &s.id.to_string(),
            "--name",
            name,
        ])?;
        let port = (base + i as u16).to_string();
        rig.weft_ok(&[
            "weave",
            "route",
            name,
            "--guest-port",
            "80",
            "--host-port",
            &port,
        ])?;
    }
    // All eight answer, each through its own port, at the same time.
    for i in 0..8u16 {
        wait_http(base + i).await?;
    }
    let running: Vec<weft::weaves::Weave> = rig.client().get("/v1/environments/web/weaves").await?;
    let up = running
        .iter()
        .filter(|w| {
            w.env
                .as_ref()
                .is_some_and(|e| e.state == weft::model::EnvState::Running)
        })
        .count();
    ensure!(up == 8, "{up} of 8 weaves run");
    for i in 0..8u16 {
        ensure!(http(base + i, "now.txt")?.starts_with("tick "));
    }
    for name in &names {
        rig.weft_ok(&["weave", "delete", name])?;
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let left = leftovers(&rig, &refs)?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    rig.passed();
    Ok(())
}

#[tokio::test]
async fn qemu_a_weaves_network_is_restored_when_weftd_starts() -> anyhow::Result<()> {
    let (mut rig, s) = web_env("wr").await?;
    rig.weft_ok(&[
        "weave",
        "create",
        "web",
        "--snapshot",
        &s.id.to_string(),
        "--name",
        "rb",
    ])?;
    rig.weft_ok(&["weave", "stop", "rb"])?;
    // As after a host reboot: the namespace is gone, and weftd restarts.
    let out = Command::new("ip")
        .args(["netns", "del", "weft-rb"])
        .output()?;
    ensure!(out.status.success(), "{out:?}");
    rig.kill_weftd();
    rig.start_weftd().await?;
    let ns = Command::new("ip").args(["netns", "list"]).output()?;
    ensure!(
        String::from_utf8_lossy(&ns.stdout).contains("weft-rb"),
        "namespace restored"
    );
    rig.weft_ok(&["weave", "start", "rb"])?;
    let port = 47_600 + (std::process::id() % 300) as u16;
    rig.weft_ok(&[
        "weave",
        "route",
        "rb",
        "--guest-port",
        "80",
        "--host-port",
        &port.to_string(),
    ])?;
    wait_http(port).await?;
    rig.weft_ok(&["weave", "delete", "rb"])?;
    ensure!(leftovers(&rig, &["rb"])?.is_empty());
    rig.passed();
    Ok(())
}
