//! Real kernel tests: they need root (CAP_NET_ADMIN + CAP_SYS_ADMIN), nftables
//! with the nat, fib and masquerade expressions, veth and tun. Names start with
//! `netns_` so they can be selected as a group. They use weave indices 207..=212
//! and 220..=223, host ports 47207/47208, 47210/47211 and 47220..=47222, and only
//! addresses in namespaces and links they create.
//!
//! The product code never runs `ip` or `nft`; these tests do, to look from outside.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use weft_netns::{
    allow_host_clients, enable_host_forwarding, list_routes, reconcile, route, set_egress,
    set_routes, switch, unroute, Egress, GuestLink, Kernel, LinkEnd, NetOps, Owned, Prefix, Route,
    Target, WeaveNet, WeavePlan,
};

/// The tests share the root namespace's table and must not interleave.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Removes everything a test may have made, even when it panics half-way.
struct Cleanup {
    weaves: Vec<(String, u8)>,
    netns: Vec<String>,
    links: Vec<String>,
    ports: Vec<u16>,
    servers: Vec<Server>,
}

impl Cleanup {
    fn new() -> Self {
        Cleanup {
            weaves: Vec::new(),
            netns: Vec::new(),
            links: Vec::new(),
            ports: Vec::new(),
            servers: Vec::new(),
        }
    }

    fn run(&mut self) {
        let k = Kernel::new();
        for s in self.servers.drain(..) {
            s.stop();
        }
        for p in self.ports.drain(..) {
            let _ = unroute(&k, p);
        }
        for (name, index) in self.weaves.drain(..) {
            let _ = WeaveNet::delete(&k, &name, index);
        }
        for ns in self.netns.drain(..) {
            let _ = k.delete_netns(&ns);
        }
        for link in self.links.drain(..) {
            let _ = k.delete_link(None, &link);
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
    }
}

/// A TCP server inside a namespace: answers every line with `<tag> <line>`.
struct Server {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Server {
    fn start(netns: &str, port: u16, tag: &str) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let tag = tag.to_string();
        let ns = std::fs::File::open(format!("/run/netns/{netns}")).expect("open netns");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind in guest");
            listener.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).expect("ready");
            let mut conns = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let tag = tag.clone();
                        let flag = flag.clone();
                        conns.push(std::thread::spawn(move || serve(stream, &tag, &flag)));
                    }
                    // sleep-ok: the test server's accept loop, polling its stop flag between tries
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server ready");
        Server { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

fn serve(stream: TcpStream, tag: &str, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer
                    .write_all(format!("{tag} {}", line).as_bytes())
                    .is_err()
                {
                    return;
                }
                line.clear();
            }
            Err(_) => continue,
        }
    }
}

/// A client connection that asks a line and reads the answer.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream =
            wait_until::Wait::new(format!("a connection to {addr}"), Duration::from_secs(10))
                .interval(Duration::from_millis(50))
                .until(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
                .unwrap_or_else(|e| panic!("{e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let writer = stream.try_clone().expect("clone");
        Client {
            reader: BufReader::new(stream),
            writer,
        }
    }

    fn ask(&mut self, line: &str) -> String {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .expect("write");
        let mut answer = String::new();
        self.reader.read_line(&mut answer).expect("read answer");
        answer.trim_end().to_string()
    }
}

const GUEST_PORT: u16 = 8000;

/// A weave whose "guest" is a namespace `weft-g<index>` behind a veth, serving `tag`.
fn weave_with_guest(k: &Kernel, cleanup: &mut Cleanup, index: u8, tag: &str) -> WeaveNet {
    let name = format!("t{index}");
    let guest_ns = format!("weft-g{index}");
    cleanup.weaves.push((name.clone(), index));
    cleanup.netns.push(guest_ns.clone());
    assert!(k.create_netns(&guest_ns).expect("guest namespace"));
    let mut plan = WeavePlan::new(&name, index);
    plan.guest_link = GuestLink::Veth {
        name: "wg0".into(),
        peer: LinkEnd::in_netns(&guest_ns, "eth0"),
    };
    let net = WeaveNet::create(k, &plan).expect("create weave network");
    let g = Some(guest_ns.as_str());
    k.add_address(g, "eth0", Prefix::new(plan.guest_ip, plan.guest_prefix))
        .expect("guest address");
    k.set_link_up(g, "eth0").expect("guest link up");
    k.set_default_route(g, plan.gateway_ip)
        .expect("guest default route");
    cleanup
        .servers
        .push(Server::start(&guest_ns, GUEST_PORT, tag));
    net
}

fn assert_nothing_left(indices: &[u8], ports: &[u16]) {
    let netns = sh("ip", &["netns", "list"]);
    let links = sh("ip", &["-o", "link", "show"]);
    let ruleset = sh("nft", &["list", "ruleset"]);
    for i in indices {
        for ns in [format!("weft-t{i}"), format!("weft-g{i}")] {
            assert!(
                !netns
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(ns.as_str())),
                "namespace {ns} left: {netns}"
            );
        }
        assert!(
            !links.contains(&format!(": wh{i}")),
            "link wh{i} left: {links}"
        );
        assert!(
            !ruleset.contains(&format!("-w{i}-")),
            "chain of weave {i} left: {ruleset}"
        );
        assert!(
            !ruleset.contains(&format!("chain w{i}-")),
            "filter chain of weave {i} left: {ruleset}"
        );
    }
    for p in ports {
        assert!(
            !ruleset.contains(&format!("p{p}-")),
            "chain of port {p} left: {ruleset}"
        );
    }
}

