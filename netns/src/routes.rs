//! Host port routes in the root namespace.
//!
//! Table `ip weft` holds one static chain and two base chains per routed port:
//!
//! ```text
//! table ip weft {
//!   chain postrouting { type nat hook postrouting priority srcnat;
//!     ip saddr 127.0.0.0/8 ip daddr 10.231.0.0/16 masquerade }
//!   chain p8080-w7-g80-in { type nat hook prerouting priority dstnat;
//!     fib daddr type local meta l4proto tcp tcp dport 8080 dnat to 10.231.7.2:80 }
//!   chain p8080-w7-g80-out { type nat hook output priority dstnat;
//!     fib daddr type local meta l4proto tcp tcp dport 8080 dnat to 10.231.7.2:80 }
//! }
//! ```
//!
//! The chain names carry the whole route (host port, weave index, guest port),
//! so the kernel's ruleset is its own record: listing chains is enough to know
//! every route, no rule handles are needed, and moving a port is one transaction
//! that deletes the old pair of chains and adds the new pair.

use std::fmt;

use crate::ops::{BaseChain, NetOps, NftOp, NftRule, Prefix};
use crate::plan::{ns_addr, LINK_NET, TABLE};
use crate::{Error, Result};

/// Chain of the root table that masquerades host-local connections (source
/// 127.0.0.0/8) leaving towards a weave, so the weave can answer them.
pub(crate) const ROOT_POSTROUTING: &str = "postrouting";

/// New TCP connections to `host_port` on any local address of the host go to
/// port `guest_port` of the guest of weave `weave_index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    /// Host port (local addresses of the root namespace, loopback included).
    pub host_port: u16,
    /// Index of the weave (its veth is `wh<index>`, 10.231.<index>.0/30).
    pub weave_index: u8,
    /// Guest port.
    pub guest_port: u16,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "host port {} -> weave {} port {}",
            self.host_port, self.weave_index, self.guest_port
        )
    }
}

/// Which of the two chains of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// prerouting: connections from other hosts
    In,
    /// output: connections from the host itself
    Out,
}

impl Route {
    fn chain(&self, side: Side) -> String {
        let suffix = match side {
            Side::In => "in",
            Side::Out => "out",
        };
        format!(
            "p{}-w{}-g{}-{suffix}",
            self.host_port, self.weave_index, self.guest_port
        )
    }

    fn check(&self) -> Result<()> {
        if self.host_port == 0 || self.guest_port == 0 {
            return Err(Error::InvalidPlan(format!(
                "{self}: port 0 cannot be routed"
            )));
        }
        Ok(())
    }

