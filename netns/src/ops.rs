//! The narrow kernel interface and the declarative nftables vocabulary it takes.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::Result;

/// An IPv4 network or address with a prefix length, e.g. `192.168.100.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    /// The address.
    pub addr: Ipv4Addr,
    /// The prefix length, 0..=32.
    pub len: u8,
}

impl Prefix {
    /// A prefix; `len` above 32 is clamped to 32.
    pub const fn new(addr: Ipv4Addr, len: u8) -> Self {
        Prefix {
            addr,
            len: if len > 32 { 32 } else { len },
        }
    }

    /// The netmask, e.g. 255.255.255.0 for /24.
    pub fn mask(&self) -> Ipv4Addr {
        let bits = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        };
        Ipv4Addr::from(bits)
    }

    /// The same prefix with the host bits cleared.
    pub fn network(&self) -> Prefix {
        Prefix::new(
            Ipv4Addr::from(u32::from(self.addr) & u32::from(self.mask())),
            self.len,
        )
    }

    /// Whether `addr` lies in this network.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & u32::from(self.mask()) == u32::from(self.network().addr)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// An IPv6 network with a prefix length, e.g. `fc00::/7`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix6 {
    /// The address.
    pub addr: Ipv6Addr,
    /// The prefix length, 0..=128.
    pub len: u8,
}

impl Prefix6 {
    /// A prefix; `len` above 128 is clamped to 128.
    pub const fn new(addr: Ipv6Addr, len: u8) -> Self {
        Prefix6 {
            addr,
            len: if len > 128 { 128 } else { len },
        }
    }

    /// The netmask, e.g. fe00:: for /7.
    pub fn mask(&self) -> Ipv6Addr {
        let bits = if self.len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.len))
        };
        Ipv6Addr::from(bits)
    }

    /// The same prefix with the host bits cleared.
    pub fn network(&self) -> Prefix6 {
        Prefix6::new(
            Ipv6Addr::from(u128::from(self.addr) & u128::from(self.mask())),
            self.len,
        )
    }

    /// Whether `addr` lies in this network.
    pub fn contains(&self, addr: Ipv6Addr) -> bool {
        u128::from(addr) & u128::from(self.mask()) == u128::from(self.network().addr)
    }
}

impl fmt::Display for Prefix6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A destination network of either family, for filter rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Net {
    /// `ip daddr …`
    V4(Prefix),
    /// `ip6 daddr …`
    V6(Prefix6),
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Net::V4(p) => p.fmt(f),
            Net::V6(p) => p.fmt(f),
        }
    }
}

/// The nftables families the crate uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// `ip`: IPv4 only (the NAT tables).
    Ip,
    /// `inet`: IPv4 and IPv6 alike (the filter tables).
    Inet,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ip => "ip",
            Family::Inet => "inet",
        })
    }
}

/// A table: its family and name. A bare name (`"weft".into()`) is an `ip` table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NftTable {
    /// Family.
    pub family: Family,
    /// Name.
    pub name: String,
}

impl NftTable {
    /// An `inet` table.
    pub fn inet(name: impl Into<String>) -> Self {
        NftTable {
            family: Family::Inet,
            name: name.into(),
        }
    }
}

impl From<&str> for NftTable {
    fn from(name: &str) -> Self {
        NftTable {
            family: Family::Ip,
            name: name.to_string(),
        }
    }
}

impl From<String> for NftTable {
    fn from(name: String) -> Self {
        NftTable {
            family: Family::Ip,
            name,
        }
    }
}

impl fmt::Display for NftTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.family, self.name)
    }
}

/// One end of a veth pair: a link name in a namespace (`None` is the namespace
/// of the calling process, the host's root namespace for weftd).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LinkEnd {
    /// Named namespace (under /run/netns), or `None` for the caller's own.
    pub netns: Option<String>,
    /// Link name (at most 15 bytes).
    pub name: String,
}

impl LinkEnd {
    /// An end in the caller's own (root) namespace.
    pub fn root(name: impl Into<String>) -> Self {
        LinkEnd {
            netns: None,
            name: name.into(),
        }
    }

    /// An end in a named namespace.
    pub fn in_netns(netns: impl Into<String>, name: impl Into<String>) -> Self {
        LinkEnd {
            netns: Some(netns.into()),
            name: name.into(),
        }
    }
}