#[test]
fn netns_route_and_switch_keep_established_connections() {
    let _serial = serial();
    let k = Kernel::new();
    let mut cleanup = Cleanup::new();
    let port = 47207;
    cleanup.ports.push(port);

    let w7 = weave_with_guest(&k, &mut cleanup, 207, "weave-207");
    assert_eq!(w7.netns, "weft-t207");
    assert_eq!(
        w7.netns_path(),
        std::path::PathBuf::from("/run/netns/weft-t207")
    );

    // From outside: the pieces are where the plan says.
    let ns_list = sh("ip", &["netns", "list"]);
    assert!(ns_list.contains("weft-t207"), "{ns_list}");
    let addr = sh("ip", &["-o", "-4", "addr", "show", "wh207"]);
    assert!(addr.contains("10.231.207.1/30"), "{addr}");
    let inner = sh("ip", &["-n", "weft-t207", "-o", "-4", "addr"]);
    assert!(inner.contains("10.231.207.2/30"), "{inner}");
    assert!(inner.contains("192.168.100.1/24"), "{inner}");
    let table = sh(
        "ip",
        &[
            "netns",
            "exec",
            "weft-t207",
            "nft",
            "list",
            "table",
            "ip",
            "weft",
        ],
    );
    assert!(table.contains("dnat to 192.168.100.2"), "{table}");
    assert!(table.contains("masquerade"), "{table}");

    let r = Route::to_weave(port, 207, GUEST_PORT);
    route(&k, &r).expect("route");
    route(&k, &r).expect("route again is a no-op");
    assert!(list_routes(&k).expect("list").contains(&r));
    let ruleset = sh("nft", &["list", "table", "ip", "weft"]);
    println!("{table}\n{ruleset}");
    assert!(ruleset.contains("p47207-w207-g8000-in"), "{ruleset}");
    assert!(ruleset.contains("dnat to 10.231.207.2:8000"), "{ruleset}");

    // The host itself, through loopback and through a non-loopback local address.
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut old = Client::connect(loopback);
    assert_eq!(old.ask("hello"), "weave-207 hello");
    let mut via_link = Client::connect(SocketAddr::from((Ipv4Addr::new(10, 231, 207, 1), port)));
    assert_eq!(via_link.ask("hi"), "weave-207 hi");

    let _w8 = weave_with_guest(&k, &mut cleanup, 208, "weave-208");
    let other = Route::to_weave(port, 208, GUEST_PORT);
    assert!(matches!(
        route(&k, &other),
        Err(weft_netns::Error::PortInUse {
            port: 47207,
            to: Target::Weave(207)
        })
    ));

    let moved = switch(&k, port, Target::Weave(208)).expect("switch");
    assert_eq!(moved, other);
    let mut new = Client::connect(loopback);
    assert_eq!(new.ask("hello"), "weave-208 hello");
    // The connection opened before the switch finishes where it started.
    assert_eq!(old.ask("still there?"), "weave-207 still there?");
    let routes = list_routes(&k).expect("list");
    assert!(
        routes.contains(&other) && !routes.contains(&r),
        "{routes:?}"
    );

    drop((old, new, via_link));
    cleanup.run();
    assert_nothing_left(&[207, 208], &[port]);
}

