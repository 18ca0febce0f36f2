//! End-to-end tests of an environment's network setup (the `net` resource): ports an
//! environment publishes on the host (`weft env expose`), moved to a weave and back
//! (`weft weave activate`, `weft env activate`) with real nftables, `net` snapshots
//! feeding a weave from a past instant, and weftd reconciling namespaces and rules it
//! owns when it starts, leaving other daemons' alone.
//!
//! The environment runs in the root namespace on a tap the test configures, as an
//! operator would (gateway address, link up); product code never runs `ip` or `nft`,
//! these tests do, to set the scene and to look from outside. They use weave slots
//! 220-225 (weftd's `[net]` range), host ports 47220-47226 and guest networks
//! 192.168.220-224.0/24.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use weft_integration::wait_until;

mod common;
use common::*;

/// Runs a command the test needs to succeed (setting the scene, looking from outside).
fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd).args(args).output()?;
    ensure!(out.status.success(), "{cmd} {args:?}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The boots the guest behind `port` recorded in boots.txt ("boot after tick N" each).
fn boots(port: u16) -> anyhow::Result<Vec<u64>> {
    http(port, "boots.txt")?
        .lines()
        .map(|l| {
            l.trim()
                .strip_prefix("boot after tick ")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("unexpected boots.txt line {l:?}"))
        })
        .collect()
}

async fn wait_http(port: u16) -> anyhow::Result<()> {
    wait_until(
        Duration::from_secs(90),
        &format!("HTTP on port {port}"),
        || async move { Ok(http(port, "now.txt").ok().map(drop)) },
    )
    .await
}

/// Whatever a test made on the host goes, even when it fails half-way: weave
/// namespaces and links, route chains of its ports, and the foreign objects it set up.
struct HostGuard {
    netns: Vec<String>,
    links: Vec<String>,
    ports: Vec<u16>,
}

