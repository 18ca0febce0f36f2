//! The narrow kernel interface and the declarative nftables vocabulary it takes.

use std::fmt;
use std::net::Ipv4Addr;

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

/// Netfilter hooks the crate uses (all in the `ip` family).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// NF_INET_PRE_ROUTING
    Prerouting,
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
}

/// One message of an nftables transaction. All tables are family `ip`.
/// A batch of these is applied atomically: all or nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NftOp {
    /// Create a table; no error if it exists.
    AddTable {
        /// Table name.
        table: String,
    },
    /// Delete a table with everything in it; error if it does not exist.
    DeleteTable {
        /// Table name.
        table: String,
    },
    /// Create a chain; no error if it exists with the same definition.
    AddChain {
        /// Table name.
        table: String,
        /// Chain name.
        chain: String,
        /// Type, hook and priority for a base chain.
        base: Option<BaseChain>,
    },
    /// Delete every rule of a chain.
    FlushChain {
        /// Table name.
        table: String,
        /// Chain name.
        chain: String,
    },
    /// Delete an empty chain; error if it does not exist.
    DeleteChain {
        /// Table name.
        table: String,
        /// Chain name.
        chain: String,
    },
    /// Append a rule to a chain.
    AddRule {
        /// Table name.
        table: String,
        /// Chain name.
        chain: String,
        /// The rule.
        rule: NftRule,
        /// Comment shown by `nft list`.
        comment: Option<String>,
    },
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
    /// Names of the chains of an `ip` family table (empty if there is no such table).
    fn list_nft_chains(&self, netns: Option<&str>, table: &str) -> Result<Vec<String>>;
}