/// Netfilter hooks the crate uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// NF_INET_PRE_ROUTING
    Prerouting,
    /// NF_INET_LOCAL_IN
    Input,
    /// NF_INET_FORWARD
    Forward,
    /// NF_INET_LOCAL_OUT
    Output,
    /// NF_INET_POST_ROUTING
    Postrouting,
}

/// Base chain types the crate uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainKind {
    /// `type nat`: consulted for the first packet of a connection only, so the
    /// mapping it picks stays with the connection (conntrack).
    Nat,
    /// `type filter`: sees every packet.
    Filter,
}

/// What makes a chain a base chain: its type, hook and priority. Policy is always accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BaseChain {
    /// Chain type.
    pub kind: ChainKind,
    /// Hook.
    pub hook: Hook,
    /// Priority (-100 is `dstnat`, 100 is `srcnat`).
    pub priority: i32,
}

impl BaseChain {
    /// `type nat hook prerouting priority dstnat`
    pub const DSTNAT: BaseChain = BaseChain {
        kind: ChainKind::Nat,
        hook: Hook::Prerouting,
        priority: -100,
    };
    /// `type nat hook output priority dstnat` (connections made by the host itself)
    pub const OUTPUT_DSTNAT: BaseChain = BaseChain {
        kind: ChainKind::Nat,
        hook: Hook::Output,
        priority: -100,
    };
    /// `type nat hook postrouting priority srcnat`
    pub const SRCNAT: BaseChain = BaseChain {
        kind: ChainKind::Nat,
        hook: Hook::Postrouting,
        priority: 100,
    };
    /// `type filter hook input priority filter` (packets to this namespace's own addresses)
    pub const INPUT_FILTER: BaseChain = BaseChain {
        kind: ChainKind::Filter,
        hook: Hook::Input,
        priority: 0,
    };
    /// `type filter hook forward priority filter` (packets routed through this namespace)
    pub const FORWARD_FILTER: BaseChain = BaseChain {
        kind: ChainKind::Filter,
        hook: Hook::Forward,
        priority: 0,
    };
}

/// What a filter rule does with the packets it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Let it through this chain (later base chains still see it).
    Accept,
    /// Drop it, whatever any other chain says.
    Drop,
}

/// The rule shapes the crate writes. Closed on purpose: the real implementation
/// turns each into nftnl expressions, the recorder just stores it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NftRule {
    /// `iifname IIF meta l4proto tcp dnat to TO` — every TCP connection arriving on
    /// `iif` goes to `to`, same port (inside a weave namespace: to the guest).
    DnatTcpFromLink {
        /// Input interface.
        iif: String,
        /// New destination address.
        to: Ipv4Addr,
    },
    /// `fib daddr type local meta l4proto tcp tcp dport PORT dnat to TO:TO_PORT` —
    /// new TCP connections to a local address of this namespace on `port`.
    DnatLocalPort {
        /// Host port.
        port: u16,
        /// New destination address.
        to: Ipv4Addr,
        /// New destination port.
        to_port: u16,
    },
    /// `ip saddr SADDR [ip daddr DADDR] [oifname OIF] masquerade`
    Masquerade {
        /// Source network.
        saddr: Prefix,
        /// Destination network, if restricted.
        daddr: Option<Prefix>,
        /// Output interface, if restricted.
        oif: Option<String>,
    },
    /// `iifname IIF ct direction reply accept` — packets answering connections
    /// opened towards the link. A connection opened from the link is never one.
    AcceptReplies {
        /// Input interface.
        iif: String,
    },
    /// `iifname IIF ct state related accept` — ICMP errors about known connections.
    AcceptRelated {
        /// Input interface.
        iif: String,
    },
    /// `iifname IIF meta l4proto udp udp dport PORT accept`
    AcceptUdp {
        /// Input interface.
        iif: String,
        /// Destination port.
        port: u16,
    },
    /// `iifname IIF [ip|ip6 daddr DADDR] accept|drop` — in an `inet` table an IPv4
    /// destination only matches IPv4 packets, an IPv6 one only IPv6 packets.
    FromLink {
        /// Input interface.
        iif: String,
        /// Destination network, if restricted.
        daddr: Option<Net>,
        /// What to do.
        verdict: Verdict,
    },
}

