//! One weave's network: its namespace, the veth to the host, the guest link,
//! forwarding and the NAT table inside the namespace.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::filter::{self, Egress};
use crate::ops::{BaseChain, LinkEnd, NetOps, NftOp, NftRule, NftTable, Prefix};
use crate::plan::{
    guest_network, host_addr, host_link, netns_path, ns_addr, ns_link, LINK_NET, TABLE,
};
use crate::{namespace_name, routes, Error, Result};

/// How the guest is attached inside the weave namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLink {
    /// A persistent tap for QEMU (`-netdev tap,ifname=NAME,script=no,downscript=no`).
    Tap {
        /// Tap name inside the namespace.
        name: String,
    },
    /// A veth pair standing in for the tap in tests: `name` stays in the weave
    /// namespace (with the gateway address), `peer` is created in its own namespace
    /// (which must exist) and configured by the caller as the guest.
    Veth {
        /// Weave-side name.
        name: String,
        /// Guest-side end.
        peer: LinkEnd,
    },
}

impl GuestLink {
    /// The name of the link inside the weave namespace.
    pub fn name(&self) -> &str {
        match self {
            GuestLink::Tap { name } | GuestLink::Veth { name, .. } => name,
        }
    }
}

/// What a weave's network looks like. Every weave of an environment keeps the
/// same guest plan; only `name` and `index` differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeavePlan {
    /// Weave short name; the namespace is `weft-<name>`.
    pub name: String,
    /// Index allocated by the caller, unique on the host: links `wh<index>`/`wn<index>`,
    /// addresses 10.231.<index>.1/30 (host) and .2/30 (namespace).
    pub index: u8,
    /// The guest's address.
    pub guest_ip: Ipv4Addr,
    /// The guest network's prefix length.
    pub guest_prefix: u8,
    /// The guest's gateway, on the namespace side of the guest link.
    pub gateway_ip: Ipv4Addr,
    /// The guest link.
    pub guest_link: GuestLink,
    /// What the guest may open connections to (the root namespace's filter).
    pub egress: Egress,
}

impl WeavePlan {
    /// The default plan: guest 192.168.100.2/24, gateway 192.168.100.1 on tap `tap0`.
    pub fn new(name: impl Into<String>, index: u8) -> Self {
        WeavePlan {
            name: name.into(),
            index,
            guest_ip: Ipv4Addr::new(192, 168, 100, 2),
            guest_prefix: 24,
            gateway_ip: Ipv4Addr::new(192, 168, 100, 1),
            guest_link: GuestLink::Tap {
                name: "tap0".into(),
            },
            egress: Egress::None,
        }
    }

    /// The namespace name, `weft-<name>`.
    pub fn netns(&self) -> Result<String> {
        namespace_name(&self.name)
    }

    fn guest_net(&self) -> Prefix {
        guest_network(self.guest_ip, self.guest_prefix)
    }

    fn check(&self) -> Result<String> {
        let netns = self.netns()?;
        let bad = |why: String| Err(Error::InvalidPlan(format!("weave {}: {why}", self.name)));
        if let Err(why) = guest_plan_problem(self.guest_ip, self.guest_prefix, self.gateway_ip) {
            return bad(why);
        }
        let link = self.guest_link.name();
        if link.is_empty() || link.len() > 15 || link == ns_link(self.index) || link == "lo" {
            return bad(format!("guest link name {link:?} is not usable"));
        }
        if let GuestLink::Veth { peer, .. } = &self.guest_link {
            if peer.netns.as_deref() == Some(netns.as_str()) || peer.netns.is_none() {
                return bad("the veth guest end must be in a namespace of its own".into());
            }
        }
        Ok(netns)
    }
}

/// Checks a guest address plan (guest address, prefix length, gateway): the prefix is
/// 1..=30, the gateway lies in the guest network and differs from the guest, and the
/// network does not overlap loopback or the host links (10.231.0.0/16).
pub fn check_guest_plan(guest_ip: Ipv4Addr, guest_prefix: u8, gateway_ip: Ipv4Addr) -> Result<()> {
    guest_plan_problem(guest_ip, guest_prefix, gateway_ip).map_err(Error::InvalidPlan)
}