#[test]
fn netns_delete_removes_routes_pointing_at_the_weave() {
    let _serial = serial();
    let k = Kernel::new();
    let mut cleanup = Cleanup::new();
    let port = 47208;
    cleanup.ports.push(port);
    weave_with_guest(&k, &mut cleanup, 207, "weave-207");
    route(&k, &Route::to_weave(port, 207, GUEST_PORT)).expect("route");
    let mut c = Client::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    assert_eq!(c.ask("x"), "weave-207 x");
    drop(c);
    for s in cleanup.servers.drain(..) {
        s.stop();
    }
    WeaveNet::delete(&k, "t207", 207).expect("delete");
    WeaveNet::delete(&k, "t207", 207).expect("delete twice is fine");
    assert!(!list_routes(&k)
        .expect("list")
        .iter()
        .any(|r| r.to == Target::Weave(207)));
    k.delete_netns("weft-g207").expect("delete guest");
    assert_nothing_left(&[207], &[port]);
}

#[test]
fn netns_tap_is_persistent_and_configured() {
    let _serial = serial();
    let k = Kernel::new();
    let mut cleanup = Cleanup::new();
    cleanup.weaves.push(("t209".into(), 209));
    let plan = WeavePlan::new("t209", 209);
    let started = Instant::now();
    let net = WeaveNet::create(&k, &plan).expect("create");
    println!("weave network created in {:?}", started.elapsed());
    assert_eq!(net.guest_link, "tap0");
    // Creating again repairs nothing and changes nothing.
    assert_eq!(WeaveNet::create(&k, &plan).expect("create again"), net);
    // The listings reconcile relies on.
    assert!(k
        .list_netns()
        .expect("netns")
        .contains(&"weft-t209".to_string()));
    let links = k.list_links(Some("weft-t209")).expect("links");
    assert_eq!(links, vec!["lo", "tap0", "wn209"]);
    assert!(k
        .list_links(None)
        .expect("root links")
        .contains(&"wh209".to_string()));
    assert_eq!(
        k.list_nft_tables(Some("weft-t209")).expect("tables"),
        vec!["weft"]
    );
    assert_eq!(
        k.list_nft_chains(Some("weft-t209"), &"weft".into())
            .expect("chains"),
        vec!["postrouting", "prerouting"]
    );
    assert!(k
        .list_nft_chains(Some("weft-t209"), &"nope".into())
        .expect("chains")
        .is_empty());
    let lo = sh("ip", &["-n", "weft-t209", "link", "show", "lo"]);
    assert!(lo.contains("UP"), "{lo}");
    let link = sh("ip", &["-n", "weft-t209", "-d", "link", "show", "tap0"]);
    assert!(link.contains("tun type tap"), "{link}");
    assert!(link.contains("vnet_hdr on"), "{link}");
    assert!(link.contains("persist on"), "{link}");
    let addr = sh(
        "ip",
        &["-n", "weft-t209", "-o", "-4", "addr", "show", "tap0"],
    );
    assert!(addr.contains("192.168.100.1/24"), "{addr}");
    let fwd = sh(
        "ip",
        &[
            "netns",
            "exec",
            "weft-t209",
            "cat",
            "/proc/sys/net/ipv4/ip_forward",
        ],
    );
    assert_eq!(fwd.trim(), "1");
    let route = sh("ip", &["-n", "weft-t209", "route", "show", "default"]);
    assert!(route.contains("via 10.231.209.1"), "{route}");
    cleanup.run();
    assert_nothing_left(&[209], &[]);
}

#[test]
fn netns_failed_create_leaves_nothing() {
    let _serial = serial();
    let k = Kernel::new();
    let mut cleanup = Cleanup::new();
    cleanup.weaves.push(("t209".into(), 209));
    let mut plan = WeavePlan::new("t209", 209);
    // The guest end's namespace does not exist: the create fails late.
    plan.guest_link = GuestLink::Veth {
        name: "wg0".into(),
        peer: LinkEnd::in_netns("weft-missing209", "eth0"),
    };
    let err = WeaveNet::create(&k, &plan).expect_err("must fail");
    assert!(err.to_string().contains("create veth"), "{err}");
    assert_nothing_left(&[209], &[]);
}