    fn add_ops(&self) -> Vec<NftOp> {
        let rule = NftRule::DnatLocalPort {
            port: self.host_port,
            to: ns_addr(self.weave_index),
            to_port: self.guest_port,
        };
        let comment = Some(format!("weft: {self}"));
        let mut ops = Vec::new();
        for (side, base) in [
            (Side::In, BaseChain::DSTNAT),
            (Side::Out, BaseChain::OUTPUT_DSTNAT),
        ] {
            ops.push(NftOp::AddChain {
                table: TABLE.into(),
                chain: self.chain(side),
                base: Some(base),
            });
            ops.push(NftOp::AddRule {
                table: TABLE.into(),
                chain: self.chain(side),
                rule: rule.clone(),
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

/// `p<host>-w<index>-g<guest>-in|out` → the route and side.
fn parse_chain(name: &str) -> Option<(Route, Side)> {
    let (rest, side) = if let Some(rest) = name.strip_suffix("-in") {
        (rest, Side::In)
    } else {
        (name.strip_suffix("-out")?, Side::Out)
    };
    let mut parts = rest.split('-');
    let host_port = parse_u(parts.next()?.strip_prefix('p')?)?;
    let weave_index = parse_u(parts.next()?.strip_prefix('w')?)?;
    let guest_port = parse_u(parts.next()?.strip_prefix('g')?)?;
    if parts.next().is_some() {
        return None;
    }
    Some((
        Route {
            host_port,
            weave_index,
            guest_port,
        },
        side,
    ))
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
                saddr: Prefix::new(std::net::Ipv4Addr::new(127, 0, 0, 0), 8),
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
    ops.list_nft_chains(None, TABLE)
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

/// Route `route.host_port` to a weave. Idempotent for the same route; a port
/// already routed elsewhere is refused (use [`switch`] to move it).
pub fn route(ops: &dyn NetOps, route: &Route) -> Result<()> {
    route.check()?;
    let existing = list_routes(ops)?;
    if existing.contains(route) {
        return Ok(());
    }
    if let Some(other) = existing.iter().find(|r| r.host_port == route.host_port) {
        return Err(Error::PortInUse {
            port: route.host_port,
            weave_index: other.weave_index,
        });
    }
    let mut batch = base_ops();
    batch.extend(route.add_ops());
    ops.apply_nft(None, &batch)
}

/// Move a routed host port to weave `to_index` (same guest port) in one
/// nftables transaction: new connections go to the new weave; established
/// ones keep their conntrack mapping and finish where they started.
/// Returns the new route.
pub fn switch(ops: &dyn NetOps, host_port: u16, to_index: u8) -> Result<Route> {
    let chains = root_chains(ops)?;
    let current: Vec<Route> = routes_of(&chains)
        .into_iter()
        .filter(|r| r.host_port == host_port)
        .collect();
    let Some(first) = current.first() else {
        return Err(Error::NotRouted(host_port));
    };
    let new = Route {
        host_port,
        weave_index: to_index,
        guest_port: first.guest_port,
    };
    if current == [new] && both_sides(&chains, &new) {
        return Ok(new);
    }
    let mut batch = base_ops();
    for chain in &chains {
        if parse_chain(chain).is_some_and(|(r, _)| r.host_port == host_port) {
            batch.extend(delete_chain_ops(chain));
        }
    }
    batch.extend(new.add_ops());
    ops.apply_nft(None, &batch)?;
    Ok(new)
}

pub(crate) fn both_sides(chains: &[String], r: &Route) -> bool {
    chains.contains(&r.chain(Side::In)) && chains.contains(&r.chain(Side::Out))
}

/// Remove the chains selected by `pick`; the table goes too when no route is
/// left. Returns the routes removed.
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

/// The chain names of a route (prerouting, output).
#[cfg(test)]
pub(crate) fn chains_of(route: &Route) -> [String; 2] {
    [route.chain(Side::In), route.chain(Side::Out)]
}

/// The route a chain name stands for.
pub(crate) fn parse_chain_route(name: &str) -> Option<Route> {
    parse_chain(name).map(|(r, _)| r)
}

/// The ops that add both chains of a route (the table must exist).
pub(crate) fn add_ops(route: &Route) -> Vec<NftOp> {
    route.add_ops()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_round_trip() {
        let r = Route {
            host_port: 8080,
            weave_index: 7,
            guest_port: 80,
        };
        let [i, o] = chains_of(&r);
        assert_eq!(i, "p8080-w7-g80-in");
        assert_eq!(o, "p8080-w7-g80-out");
        assert_eq!(parse_chain(&i), Some((r, Side::In)));
        assert_eq!(parse_chain(&o), Some((r, Side::Out)));
        assert_eq!(parse_chain_route(&i), Some(r));
        for bad in [
            "postrouting",
            "p8080-w7-g80",
            "p8080-w256-g80-in",
            "p08080-w7-g80-in",
            "p8080-w7-g80-x-in",
            "p-w7-g80-in",
        ] {
            assert_eq!(parse_chain(bad), None, "{bad}");
        }
    }

    use crate::recorder::{Call, Recorder};

    fn r(host_port: u16, weave_index: u8) -> Route {
        Route {
            host_port,
            weave_index,
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
                to: std::net::Ipv4Addr::new(10, 231, 7, 2),
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
    fn a_port_routed_elsewhere_is_refused() {
        let rec = Recorder::new();
        route(&rec, &r(8080, 7)).unwrap();
        assert!(matches!(
            route(&rec, &r(8080, 8)),
            Err(Error::PortInUse {
                port: 8080,
                weave_index: 7
            })
        ));
        assert!(route(
            &rec,
            &Route {
                host_port: 0,
                weave_index: 1,
                guest_port: 80
            }
        )
        .is_err());
        assert_eq!(list_routes(&rec).unwrap(), vec![r(8080, 7)]);
    }

    #[test]
    fn switch_replaces_the_target_in_one_transaction() {
        let rec = Recorder::new();
        route(&rec, &r(8080, 7)).unwrap();
        route(&rec, &r(9090, 7)).unwrap();
        rec.clear_calls();
        assert_eq!(switch(&rec, 8080, 8).unwrap(), r(8080, 8));
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
        switch(&rec, 8080, 8).unwrap();
        assert!(rec.mutations().is_empty());
        assert!(matches!(switch(&rec, 1234, 8), Err(Error::NotRouted(1234))));
    }

    #[test]
    fn unroute_removes_the_chains_and_the_table_with_the_last_route() {
        let rec = Recorder::new();
        assert!(!unroute(&rec, 8080).unwrap());
        route(&rec, &r(8080, 7)).unwrap();
        route(&rec, &r(9090, 8)).unwrap();
        assert!(unroute(&rec, 8080).unwrap());
        assert_eq!(list_routes(&rec).unwrap(), vec![r(9090, 8)]);
        assert_eq!(rec.tables(None), vec![TABLE]);
        assert!(unroute(&rec, 9090).unwrap());
        assert!(rec.tables(None).is_empty());
    }

    #[test]
    fn host_forwarding_is_an_explicit_call() {
        let rec = Recorder::new();
        route(&rec, &r(8080, 7)).unwrap();
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
    }
}
