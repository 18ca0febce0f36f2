//! DHCP for weave guests: a small DHCPv4 server inside each weave's namespace.
//!
//! A weave has one guest plan (see [`crate::net`]): one address, its prefix and the
//! gateway on the namespace side of the guest's tap. A guest that asks by DHCP gets
//! exactly that plan, so a guest image configured for DHCP runs in any weave unchanged.
//!
//! One OS thread per weave `setns`es into the weave's namespace (as `weft-netns` does:
//! a tokio worker never changes namespace), opens a UDP socket on port 67 bound to
//! the guest's tap (`SO_BINDTODEVICE`), and answers DISCOVER with an OFFER and REQUEST
//! with an ACK (or a NAK for another address). Everything else is ignored.
//!
//! Everything the guest sends is untrusted: [`answer`] takes a datagram of at most
//! [`MAX_PACKET`] bytes, checks the fixed BOOTP fields before decoding (message
//! encoding and decoding is `dhcproto`'s), never panics (a cargo-fuzz target feeds it
//! arbitrary bytes) and answers only what it can answer with the plan. The serving
//! loop handles at most [`PACKETS_PER_SEC`] datagrams a second and leaves the rest to
//! the kernel's socket buffer, so a flooding guest costs weftd little.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dhcproto::v4::{
    DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode, CLIENT_PORT, MAGIC,
    SERVER_PORT,
};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use tracing::{debug, info, warn};
use weft_qmp::launch::VmConfig;

use crate::catalog::Catalog;
use crate::model::GuestPlan;

/// The largest datagram handled: an Ethernet MTU. Longer ones are dropped unread.
pub const MAX_PACKET: usize = 1500;
/// The fixed BOOTP header (236 bytes) and the DHCP magic cookie.
const MIN_PACKET: usize = 240;
/// Where the magic cookie sits.
const MAGIC_AT: usize = 236;
/// Replies are padded to the BOOTP minimum; some clients drop shorter ones.
const MIN_REPLY: usize = 300;
/// Lease time handed out: the plan never changes, so the lease only has to be renewed
/// now and then.
pub const LEASE_SECS: u32 = 3600;
/// At most this many datagrams a second are read and answered per weave.
pub const PACKETS_PER_SEC: u32 = 50;
/// How often the serving thread looks at its stop flag.
const POLL: Duration = Duration::from_millis(200);

/// What a guest is told: its address, prefix, router and lease time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The guest's address.
    pub address: Ipv4Addr,
    /// The prefix length of the guest network.
    pub prefix: u8,
    /// The guest's gateway; also the server identifier (the address of the tap).
    pub router: Ipv4Addr,
    /// Lease time in seconds.
    pub lease_secs: u32,
}

impl Lease {
    /// The lease of a guest plan.
    pub fn for_plan(plan: &GuestPlan) -> Lease {
        Lease {
            address: plan.guest_ip,
            prefix: plan.guest_prefix,
            router: plan.gateway,
            lease_secs: LEASE_SECS,
        }
    }

    /// The lease of the default plan (192.168.100.2/24, gateway 192.168.100.1).
    pub fn for_weaves() -> Lease {
        Lease::for_plan(&GuestPlan::default())
    }

    /// The subnet mask of the prefix.
    pub fn mask(&self) -> Ipv4Addr {
        let bits = u32::from(self.prefix.min(32));
        Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0))
    }
}