/// A "VM" reached straight from the root namespace, as an environment's guest on a
/// host tap: namespace `weft-h<index>` behind a veth `wa<index>` (192.168.<index>.1/24
/// on the host side), serving `tag` at 192.168.<index>.2.
fn host_guest(k: &Kernel, cleanup: &mut Cleanup, index: u8, tag: &str) -> Ipv4Addr {
    let ns = format!("weft-h{index}");
    let link = format!("wa{index}");
    cleanup.netns.push(ns.clone());
    cleanup.links.push(link.clone());
    assert!(k.create_netns(&ns).expect("guest namespace"));
    k.create_veth(&LinkEnd::root(&link), &LinkEnd::in_netns(&ns, "eth0"))
        .expect("veth");
    let gateway = Ipv4Addr::new(192, 168, index, 1);
    let guest = Ipv4Addr::new(192, 168, index, 2);
    k.add_address(None, &link, Prefix::new(gateway, 24))
        .expect("host address");
    k.set_link_up(None, &link).expect("host link up");
    let g = Some(ns.as_str());
    k.add_address(g, "eth0", Prefix::new(guest, 24))
        .expect("guest address");
    k.set_link_up(g, "eth0").expect("guest link up");
    k.set_default_route(g, gateway)
        .expect("guest default route");
    cleanup.servers.push(Server::start(&ns, GUEST_PORT, tag));
    guest
}

#[test]
fn netns_a_published_port_moves_from_an_address_to_a_weave_and_back() {
    let _serial = serial();
    let k = Kernel::new();
    let mut cleanup = Cleanup::new();
    let port = 47220;
    cleanup.ports.push(port);
    let guest = host_guest(&k, &mut cleanup, 220, "env");
    let published = Route {
        host_port: port,
        to: Target::Addr(guest),
        guest_port: GUEST_PORT,
    };
    route(&k, &published).expect("publish");
    allow_host_clients(&k, "wa220").expect("route_localnet");
    let ruleset = sh("nft", &["list", "table", "ip", "weft"]);
    assert!(
        ruleset.contains("p47220-a192.168.220.2-g8000-src"),
        "{ruleset}"
    );
    assert!(ruleset.contains("dnat to 192.168.220.2:8000"), "{ruleset}");
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut at_env = Client::connect(loopback);
    assert_eq!(at_env.ask("hello"), "env hello");

    weave_with_guest(&k, &mut cleanup, 221, "weave-221");
    let to_weave = Route::to_weave(port, 221, GUEST_PORT);
    assert_eq!(
        set_routes(&k, &[to_weave]).expect("activate"),
        vec![to_weave]
    );
    let ruleset = sh("nft", &["list", "table", "ip", "weft"]);
    assert!(!ruleset.contains("p47220-a192"), "{ruleset}");
    let mut at_weave = Client::connect(loopback);
    assert_eq!(at_weave.ask("hello"), "weave-221 hello");
    // Established connections finish where they started.
    assert_eq!(at_env.ask("still?"), "env still?");

    assert_eq!(set_routes(&k, &[published]).expect("back"), vec![published]);
    let mut again = Client::connect(loopback);
    assert_eq!(again.ask("back"), "env back");
    assert_eq!(at_weave.ask("still?"), "weave-221 still?");
    let routes = list_routes(&k).expect("list");
    assert!(
        routes.contains(&published) && !routes.contains(&to_weave),
        "{routes:?}"
    );

    drop((at_env, at_weave, again));
    cleanup.run();
    assert_nothing_left(&[220, 221], &[port]);
    let links = sh("ip", &["-o", "link", "show"]);
    assert!(!links.contains(": wa220"), "{links}");
    assert!(!sh("ip", &["netns", "list"]).contains("weft-h220"));
}

