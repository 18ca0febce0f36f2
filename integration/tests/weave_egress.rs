//! End-to-end test of what a weave's guest may reach (issue 14, point 2): a real guest
//! in a real weave probes the host, another weave, a private and a public address and
//! its own namespace, under each egress policy, changed while it runs; routed ports
//! work throughout.
//!
//! weftd hands out weave slot 250 only; the test makes weave network 251 itself (through
//! weft-netns, with a namespace playing its guest), a namespace `weft-egp` on a veth
//! `wep250` with a private (172.31.250.0/24) and a public-looking (TEST-NET-3,
//! 203.0.113.0/24) network, and uses host ports 47250-47254. Nothing is sent to an
//! address outside this machine.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use weft_integration::wait_until;
use weft_netns::{GuestLink, Kernel, LinkEnd, NetOps, Prefix, WeaveNet, WeavePlan};

mod common;
use common::*;

/// Runs a command the test needs to succeed (setting the scene, looking from outside).
fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd).args(args).output()?;
    ensure!(out.status.success(), "{cmd} {args:?}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const SLOT: u8 = 250;
const OTHER: u8 = 251;
/// Routed to the guest's httpd (port 80) and to its "next round" listener (port 81).
const ROUTED: u16 = 47250;
const NEXT: u16 = 47254;
/// A service of the host (every address), of the other weave / private network, and of
/// the weave's own namespace.
const HOST_SVC: u16 = 47251;
const NET_SVC: u16 = 47252;
const NS_SVC: u16 = 47253;

/// What the guest probes, by name: (name, address, port, reachable under none,
/// internet, all).
const TARGETS: [(&str, [u8; 4], u16, [bool; 3]); 8] = [
    (
        "host-end",
        [10, 231, SLOT, 1],
        HOST_SVC,
        [false, false, true],
    ),
    (
        "host-other",
        [172, 31, 250, 1],
        HOST_SVC,
        [false, false, true],
    ),
    (
        "host-public",
        [203, 0, 113, 1],
        HOST_SVC,
        [false, false, true],
    ),
    ("weave", [10, 231, OTHER, 2], NET_SVC, [false, false, true]),
    ("private", [172, 31, 250, 2], NET_SVC, [false, false, true]),
    ("public", [203, 0, 113, 2], NET_SVC, [false, true, true]),
    (
        "ns-inner",
        [10, 231, SLOT, 2],
        NS_SVC,
        [false, false, false],
    ),
    (
        "ns-gateway",
        [192, 168, 100, 1],
        NS_SVC,
        [false, false, false],
    ),
];

/// The guest's script: serves /r.txt on port 80, then runs a round of probes (all at
/// once, 2 s each at most) for every connection the host makes to port 81.
fn script() -> String {
    let mut probes = String::new();
    for (name, ip, port, _) in TARGETS {
        let ip = Ipv4Addr::from(ip);
        probes.push_str(&format!("    probe \"$1\" {name} {ip} {port} &\n"));
    }
    format!(
        r#"probe() {{
    out=$(timeout 3 nc -w 2 "$3" "$4" </dev/null 2>/dev/null | tr -dc 'a-z-' | head -c 32)
    echo "weft-probe $1 $2 [$out]"
}}
round() {{
{probes}    wait
    echo "weft-round $1 done"
}}
mkdir -p /tmp/www && echo routed > /tmp/www/r.txt && httpd -p 80 -h /tmp/www
for r in 1 2 3; do
    nc -l -p 81 </dev/null >/dev/null 2>&1
    round $r
done
"#
    )
}

/// A 64 MiB ext4 data disk (qcow2) holding /run.sh.
fn script_disk(rig: &Rig) -> anyhow::Result<PathBuf> {
    let dir = rig.path("disk-root");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("run.sh"), script())?;
    let raw = rig.path("vda.raw");
    std::fs::File::create(&raw)?.set_len(64 << 20)?;
    sh("mkfs.ext4", &["-q", "-F", "-d", path(&dir)?, path(&raw)?])?;
    let qcow2 = rig.path("vda.qcow2");
    sh(
        "qemu-img",
        &["convert", "-O", "qcow2", path(&raw)?, path(&qcow2)?],
    )?;
    Ok(qcow2)
}

fn path(p: &std::path::Path) -> anyhow::Result<&str> {
    p.to_str().context("utf-8 path")
}