/// Why a datagram got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Shorter than a BOOTP header with the magic cookie.
    TooShort(usize),
    /// Longer than [`MAX_PACKET`].
    TooLong(usize),
    /// Not a BOOTREQUEST.
    NotRequest,
    /// Not Ethernet with a 6-byte hardware address.
    NotEthernet,
    /// The DHCP magic cookie is missing.
    NoCookie,
    /// `dhcproto` could not decode it.
    Malformed,
    /// Came through a relay (`giaddr` or `hops` set): there is none on a weave's tap.
    Relayed,
    /// The client hardware address is zero, multicast or broadcast.
    BadClientAddress,
    /// A message type this server does not answer (or none).
    Unhandled(Option<u8>),
    /// A REQUEST addressed to another server.
    OtherServer,
    /// A REQUEST that names no address.
    NoAddress,
    /// The answer could not be encoded (never expected).
    Encode,
}

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ignored::TooShort(n) => write!(f, "{n} bytes is shorter than a DHCP message"),
            Ignored::TooLong(n) => write!(f, "{n} bytes is longer than {MAX_PACKET}"),
            Ignored::NotRequest => f.write_str("not a BOOTREQUEST"),
            Ignored::NotEthernet => f.write_str("not Ethernet with a 6-byte address"),
            Ignored::NoCookie => f.write_str("no DHCP magic cookie"),
            Ignored::Malformed => f.write_str("malformed DHCP message"),
            Ignored::Relayed => f.write_str("relayed message"),
            Ignored::BadClientAddress => f.write_str("zero, multicast or broadcast client address"),
            Ignored::Unhandled(Some(t)) => write!(f, "message type {t} is not answered"),
            Ignored::Unhandled(None) => f.write_str("no message type"),
            Ignored::OtherServer => f.write_str("request for another server"),
            Ignored::NoAddress => f.write_str("request names no address"),
            Ignored::Encode => f.write_str("cannot encode the answer"),
        }
    }
}

/// An answer to send to the client port ([`CLIENT_PORT`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// OFFER, ACK or NAK.
    pub kind: MessageType,
    /// Where to send it: the client's address when it already has the plan's address,
    /// else the limited broadcast (which leaves only through the tap).
    pub to: Ipv4Addr,
    /// The encoded message.
    pub bytes: Vec<u8>,
}

/// The answer to one datagram from the guest, or why there is none.
///
/// Checks the fixed fields before decoding: BOOTREQUEST, Ethernet with a 6-byte
/// address, the magic cookie, no relay, a unicast client address. DISCOVER gets an
/// OFFER of `lease`; REQUEST for `lease.address` (in option 50, or `ciaddr` when
/// renewing) gets an ACK, a REQUEST for any other address a NAK, a REQUEST naming
/// another server nothing. Never panics, whatever `packet` holds.
pub fn answer(packet: &[u8], lease: &Lease) -> Result<Answer, Ignored> {
    if packet.len() > MAX_PACKET {
        return Err(Ignored::TooLong(packet.len()));
    }
    if packet.len() < MIN_PACKET {
        return Err(Ignored::TooShort(packet.len()));
    }
    // op, htype, hlen, hops: checked on the raw bytes (dhcproto takes hlen as given
    // and slices the hardware address with it).
    if packet[0] != 1 {
        return Err(Ignored::NotRequest);
    }
    if packet[1] != 1 || packet[2] != 6 {
        return Err(Ignored::NotEthernet);
    }
    if packet[MAGIC_AT..MIN_PACKET] != MAGIC {
        return Err(Ignored::NoCookie);
    }
    // dhcproto decodes only the header and the options read here, each well-formed:
    // some of its option decoders assert on lengths a guest chooses (found by the
    // `dhcp_packet` fuzz target). Should one still panic, the datagram is dropped and
    // the serving thread lives on.
    let clean = read_options(packet).ok_or(Ignored::Malformed)?;
    let request = std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(&clean)))
        .map_err(|_| Ignored::Malformed)?
        .map_err(|_| Ignored::Malformed)?;
    if request.opcode() != Opcode::BootRequest || request.htype() != HType::Eth {
        return Err(Ignored::NotEthernet);
    }
    if request.hops() != 0 || !request.giaddr().is_unspecified() {
        return Err(Ignored::Relayed);
    }
    let chaddr = request.chaddr();
    if chaddr.len() != 6 || chaddr.iter().all(|b| *b == 0) || chaddr[0] & 1 != 0 {
        return Err(Ignored::BadClientAddress);
    }
    let kind = match request.opts().get(OptionCode::MessageType) {
        Some(DhcpOption::MessageType(MessageType::Discover)) => MessageType::Offer,
        Some(DhcpOption::MessageType(MessageType::Request)) => {
            if let Some(DhcpOption::ServerIdentifier(server)) =
                request.opts().get(OptionCode::ServerIdentifier)
            {
                if *server != lease.router {
                    return Err(Ignored::OtherServer);
                }
            }
            let wanted = match request.opts().get(OptionCode::RequestedIpAddress) {
                Some(DhcpOption::RequestedIpAddress(ip)) => *ip,
                _ if !request.ciaddr().is_unspecified() => request.ciaddr(),
                _ => return Err(Ignored::NoAddress),
            };
            if wanted == lease.address {
                MessageType::Ack
            } else {
                MessageType::Nak
            }
        }
        Some(DhcpOption::MessageType(other)) => {
            return Err(Ignored::Unhandled(Some(u8::from(*other))))
        }
        _ => return Err(Ignored::Unhandled(None)),
    };
    let offered = match kind {
        MessageType::Nak => Ipv4Addr::UNSPECIFIED,
        _ => lease.address,
    };
    let ciaddr = match kind {
        MessageType::Ack => request.ciaddr(),
        _ => Ipv4Addr::UNSPECIFIED,
    };
    let mut reply = Message::new_with_id(
        request.xid(),
        ciaddr,
        offered,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        chaddr,
    );
    reply
        .set_opcode(Opcode::BootReply)
        .set_htype(HType::Eth)
        .set_flags(Flags::new(u16::from(request.flags()) & 0x8000));
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ServerIdentifier(lease.router));
    if kind != MessageType::Nak {
        opts.insert(DhcpOption::AddressLeaseTime(lease.lease_secs));
        opts.insert(DhcpOption::Renewal(lease.lease_secs / 2));
        opts.insert(DhcpOption::Rebinding(lease.lease_secs / 8 * 7));
        opts.insert(DhcpOption::SubnetMask(lease.mask()));
        opts.insert(DhcpOption::Router(vec![lease.router]));
    }
    let mut bytes = Vec::with_capacity(MIN_REPLY);
    reply
        .encode(&mut Encoder::new(&mut bytes))
        .map_err(|_| Ignored::Encode)?;
    if bytes.len() < MIN_REPLY {
        bytes.resize(MIN_REPLY, 0);
    }
    // A client that already holds the address (renewing) is answered directly; one
    // that does not yet, and every NAK, by broadcast on the tap (RFC 2131 4.1).
    let to = if kind != MessageType::Nak && request.ciaddr() == lease.address {
        lease.address
    } else {
        Ipv4Addr::BROADCAST
    };
    Ok(Answer { kind, to, bytes })
}

