//! Host port routes in the root namespace.
//!
//! Table `ip weft` holds one static chain and two or three base chains per routed port:
//!
//! ```text
//! table ip weft {
//!   chain postrouting { type nat hook postrouting priority srcnat;
//!     ip saddr 127.0.0.0/8 ip daddr 10.231.0.0/16 masquerade }
//!   chain p8080-w7-g80-in { type nat hook prerouting priority dstnat;
//!     fib daddr type local meta l4proto tcp tcp dport 8080 dnat to 10.231.7.2:80 }
//!   chain p8080-w7-g80-out { type nat hook output priority dstnat;
//!     fib daddr type local meta l4proto tcp tcp dport 8080 dnat to 10.231.7.2:80 }
//!   # a port published straight to an address (an environment's guest on a host tap):
//!   chain p9090-a192.168.220.2-g80-in  { … dnat to 192.168.220.2:80 }
//!   chain p9090-a192.168.220.2-g80-out { … dnat to 192.168.220.2:80 }
//!   chain p9090-a192.168.220.2-g80-src { type nat hook postrouting priority srcnat;
//!     ip saddr 127.0.0.0/8 ip daddr 192.168.220.2/32 masquerade }
//! }
//! ```
//!
//! The chain names carry the whole route (host port, target, guest port), so the
//! kernel's ruleset is its own record: listing chains is enough to know every
//! route, no rule handles are needed, and moving ports is one transaction that
//! deletes the old chains and adds the new ones.

use std::fmt;
use std::net::Ipv4Addr;

use crate::ops::{BaseChain, NetOps, NftOp, NftRule, Prefix};
use crate::plan::{ns_addr, LINK_NET, TABLE};
use crate::{Error, Result};

/// Chain of the root table that masquerades host-local connections (source
/// 127.0.0.0/8) leaving towards a weave, so the weave can answer them.
pub(crate) const ROOT_POSTROUTING: &str = "postrouting";

/// Host-local sources (`curl 127.0.0.1:PORT`).
const LOOPBACK: Prefix = Prefix::new(Ipv4Addr::new(127, 0, 0, 0), 8);

/// Where a host port leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// The guest of weave `index`, through its veth (10.231.<index>.2, whose
    /// namespace DNATs on to the guest).
    Weave(u8),
    /// An address the root namespace reaches directly, e.g. an environment's guest
    /// on a tap or bridge of the host.
    Addr(Ipv4Addr),
}

impl Target {
    /// The address new connections are sent to.
    pub fn addr(&self) -> Ipv4Addr {
        match self {
            Target::Weave(index) => ns_addr(*index),
            Target::Addr(addr) => *addr,
        }
    }

    /// The weave index, for a weave target.
    pub fn weave_index(&self) -> Option<u8> {
        match self {
            Target::Weave(index) => Some(*index),
            Target::Addr(_) => None,
        }
    }

    fn tag(&self) -> String {
        match self {
            Target::Weave(index) => format!("w{index}"),
            Target::Addr(addr) => format!("a{addr}"),
        }
    }

    fn parse_tag(tag: &str) -> Option<Target> {
        if let Some(index) = tag.strip_prefix('w') {
            return parse_u(index).map(Target::Weave);
        }
        let text = tag.strip_prefix('a')?;
        let addr: Ipv4Addr = text.parse().ok()?;
        // Only the canonical spelling, so every route has exactly one chain name.
        (addr.to_string() == text).then_some(Target::Addr(addr))
    }

    fn check(&self) -> std::result::Result<(), String> {
        let Target::Addr(addr) = self else {
            return Ok(());
        };
        if addr.is_unspecified()
            || addr.is_broadcast()
            || addr.is_multicast()
            || LOOPBACK.contains(*addr)
            || LINK_NET.contains(*addr)
        {
            return Err(format!(
                "{addr} cannot be a route target (unspecified, broadcast, multicast, loopback or in {LINK_NET})"
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Weave(index) => write!(f, "weave {index}"),
            Target::Addr(addr) => write!(f, "{addr}"),
        }
    }
}

/// New TCP connections to `host_port` on any local address of the host go to
/// port `guest_port` of `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    /// Host port (local addresses of the root namespace, loopback included).
    pub host_port: u16,
    /// Where it leads.
    pub to: Target,
    /// Guest port.
    pub guest_port: u16,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "host port {} -> {} port {}",
            self.host_port, self.to, self.guest_port
        )
    }
}