#[test]
fn netns_reconcile_removes_only_what_it_owns() {
    let _serial = serial();
    let k = Kernel::new();
    let mut cleanup = Cleanup::new();
    let (mine, theirs) = (47221, 47222);
    cleanup.ports.extend([mine, theirs]);
    cleanup.weaves.push(("t222".into(), 222));
    cleanup.weaves.push(("t223".into(), 223));
    let plan = WeavePlan::new("t222", 222);
    WeaveNet::create(&k, &plan).expect("ours");
    WeaveNet::create(&k, &WeavePlan::new("t223", 223)).expect("another daemon's");
    let ours = Route::to_weave(mine, 222, 80);
    let other = Route::to_weave(theirs, 223, 80);
    route(&k, &ours).expect("route ours");
    route(&k, &other).expect("route theirs");
    let owned = Owned {
        netns: ["weft-t222".to_string()].into(),
        indices: [222].into(),
        ports: [mine].into(),
    };

    // Our catalog no longer wants weave t222: it goes, the other daemon's stays.
    let report = reconcile(&k, &owned, &[], &[]).expect("reconcile");
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.removed_netns, vec!["weft-t222"]);
    assert_eq!(report.removed_routes, vec![ours]);
    let netns = sh("ip", &["netns", "list"]);
    assert!(!netns.contains("weft-t222"), "{netns}");
    assert!(netns.contains("weft-t223"), "{netns}");
    let links = sh("ip", &["-o", "link", "show"]);
    assert!(!links.contains(": wh222"), "{links}");
    assert!(links.contains(": wh223"), "{links}");
    let routes = list_routes(&k).expect("list");
    assert!(
        routes.contains(&other) && !routes.contains(&ours),
        "{routes:?}"
    );

    // And back: wanted again, it is re-created with its route.
    let report = reconcile(&k, &owned, std::slice::from_ref(&plan), &[ours]).expect("again");
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.created_weaves, vec!["t222"]);
    assert_eq!(report.added_routes, vec![ours]);
    assert!(sh("ip", &["netns", "list"]).contains("weft-t222"));
    let routes = list_routes(&k).expect("list");
    assert!(
        routes.contains(&other) && routes.contains(&ours),
        "{routes:?}"
    );

    cleanup.run();
    assert_nothing_left(&[222, 223], &[mine, theirs]);
}

/// Runs `f` on a new thread inside namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread in namespace")
}

/// Whether a TCP connection from namespace `ns` to `addr` is accepted. A dropped SYN
/// times out; the tests' listeners all exist, so a refusal is never the answer.
fn reaches(ns: &str, addr: SocketAddr) -> bool {
    in_netns(ns, move || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(700)).is_ok()
    })
}

/// Whether a UDP datagram sent from namespace `from` to `to` reaches a socket bound
/// to `to`'s port in namespace `server`.
fn udp_arrives(server: &str, from: &str, to: SocketAddr) -> bool {
    let file = std::fs::File::open(format!("/run/netns/{server}")).expect("open netns");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let port = to.port();
    let listener = std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let socket = UdpSocket::bind(("0.0.0.0", port)).expect("bind udp");
        socket
            .set_read_timeout(Some(Duration::from_millis(700)))
            .expect("timeout");
        ready_tx.send(()).expect("ready");
        let mut buf = [0u8; 16];
        socket.recv(&mut buf).is_ok()
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("udp ready");
    in_netns(from, move || {
        let s = UdpSocket::bind(("0.0.0.0", 0)).expect("bind");
        let _ = s.send_to(b"weft", to);
    });
    listener.join().expect("udp listener")
}