/// The options [`answer`] reads, with the one length each may have: message type,
/// requested address, server identifier.
const READ_OPTIONS: [(u8, usize); 3] = [
    (OPT_MESSAGE_TYPE, 1),
    (OPT_REQUESTED_ADDRESS, 4),
    (OPT_SERVER_ID, 4),
];
const OPT_PAD: u8 = 0;
const OPT_REQUESTED_ADDRESS: u8 = 50;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_END: u8 = 255;

/// The fixed part of `packet` (BOOTP header and cookie, at least [`MIN_PACKET`] bytes)
/// followed by the first of each of [`READ_OPTIONS`] that has its length, and END.
/// Other options, and ones of another length, are left out; none when an option runs
/// past the end of the datagram.
fn read_options(packet: &[u8]) -> Option<Vec<u8>> {
    let mut out = packet.get(..MIN_PACKET)?.to_vec();
    let mut seen = [false; READ_OPTIONS.len()];
    let mut at = MIN_PACKET;
    while let Some(&code) = packet.get(at) {
        match code {
            OPT_PAD => {
                at += 1;
                continue;
            }
            OPT_END => break,
            _ => {}
        }
        let len = usize::from(*packet.get(at + 1)?);
        let value = packet.get(at + 2..at + 2 + len)?;
        let wanted = READ_OPTIONS
            .iter()
            .position(|&(c, l)| c == code && l == len);
        if let Some(k) = wanted {
            if !seen[k] {
                seen[k] = true;
                out.push(code);
                out.push(value.len() as u8);
                out.extend_from_slice(value);
            }
        }
        at += 2 + len;
    }
    out.push(OPT_END);
    Some(out)
}

/// The tap a weave's guest is on: its first NIC's (as [`crate::weavenet::create`]
/// makes it); none when the VM has no NIC.
pub fn guest_tap(config: &VmConfig) -> Option<String> {
    config.nics.first().map(|n| n.tap.clone())
}

