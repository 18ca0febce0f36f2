//! The weave DHCP server ([`weft_netns::dhcp`]) against a real client (busybox `udhcpc`) in real namespaces,
//! without QEMU: a namespace `weft-d230` stands for the weave (the server's side of the
//! guest link, 192.168.100.1/24 on `wg0`), `weft-g230` for the guest (`eth0`, the
//! other end of a veth pair). Needs root; named `netns_*` so the tests run one at a
//! time. Uses weave index 230's names only.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;

use weft_netns::dhcp::{Lease, Servers};

const WEAVE: &str = "d230";
const WEAVE_NS: &str = "weft-d230";
const GUEST_NS: &str = "weft-g230";

fn netns(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

fn sh(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"))
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let out = sh(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes the namespaces (and with them the veth pair), even after a panic.
struct Cleanup;

impl Cleanup {
    fn run() {
        for ns in [WEAVE_NS, GUEST_NS] {
            let _ = sh("ip", &["netns", "del", ns]);
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        Cleanup::run();
    }
}

/// The weave and guest namespaces joined by a veth pair; the weave side has the gateway.
fn link_up() -> Cleanup {
    Cleanup::run();
    let cleanup = Cleanup;
    ok("ip", &["netns", "add", WEAVE_NS]);
    ok("ip", &["netns", "add", GUEST_NS]);
    ok(
        "ip",
        &[
            "link", "add", "wg0", "netns", WEAVE_NS, "type", "veth", "peer", "name", "eth0",
            "netns", GUEST_NS,
        ],
    );
    ok(
        "ip",
        &[
            "-n",
            WEAVE_NS,
            "addr",
            "add",
            "192.168.100.1/24",
            "dev",
            "wg0",
        ],
    );
    ok("ip", &["-n", WEAVE_NS, "link", "set", "wg0", "up"]);
    ok("ip", &["-n", GUEST_NS, "link", "set", "lo", "up"]);
    ok("ip", &["-n", GUEST_NS, "link", "set", "eth0", "up"]);
    cleanup
}

/// Runs udhcpc once in the guest namespace; returns what its script saw on `bound`.
fn udhcpc(dir: &Path) -> String {
    let script = dir.join("script.sh");
    let out = dir.join("bound.env");
    let _ = std::fs::remove_file(&out);
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = bound ] && env > {}\nexit 0\n",
            out.display()
        ),
    )
    .expect("write script");
    ok("chmod", &["0755", script.to_str().expect("utf-8")]);
    let run = sh(
        "ip",
        &[
            "netns",
            "exec",
            GUEST_NS,
            "busybox",
            "udhcpc",
            "-f",
            "-q",
            "-n",
            "-t",
            "10",
            "-T",
            "1",
            "-i",
            "eth0",
            "-s",
            script.to_str().expect("utf-8"),
        ],
    );
    assert!(
        run.status.success(),
        "udhcpc got no lease: {}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::read_to_string(&out).expect("udhcpc ran its script on bound")
}

fn var<'a>(env: &'a str, name: &str) -> Option<&'a str> {
    env.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

/// Sends datagrams to the server from the guest namespace (from a temporary address).
fn send_from_guest(datagrams: Vec<Vec<u8>>) {
    ok(
        "ip",
        &[
            "-n",
            GUEST_NS,
            "addr",
            "add",
            "192.168.100.50/24",
            "dev",
            "eth0",
        ],
    );
    let ns = std::fs::File::open(format!("/run/netns/{GUEST_NS}")).expect("open netns");
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let s = UdpSocket::bind("192.168.100.50:0").expect("bind");
        for d in datagrams {
            // Oversized datagrams may be refused locally; the others must go out.
            let _ = s.send_to(&d, "192.168.100.1:67");
        }
    })
    .join()
    .expect("sender");
    ok("ip", &["-n", GUEST_NS, "addr", "flush", "dev", "eth0"]);
}

#[test]
fn netns_dhcp_gives_a_real_client_the_weave_plan_and_survives_garbage() {
    let _cleanup = link_up();
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = Servers::new();
    servers
        .start(WEAVE, &netns(WEAVE_NS), "wg0", Lease::for_weaves())
        .expect("server starts");
    assert!(servers.is_running(WEAVE));
    // Starting again keeps the running server.
    servers
        .start(WEAVE, &netns(WEAVE_NS), "wg0", Lease::for_weaves())
        .expect("second start");

    let env = udhcpc(dir.path());
    assert_eq!(var(&env, "ip"), Some("192.168.100.2"), "{env}");
    assert_eq!(var(&env, "mask"), Some("24"), "{env}");
    assert_eq!(var(&env, "router"), Some("192.168.100.1"), "{env}");
    assert_eq!(var(&env, "serverid"), Some("192.168.100.1"), "{env}");
    assert_eq!(var(&env, "lease"), Some("3600"), "{env}");

    // Garbage from the guest: short, long, damaged, wrong types. The server ignores
    // it and keeps answering.
    let mut garbage: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![1; 100],
        vec![1; 240],
        vec![0xff; 1400],
        vec![1; 3000],
    ];
    for i in 0..40u8 {
        let mut d = vec![1u8, 1, 6, 0];
        d.extend(std::iter::repeat_n(i, 232));
        d.extend([99, 130, 83, 99, 53, 1, i % 9, 255]);
        garbage.push(d);
    }
    send_from_guest(garbage);
    assert!(servers.is_running(WEAVE), "the server died of garbage");
    let env = udhcpc(dir.path());
    assert_eq!(var(&env, "ip"), Some("192.168.100.2"), "{env}");

    // Stopped: its thread has left the namespace, nothing listens on port 67 there.
    servers.stop(WEAVE);
    assert!(!servers.is_running(WEAVE));
    let listening = ok("ip", &["netns", "exec", WEAVE_NS, "ss", "-Hulnp"]);
    assert!(!listening.contains(":67"), "{listening}");

    // A namespace that does not exist: a clear error, nothing running.
    let err = servers
        .start(
            "nosuch230",
            &netns("weft-nosuch230"),
            "wg0",
            Lease::for_weaves(),
        )
        .expect_err("no namespace")
        .to_string();
    assert!(err.contains("/run/netns/weft-nosuch230"), "{err}");
    assert!(!servers.is_running("nosuch230"));
    // A tap that does not exist in the namespace: refused too.
    let err = servers
        .start(WEAVE, &netns(WEAVE_NS), "nosuch0", Lease::for_weaves())
        .expect_err("no tap")
        .to_string();
    assert!(err.contains("nosuch0"), "{err}");
}