#[test]
fn netns_the_filter_isolates_a_weave_by_default_and_follows_its_egress() {
    let _serial = serial();
    let k = Kernel::new();
    let mut cleanup = Cleanup::new();
    let (routed, host_port) = (47210u16, 47211u16);
    cleanup.ports.push(routed);
    // Forwarding on, as weftd turns it on for routes: the filter must hold anyway.
    enable_host_forwarding(&k).expect("forwarding");

    weave_with_guest(&k, &mut cleanup, 210, "weave-210");
    weave_with_guest(&k, &mut cleanup, 211, "weave-211");
    let guest = "weft-g210";
    // A private network the host reaches (192.168.212.0/24), with a "public" address
    // on the same link (TEST-NET-2); both ends are the test's own.
    let private = host_guest(&k, &mut cleanup, 212, "private");
    k.add_address(
        None,
        "wa212",
        Prefix::new(Ipv4Addr::new(198, 51, 100, 1), 24),
    )
    .expect("public host address");
    k.add_address(
        Some("weft-h212"),
        "eth0",
        Prefix::new(Ipv4Addr::new(198, 51, 100, 2), 24),
    )
    .expect("public address");
    // A service of the host on every address, and one of the weave's namespace.
    // Dual-stack: IPv4 and IPv6 clients alike.
    let _host_service = TcpListener::bind(("::", host_port)).expect("host service");
    // IPv6 on the host link: the filter matches the link, whatever the family. (From
    // the weave's namespace, whose traffic to the host goes through the same chains.)
    // Neighbours are fixed: the filter drops neighbour discovery from the link too.
    let mac = |ns: &str, link: &str| {
        let out = sh("ip", &["-n", ns, "-o", "link", "show", link]);
        let at = out.find("link/ether ").expect("mac") + "link/ether ".len();
        out[at..at + 17].to_string()
    };
    let wh_mac = std::fs::read_to_string("/sys/class/net/wh210/address").expect("wh210 mac");
    let wn_mac = mac("weft-t210", "wn210");
    for (ns, addr, peer, peer_mac, link) in [
        (
            None,
            "fd31:210::1/64",
            "fd31:210::2",
            wn_mac.as_str(),
            "wh210",
        ),
        (
            Some("weft-t210"),
            "fd31:210::2/64",
            "fd31:210::1",
            wh_mac.trim(),
            "wn210",
        ),
    ] {
        let mut pre = Vec::new();
        if let Some(ns) = ns {
            pre.extend(["-n", ns]);
        }
        let run = |args: &[&str]| sh("ip", &[pre.as_slice(), args].concat());
        run(&["addr", "add", addr, "dev", link, "nodad"]);
        run(&[
            "neigh",
            "replace",
            peer,
            "lladdr",
            peer_mac,
            "dev",
            link,
            "nud",
            "permanent",
        ]);
    }
    cleanup
        .servers
        .push(Server::start("weft-t210", host_port, "namespace"));
    route(&k, &Route::to_weave(routed, 210, GUEST_PORT)).expect("route");

    let at = |ip: [u8; 4], port: u16| SocketAddr::from((Ipv4Addr::from(ip), port));
    let host_end = at([10, 231, 210, 1], host_port);
    let host_other = at([192, 168, 212, 1], host_port);
    let host_public = at([198, 51, 100, 1], host_port);
    let other_weave = at([10, 231, 211, 2], GUEST_PORT);
    let private = SocketAddr::from((private, GUEST_PORT));
    let public = at([198, 51, 100, 2], GUEST_PORT);
    let ns_inner = at([10, 231, 210, 2], host_port);
    let ns_gateway = at([192, 168, 100, 1], host_port);
    // What the guest reaches, in that order, then the host over IPv6.
    let targets = [
        host_end,
        host_other,
        host_public,
        other_weave,
        private,
        public,
        ns_inner,
        ns_gateway,
    ]
    .map(|a| (guest, a))
    .into_iter()
    .chain([(
        "weft-t210",
        SocketAddr::from((
            "fd31:210::1".parse::<std::net::Ipv6Addr>().expect("v6"),
            host_port,
        )),
    )])
    .collect::<Vec<_>>();
    // All at once: a dropped connection costs its whole timeout.
    let probe = || -> Vec<bool> {
        let probes: Vec<_> = targets
            .iter()
            .map(|a| {
                let (ns, a) = *a;
                std::thread::spawn(move || reaches(ns, a))
            })
            .collect();
        probes
            .into_iter()
            .map(|p| p.join().expect("probe"))
            .collect()
    };
    // Routed connections and DHCP work under every policy.
    let routed_and_dhcp_work = || {
        let mut c = Client::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, routed)));
        assert_eq!(c.ask("hi"), "weave-210 hi");
        let mut c = Client::connect(SocketAddr::from((Ipv4Addr::new(192, 168, 212, 1), routed)));
        assert_eq!(c.ask("hi"), "weave-210 hi");
        // A client on another machine: forwarded to the weave, its answers forwarded back.
        let remote = in_netns("weft-h212", move || {
            let mut c =
                Client::connect(SocketAddr::from((Ipv4Addr::new(192, 168, 212, 1), routed)));
            c.ask("hi")
        });
        assert_eq!(remote, "weave-210 hi", "remote client");
        assert!(
            udp_arrives("weft-t210", guest, at([192, 168, 100, 1], 67)),
            "DHCP"
        );
        assert!(
            !udp_arrives("weft-t210", guest, at([192, 168, 100, 1], 69)),
            "UDP other than DHCP"
        );
    };

    // Before anything, from the test's own namespace: everything is up.
    let t = Instant::now();
    assert!(reaches(
        "weft-h212",
        SocketAddr::from((Ipv4Addr::new(198, 51, 100, 1), host_port))
    ));

    // Default (none): nothing at all.
    let table = sh("nft", &["list", "table", "inet", "weft-filter"]);
    println!("{table}");
    assert!(
        table.contains("chain w210-fwd") && table.contains("chain w210-in"),
        "{table}"
    );
    assert_eq!(probe(), vec![false; 9], "egress none");
    routed_and_dhcp_work();

    // internet: public addresses only.
    let t_set = Instant::now();
    set_egress(&k, 210, Egress::Internet).expect("internet");
    println!("set_egress took {:?}", t_set.elapsed());
    let table = sh("nft", &["list", "table", "inet", "weft-filter"]);
    assert!(
        table.contains("fc00::/7") && table.contains("masquerade"),
        "{table}"
    );
    assert_eq!(
        probe(),
        vec![false, false, false, false, false, true, false, false, false],
        "egress internet"
    );
    routed_and_dhcp_work();

    // all: everything but the weave namespace's own addresses.
    set_egress(&k, 210, Egress::All).expect("all");
    assert_eq!(
        probe(),
        vec![true, true, true, true, true, true, false, false, true],
        "egress all"
    );

    // Back to none while connections are open: what the guest opened stops.
    let open = in_netns(guest, move || {
        TcpStream::connect_timeout(&private, Duration::from_millis(700)).expect("open under all")
    });
    set_egress(&k, 210, Egress::None).expect("none");
    assert_eq!(probe(), vec![false; 9], "egress none again");
    let mut open_reader = BufReader::new(open.try_clone().expect("clone"));
    open.set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    let _ = (&open).write_all(b"still there?\n");
    let mut answer = String::new();
    assert!(
        open_reader
            .read_line(&mut answer)
            .map(|n| n == 0)
            .unwrap_or(true),
        "a connection the guest opened under `all` still works: {answer:?}"
    );
    routed_and_dhcp_work();
    println!("probes took {:?}", t.elapsed());

    // The weave's chains go with it; the other weave's stay.
    WeaveNet::delete(&k, "t210", 210).expect("delete");
    let table = sh("nft", &["list", "table", "inet", "weft-filter"]);
    assert!(
        !table.contains("w210-") && table.contains("chain w211-in"),
        "{table}"
    );
    drop(cleanup);
    assert_nothing_left(&[210, 211], &[routed]);
}