/// One running server.
struct Server {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The DHCP servers of the weaves, one thread each, by weave name.
#[derive(Default)]
pub struct Servers {
    running: Mutex<HashMap<String, Server>>,
}

impl Servers {
    /// No servers yet.
    pub fn new() -> Arc<Servers> {
        Arc::new(Servers::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Server>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the server of `weave` runs.
    pub fn is_running(&self, weave: &str) -> bool {
        self.lock()
            .get(weave)
            .is_some_and(|s| !s.thread.is_finished())
    }

    /// Serves the guest plan `catalog` records for `weave` to its guest, described by
    /// `config` (on its first NIC's tap); nothing to do for a VM without a NIC.
    pub async fn start_for(
        self: &Arc<Self>,
        catalog: &Catalog,
        weave: &str,
        config: &VmConfig,
    ) -> Result<(), String> {
        let Some(tap) = guest_tap(config) else {
            return Ok(());
        };
        let plan = catalog
            .net_plan(weave)
            .await
            .map_err(|e| format!("guest plan of weave {weave}: {e}"))?;
        self.start(weave, &tap, Lease::for_plan(&plan)).await
    }

    /// Starts serving `lease` on `tap` in the namespace of `weave` (`weft-<weave>`,
    /// which must exist). A server of `weave` that runs already is kept. Returns once
    /// the socket is bound, or why it could not be.
    pub async fn start(
        self: &Arc<Self>,
        weave: &str,
        tap: &str,
        lease: Lease,
    ) -> Result<(), String> {
        let me = Arc::clone(self);
        let (weave, tap) = (weave.to_string(), tap.to_string());
        match tokio::task::spawn_blocking(move || me.start_blocking(&weave, &tap, lease)).await {
            Ok(r) => r,
            Err(e) => Err(format!("dhcp task failed: {e}")),
        }
    }

    fn start_blocking(&self, weave: &str, tap: &str, lease: Lease) -> Result<(), String> {
        let mut running = self.lock();
        if let Some(s) = running.get(weave) {
            if !s.thread.is_finished() {
                return Ok(());
            }
        }
        if let Some(old) = running.remove(weave) {
            let _ = old.thread.join();
        }
        let path = crate::weaves::netns_path(weave);
        let ns = File::open(&path)
            .map_err(|e| format!("cannot open network namespace {}: {e}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (stop, weave, tap) = (stop.clone(), weave.to_string(), tap.to_string());
            std::thread::Builder::new()
                .name("weft-dhcp".into())
                .spawn(move || run(ns, &weave, &tap, lease, &stop, ready_tx))
                .map_err(|e| format!("cannot start the DHCP thread: {e}"))?
        };
        let ready = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| Err("the DHCP thread did not start".into()));
        match ready {
            Ok(()) => {
                info!(weave, tap, address = %lease.address, "DHCP server started");
                running.insert(weave.to_string(), Server { stop, thread });
                Ok(())
            }
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                let _ = thread.join();
                Err(e)
            }
        }
    }

    /// Stops the server of `weave` (if any) and waits until its thread has left the
    /// namespace, so the namespace can go.
    pub async fn stop(self: &Arc<Self>, weave: &str) {
        let Some(server) = self.lock().remove(weave) else {
            return;
        };
        server.stop.store(true, Ordering::SeqCst);
        let weave = weave.to_string();
        let joined = tokio::task::spawn_blocking(move || server.thread.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            warn!(weave, "the DHCP thread ended abnormally");
        } else {
            info!(weave, "DHCP server stopped");
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for s in self.lock().values() {
            s.stop.store(true, Ordering::SeqCst);
        }
    }
}

/// The serving thread: enter the namespace, bind, report, serve until stopped.
fn run(
    ns: File,
    weave: &str,
    tap: &str,
    lease: Lease,
    stop: &AtomicBool,
    ready: mpsc::Sender<Result<(), String>>,
) {
    if let Err(e) = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET) {
        let _ = ready.send(Err(format!(
            "cannot enter the namespace of weave {weave}: {e}"
        )));
        return;
    }
    drop(ns);
    let socket = match open_socket(tap) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(format!(
                "cannot listen for DHCP on {tap} in weft-{weave}: {e}"
            )));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    serve(&socket, weave, &lease, stop);
}

/// UDP port 67 on `tap` only, allowed to broadcast, with a read timeout of [`POLL`].
fn open_socket(tap: &str) -> io::Result<UdpSocket> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // Bound to the tap before the port, so nothing from another link is ever queued.
    setsockopt(&fd, sockopt::BindToDevice, &OsString::from(tap))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::Broadcast, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, SERVER_PORT))?;
    let socket = UdpSocket::from(fd);
    socket.set_read_timeout(Some(POLL))?;
    Ok(socket)
}