/// A TCP service in namespace `netns` (the test's own when `None`): every connection
/// gets `marker` and is closed. It runs until the test process ends.
fn serve(netns: Option<&str>, port: u16, marker: &'static str) -> anyhow::Result<()> {
    let ns = netns
        .map(|n| std::fs::File::open(format!("/run/netns/{n}")))
        .transpose()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let bound = (|| {
            if let Some(ns) = &ns {
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            }
            Ok::<_, anyhow::Error>(TcpListener::bind(("0.0.0.0", port))?)
        })();
        let listener = match bound {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(format!("{marker}\n").as_bytes());
        }
    });
    rx.recv_timeout(Duration::from_secs(10))?
}

/// What the test made on the host goes, even when it fails half-way.
struct Scene;

impl Drop for Scene {
    fn drop(&mut self) {
        // weftd's weave too, when the test failed before deleting it: its routes,
        // link, namespace and filter chains.
        let _ = WeaveNet::delete(&Kernel::new(), "eg", SLOT);
        let _ = WeaveNet::delete(&Kernel::new(), "egx", OTHER);
        for ns in ["weft-egxg", "weft-egp"] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip").args(["link", "del", "wep250"]).output();
    }
}

/// Another weave's network (slot 251, made here, not by weftd) whose "guest" is a
/// namespace serving `svc-weave`; a namespace behind `wep250` serving `svc-private` on a
/// private and a public address; the host's own service on every address.
fn set_scene() -> anyhow::Result<Scene> {
    let scene = Scene;
    let k = Kernel::new();
    k.create_netns("weft-egxg")?;
    let mut plan = WeavePlan::new("egx", OTHER);
    plan.guest_link = GuestLink::Veth {
        name: "wg0".into(),
        peer: LinkEnd::in_netns("weft-egxg", "eth0"),
    };
    WeaveNet::create(&k, &plan)?;
    let g = Some("weft-egxg");
    k.add_address(g, "eth0", Prefix::new(plan.guest_ip, plan.guest_prefix))?;
    k.set_link_up(g, "eth0")?;
    k.set_default_route(g, plan.gateway_ip)?;
    serve(g, NET_SVC, "svc-weave")?;

    sh("ip", &["netns", "add", "weft-egp"])?;
    sh(
        "ip",
        &[
            "link", "add", "wep250", "type", "veth", "peer", "name", "eth0", "netns", "weft-egp",
        ],
    )?;
    for (ns, net) in [(None, "1"), (Some("weft-egp"), "2")] {
        let mut ip = vec![];
        if let Some(ns) = ns {
            ip.extend(["-n", ns]);
        }
        let link = if ns.is_some() { "eth0" } else { "wep250" };
        for addr in [
            format!("172.31.250.{net}/24"),
            format!("203.0.113.{net}/24"),
        ] {
            let mut args = ip.clone();
            args.extend(["addr", "add", &addr, "dev", link]);
            sh("ip", &args)?;
        }
        let mut args = ip.clone();
        args.extend(["link", "set", link, "up"]);
        sh("ip", &args)?;
    }
    sh("ip", &["-n", "weft-egp", "link", "set", "lo", "up"])?;
    serve(Some("weft-egp"), NET_SVC, "svc-private")?;
    serve(None, HOST_SVC, "svc-host")?;
    Ok(scene)
}

/// Reads a service from the host: the scene works before the guest is asked.
fn read_from_host(addr: SocketAddr) -> anyhow::Result<String> {
    use std::io::Read;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.trim().to_string())
}

/// Lets the guest run its next round of probes (it listens on port 81, routed from
/// NEXT), and returns what it saw: (name, reached).
async fn round(rig: &Rig, r: usize) -> anyhow::Result<Vec<(String, bool)>> {
    wait_until(
        Duration::from_secs(30),
        &format!("the guest's round {r} listener"),
        || async move {
            Ok(TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, NEXT)),
                Duration::from_secs(1),
            )
            .ok()
            .map(drop))
        },
    )
    .await?;
    let serial = rig.serial("eg");
    serial
        .wait_for(&format!("weft-round {r} done"), Duration::from_secs(30))
        .await?;
    let log = serial.contents();
    let prefix = format!("weft-probe {r} ");
    let mut seen = Vec::new();
    for line in log.lines().filter_map(|l| l.trim().strip_prefix(&prefix)) {
        let (name, out) = line.split_once(' ').context("probe line")?;
        seen.push((name.to_string(), out.contains("svc-")));
    }
    println!("round {r}: {seen:?}");
    Ok(seen)
}

