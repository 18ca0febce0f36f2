//! The address and naming plan shared by the logic and its tests.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::Prefix;

/// Every namespace this crate owns is named `weft-*`.
pub const NETNS_PREFIX: &str = "weft-";
/// Every host-side link this crate owns is named `wh<index>`.
pub const LINK_PREFIX: &str = "wh";
/// Where named namespaces are bind-mounted (the same place `ip netns` uses).
pub const NETNS_DIR: &str = "/run/netns";
/// The nftables table (family `ip`) this crate owns, in the root namespace and in every weave namespace.
pub const TABLE: &str = "weft";
/// The host↔namespace links live in 10.231.0.0/16: link `<index>` is 10.231.<index>.0/30.
pub const LINK_NET: Prefix = Prefix::new(Ipv4Addr::new(10, 231, 0, 0), 16);

/// Path of a named namespace, for `setns` by the launcher.
pub fn netns_path(netns: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(netns)
}

/// Host end of the veth pair of weave `index` (root namespace).
pub fn host_link(index: u8) -> String {
    format!("{LINK_PREFIX}{index}")
}

/// Namespace end of the veth pair of weave `index`.
pub fn ns_link(index: u8) -> String {
    format!("wn{index}")
}

/// Address of the host end: 10.231.<index>.1/30.
pub fn host_addr(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 231, index, 1)
}

/// Address of the namespace end: 10.231.<index>.2/30.
pub fn ns_addr(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 231, index, 2)
}

/// The network a guest address belongs to, e.g. 192.168.100.0/24 for 192.168.100.2/24.
pub fn guest_network(addr: Ipv4Addr, prefix: u8) -> Prefix {
    Prefix::new(addr, prefix).network()
}

/// The weave index a host link name (`wh<index>`) stands for.
pub(crate) fn parse_host_link(name: &str) -> Option<u8> {
    let digits = name.strip_prefix(LINK_PREFIX)?;
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_names_and_addresses() {
        assert_eq!(host_link(7), "wh7");
        assert_eq!(ns_link(255), "wn255");
        assert_eq!(host_addr(7), Ipv4Addr::new(10, 231, 7, 1));
        assert_eq!(ns_addr(7), Ipv4Addr::new(10, 231, 7, 2));
        assert_eq!(parse_host_link("wh7"), Some(7));
        assert_eq!(parse_host_link("wh255"), Some(255));
        assert_eq!(parse_host_link("wh256"), None);
        assert_eq!(parse_host_link("wh07"), None);
        assert_eq!(parse_host_link("whx"), None);
        assert_eq!(
            guest_network(Ipv4Addr::new(192, 168, 100, 2), 24),
            Prefix::new(Ipv4Addr::new(192, 168, 100, 0), 24)
        );
        assert_eq!(netns_path("weft-a"), PathBuf::from("/run/netns/weft-a"));
    }
}