fn guest_plan_problem(
    guest_ip: Ipv4Addr,
    guest_prefix: u8,
    gateway_ip: Ipv4Addr,
) -> std::result::Result<(), String> {
    if !(1..=30).contains(&guest_prefix) {
        return Err(format!("guest prefix /{guest_prefix} is not in 1..=30"));
    }
    let net = guest_network(guest_ip, guest_prefix);
    if !net.contains(gateway_ip) {
        return Err(format!("gateway {gateway_ip} is outside {net}"));
    }
    if gateway_ip == guest_ip {
        return Err("guest and gateway have the same address".into());
    }
    for reserved in [LINK_NET, Prefix::new(Ipv4Addr::new(127, 0, 0, 0), 8)] {
        if net.contains(reserved.addr) || reserved.contains(net.addr) {
            return Err(format!("guest network {net} overlaps {reserved}"));
        }
    }
    Ok(())
}

/// A weave's network as created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeaveNet {
    /// Namespace name, `weft-<weave>`.
    pub netns: String,
    /// Weave index.
    pub index: u8,
    /// Host end of the veth, `wh<index>`, in the root namespace.
    pub host_link: String,
    /// Namespace end of the veth, `wn<index>`.
    pub ns_link: String,
    /// 10.231.<index>.1/30
    pub host_addr: Prefix,
    /// 10.231.<index>.2/30
    pub ns_addr: Prefix,
    /// The guest link inside the namespace (the tap QEMU opens).
    pub guest_link: String,
    /// The guest's address.
    pub guest_ip: Ipv4Addr,
    /// The gateway address on the guest link.
    pub gateway: Prefix,
}

enum Undo {
    Netns(String),
    Link(Option<String>, String),
    Filter(u8),
}

/// The nftables tables inside a weave namespace (NAT, and the filter that keeps the
/// guest off the namespace's own addresses), each replaced as a whole, in one batch.
pub(crate) fn ns_table_ops(plan: &WeavePlan) -> Vec<NftOp> {
    let wn = ns_link(plan.index);
    let t = || NftTable::from(TABLE);
    let mut ops = vec![
        // add + delete + add: replaces the table atomically whether or not it existed.
        NftOp::AddTable { table: t() },
        NftOp::DeleteTable { table: t() },
        NftOp::AddTable { table: t() },
        NftOp::AddChain {
            table: t(),
            chain: "prerouting".into(),
            base: Some(BaseChain::DSTNAT),
        },
        NftOp::AddRule {
            table: t(),
            chain: "prerouting".into(),
            rule: NftRule::DnatTcpFromLink {
                iif: wn.clone(),
                to: plan.guest_ip,
            },
            comment: Some("weft: host connections to the guest".into()),
        },
        NftOp::AddChain {
            table: t(),
            chain: "postrouting".into(),
            base: Some(BaseChain::SRCNAT),
        },
        NftOp::AddRule {
            table: t(),
            chain: "postrouting".into(),
            rule: NftRule::Masquerade {
                saddr: plan.guest_net(),
                daddr: None,
                oif: Some(wn),
            },
            comment: Some("weft: guest outbound".into()),
        },
    ];
    ops.extend(filter::ns_filter_ops(plan.guest_link.name()));
    ops
}

impl WeaveNet {
    /// Path of the namespace, for the launcher's `setns` before it execs QEMU.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// Build (or repair) the network of a weave. Steps already in place are
    /// kept; if a step fails, what this call created is removed again.
    pub fn create(ops: &dyn NetOps, plan: &WeavePlan) -> Result<WeaveNet> {
        let netns = plan.check()?;
        let mut undo = Vec::new();
        match Self::build(ops, plan, &netns, &mut undo) {
            Ok(net) => Ok(net),
            Err(e) => {
                for step in undo.into_iter().rev() {
                    let result = match &step {
                        Undo::Netns(name) => ops.delete_netns(name),
                        Undo::Link(ns, name) => ops.delete_link(ns.as_deref(), name),
                        Undo::Filter(index) => filter::remove_filter(ops, *index),
                    };
                    if let Err(undo_err) = result {
                        tracing::warn!(netns = %netns, error = %undo_err, "undo after failed weave network create");
                    }
                }
                Err(e)
            }
        }
    }