fn expect(seen: &[(String, bool)], policy: usize, what: &str) -> anyhow::Result<()> {
    for (name, _, _, reach) in TARGETS {
        let got = seen
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| *r)
            .with_context(|| format!("{what}: no probe of {name} in {seen:?}"))?;
        ensure!(
            got == reach[policy],
            "{what}: the guest {} {name}; all probes: {seen:?}",
            if got { "reached" } else { "did not reach" }
        );
    }
    Ok(())
}

fn net_json(rig: &Rig) -> anyhow::Result<serde_json::Value> {
    let out = rig.weft_ok(&["--json", "env", "net", "eg"])?;
    serde_json::from_str(&out).with_context(|| format!("env net: {out}"))
}

#[tokio::test]
async fn qemu_a_weave_guest_reaches_only_what_its_egress_allows() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut rig = Rig::new()?;
    let config = rig.path("weftd.toml");
    std::fs::write(
        &config,
        format!("[net]\nfirst_slot = {SLOT}\nlast_slot = {SLOT}\n"),
    )?;
    rig.config = Some(config);
    rig.start_weftd().await?;
    let _scene = set_scene()?;
    for (addr, marker) in [
        (([172, 31, 250, 2], NET_SVC), "svc-private"),
        (([203, 0, 113, 2], NET_SVC), "svc-private"),
        (([10, 231, OTHER, 2], NET_SVC), "svc-weave"),
    ] {
        let got = read_from_host(SocketAddr::from(addr))?;
        ensure!(got == marker, "{addr:?} from the host: {got:?}");
    }

    let disk = script_disk(&rig)?;
    let tap = format!("we{}", std::process::id() % 100_000);
    rig.boot_with(
        "web",
        &[&disk],
        "weft.workload=script weft.net=192.168.100.2/24,192.168.100.1",
        &["--nic", &tap],
    )
    .await?;
    // Default egress: none.
    rig.weft_ok(&["weave", "create", "web", "--name", "eg"])?;
    rig.serial("eg").wait_for("WEFT-READY", BOOT).await?;
    serve(Some("weft-eg"), NS_SVC, "svc-ns")?;
    for (guest, host) in [("80", ROUTED), ("81", NEXT)] {
        rig.weft_ok(&[
            "weave",
            "route",
            "eg",
            "--guest-port",
            guest,
            "--host-port",
            &host.to_string(),
        ])?;
    }
    ensure!(net_json(&rig)?["egress"] == "none");
    let table = sh("nft", &["list", "table", "inet", "weft-filter"])?;
    ensure!(table.contains(&format!("chain w{SLOT}-fwd")), "{table}");

    expect(&round(&rig, 1).await?, 0, "egress none")?;
    ensure!(http(ROUTED, "r.txt")?.trim() == "routed");

    // Changed while the guest runs, recorded in the weave's net resource.
    rig.weft_ok(&["weave", "egress", "eg", "internet"])?;
    ensure!(net_json(&rig)?["egress"] == "internet");
    expect(&round(&rig, 2).await?, 1, "egress internet")?;

    rig.weft_ok(&["weave", "egress", "eg", "all"])?;
    expect(&round(&rig, 3).await?, 2, "egress all")?;
    ensure!(http(ROUTED, "r.txt")?.trim() == "routed");

    // A bad policy is refused with one line.
    let out = rig.weft(&["weave", "egress", "eg", "everything"]);
    ensure!(!out.status.success(), "{out:?}");

    // weftd started again after the filter was lost (as after a reboot) puts it back.
    rig.kill_weftd();
    sh("nft", &["delete", "table", "inet", "weft-filter"])?;
    rig.start_weftd().await?;
    let table = wait_until(
        Duration::from_secs(30),
        "weftd to restore the weave's filter",
        || async move {
            Ok(sh("nft", &["list", "table", "inet", "weft-filter"])
                .ok()
                .filter(|t| t.contains(&format!("chain w{SLOT}-nat"))))
        },
    )
    .await?;
    ensure!(table.contains("masquerade"), "{table}");

    rig.weft_ok(&["weave", "delete", "eg"])?;
    let left = sh("nft", &["list", "ruleset"])?;
    ensure!(
        !left.contains(&format!("chain w{SLOT}-")),
        "filter chains of the weave left: {left}"
    );
    rig.weft_ok(&["env", "delete", "web"])?;
    println!("took {:?}", started.elapsed());
    rig.passed();
    Ok(())
}