impl Drop for HostGuard {
    fn drop(&mut self) {
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        for link in &self.links {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
        let chains = Command::new("nft")
            .args(["list", "chains", "ip"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for port in &self.ports {
            let prefix = format!("p{port}-");
            for chain in chains.split_whitespace().filter(|w| w.starts_with(&prefix)) {
                let _ = Command::new("nft")
                    .args(["flush", "chain", "ip", "weft", chain])
                    .output();
                let _ = Command::new("nft")
                    .args(["delete", "chain", "ip", "weft", chain])
                    .output();
            }
        }
    }
}

/// A weftd handing out weave slots `first..=last`, with environment `web` (the web
/// workload) whose guest is `<net>.2/24` on tap `<tap_prefix><pid>`; with
/// `configure_tap` the test plays the operator and puts `<net>.1/24` on the tap. The
/// environment's recorded plan is set to the guest's. Returns the rig and the tap.
async fn web_env(
    first: u8,
    last: u8,
    net: &str,
    tap_prefix: &str,
    configure_tap: bool,
) -> anyhow::Result<(Rig, String)> {
    let mut rig = Rig::new()?;
    let conf = rig.path("weftd.toml");
    std::fs::write(
        &conf,
        format!("[net]\nfirst_slot = {first}\nlast_slot = {last}\n"),
    )?;
    rig.config = Some(conf);
    rig.start_weftd().await?;
    let disk = qcow2_data_disk(&rig, "vda")?;
    let tap = format!("{tap_prefix}{}", std::process::id() % 100_000);
    let append = format!("weft.workload=web weft.net={net}.2/24,{net}.1");
    rig.boot_with("web", &[&disk], &append, &["--nic", &tap])
        .await?;
    if configure_tap {
        sh("ip", &["addr", "add", &format!("{net}.1/24"), "dev", &tap])?;
        sh("ip", &["link", "set", &tap, "up"])?;
    }
    rig.weft_ok(&[
        "env",
        "net",
        "web",
        "--guest",
        &format!("{net}.2/24"),
        "--gateway",
        &format!("{net}.1"),
    ])?;
    Ok((rig, tap))
}

/// A failed `weft` command's one-line message.
fn refused(rig: &Rig, args: &[&str]) -> anyhow::Result<String> {
    let out = rig.weft(args);
    ensure!(!out.status.success(), "weft {args:?} must fail");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    ensure!(err.lines().count() == 1, "not one line: {err}");
    Ok(err)
}

fn ruleset() -> anyhow::Result<String> {
    sh("nft", &["list", "ruleset"])
}

#[tokio::test]
async fn qemu_env_expose_activate_moves_the_published_port_to_a_weave_and_back(
) -> anyhow::Result<()> {
    let _guard = HostGuard {
        netns: vec!["weft-x220".into()],
        links: vec!["wh220".into()],
        ports: vec![47220, 47221],
    };
    let (mut rig, _tap) = web_env(220, 221, "192.168.220", "xe", true).await?;
    let (published, routed) = (47220u16, 47221u16);
    rig.serial("web").wait_for("weft-web: tick 5", BOOT).await?;
    let s1 = rig.snapshot("web", "all").await?;

    // The environment publishes its guest's port 80 on the host.
    let out = rig.weft_ok(&[
        "env",
        "expose",
        "web",
        "--guest-port",
        "80",
        "--host-port",
        &published.to_string(),
    ])?;
    ensure!(out.contains("published"), "{out}");
    wait_http(published).await?;
    let env_boots = boots(published)?;
    ensure!(
        env_boots.len() == 1,
        "the environment booted once: {env_boots:?}"
    );
    let rules = ruleset()?;
    ensure!(
        rules.contains("p47220-a192.168.220.2-g80-in")
            && rules.contains("dnat to 192.168.220.2:80"),
        "{rules}"
    );

    // Mistakes get one clear line and change nothing.
    let port = published.to_string();
    for (args, want) in [
        (
            vec![
                "env",
                "expose",
                "web",
                "--guest-port",
                "81",
                "--host-port",
                &port,
            ],
            "already published by environment web",
        ),
        (
            vec![
                "env",
                "expose",
                "nope",
                "--guest-port",
                "80",
                "--host-port",
                "47229",
            ],
            "no environment named \"nope\"",
        ),
        (
            vec![
                "env",
                "expose",
                "web",
                "--guest-port",
                "0",
                "--host-port",
                "47229",
            ],
            "ports must be 1-65535",
        ),
        (
            vec!["env", "unexpose", "web", "--host-port", "47229"],
            "its host ports: 47220",
        ),
    ] {
        let err = refused(&rig, &args)?;
        ensure!(err.contains(want), "{args:?}: {err}");
    }

    // A weave from the snapshot, reached first through a port of its own.
    rig.weft_ok(&[
        "weave",
        "create",
        "web",
        "--snapshot",
        &s1.id.to_string(),
        "--name",
        "x220",
    ])?;
    let weave: weft::weaves::Weave = rig.client().get("/v1/weaves/x220").await?;
    ensure!(
        weave.net_index == 220,
        "slot from weftd's [net] range: {}",
        weave.net_index
    );
    rig.weft_ok(&[
        "weave",
        "route",
        "x220",
        "--guest-port",
        "80",
        "--host-port",
        &routed.to_string(),
    ])?;
    wait_http(routed).await?;
    let weave_boots = boots(routed)?;
    ensure!(
        weave_boots.len() == 2 && weave_boots[1] >= 5,
        "the weave booted again from the snapshot: {weave_boots:?}"
    );

    // A connection to the environment opened before the switch...
    let mut before = TcpStream::connect(("127.0.0.1", published))?;
    before.set_read_timeout(Some(Duration::from_secs(10)))?;
    let out = rig.weft_ok(&["weave", "activate", "x220"])?;
    ensure!(out.contains("47220") && out.contains("47221"), "{out}");
    // ...new ones reach the weave at once...
    ensure!(
        boots(published)? == weave_boots,
        "the published port goes to the weave"
    );
    // ...and the old one finishes where it started.
    before.write_all(b"GET /boots.txt HTTP/1.0\r\nHost: web\r\n\r\n")?;
    let mut answer = String::new();
    before.read_to_string(&mut answer)?;
    ensure!(
        answer.matches("boot after tick").count() == 1,
        "the established connection stayed with the environment: {answer}"
    );
    let rules = ruleset()?;
    ensure!(
        rules.contains("p47220-w220-g80-in") && !rules.contains("p47220-a192"),
        "{rules}"
    );

    // Every change is a `net` snapshot of the environment.
    let list = rig.weft_ok(&["snapshot", "list", "web", "--resource", "net"])?;
    ensure!(list.matches("network change").count() >= 4, "{list}");
    let net: weft::model::NetSetup = rig.client().get("/v1/environments/web/net").await?;
    ensure!(net.active.as_deref() == Some("x220"), "{net:?}");

    // The way back: the published port returns to the environment, the weave's own
    // route stays with the weave.
    let out = rig.weft_ok(&["env", "activate", "web"])?;
    ensure!(out.contains("active: web itself"), "{out}");
    ensure!(boots(published)? == env_boots, "back to the environment");
    ensure!(boots(routed)? == weave_boots, "the weave keeps its route");

    // Unexpose: the port is gone from the host.
    rig.weft_ok(&["env", "unexpose", "web", "--host-port", &port])?;
    ensure!(
        http(published, "now.txt").is_err(),
        "nothing answers on {published}"
    );
    ensure!(!ruleset()?.contains("p47220-"), "no chain of 47220 left");

    rig.weft_ok(&["weave", "delete", "x220"])?;
    let rules = ruleset()?;
    ensure!(
        !rules.contains("p47221-"),
        "the weave's route went with it: {rules}"
    );
    ensure!(!sh("ip", &["netns", "list"])?.contains("weft-x220"));
    rig.weft_ok(&["env", "delete", "web"])?;
    rig.passed();
    Ok(())
}

#[tokio::test]
async fn qemu_a_weave_from_a_past_instant_gets_that_instants_net_plan() -> anyhow::Result<()> {
    let _guard = HostGuard {
        netns: vec!["weft-x222".into(), "weft-x223".into()],
        links: vec!["wh222".into(), "wh223".into()],
        ports: vec![47222],
    };
    let (mut rig, _tap) = web_env(222, 223, "192.168.222", "xp", false).await?;
    rig.serial("web").wait_for("weft-web: tick 5", BOOT).await?;
    let s1 = rig.snapshot("web", "all").await?;
    // Later the environment moves to another address plan.
    rig.weft_ok(&[
        "env",
        "net",
        "web",
        "--guest",
        "192.168.223.2/24",
        "--gateway",
        "192.168.223.1",
    ])?;
    let list = rig.weft_ok(&["snapshot", "list", "web", "--resource", "net"])?;
    ensure!(
        list.lines().count() == 4,
        "header + 3 net snapshots: {list}"
    );
    let snaps: Vec<weft::model::Snapshot> = rig
        .client()
        .get("/v1/environments/web/snapshots?resource=net")
        .await?;
    let plans: Vec<String> = snaps
        .iter()
        .map(|s| {
            s.net
                .as_ref()
                .map(|n| n.plan.guest_ip.to_string())
                .unwrap_or_default()
        })
        .collect();
    ensure!(
        plans == ["192.168.222.2", "192.168.222.2", "192.168.223.2"],
        "{plans:?}"
    );
    ensure!(
        snaps[1].taken_at == s1.taken_at,
        "`all` includes net at its instant"
    );

    // A weave from the snapshot's instant gets that instant's plan...
    rig.weft_ok(&[
        "weave",
        "create",
        "web",
        "--snapshot",
        &s1.id.to_string(),
        "--name",
        "x222",
    ])?;
    let inside = sh("ip", &["-n", "weft-x222", "-4", "-o", "addr"])?;
    ensure!(inside.contains("192.168.222.1/24"), "{inside}");
    let table = sh(
        "ip",
        &[
            "netns",
            "exec",
            "weft-x222",
            "nft",
            "list",
            "table",
            "ip",
            "weft",
        ],
    )?;
    ensure!(table.contains("dnat to 192.168.222.2"), "{table}");
    let plan: weft::model::NetSetup = rig.client().get("/v1/environments/x222/net").await?;
    ensure!(
        plan.plan.guest_ip.to_string() == "192.168.222.2",
        "{plan:?}"
    );
    // ...which its guest (booted from that instant) uses: it answers.
    rig.weft_ok(&[
        "weave",
        "route",
        "x222",
        "--guest-port",
        "80",
        "--host-port",
        "47222",
    ])?;
    wait_http(47222).await?;
    ensure!(boots(47222)?.len() == 2);
    rig.weft_ok(&["weave", "delete", "x222"])?;

    // A weave from now gets today's plan.
    rig.weft_ok(&["weave", "create", "web", "--name", "x223"])?;
    let inside = sh("ip", &["-n", "weft-x223", "-4", "-o", "addr"])?;
    ensure!(inside.contains("192.168.223.1/24"), "{inside}");
    rig.weft_ok(&["weave", "delete", "x223"])?;
    ensure!(!ruleset()?.contains("p47222-"));
    rig.weft_ok(&["env", "delete", "web"])?;
    rig.passed();
    Ok(())
}

#[tokio::test]
async fn qemu_weftd_start_removes_its_strays_restores_routes_and_leaves_others_alone(
) -> anyhow::Result<()> {
    let _guard = HostGuard {
        netns: vec!["weft-x224".into(), "weft-f226".into()],
        links: vec!["wh224".into()],
        ports: vec![47224, 47225, 47226],
    };
    let (mut rig, _tap) = web_env(224, 225, "192.168.224", "xs", true).await?;
    rig.serial("web").wait_for("weft-web: tick 5", BOOT).await?;
    let s1 = rig.snapshot("web", "all").await?;
    rig.weft_ok(&[
        "env",
        "expose",
        "web",
        "--guest-port",
        "80",
        "--host-port",
        "47224",
    ])?;
    wait_http(47224).await?;
    rig.weft_ok(&[
        "weave",
        "create",
        "web",
        "--snapshot",
        &s1.id.to_string(),
        "--name",
        "x224",
    ])?;
    rig.weft_ok(&[
        "weave",
        "route",
        "x224",
        "--guest-port",
        "80",
        "--host-port",
        "47225",
    ])?;
    wait_http(47225).await?;
    let weave: weft::weaves::Weave = rig.client().get("/v1/weaves/x224").await?;
    let weave_pid = weave.env.and_then(|e| e.pid).context("the weave runs")?;

    // Another daemon's namespace and route on the same host.
    sh("ip", &["netns", "add", "weft-f226"])?;
    sh("nft", &["add", "table", "ip", "weft"])?;
    for (side, hook) in [("in", "prerouting"), ("out", "output")] {
        sh(
            "nft",
            &[
                "add",
                "chain",
                "ip",
                "weft",
                &format!("p47226-w226-g80-{side}"),
                &format!("{{ type nat hook {hook} priority -100; }}"),
            ],
        )?;
    }

    // weftd dies; its catalog loses the weave (as if it crashed half-way through
    // deleting it), and the environment's route disappears from the kernel.
    rig.kill_weftd();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(weave_pid)?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let catalog = rig.path("data/catalog.db");
    sh(
        "sqlite3",
        &[
            catalog.to_str().context("utf-8")?,
            "DELETE FROM host_ports WHERE host_port = 47225; DELETE FROM env_net WHERE env = 'x224'; \
             DELETE FROM weaves WHERE name = 'x224'; DELETE FROM environments WHERE name = 'x224';",
        ],
    )?;
    for side in ["in", "out", "src"] {
        let chain = format!("p47224-a192.168.224.2-g80-{side}");
        sh("nft", &["flush", "chain", "ip", "weft", &chain])?;
        sh("nft", &["delete", "chain", "ip", "weft", &chain])?;
    }
    ensure!(http(47224, "now.txt").is_err(), "the route is gone");

    rig.start_weftd().await?;
    let netns = sh("ip", &["netns", "list"])?;
    ensure!(
        !netns.contains("weft-x224"),
        "its stray namespace went: {netns}"
    );
    ensure!(
        netns.contains("weft-f226"),
        "another daemon's stays: {netns}"
    );
    let links = sh("ip", &["-o", "link", "show"])?;
    ensure!(!links.contains(": wh224"), "its stray link went: {links}");
    let rules = ruleset()?;
    ensure!(!rules.contains("p47225-"), "its stray route went: {rules}");
    ensure!(
        rules.contains("p47226-w226-g80-in") && rules.contains("p47226-w226-g80-out"),
        "another daemon's route stays: {rules}"
    );
    ensure!(
        rules.contains("p47224-a192.168.224.2-g80-src"),
        "the missing route is back: {rules}"
    );
    wait_http(47224).await?;
    ensure!(boots(47224)?.len() == 1, "it leads to the environment");
    let audit = rig.weft_ok(&["audit", "--limit", "50"])?;
    ensure!(audit.contains("net.reconcile"), "{audit}");

    // The lost weave's cgroups are not network: the test removes them.
    let _ = weft::cgroups::groups("x224").remove(std::time::Duration::ZERO);
    // The other daemon's things are its own business; the test removes them.
    sh("ip", &["netns", "del", "weft-f226"])?;
    for side in ["in", "out"] {
        sh(
            "nft",
            &[
                "delete",
                "chain",
                "ip",
                "weft",
                &format!("p47226-w226-g80-{side}"),
            ],
        )?;
    }
    rig.weft_ok(&["env", "delete", "web"])?;
    ensure!(
        !ruleset()?.contains("p47224-"),
        "deleting the environment took its route"
    );
    rig.passed();
    Ok(())
}