/// Which chain of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// prerouting: connections from other hosts
    In,
    /// output: connections from the host itself
    Out,
    /// postrouting, address targets only: host-local connections leave with the
    /// host's address on the way to the target, so its answer comes back
    Src,
}

impl Side {
    fn suffix(self) -> &'static str {
        match self {
            Side::In => "in",
            Side::Out => "out",
            Side::Src => "src",
        }
    }
}

impl Route {
    /// A route to weave `index`.
    pub fn to_weave(host_port: u16, index: u8, guest_port: u16) -> Route {
        Route {
            host_port,
            to: Target::Weave(index),
            guest_port,
        }
    }

    fn sides(&self) -> &'static [Side] {
        match self.to {
            Target::Weave(_) => &[Side::In, Side::Out],
            Target::Addr(_) => &[Side::In, Side::Out, Side::Src],
        }
    }

    fn chain(&self, side: Side) -> String {
        format!(
            "p{}-{}-g{}-{}",
            self.host_port,
            self.to.tag(),
            self.guest_port,
            side.suffix()
        )
    }

    fn check(&self) -> Result<()> {
        if self.host_port == 0 || self.guest_port == 0 {
            return Err(Error::InvalidPlan(format!(
                "{self}: port 0 cannot be routed"
            )));
        }
        self.to
            .check()
            .map_err(|why| Error::InvalidPlan(format!("{self}: {why}")))
    }

    fn add_ops(&self) -> Vec<NftOp> {
        let comment = Some(format!("weft: {self}"));
        let dnat = NftRule::DnatLocalPort {
            port: self.host_port,
            to: self.to.addr(),
            to_port: self.guest_port,
        };
        let mut ops = Vec::new();
        for side in self.sides() {
            let (base, rule) = match side {
                Side::In => (BaseChain::DSTNAT, dnat.clone()),
                Side::Out => (BaseChain::OUTPUT_DSTNAT, dnat.clone()),
                Side::Src => (
                    BaseChain::SRCNAT,
                    NftRule::Masquerade {
                        saddr: LOOPBACK,
                        daddr: Some(Prefix::new(self.to.addr(), 32)),
                        oif: None,
                    },
                ),
            };
            ops.push(NftOp::AddChain {
                table: TABLE.into(),
                chain: self.chain(*side),
                base: Some(base),
            });
            ops.push(NftOp::AddRule {
                table: TABLE.into(),
                chain: self.chain(*side),
                rule,
                comment: comment.clone(),
            });
        }
        ops
    }
}

fn parse_u<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok()
}

/// `p<host>-<w<index>|a<addr>>-g<guest>-in|out|src` → the route and side.
fn parse_chain(name: &str) -> Option<(Route, Side)> {
    let (rest, side) = [Side::In, Side::Out, Side::Src]
        .into_iter()
        .find_map(|side| {
            name.strip_suffix(side.suffix())
                .and_then(|r| r.strip_suffix('-'))
                .map(|r| (r, side))
        })?;
    let mut parts = rest.split('-');
    let host_port = parse_u(parts.next()?.strip_prefix('p')?)?;
    let to = Target::parse_tag(parts.next()?)?;
    let guest_port = parse_u(parts.next()?.strip_prefix('g')?)?;
    if parts.next().is_some() {
        return None;
    }
    let route = Route {
        host_port,
        to,
        guest_port,
    };
    route.sides().contains(&side).then_some((route, side))
}

/// Ops that (re)write the static part of the root table; idempotent.
pub(crate) fn base_ops() -> Vec<NftOp> {
    vec![
        NftOp::AddTable {
            table: TABLE.into(),
        },
        NftOp::AddChain {
            table: TABLE.into(),
            chain: ROOT_POSTROUTING.into(),
            base: Some(BaseChain::SRCNAT),
        },
        NftOp::FlushChain {
            table: TABLE.into(),
            chain: ROOT_POSTROUTING.into(),
        },
        NftOp::AddRule {
            table: TABLE.into(),
            chain: ROOT_POSTROUTING.into(),
            rule: NftRule::Masquerade {
                saddr: LOOPBACK,
                daddr: Some(LINK_NET),
                oif: None,
            },
            comment: Some("weft: host-local connections to weaves".into()),
        },
    ]
}