    fn build(
        ops: &dyn NetOps,
        plan: &WeavePlan,
        netns: &str,
        undo: &mut Vec<Undo>,
    ) -> Result<WeaveNet> {
        let ns = Some(netns);
        let (wh, wn) = (host_link(plan.index), ns_link(plan.index));
        let host = Prefix::new(host_addr(plan.index), 30);
        let inner = Prefix::new(ns_addr(plan.index), 30);
        let gateway = Prefix::new(plan.gateway_ip, plan.guest_prefix);

        let fresh = ops.create_netns(netns)?;
        if fresh {
            undo.push(Undo::Netns(netns.to_string()));
        }
        // The filter comes before the host link exists, so the link is never up unfiltered.
        filter::set_egress(ops, plan.index, plan.egress)?;
        if fresh {
            undo.push(Undo::Filter(plan.index));
        }
        // A host end whose peer is not in the namespace is stale: its namespace was
        // deleted and the kernel has not destroyed the pair yet (that cleanup runs
        // asynchronously), or it was left behind. Replace it.
        if !ops.list_links(ns)?.contains(&wn) && ops.list_links(None)?.contains(&wh) {
            ops.delete_link(None, &wh)?;
        }
        if ops.create_veth(&LinkEnd::root(&wh), &LinkEnd::in_netns(netns, &wn))? {
            undo.push(Undo::Link(None, wh.clone()));
        }
        ops.add_address(None, &wh, host)?;
        ops.set_link_up(None, &wh)?;
        // Lets the host's own connections to 127.0.0.1:PORT be DNATed out of this link.
        crate::allow_host_clients(ops, &wh)?;

        ops.add_address(ns, &wn, inner)?;
        ops.set_link_up(ns, &wn)?;
        ops.set_default_route(ns, host.addr)?;

        let guest = plan.guest_link.name().to_string();
        let created = match &plan.guest_link {
            GuestLink::Tap { name } => ops.create_tap(netns, name)?,
            GuestLink::Veth { name, peer } => {
                ops.create_veth(&LinkEnd::in_netns(netns, name), peer)?
            }
        };
        if created {
            undo.push(Undo::Link(ns.map(str::to_string), guest.clone()));
        }
        ops.add_address(ns, &guest, gateway)?;
        ops.set_link_up(ns, &guest)?;

        ops.set_sysctl(ns, "net/ipv4/ip_forward", "1")?;
        ops.apply_nft(ns, &ns_table_ops(plan))?;

        Ok(WeaveNet {
            netns: netns.to_string(),
            index: plan.index,
            host_link: wh,
            ns_link: wn,
            host_addr: host,
            ns_addr: inner,
            guest_link: guest,
            guest_ip: plan.guest_ip,
            gateway,
        })
    }