/// A name that would reach another file under /proc/sys (`all` sets every link, `..`
/// leaves conf/) is refused before the kernel is touched; a real link's own
/// `route_localnet` is set.
#[test]
fn netns_route_localnet_names_are_checked_against_the_real_proc() {
    let _g = serial();
    let k = Kernel::new();
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let all = "/proc/sys/net/ipv4/conf/all/route_localnet";
    let before = read(all);
    for bad in ["all", "default", "../all", "lo/../all", ".."] {
        let e = allow_host_clients(&k, bad).unwrap_err();
        assert!(matches!(e, weft_netns::Error::InvalidLink(_)), "{bad}: {e}");
    }
    assert_eq!(read(all), before, "conf/all was changed");
    // A link made from outside, as a tap would be.
    let link = format!("wrl{}", std::process::id() % 100_000);
    let peer = format!("{link}p");
    sh(
        "ip",
        &["link", "add", &link, "type", "veth", "peer", "name", &peer],
    );
    let set = allow_host_clients(&k, &link);
    let value = read(&format!("/proc/sys/net/ipv4/conf/{link}/route_localnet"));
    sh("ip", &["link", "del", &link]);
    set.unwrap();
    assert_eq!(value.trim(), "1");
    assert_eq!(read(all), before, "conf/all was changed");
}