pub(crate) fn delete_chain_ops(chain: &str) -> Vec<NftOp> {
    vec![
        NftOp::FlushChain {
            table: TABLE.into(),
            chain: chain.into(),
        },
        NftOp::DeleteChain {
            table: TABLE.into(),
            chain: chain.into(),
        },
    ]
}

/// Chains of the root table (empty when there is no table).
pub(crate) fn root_chains(ops: &dyn NetOps) -> Result<Vec<String>> {
    if !ops.list_nft_tables(None)?.iter().any(|t| t == TABLE) {
        return Ok(Vec::new());
    }
    ops.list_nft_chains(None, &TABLE.into())
}

pub(crate) fn routes_of(chains: &[String]) -> Vec<Route> {
    let mut routes: Vec<Route> = chains
        .iter()
        .filter_map(|c| parse_chain(c).map(|(r, _)| r))
        .collect();
    routes.sort();
    routes.dedup();
    routes
}

/// The routes present in the root namespace.
pub fn list_routes(ops: &dyn NetOps) -> Result<Vec<Route>> {
    Ok(routes_of(&root_chains(ops)?))
}

/// Whether every chain of `r` is present.
pub(crate) fn complete(chains: &[String], r: &Route) -> bool {
    r.sides()
        .iter()
        .all(|side| chains.contains(&r.chain(*side)))
}

/// Deletes of every chain of the root table that belongs to a route of `port`.
fn port_chain_deletes(chains: &[String], port: u16) -> Vec<NftOp> {
    chains
        .iter()
        .filter(|c| parse_chain(c).is_some_and(|(r, _)| r.host_port == port))
        .flat_map(|c| delete_chain_ops(c))
        .collect()
}

/// Route `route.host_port`. Idempotent for the same route; a port already
/// routed elsewhere is refused (use [`switch`] or [`set_routes`] to move it).
pub fn route(ops: &dyn NetOps, route: &Route) -> Result<()> {
    route.check()?;
    let chains = root_chains(ops)?;
    let existing = routes_of(&chains);
    if existing.contains(route) && complete(&chains, route) {
        return Ok(());
    }
    if let Some(other) = existing
        .iter()
        .find(|r| r.host_port == route.host_port && *r != route)
    {
        return Err(Error::PortInUse {
            port: route.host_port,
            to: other.to,
        });
    }
    let mut batch = base_ops();
    // A route left incomplete (e.g. by hand) is rewritten whole.
    batch.extend(port_chain_deletes(&chains, route.host_port));
    batch.extend(route.add_ops());
    ops.apply_nft(None, &batch)
}

/// Make each of `routes` the one route of its host port, whatever the port had
/// before (nothing, or a route elsewhere), in one nftables transaction: new
/// connections follow the new routes at once; established ones keep their
/// conntrack mapping and finish where they started. Returns the routes that
/// changed; nothing is sent when none did.
pub fn set_routes(ops: &dyn NetOps, routes: &[Route]) -> Result<Vec<Route>> {
    let mut ports = std::collections::BTreeSet::new();
    for r in routes {
        r.check()?;
        if !ports.insert(r.host_port) {
            return Err(Error::InvalidPlan(format!(
                "host port {} is given twice",
                r.host_port
            )));
        }
    }
    let chains = root_chains(ops)?;
    let existing = routes_of(&chains);
    let mut batch = base_ops();
    let mut changed = Vec::new();
    for r in routes {
        let current: Vec<&Route> = existing
            .iter()
            .filter(|e| e.host_port == r.host_port)
            .collect();
        if current == [r] && complete(&chains, r) {
            continue;
        }
        batch.extend(port_chain_deletes(&chains, r.host_port));
        batch.extend(r.add_ops());
        changed.push(*r);
    }
    if !changed.is_empty() {
        ops.apply_nft(None, &batch)?;
    }
    Ok(changed)
}