/// One message of an nftables transaction; a bare table name is family `ip`.
/// A batch of these is applied atomically: all or nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NftOp {
    /// Create a table; no error if it exists.
    AddTable {
        /// Table name.
        table: NftTable,
    },
    /// Delete a table with everything in it; error if it does not exist.
    DeleteTable {
        /// Table name.
        table: NftTable,
    },
    /// Create a chain; no error if it exists with the same definition.
    AddChain {
        /// Table name.
        table: NftTable,
        /// Chain name.
        chain: String,
        /// Type, hook and priority for a base chain.
        base: Option<BaseChain>,
    },
    /// Delete every rule of a chain.
    FlushChain {
        /// Table name.
        table: NftTable,
        /// Chain name.
        chain: String,
    },
    /// Delete an empty chain; error if it does not exist.
    DeleteChain {
        /// Table name.
        table: NftTable,
        /// Chain name.
        chain: String,
    },
    /// Append a rule to a chain.
    AddRule {
        /// Table name.
        table: NftTable,
        /// Chain name.
        chain: String,
        /// The rule.
        rule: NftRule,
        /// Comment shown by `nft list`.
        comment: Option<String>,
    },
}

impl NftOp {
    /// The table the message is about.
    pub fn table(&self) -> &NftTable {
        match self {
            NftOp::AddTable { table }
            | NftOp::DeleteTable { table }
            | NftOp::AddChain { table, .. }
            | NftOp::FlushChain { table, .. }
            | NftOp::DeleteChain { table, .. }
            | NftOp::AddRule { table, .. } => table,
        }
    }
}

/// The kernel side effects of this crate, and nothing more.
///
/// `netns: Option<&str>` names a namespace under /run/netns; `None` is the
/// namespace of the calling process. Creations return `true` when they created
/// the object and `false` when it already existed; deletions of something
/// missing succeed. Calls block; from async code use `spawn_blocking`.
pub trait NetOps: Send + Sync {
    /// Create the named namespace (/run/netns/NAME) with `lo` up.
    fn create_netns(&self, name: &str) -> Result<bool>;
    /// Remove the named namespace; it dies with its last user.
    fn delete_netns(&self, name: &str) -> Result<()>;
    /// Names under /run/netns.
    fn list_netns(&self) -> Result<Vec<String>>;
    /// Create a veth pair `a` ↔ `b`, each end in its namespace (both down).
    fn create_veth(&self, a: &LinkEnd, b: &LinkEnd) -> Result<bool>;
    /// Create a persistent tap (`IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`, owner root)
    /// for QEMU's `-netdev tap,ifname=NAME,script=no,downscript=no`.
    fn create_tap(&self, netns: &str, name: &str) -> Result<bool>;
    /// Delete a link (and a veth's peer with it).
    fn delete_link(&self, netns: Option<&str>, name: &str) -> Result<()>;
    /// Names of the links in a namespace.
    fn list_links(&self, netns: Option<&str>) -> Result<Vec<String>>;
    /// Set a link up.
    fn set_link_up(&self, netns: Option<&str>, name: &str) -> Result<()>;
    /// Add an address to a link; no error if it is already there.
    fn add_address(&self, netns: Option<&str>, link: &str, addr: Prefix) -> Result<()>;
    /// Add or replace the default route.
    fn set_default_route(&self, netns: Option<&str>, via: std::net::Ipv4Addr) -> Result<()>;
    /// Write `value` to /proc/sys/KEY as seen from the namespace, e.g. `net/ipv4/ip_forward`.
    fn set_sysctl(&self, netns: Option<&str>, key: &str, value: &str) -> Result<()>;
    /// Apply an nftables transaction atomically.
    fn apply_nft(&self, netns: Option<&str>, batch: &[NftOp]) -> Result<()>;
    /// Names of the `ip` family tables.
    fn list_nft_tables(&self, netns: Option<&str>) -> Result<Vec<String>>;
    /// Names of the chains of a table (empty if there is no such table).
    fn list_nft_chains(&self, netns: Option<&str>, table: &NftTable) -> Result<Vec<String>>;
}
