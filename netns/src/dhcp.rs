//! DHCPv4 for weave guests: the packet handling ([`answer`]) and a server per weave
//! namespace ([`Servers`]).
//!
//! A weave's guest has one address plan: one address, its prefix and the gateway on
//! the namespace side of the guest's tap. A guest that asks by DHCP gets exactly that
//! plan (a [`Lease`]), so a guest image configured for DHCP runs in any weave unchanged.
//! The caller says which plan, which namespace and which tap; this module knows
//! nothing of where plans are recorded.
//!
//! One OS thread per weave `setns`es into the weave's namespace (as the rest of this
//! crate does: a tokio worker never changes namespace), opens a UDP socket on port 67
//! bound to the guest's tap (`SO_BINDTODEVICE`), and answers DISCOVER with an OFFER and
//! REQUEST with an ACK (or a NAK for another address). Everything else is ignored.
//!
//! Everything the guest sends is untrusted: [`answer`] takes a datagram of at most
//! [`MAX_PACKET`] bytes, checks the fixed BOOTP fields before decoding (message
//! encoding and decoding is `dhcproto`'s), never panics (a cargo-fuzz target feeds it
//! arbitrary bytes) and answers only what it can answer with the plan. It does no I/O.
//! The serving loop handles at most [`PACKETS_PER_SEC`] datagrams a second and leaves
//! the rest to the kernel's socket buffer, so a flooding guest costs its host little.

use std::fmt;
use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode, MAGIC};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use crate::WeavePlan;

mod server;

pub use server::Servers;

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
    /// The lease of a guest plan: `address/prefix` via `router`, for [`LEASE_SECS`].
    pub fn new(address: Ipv4Addr, prefix: u8, router: Ipv4Addr) -> Lease {
        Lease {
            address,
            prefix,
            router,
            lease_secs: LEASE_SECS,
        }
    }

    /// The lease of the default plan ([`WeavePlan::new`]: 192.168.100.2/24, gateway
    /// 192.168.100.1).
    pub fn for_weaves() -> Lease {
        let plan = WeavePlan::new("", 0);
        Lease::new(plan.guest_ip, plan.guest_prefix, plan.gateway_ip)
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

/// An answer to send to the client port (68, [`dhcproto::v4::CLIENT_PORT`]).
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
        let l = Lease::new(Ipv4Addr::new(10, 77, 0, 9), 16, Ipv4Addr::new(10, 77, 0, 1));
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