/// Move routed host ports, each to its new target (same guest port), in one
/// nftables transaction (see [`set_routes`]). Every port must be routed now.
/// Returns the new routes.
pub fn switch_all(ops: &dyn NetOps, moves: &[(u16, Target)]) -> Result<Vec<Route>> {
    let existing = list_routes(ops)?;
    let mut new = Vec::new();
    for (port, to) in moves {
        let Some(current) = existing.iter().find(|r| r.host_port == *port) else {
            return Err(Error::NotRouted(*port));
        };
        new.push(Route {
            host_port: *port,
            to: *to,
            guest_port: current.guest_port,
        });
    }
    set_routes(ops, &new)?;
    Ok(new)
}

/// Move a routed host port to `to` (same guest port) in one nftables
/// transaction: new connections go to the new target; established ones keep
/// their conntrack mapping and finish where they started. Returns the new route.
pub fn switch(ops: &dyn NetOps, host_port: u16, to: Target) -> Result<Route> {
    let mut moved = switch_all(ops, &[(host_port, to)])?;
    moved.pop().ok_or(Error::NotRouted(host_port))
}

/// Remove the chains of the routes selected by `pick`; the table goes too when
/// no route is left. Returns the routes removed.
pub(crate) fn remove_routes(ops: &dyn NetOps, pick: impl Fn(&Route) -> bool) -> Result<Vec<Route>> {
    let chains = root_chains(ops)?;
    let routes = routes_of(&chains);
    let removed: Vec<Route> = routes.iter().copied().filter(|r| pick(r)).collect();
    if removed.is_empty() {
        return Ok(removed);
    }
    let batch = if removed.len() == routes.len() {
        vec![NftOp::DeleteTable {
            table: TABLE.into(),
        }]
    } else {
        chains
            .iter()
            .filter(|c| parse_chain(c).is_some_and(|(r, _)| pick(&r)))
            .flat_map(|c| delete_chain_ops(c))
            .collect()
    };
    ops.apply_nft(None, &batch)?;
    Ok(removed)
}

/// Remove the route of a host port. Returns whether there was one.
pub fn unroute(ops: &dyn NetOps, host_port: u16) -> Result<bool> {
    Ok(!remove_routes(ops, |r| r.host_port == host_port)?.is_empty())
}

/// Turn on IPv4 forwarding in the root namespace. Needed only for clients on
/// other hosts (their packets are forwarded to `wh<index>`); connections from
/// the host itself work without it. A host-wide switch: the daemon decides.
pub fn enable_host_forwarding(ops: &dyn NetOps) -> Result<()> {
    ops.set_sysctl(None, "net/ipv4/ip_forward", "1")
}

/// Let host-local connections (`127.0.0.1:PORT`) that a route DNATs leave
/// through `link` of the root namespace (`route_localnet` on that link only).
/// [`crate::WeaveNet::create`] does it for `wh<index>`; for an address target
/// the caller does it for the link that reaches the address (e.g. a VM's tap), and
/// only for a link weft made. `link` must be a plain interface name
/// ([`crate::check_link_name`]): it becomes part of a path under `/proc/sys`.
pub fn allow_host_clients(ops: &dyn NetOps, link: &str) -> Result<()> {
    crate::check_link_name(link)?;
    ops.set_sysctl(None, &format!("net/ipv4/conf/{link}/route_localnet"), "1")
}

/// The chain names of a route (prerouting, output and, for an address, postrouting).
#[cfg(test)]
pub(crate) fn chains_of(route: &Route) -> Vec<String> {
    route.sides().iter().map(|s| route.chain(*s)).collect()
}

/// The route a chain name stands for.
pub(crate) fn parse_chain_route(name: &str) -> Option<Route> {
    parse_chain(name).map(|(r, _)| r)
}

