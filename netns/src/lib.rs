//! Network isolation for weaves: a namespace per weave, veth/tap links and
//! addresses through rtnetlink, nftables tables, chains and rules through nftnl,
//! port routes and the atomic switch-over used by `weave activate`, and the filter
//! that keeps a weave's guest off the host, other weaves and networks as its egress
//! policy says ([`set_egress`]), and the DHCP server that gives each weave's guest
//! its address plan ([`dhcp`]).
//!
//! Every kernel side effect of the network setup goes through the narrow [`NetOps`]
//! trait (the DHCP server's socket is its own: a thread inside the namespace). [`Kernel`]
//! is the real implementation; [`Recorder`] is a test double that records the
//! calls and keeps a small model of the kernel state so the logic on top
//! ([`WeaveNet`], [`route`], [`switch`], [`set_routes`], [`reconcile`]) is unit-tested
//! without root.
//!
//! All operations are blocking (each kernel call runs on a short-lived OS thread,
//! the only safe way to enter another network namespace); async callers wrap them
//! in `tokio::task::spawn_blocking`.

use std::io;

pub mod dhcp;
mod filter;
mod kernel;
mod nft;
mod ops;
mod plan;
mod reconcile;
mod recorder;
mod routes;
mod weave;

pub use filter::{
    filter_chains, filter_ops, filter_table, remove_filter, set_egress, Egress, DHCP_SERVER_PORT,
    FILTER_TABLE, PRIVATE_V4, PRIVATE_V6,
};
pub use kernel::Kernel;
pub use ops::{
    BaseChain, ChainKind, Family, Hook, LinkEnd, Net, NetOps, NftOp, NftRule, NftTable, Prefix,
    Prefix6, Verdict,
};
pub use plan::{
    guest_network, host_addr, host_link, netns_path, ns_addr, ns_link, LINK_NET, LINK_PREFIX,
    NETNS_DIR, NETNS_PREFIX, TABLE,
};
pub use reconcile::{reconcile, Owned, ReconcileReport};
pub use recorder::{Call, Recorder};
pub use routes::{
    allow_host_clients, enable_host_forwarding, list_routes, route, set_routes, switch, switch_all,
    unroute, Route, Target,
};
pub use weave::{check_guest_plan, GuestLink, WeaveNet, WeavePlan};

/// Errors raised by namespace and firewall operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name cannot be used for a namespace.
    #[error("invalid namespace name {0:?}: use 1-10 characters from [a-z0-9-]")]
    InvalidName(String),
    /// A weave network plan or route is inconsistent.
    #[error("invalid network plan: {0}")]
    InvalidPlan(String),
    /// A kernel operation failed.
    #[error("cannot {op}")]
    Os {
        /// What was being done, e.g. `create namespace weft-a`.
        op: String,
        /// The kernel's (or libc's) answer.
        #[source]
        source: io::Error,
    },
    /// A host port is already routed elsewhere.
    #[error("host port {port} is already routed to {to}: switch it or unroute it first")]
    PortInUse {
        /// The host port.
        port: u16,
        /// Where it goes now.
        to: Target,
    },
    /// `switch` was asked to move a port that has no route.
    #[error("host port {0} is not routed: route or publish it before switching it")]
    NotRouted(u16),
    /// A name cannot be an interface name, or would not name one link in a sysctl path.
    #[error("invalid interface name {0:?}: use 1-15 printable characters without '/', ':' or spaces, not '.', '..', 'all' or 'default'")]
    InvalidLink(String),
    /// A link weft did not make: weft changes no setting of it.
    #[error("link {0:?} was not made by weft (it existed before weft started the VM on it): weft sets route_localnet only on its own links")]
    ForeignLink(String),
}

/// Checks an interface name the way the kernel does (`dev_valid_name`: 1 to 15 bytes,
/// not `.` or `..`, no `/`, `:` or whitespace), keeps it to printable ASCII, and refuses
/// `all` and `default`, which in `/proc/sys/net/*/conf/` name every link and new links.
/// Every name that reaches a sysctl path passes here.
pub fn check_link_name(name: &str) -> Result<()> {
    let ok = (1..=15).contains(&name.len())
        && !matches!(name, "." | ".." | "all" | "default")
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b':'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidLink(name.to_string()))
    }
}

impl Error {
    pub(crate) fn os(op: impl Into<String>, source: io::Error) -> Self {
        Error::Os {
            op: op.into(),
            source,
        }
    }

    /// The errno behind a kernel failure, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Name of the network namespace that holds a weave (`weft-<weave>`).
///
/// Interface names in Linux are limited to 15 bytes, and the namespace name is
/// reused as a prefix for links, so the weave part is kept short and plain.
pub fn namespace_name(weave: &str) -> Result<String, Error> {
    let ok = !weave.is_empty()
        && weave.len() <= 10
        && weave
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(format!("{NETNS_PREFIX}{weave}"))
    } else {
        Err(Error::InvalidName(weave.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_are_bounded_and_plain() {
        assert_eq!(namespace_name("ab-1").unwrap(), "weft-ab-1");
        assert!(namespace_name("").is_err());
        assert!(namespace_name("UPPER").is_err());
        assert!(namespace_name("much-too-long-name").is_err());
        assert!(namespace_name("a/b").is_err());
    }

    #[test]
    fn link_names_follow_the_kernel_and_stay_out_of_sysctl_directories() {
        for ok in ["tap0", "wh7", "weft-tap0", "a", "eth0.100", "x_y-z@1"] {
            check_link_name(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "all",
            "default",
            "a/b",
            "../all",
            "a:b",
            "a b",
            "tab\t",
            "sixteen-chars-xx",
            "é",
        ] {
            assert!(
                matches!(check_link_name(bad), Err(Error::InvalidLink(_))),
                "{bad:?}"
            );
        }
    }
}