    /// Remove everything of weave `name`/`index`: the host routes that point at
    /// it, the host end of its veth, its namespace (with the tap and the
    /// namespace's nftables tables), and last its chains of the root filter.
    /// Missing pieces are fine; every step is tried and the first error is returned.
    pub fn delete(ops: &dyn NetOps, name: &str, index: u8) -> Result<()> {
        let netns = namespace_name(name)?;
        let results = [
            routes::remove_routes(ops, |r| r.to == routes::Target::Weave(index)).map(|_| ()),
            ops.delete_link(None, &host_link(index)),
            ops.delete_netns(&netns),
            filter::remove_filter(ops, index),
        ];
        results.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::{Call, Recorder};
    use crate::routes::{route, Route};

    fn root(name: &str) -> LinkEnd {
        LinkEnd::root(name)
    }

    fn inside(name: &str) -> LinkEnd {
        LinkEnd::in_netns("weft-a", name)
    }

    fn ns() -> Option<String> {
        Some("weft-a".into())
    }

    fn expected_create_calls(plan: &WeavePlan) -> Vec<Call> {
        vec![
            Call::CreateNetns("weft-a".into()),
            Call::ApplyNft(None, filter::filter_ops(7, Egress::None)),
            Call::ListLinks(ns()),
            Call::ListLinks(None),
            Call::CreateVeth(root("wh7"), inside("wn7")),
            Call::AddAddress(root("wh7"), Prefix::new(Ipv4Addr::new(10, 231, 7, 1), 30)),
            Call::SetLinkUp(root("wh7")),
            Call::SetSysctl {
                netns: None,
                key: "net/ipv4/conf/wh7/route_localnet".into(),
                value: "1".into(),
            },
            Call::AddAddress(inside("wn7"), Prefix::new(Ipv4Addr::new(10, 231, 7, 2), 30)),
            Call::SetLinkUp(inside("wn7")),
            Call::SetDefaultRoute(ns(), Ipv4Addr::new(10, 231, 7, 1)),
            Call::CreateTap {
                netns: "weft-a".into(),
                name: "tap0".into(),
            },
            Call::AddAddress(
                inside("tap0"),
                Prefix::new(Ipv4Addr::new(192, 168, 100, 1), 24),
            ),
            Call::SetLinkUp(inside("tap0")),
            Call::SetSysctl {
                netns: ns(),
                key: "net/ipv4/ip_forward".into(),
                value: "1".into(),
            },
            Call::ApplyNft(ns(), ns_table_ops(plan)),
        ]
    }

    #[test]
    fn create_builds_namespace_links_forwarding_and_nat_in_order() {
        let rec = Recorder::new();
        let plan = WeavePlan::new("a", 7);
        let net = WeaveNet::create(&rec, &plan).unwrap();
        assert_eq!(rec.calls(), expected_create_calls(&plan));
        assert_eq!(net.netns, "weft-a");
        assert_eq!(net.netns_path(), PathBuf::from("/run/netns/weft-a"));
        assert_eq!(net.guest_link, "tap0");
        assert_eq!(rec.netns(), vec!["weft-a"]);
        assert_eq!(rec.links(None), vec!["wh7"]);
        assert_eq!(rec.links(Some("weft-a")), vec!["tap0", "wn7"]);
        assert_eq!(
            rec.rules(Some("weft-a"), TABLE, "prerouting"),
            vec![NftRule::DnatTcpFromLink {
                iif: "wn7".into(),
                to: Ipv4Addr::new(192, 168, 100, 2)
            }]
        );
        assert_eq!(
            rec.rules(Some("weft-a"), TABLE, "postrouting"),
            vec![NftRule::Masquerade {
                saddr: Prefix::new(Ipv4Addr::new(192, 168, 100, 0), 24),
                daddr: None,
                oif: Some("wn7".into())
            }]
        );
    }

    #[test]
    fn a_stale_host_end_without_its_peer_is_replaced() {
        let rec = Recorder::new();
        // What is left for a moment after the namespace was deleted: the host end.
        rec.create_veth(&root("wh7"), &root("gone7")).unwrap();
        let plan = WeavePlan::new("a", 7);
        WeaveNet::create(&rec, &plan).unwrap();
        assert!(rec.calls().contains(&Call::DeleteLink(root("wh7"))));
        assert_eq!(rec.links(None), vec!["wh7"]);
        assert_eq!(rec.links(Some("weft-a")), vec!["tap0", "wn7"]);
    }

    #[test]
    fn create_twice_is_a_repair_not_an_error() {
        let rec = Recorder::new();
        let plan = WeavePlan::new("a", 7);
        let first = WeaveNet::create(&rec, &plan).unwrap();
        let second = WeaveNet::create(&rec, &plan).unwrap();
        assert_eq!(first, second);
        assert_eq!(rec.links(Some("weft-a")), vec!["tap0", "wn7"]);
        assert_eq!(rec.tables(Some("weft-a")), vec![TABLE]);
        assert_eq!(rec.rules(Some("weft-a"), TABLE, "prerouting").len(), 1);
    }

    #[test]
    fn a_failure_at_any_step_undoes_what_was_created() {
        let plan = WeavePlan::new("a", 7);
        let steps = expected_create_calls(&plan)
            .iter()
            .filter(|c| c.is_mutation())
            .count();
        for n in 1..=steps {
            let rec = Recorder::new();
            rec.fail_nth_mutation(n);
            assert!(WeaveNet::create(&rec, &plan).is_err(), "step {n}");
            assert!(rec.netns().is_empty(), "step {n}: {:?}", rec.netns());
            assert!(
                rec.links(None).is_empty(),
                "step {n}: {:?}",
                rec.links(None)
            );
            let calls = rec.calls();
            // The failed call (the n-th mutation) is followed only by undo, newest first.
            let failed = calls
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_mutation())
                .nth(n - 1)
                .map(|(i, _)| i)
                .unwrap();
            let undo: Vec<Call> = calls[failed + 1..].to_vec();
            let mut want = Vec::new();
            if n > 3 {
                want.push(Call::DeleteLink(root("wh7")));
            }
            if n > 2 {
                want.push(Call::ListNftChains(None, filter::filter_table()));
                want.push(Call::ApplyNft(
                    None,
                    vec![NftOp::DeleteTable {
                        table: filter::filter_table(),
                    }],
                ));
            }
            if n > 1 {
                want.push(Call::DeleteNetns("weft-a".into()));
            }
            if n > 10 {
                want.insert(0, Call::DeleteLink(inside("tap0")));
            }
            assert_eq!(undo, want, "step {n}");
            assert!(
                rec.tables_of(None, crate::Family::Inet).is_empty(),
                "step {n}"
            );
        }
    }