/// The ops that add every chain of a route (the table must exist).
pub(crate) fn add_ops(route: &Route) -> Vec<NftOp> {
    route.add_ops()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 220, 2)
    }

    #[test]
    fn chain_names_round_trip() {
        let r = Route::to_weave(8080, 7, 80);
        let names = chains_of(&r);
        assert_eq!(names, vec!["p8080-w7-g80-in", "p8080-w7-g80-out"]);
        assert_eq!(parse_chain(&names[0]), Some((r, Side::In)));
        assert_eq!(parse_chain(&names[1]), Some((r, Side::Out)));
        assert_eq!(parse_chain_route(&names[0]), Some(r));
        let a = Route {
            host_port: 9090,
            to: Target::Addr(guest()),
            guest_port: 80,
        };
        let names = chains_of(&a);
        assert_eq!(
            names,
            vec![
                "p9090-a192.168.220.2-g80-in",
                "p9090-a192.168.220.2-g80-out",
                "p9090-a192.168.220.2-g80-src"
            ]
        );
        for (name, side) in names.iter().zip([Side::In, Side::Out, Side::Src]) {
            assert_eq!(parse_chain(name), Some((a, side)), "{name}");
        }
        for bad in [
            "postrouting",
            "p8080-w7-g80",
            "p8080-w256-g80-in",
            "p08080-w7-g80-in",
            "p8080-w7-g80-x-in",
            "p-w7-g80-in",
            "p8080-w7-g80-src",
            "p8080-a192.168.1.02-g80-in",
            "p8080-a192.168.1-g80-in",
            "p8080-x7-g80-in",
            "p8080-w7-g80in",
        ] {
            assert_eq!(parse_chain(bad), None, "{bad}");
        }
    }

    use crate::recorder::{Call, Recorder};

    fn r(host_port: u16, weave_index: u8) -> Route {
        Route::to_weave(host_port, weave_index, 80)
    }

    fn a(host_port: u16) -> Route {
        Route {
            host_port,
            to: Target::Addr(guest()),
            guest_port: 80,
        }
    }

    fn applies(rec: &Recorder) -> Vec<Vec<NftOp>> {
        rec.mutations()
            .into_iter()
            .filter_map(|c| match c {
                Call::ApplyNft(None, batch) => Some(batch),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn route_is_one_transaction_and_idempotent() {
        let rec = Recorder::new();
        route(&rec, &r(8080, 7)).unwrap();
        let batches = applies(&rec);
        assert_eq!(batches.len(), 1);
        let mut want = base_ops();
        want.extend(r(8080, 7).add_ops());
        assert_eq!(batches[0], want);
        assert_eq!(
            rec.rules(None, TABLE, "p8080-w7-g80-out"),
            vec![NftRule::DnatLocalPort {
                port: 8080,
                to: Ipv4Addr::new(10, 231, 7, 2),
                to_port: 80
            }]
        );
        assert_eq!(rec.rules(None, TABLE, ROOT_POSTROUTING).len(), 1);
        rec.clear_calls();
        route(&rec, &r(8080, 7)).unwrap();
        assert!(rec.mutations().is_empty());
        // A second route keeps a single masquerade rule.
        route(&rec, &r(8081, 7)).unwrap();
        assert_eq!(rec.rules(None, TABLE, ROOT_POSTROUTING).len(), 1);
        assert_eq!(list_routes(&rec).unwrap(), vec![r(8080, 7), r(8081, 7)]);
    }

    #[test]
    fn an_address_route_dnats_and_masquerades_host_clients_to_that_address_only() {
        let rec = Recorder::new();
        route(&rec, &a(9090)).unwrap();
        let dnat = NftRule::DnatLocalPort {
            port: 9090,
            to: guest(),
            to_port: 80,
        };
        assert_eq!(
            rec.rules(None, TABLE, "p9090-a192.168.220.2-g80-in"),
            vec![dnat.clone()]
        );
        assert_eq!(
            rec.rules(None, TABLE, "p9090-a192.168.220.2-g80-out"),
            vec![dnat]
        );
        assert_eq!(
            rec.rules(None, TABLE, "p9090-a192.168.220.2-g80-src"),
            vec![NftRule::Masquerade {
                saddr: LOOPBACK,
                daddr: Some(Prefix::new(guest(), 32)),
                oif: None
            }]
        );
        assert_eq!(list_routes(&rec).unwrap(), vec![a(9090)]);
        // Targets the root namespace must never DNAT to.
        for bad in [
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(224, 0, 0, 1),
            Ipv4Addr::new(10, 231, 3, 2),
        ] {
            let route_to = Route {
                host_port: 9091,
                to: Target::Addr(bad),
                guest_port: 80,
            };
            assert!(
                matches!(route(&rec, &route_to), Err(Error::InvalidPlan(_))),
                "{bad}"
            );
        }
        assert_eq!(list_routes(&rec).unwrap(), vec![a(9090)]);
    }

    #[test]
    fn a_port_routed_elsewhere_is_refused() {
        let rec = Recorder::new();
        route(&rec, &r(8080, 7)).unwrap();
        assert!(matches!(
            route(&rec, &r(8080, 8)),
            Err(Error::PortInUse {
                port: 8080,
                to: Target::Weave(7)
            })
        ));
        assert!(matches!(
            route(&rec, &a(8080)),
            Err(Error::PortInUse { port: 8080, .. })
        ));
        assert!(route(&rec, &Route::to_weave(0, 1, 80)).is_err());
        assert_eq!(list_routes(&rec).unwrap(), vec![r(8080, 7)]);
    }

    #[test]
    fn an_incomplete_route_is_rewritten_whole() {
        let rec = Recorder::new();
        route(&rec, &a(9090)).unwrap();
        // Someone removed the postrouting half.
        rec.apply_nft(None, &delete_chain_ops("p9090-a192.168.220.2-g80-src"))
            .unwrap();
        rec.clear_calls();
        route(&rec, &a(9090)).unwrap();
        assert_eq!(applies(&rec).len(), 1);
        assert_eq!(
            rec.rules(None, TABLE, "p9090-a192.168.220.2-g80-src").len(),
            1
        );
        assert_eq!(
            rec.rules(None, TABLE, "p9090-a192.168.220.2-g80-in").len(),
            1
        );
    }

    #[test]
    fn switch_replaces_the_target_in_one_transaction() {
        let rec = Recorder::new();
        route(&rec, &r(8080, 7)).unwrap();
        route(&rec, &r(9090, 7)).unwrap();
        rec.clear_calls();
        assert_eq!(switch(&rec, 8080, Target::Weave(8)).unwrap(), r(8080, 8));
        let batches = applies(&rec);
        assert_eq!(batches.len(), 1, "one transaction: {batches:?}");
        let batch = &batches[0];
        let deleted: Vec<&str> = batch
            .iter()
            .filter_map(|op| match op {
                NftOp::DeleteChain { chain, .. } => Some(chain.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(deleted, vec!["p8080-w7-g80-in", "p8080-w7-g80-out"]);
        // Old chains go before the new ones come.
        let last_delete = batch
            .iter()
            .rposition(|op| matches!(op, NftOp::DeleteChain { .. }));
        let first_new = batch.iter().position(
            |op| matches!(op, NftOp::AddChain { chain, .. } if chain.starts_with("p8080-w8")),
        );
        assert!(last_delete < first_new);
        assert_eq!(list_routes(&rec).unwrap(), vec![r(8080, 8), r(9090, 7)]);
        // Switching to where it already goes changes nothing.
        rec.clear_calls();
        switch(&rec, 8080, Target::Weave(8)).unwrap();
        assert!(rec.mutations().is_empty());
        assert!(matches!(
            switch(&rec, 1234, Target::Weave(8)),
            Err(Error::NotRouted(1234))
        ));
    }

    #[test]
    fn ports_move_between_an_address_and_weaves_together() {
        let rec = Recorder::new();
        route(&rec, &a(8080)).unwrap();
        route(&rec, &a(8081)).unwrap();
        route(&rec, &r(8082, 3)).unwrap();
        rec.clear_calls();
        // To weave 7: three ports, one transaction.
        let moved = switch_all(
            &rec,
            &[
                (8080, Target::Weave(7)),
                (8081, Target::Weave(7)),
                (8082, Target::Weave(7)),
            ],
        )
        .unwrap();
        assert_eq!(moved, vec![r(8080, 7), r(8081, 7), r(8082, 7)]);
        assert_eq!(applies(&rec).len(), 1);
        assert!(rec.tables(None).contains(&TABLE.to_string()));
        // The address routes' postrouting chains went with them.
        let chains = rec.list_nft_chains(None, &TABLE.into()).unwrap();
        assert!(!chains.iter().any(|c| c.ends_with("-src")), "{chains:?}");
        // And back: the two published ones to the address, the third stays.
        rec.clear_calls();
        let changed = set_routes(&rec, &[a(8080), a(8081), r(8082, 7)]).unwrap();
        assert_eq!(changed, vec![a(8080), a(8081)]);
        assert_eq!(applies(&rec).len(), 1);
        assert_eq!(
            list_routes(&rec).unwrap(),
            vec![a(8080), a(8081), r(8082, 7)]
        );
        // Nothing to do: nothing sent.
        rec.clear_calls();
        assert!(set_routes(&rec, &[a(8080), r(8082, 7)]).unwrap().is_empty());
        assert!(rec.mutations().is_empty());
        // A port given twice, or a bad route, is refused before anything is sent.
        assert!(set_routes(&rec, &[a(8080), r(8080, 1)]).is_err());
        assert!(set_routes(&rec, &[r(8083, 1), Route::to_weave(8084, 1, 0)]).is_err());
        assert!(rec.mutations().is_empty());
        // set_routes also routes a port that had nothing.
        set_routes(&rec, &[r(8085, 2)]).unwrap();
        assert!(list_routes(&rec).unwrap().contains(&r(8085, 2)));
    }

    #[test]
    fn a_failed_move_changes_nothing() {
        let rec = Recorder::new();
        route(&rec, &a(8080)).unwrap();
        route(&rec, &r(8081, 3)).unwrap();
        rec.fail_nth_mutation(1);
        assert!(switch_all(&rec, &[(8080, Target::Weave(7)), (8081, Target::Weave(7))]).is_err());
        assert_eq!(list_routes(&rec).unwrap(), vec![a(8080), r(8081, 3)]);
    }

    #[test]
    fn unroute_removes_the_chains_and_the_table_with_the_last_route() {
        let rec = Recorder::new();
        assert!(!unroute(&rec, 8080).unwrap());
        route(&rec, &r(8080, 7)).unwrap();
        route(&rec, &r(9090, 8)).unwrap();
        route(&rec, &a(9091)).unwrap();
        assert!(unroute(&rec, 8080).unwrap());
        assert!(unroute(&rec, 9091).unwrap());
        assert_eq!(list_routes(&rec).unwrap(), vec![r(9090, 8)]);
        assert_eq!(
            rec.list_nft_chains(None, &TABLE.into()).unwrap(),
            vec!["p9090-w8-g80-in", "p9090-w8-g80-out", ROOT_POSTROUTING]
        );
        assert_eq!(rec.tables(None), vec![TABLE]);
        assert!(unroute(&rec, 9090).unwrap());
        assert!(rec.tables(None).is_empty());
    }

    #[test]
    fn host_forwarding_and_host_clients_are_explicit_calls() {
        let rec = Recorder::new();
        route(&rec, &r(8080, 7)).unwrap();
        route(&rec, &a(8081)).unwrap();
        assert!(!rec
            .calls()
            .iter()
            .any(|c| matches!(c, Call::SetSysctl { .. })));
        enable_host_forwarding(&rec).unwrap();
        assert_eq!(
            rec.mutations().last(),
            Some(&Call::SetSysctl {
                netns: None,
                key: "net/ipv4/ip_forward".into(),
                value: "1".into()
            })
        );
        allow_host_clients(&rec, "tap7").unwrap();
        assert_eq!(
            rec.mutations().last(),
            Some(&Call::SetSysctl {
                netns: None,
                key: "net/ipv4/conf/tap7/route_localnet".into(),
                value: "1".into()
            })
        );
        // A name that would leave conf/<link>/, or name every link, writes nothing.
        let before = rec.mutations().len();
        for bad in [
            "all",
            "default",
            "../../ip_forward",
            "a/b",
            "..",
            "",
            "tap 7",
            "sixteen-chars-xx",
        ] {
            assert!(
                matches!(
                    allow_host_clients(&rec, bad),
                    Err(crate::Error::InvalidLink(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(rec.mutations().len(), before);
    }
}