/// Answers datagrams until `stop` is set, at most [`PACKETS_PER_SEC`] a second.
fn serve(socket: &UdpSocket, weave: &str, lease: &Lease, stop: &AtomicBool) {
    // One byte more than the limit: a longer datagram fills it and is dropped.
    let mut buf = vec![0u8; MAX_PACKET + 1];
    let mut window = Instant::now();
    let mut handled = 0u32;
    let mut failures = 0u32;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now.duration_since(window) >= Duration::from_secs(1) {
            window = now;
            handled = 0;
        }
        if handled >= PACKETS_PER_SEC {
            // Over budget: leave the rest to the socket buffer (the kernel drops the
            // excess) until the next second.
            let left = Duration::from_secs(1).saturating_sub(now.duration_since(window));
            std::thread::sleep(left.min(POLL));
            continue;
        }
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_multiple_of(100) {
                    warn!(weave, error = %e, failures, "DHCP receive failed");
                }
                std::thread::sleep(POLL);
                continue;
            }
        };
        handled += 1;
        let packet = buf.get(..n).unwrap_or_default();
        match answer(packet, lease) {
            Ok(a) => {
                let to = SocketAddrV4::new(a.to, CLIENT_PORT);
                match socket.send_to(&a.bytes, to) {
                    Ok(_) => debug!(weave, %from, %to, kind = ?a.kind, "DHCP answered"),
                    Err(e) => debug!(weave, %to, error = %e, "DHCP answer not sent"),
                }
            }
            Err(why) => debug!(weave, %from, %why, "DHCP datagram ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    fn lease() -> Lease {
        Lease::for_weaves()
    }

    fn request(kind: MessageType, edit: impl FnOnce(&mut Message)) -> Vec<u8> {
        let mut m = Message::new_with_id(
            0x1234_5678,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &MAC,
        );
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        edit(&mut m);
        let mut out = Vec::new();
        m.encode(&mut Encoder::new(&mut out)).expect("encode");
        out
    }

    fn decode(a: &Answer) -> Message {
        Message::decode(&mut Decoder::new(&a.bytes)).expect("answer decodes")
    }

    #[test]
    fn discover_gets_the_plan() {
        let a = answer(&request(MessageType::Discover, |_| {}), &lease()).expect("offer");
        assert_eq!(a.kind, MessageType::Offer);
        assert_eq!(a.to, Ipv4Addr::BROADCAST);
        assert!(a.bytes.len() >= MIN_REPLY);
        let m = decode(&a);
        assert_eq!(m.opcode(), Opcode::BootReply);
        assert_eq!(m.xid(), 0x1234_5678);
        assert_eq!(m.chaddr(), &MAC);
        assert_eq!(m.yiaddr(), Ipv4Addr::new(192, 168, 100, 2));
        let o = m.opts();
        assert_eq!(o.msg_type(), Some(MessageType::Offer));
        assert_eq!(
            o.get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
        assert_eq!(
            o.get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![Ipv4Addr::new(192, 168, 100, 1)]))
        );
        assert_eq!(
            o.get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(Ipv4Addr::new(
                192, 168, 100, 1
            )))
        );
        assert_eq!(
            o.get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(LEASE_SECS))
        );
        assert_eq!(
            o.get(OptionCode::Renewal),
            Some(&DhcpOption::Renewal(LEASE_SECS / 2))
        );
    }

    #[test]
    fn request_for_the_plan_is_acked_other_addresses_are_naked() {
        let selecting = request(MessageType::Request, |m| {
            m.opts_mut()
                .insert(DhcpOption::RequestedIpAddress(lease().address));
            m.opts_mut()
                .insert(DhcpOption::ServerIdentifier(lease().router));
        });
        let a = answer(&selecting, &lease()).expect("ack");
        assert_eq!(a.kind, MessageType::Ack);
        assert_eq!(a.to, Ipv4Addr::BROADCAST);
        assert_eq!(decode(&a).yiaddr(), lease().address);

        // Renewing: the address is in ciaddr, the answer goes straight to it.
        let renewing = request(MessageType::Request, |m| {
            m.set_ciaddr(lease().address);
        });
        let a = answer(&renewing, &lease()).expect("ack");
        assert_eq!(a.kind, MessageType::Ack);
        assert_eq!(a.to, lease().address);
        assert_eq!(decode(&a).ciaddr(), lease().address);

        // Another address (say, from an earlier network): NAK, by broadcast, no lease.
        let other = request(MessageType::Request, |m| {
            m.opts_mut()
                .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 9)));
        });
        let a = answer(&other, &lease()).expect("nak");
        assert_eq!(a.kind, MessageType::Nak);
        assert_eq!(a.to, Ipv4Addr::BROADCAST);
        let m = decode(&a);
        assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(m.opts().get(OptionCode::AddressLeaseTime).is_none());
        let renew_other = request(MessageType::Request, |m| {
            m.set_ciaddr(Ipv4Addr::new(10, 0, 0, 9));
        });
        assert_eq!(
            answer(&renew_other, &lease()).expect("nak").kind,
            MessageType::Nak
        );
    }

    #[test]
    fn everything_else_is_ignored() {
        let l = lease();
        let base = request(MessageType::Discover, |_| {});
        let with = |i: usize, v: u8| {
            let mut p = base.clone();
            p[i] = v;
            p
        };
        assert_eq!(answer(&[], &l), Err(Ignored::TooShort(0)));
        assert_eq!(answer(&base[..239], &l), Err(Ignored::TooShort(239)));
        assert_eq!(
            answer(&vec![0u8; MAX_PACKET + 1], &l),
            Err(Ignored::TooLong(MAX_PACKET + 1))
        );
        assert_eq!(answer(&with(0, 2), &l), Err(Ignored::NotRequest));
        assert_eq!(answer(&with(1, 6), &l), Err(Ignored::NotEthernet));
        // A hardware address length beyond the 16-byte field must not be trusted.
        assert_eq!(answer(&with(2, 200), &l), Err(Ignored::NotEthernet));
        assert_eq!(answer(&with(3, 1), &l), Err(Ignored::Relayed));
        assert_eq!(answer(&with(24, 10), &l), Err(Ignored::Relayed));
        assert_eq!(answer(&with(MAGIC_AT, 0), &l), Err(Ignored::NoCookie));
        assert_eq!(answer(&with(28, 0x01), &l), Err(Ignored::BadClientAddress));
        let zero_mac = request(MessageType::Discover, |m| {
            m.set_chaddr(&[0; 6]);
        });
        assert_eq!(answer(&zero_mac, &l), Err(Ignored::BadClientAddress));
        for t in [
            MessageType::Decline,
            MessageType::Release,
            MessageType::Inform,
            MessageType::Offer,
            MessageType::Ack,
        ] {
            assert!(
                matches!(
                    answer(&request(t, |_| {}), &l),
                    Err(Ignored::Unhandled(Some(_)))
                ),
                "{t:?}"
            );
        }
        let untyped = request(MessageType::Discover, |m| {
            m.opts_mut().remove(OptionCode::MessageType);
        });
        assert_eq!(answer(&untyped, &l), Err(Ignored::Unhandled(None)));
        let elsewhere = request(MessageType::Request, |m| {
            m.opts_mut()
                .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 1, 1, 1)));
            m.opts_mut()
                .insert(DhcpOption::RequestedIpAddress(l.address));
        });
        assert_eq!(answer(&elsewhere, &l), Err(Ignored::OtherServer));
        let nothing = request(MessageType::Request, |_| {});
        assert_eq!(answer(&nothing, &l), Err(Ignored::NoAddress));
    }

    #[test]
    fn damaged_messages_never_panic() {
        // Every truncation and every single-byte change of valid requests.
        let l = lease();
        let samples = [
            request(MessageType::Discover, |m| {
                m.opts_mut().insert(DhcpOption::ParameterRequestList(vec![
                    OptionCode::SubnetMask,
                    OptionCode::Router,
                ]));
                m.opts_mut().insert(DhcpOption::Hostname("guest".into()));
            }),
            request(MessageType::Request, |m| {
                m.opts_mut()
                    .insert(DhcpOption::RequestedIpAddress(l.address));
            }),
        ];
        for s in &samples {
            for n in 0..=s.len() {
                let _ = answer(&s[..n], &l);
            }
            for i in 0..s.len() {
                for v in [0u8, 1, 2, 6, 0x35, 0x7f, 0xff] {
                    let mut p = s.clone();
                    p[i] = v;
                    let _ = answer(&p, &l);
                }
            }
            // Options running past the end, and a packet of option bytes only.
            let mut long = s.clone();
            long.extend(std::iter::repeat_n(0x35u8, 64));
            let _ = answer(&long, &l);
        }
    }

    #[test]
    fn another_plan_is_served_as_recorded() {
        let l = Lease::for_plan(&GuestPlan {
            guest_ip: Ipv4Addr::new(10, 77, 0, 9),
            guest_prefix: 16,
            gateway: Ipv4Addr::new(10, 77, 0, 1),
        });
        let a = answer(&request(MessageType::Discover, |_| {}), &l).expect("offer");
        let m = decode(&a);
        assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 77, 0, 9));
        assert_eq!(
            m.opts().get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 0, 0)))
        );
        assert_eq!(
            m.opts().get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![Ipv4Addr::new(10, 77, 0, 1)]))
        );
        // The default plan's address is another address here.
        let old = request(MessageType::Request, |m| {
            m.opts_mut()
                .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(
                    192, 168, 100, 2,
                )));
        });
        assert_eq!(answer(&old, &l).expect("nak").kind, MessageType::Nak);
    }

    #[test]
    fn only_well_formed_options_that_are_read_reach_the_decoder() {
        let l = lease();
        let discover = request(MessageType::Discover, |_| {});
        let header = &discover[..MIN_PACKET];
        let with_options = |opts: &[u8]| {
            let mut p = header.to_vec();
            p.extend_from_slice(opts);
            p
        };
        // Found by the fuzz target: a bulk-leasequery option of length 0, which
        // dhcproto's decoder asserts on; also a client FQDN shorter than its fixed part.
        for opts in [
            &[53, 1, 1, 0x99, 0, 255][..],
            &[53, 1, 1, 81, 1, 0, 255][..],
            &[52, 1, 3, 50, 4, 0, 0, 0, 0, 0, 0, 0x99, 0, 255][..],
        ] {
            let _ = answer(&with_options(opts), &l);
        }
        assert_eq!(
            answer(&with_options(&[53, 1, 1, 0x99, 0, 255]), &l)
                .expect("offer")
                .kind,
            MessageType::Offer
        );
        // Wrong lengths are left out; an option past the end spoils the datagram.
        assert_eq!(
            answer(&with_options(&[53, 2, 1, 1, 255]), &l),
            Err(Ignored::Unhandled(None))
        );
        assert_eq!(
            answer(&with_options(&[53, 1, 1, 12, 40, 1, 2]), &l),
            Err(Ignored::Malformed)
        );
        // Padding, no END, and the first of two message types.
        assert_eq!(
            answer(&with_options(&[0, 0, 53, 1, 1, 53, 1, 3]), &l)
                .expect("offer")
                .kind,
            MessageType::Offer
        );
        assert_eq!(read_options(&header[..100]), None);
    }

    #[test]
    fn masks() {
        let mut l = lease();
        assert_eq!(l.mask(), Ipv4Addr::new(255, 255, 255, 0));
        l.prefix = 0;
        assert_eq!(l.mask(), Ipv4Addr::UNSPECIFIED);
        l.prefix = 32;
        assert_eq!(l.mask(), Ipv4Addr::BROADCAST);
        l.prefix = 30;
        assert_eq!(l.mask(), Ipv4Addr::new(255, 255, 255, 252));
    }
}