    #[test]
    fn a_failed_repair_keeps_what_existed_before() {
        let rec = Recorder::new();
        let plan = WeavePlan::new("a", 7);
        WeaveNet::create(&rec, &plan).unwrap();
        rec.clear_calls();
        rec.fail_nth_mutation(14);
        assert!(WeaveNet::create(&rec, &plan).is_err());
        assert_eq!(rec.netns(), vec!["weft-a"]);
        assert_eq!(rec.links(None), vec!["wh7"]);
        assert!(rec
            .calls()
            .iter()
            .all(|c| !matches!(c, Call::DeleteNetns(_) | Call::DeleteLink(_))));
    }

    #[test]
    fn veth_guest_link_is_created_towards_its_namespace() {
        let rec = Recorder::new();
        rec.create_netns("weft-g").unwrap();
        let mut plan = WeavePlan::new("a", 7);
        plan.guest_link = GuestLink::Veth {
            name: "wg0".into(),
            peer: LinkEnd::in_netns("weft-g", "eth0"),
        };
        WeaveNet::create(&rec, &plan).unwrap();
        assert!(rec.calls().contains(&Call::CreateVeth(
            inside("wg0"),
            LinkEnd::in_netns("weft-g", "eth0")
        )));
        assert_eq!(rec.links(Some("weft-g")), vec!["eth0"]);
        // Deleting the weave takes the guest's end with it (the pair dies together).
        WeaveNet::delete(&rec, "a", 7).unwrap();
        assert!(rec.links(Some("weft-g")).is_empty());
    }

    #[test]
    fn bad_plans_are_refused_before_touching_anything() {
        let rec = Recorder::new();
        let mut bad = vec![
            WeavePlan::new("Not-OK", 1),
            WeavePlan::new("much-too-long-name", 1),
        ];
        let mut p = WeavePlan::new("a", 1);
        p.gateway_ip = Ipv4Addr::new(192, 168, 101, 1);
        bad.push(p);
        let mut p = WeavePlan::new("a", 1);
        p.gateway_ip = p.guest_ip;
        bad.push(p);
        let mut p = WeavePlan::new("a", 1);
        p.guest_ip = Ipv4Addr::new(10, 231, 9, 2);
        p.gateway_ip = Ipv4Addr::new(10, 231, 9, 1);
        bad.push(p);
        let mut p = WeavePlan::new("a", 1);
        p.guest_link = GuestLink::Tap { name: "wn1".into() };
        bad.push(p);
        let mut p = WeavePlan::new("a", 1);
        p.guest_prefix = 31;
        bad.push(p);
        for plan in bad {
            assert!(WeaveNet::create(&rec, &plan).is_err(), "{plan:?}");
        }
        assert!(rec.calls().is_empty());
    }

    #[test]
    fn delete_removes_routes_to_the_weave_then_the_link_then_the_namespace() {
        let rec = Recorder::new();
        WeaveNet::create(&rec, &WeavePlan::new("a", 7)).unwrap();
        WeaveNet::create(&rec, &WeavePlan::new("b", 8)).unwrap();
        let to7 = Route::to_weave(80, 7, 80);
        let to8 = Route::to_weave(81, 8, 80);
        route(&rec, &to7).unwrap();
        route(&rec, &to8).unwrap();
        rec.clear_calls();
        WeaveNet::delete(&rec, "a", 7).unwrap();
        let muts = rec.mutations();
        assert_eq!(muts.len(), 4, "{muts:?}");
        assert!(matches!(&muts[0], Call::ApplyNft(None, batch) if batch.len() == 4));
        assert_eq!(muts[1], Call::DeleteLink(root("wh7")));
        assert_eq!(muts[2], Call::DeleteNetns("weft-a".into()));
        // Its filter chains go last, weave b's stay.
        assert!(matches!(&muts[3], Call::ApplyNft(None, batch) if batch.len() == 4));
        assert_eq!(
            rec.chains(None, &filter::filter_table()),
            vec!["w8-fwd", "w8-in"]
        );
        assert_eq!(crate::list_routes(&rec).unwrap(), vec![to8]);
        assert_eq!(rec.netns(), vec!["weft-b"]);
        assert_eq!(rec.links(None), vec!["wh8"]);
        // The last weave's routes go with the whole table.
        WeaveNet::delete(&rec, "b", 8).unwrap();
        assert!(rec.tables(None).is_empty());
        assert!(rec.tables_of(None, crate::Family::Inet).is_empty());
        assert!(rec.netns().is_empty() && rec.links(None).is_empty());
        // Deleting what is gone is fine.
        WeaveNet::delete(&rec, "b", 8).unwrap();
    }
}
