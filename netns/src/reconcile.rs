//! Bringing the kernel in line with what the catalog says should exist.
//!
//! Several daemons (each with its own catalog) may share a host: namespaces,
//! `wh<n>` links and the root `ip weft` table are host-wide. So reconcile only
//! ever removes what the caller says it owns ([`Owned`]); anything else named
//! like ours is someone else's and is left alone.

use std::collections::BTreeSet;

use crate::filter::{self, filter_table, parse_filter_chain};
use crate::ops::{NetOps, NftOp};
use crate::plan::{parse_host_link, NETNS_PREFIX, TABLE};
use crate::routes::{self, Route};
use crate::{Error, Result, WeaveNet, WeavePlan};

/// What the caller owns on a shared host: the only objects [`reconcile`] may
/// remove as strays. A daemon records these (before creating them) and forgets
/// them (after removing them), so a crash in between leaves them owned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    /// Namespaces (`weft-<name>`).
    pub netns: BTreeSet<String>,
    /// Weave indices: their host links `wh<index>`.
    pub indices: BTreeSet<u8>,
    /// Host ports: the route chains of these ports in the root table.
    pub ports: BTreeSet<u16>,
}

/// What [`reconcile`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Stray owned `weft-*` namespaces removed.
    pub removed_netns: Vec<String>,
    /// Stray owned `wh*` host links removed.
    pub removed_links: Vec<String>,
    /// Weave indices whose stray owned chains of the root filter were removed.
    pub removed_filters: Vec<u8>,
    /// Routes removed (owned and not wanted, or pointing elsewhere than wanted).
    pub removed_routes: Vec<Route>,
    /// Weaves whose namespace was missing and was created.
    pub created_weaves: Vec<String>,
    /// Weaves whose namespace existed; their links, addresses and table were re-applied.
    pub repaired_weaves: Vec<String>,
    /// Routes added (missing, incomplete, or pointing elsewhere).
    pub added_routes: Vec<Route>,
    /// Steps that failed (the rest was still done).
    pub errors: Vec<String>,
}

impl ReconcileReport {
    /// Whether anything was removed or added (repairs of existing weaves aside).
    pub fn changed(&self) -> bool {
        !(self.removed_netns.is_empty()
            && self.removed_links.is_empty()
            && self.removed_filters.is_empty()
            && self.removed_routes.is_empty()
            && self.created_weaves.is_empty()
            && self.added_routes.is_empty())
    }
}

fn check_wanted(wanted: &[WeavePlan], routes: &[Route]) -> Result<()> {
    let mut names = BTreeSet::new();
    let mut indices = BTreeSet::new();
    for plan in wanted {
        plan.netns()?;
        if !names.insert(plan.name.as_str()) {
            return Err(Error::InvalidPlan(format!(
                "weave {} is listed twice",
                plan.name
            )));
        }
        if !indices.insert(plan.index) {
            return Err(Error::InvalidPlan(format!(
                "weave index {} is used twice",
                plan.index
            )));
        }
    }
    let mut ports = BTreeSet::new();
    for r in routes {
        if !ports.insert(r.host_port) {
            return Err(Error::InvalidPlan(format!(
                "host port {} is routed twice",
                r.host_port
            )));
        }
    }
    Ok(())
}

/// Make the kernel match `wanted` weaves and `routes`, touching only what is
/// wanted or `owned`: remove owned namespaces, `wh*` links and route chains that
/// are not wanted; create or repair every wanted weave; add missing routes and
/// replace wanted ports' chains that point elsewhere. Namespaces, links and
/// ports neither wanted nor owned are left alone, whoever made them.
/// Everything is attempted; failures are listed in the report. Fails early only
/// on an inconsistent request or when the current state cannot be read.
pub fn reconcile(
    ops: &dyn NetOps,
    owned: &Owned,
    wanted: &[WeavePlan],
    routes: &[Route],
) -> Result<ReconcileReport> {
    check_wanted(wanted, routes)?;
    let mut report = ReconcileReport::default();
    let wanted_ns: BTreeSet<String> = wanted.iter().filter_map(|p| p.netns().ok()).collect();
    let wanted_idx: BTreeSet<u8> = wanted.iter().map(|p| p.index).collect();

    // 1. Strays the caller owns.
    let present_ns = ops.list_netns()?;
    for ns in present_ns.iter().filter(|n| {
        n.starts_with(NETNS_PREFIX) && owned.netns.contains(*n) && !wanted_ns.contains(*n)
    }) {
        match ops.delete_netns(ns) {
            Ok(()) => report.removed_netns.push(ns.clone()),
            Err(e) => report.errors.push(format!("{}", ErrorChain(&e))),
        }
    }
    for link in ops.list_links(None)? {
        let stray = parse_host_link(&link)
            .is_some_and(|i| owned.indices.contains(&i) && !wanted_idx.contains(&i));
        if stray {
            match ops.delete_link(None, &link) {
                Ok(()) => report.removed_links.push(link),
                Err(e) => report.errors.push(format!("{}", ErrorChain(&e))),
            }
        }
    }

    let stray_filters: BTreeSet<u8> = ops
        .list_nft_chains(None, &filter_table())?
        .iter()
        .filter_map(|c| parse_filter_chain(c))
        .filter(|i| owned.indices.contains(i) && !wanted_idx.contains(i))
        .collect();
    for index in stray_filters {
        match filter::remove_filter(ops, index) {
            Ok(()) => report.removed_filters.push(index),
            Err(e) => report.errors.push(format!("{}", ErrorChain(&e))),
        }
    }

    // 2. Weaves (each with its filter, by its egress policy).
    for plan in wanted {
        let ns = plan.netns()?;
        let existed = present_ns.contains(&ns) && !report.removed_netns.contains(&ns);
        match WeaveNet::create(ops, plan) {
            Ok(_) if existed => report.repaired_weaves.push(plan.name.clone()),
            Ok(_) => report.created_weaves.push(plan.name.clone()),
            Err(e) => report
                .errors
                .push(format!("weave {}: {}", plan.name, ErrorChain(&e))),
        }
    }

    // 3. Routes: one transaction for the whole root table.
    let chains = routes::root_chains(ops)?;
    let present = routes::routes_of(&chains);
    let wanted_routes: BTreeSet<Route> = routes.iter().copied().collect();
    let wanted_ports: BTreeSet<u16> = routes.iter().map(|r| r.host_port).collect();
    let mut deletes = Vec::new();
    let mut kept_route_chains = 0usize;
    for chain in &chains {
        let Some(r) = routes::parse_chain_route(chain) else {
            continue;
        };
        let remove = if wanted_ports.contains(&r.host_port) {
            !(wanted_routes.contains(&r) && routes::complete(&chains, &r))
        } else {
            owned.ports.contains(&r.host_port)
        };
        if remove {
            deletes.extend(routes::delete_chain_ops(chain));
        } else {
            kept_route_chains += 1;
        }
    }
    for r in &present {
        let owned_or_wanted =
            wanted_ports.contains(&r.host_port) || owned.ports.contains(&r.host_port);
        if owned_or_wanted && !wanted_routes.contains(r) {
            report.removed_routes.push(*r);
        }
    }
    let mut adds = Vec::new();
    for r in &wanted_routes {
        if !(present.contains(r) && routes::complete(&chains, r)) {
            adds.extend(routes::add_ops(r));
            report.added_routes.push(*r);
        }
    }
    let batch = if deletes.is_empty() && adds.is_empty() {
        // Nothing of ours to change; only a lost static chain is put back.
        if kept_route_chains > 0 && !chains.iter().any(|c| c == routes::ROOT_POSTROUTING) {
            routes::base_ops()
        } else {
            Vec::new()
        }
    } else if adds.is_empty() && kept_route_chains == 0 {
        // What we removed was the last route of anyone's: the table goes.
        vec![NftOp::DeleteTable {
            table: TABLE.into(),
        }]
    } else {
        let mut batch = routes::base_ops();
        batch.extend(deletes);
        batch.extend(adds);
        batch
    };
    if !batch.is_empty() {
        if let Err(e) = ops.apply_nft(None, &batch) {
            report.errors.push(format!("{}", ErrorChain(&e)));
            report.removed_routes.clear();
            report.added_routes.clear();
        }
    }
    Ok(report)
}

/// Display an error with its causes, `a: b: c`.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::LinkEnd;
    use crate::recorder::Recorder;
    use crate::routes::{route, Target};
    use std::net::Ipv4Addr;

    fn r(host_port: u16, weave_index: u8) -> Route {
        Route::to_weave(host_port, weave_index, 80)
    }

    fn a(host_port: u16) -> Route {
        Route {
            host_port,
            to: Target::Addr(Ipv4Addr::new(192, 168, 220, 2)),
            guest_port: 80,
        }
    }

    /// What this caller made, according to its own record.
    fn mine() -> Owned {
        Owned {
            netns: ["weft-a", "weft-old"].map(String::from).into(),
            indices: [1, 3, 4].into(),
            ports: [80, 81, 83].into(),
        }
    }

    /// A host after a crash: weave a (index 1) is half there, weave old (index 3)
    /// and the link of index 4 should not exist, plus things this caller does not own: another daemon's
    /// weave `theirs` (index 9, port 90) and a namespace that is not weft's at all.
    fn messy_host() -> Recorder {
        let rec = Recorder::new();
        WeaveNet::create(&rec, &WeavePlan::new("old", 3)).unwrap();
        WeaveNet::create(&rec, &WeavePlan::new("theirs", 9)).unwrap();
        rec.create_netns("weft-a").unwrap();
        rec.create_netns("other").unwrap();
        rec.create_veth(&LinkEnd::root("eth0"), &LinkEnd::in_netns("other", "eth0"))
            .unwrap();
        // A host link of ours whose namespace end lives on elsewhere.
        rec.create_veth(&LinkEnd::root("wh4"), &LinkEnd::in_netns("other", "x4"))
            .unwrap();
        route(&rec, &r(80, 3)).unwrap();
        route(&rec, &r(81, 1)).unwrap();
        route(&rec, &a(83)).unwrap();
        route(&rec, &r(90, 9)).unwrap();
        // Old filter chains of the index-4 link.
        filter::set_egress(&rec, 4, filter::Egress::All).unwrap();
        rec.apply_nft(
            None,
            &[NftOp::AddTable {
                table: "filter".into(),
            }],
        )
        .unwrap();
        rec.clear_calls();
        rec
    }

    #[test]
    fn owned_strays_go_missing_pieces_come_back_the_rest_stays() {
        let rec = messy_host();
        let wanted = [WeavePlan::new("a", 1), WeavePlan::new("b", 2)];
        let routes = [r(81, 1), r(82, 2), a(84)];
        let report = reconcile(&rec, &mine(), &wanted, &routes).unwrap();
        assert_eq!(report.errors, Vec::<String>::new());
        assert_eq!(report.removed_netns, vec!["weft-old"]);
        // wh3 went with its namespace (the pair dies together).
        assert_eq!(report.removed_links, vec!["wh4"]);
        // The filters of owned strays go, theirs and the wanted ones stay or come.
        assert_eq!(report.removed_filters, vec![3, 4]);
        assert_eq!(
            rec.chains(None, &filter_table()),
            vec!["w1-fwd", "w1-in", "w2-fwd", "w2-in", "w9-fwd", "w9-in"]
        );
        assert_eq!(report.removed_routes, vec![r(80, 3), a(83)]);
        assert_eq!(report.repaired_weaves, vec!["a"]);
        assert_eq!(report.created_weaves, vec!["b"]);
        assert_eq!(report.added_routes, vec![r(82, 2), a(84)]);
        assert!(report.changed());

        assert_eq!(
            rec.netns(),
            vec!["other", "weft-a", "weft-b", "weft-theirs"]
        );
        assert_eq!(rec.links(None), vec!["eth0", "wh1", "wh2", "wh9"]);
        assert_eq!(rec.tables(None), vec!["filter", "weft"]);
        assert_eq!(
            crate::list_routes(&rec).unwrap(),
            vec![r(81, 1), r(82, 2), a(84), r(90, 9)]
        );
        assert_eq!(rec.tables(Some("weft-a")), vec!["weft"]);

        // A second pass finds nothing to remove or add, and sends no batch to the
        // route table (the weaves' filters are rewritten as they are).
        rec.clear_calls();
        let again = reconcile(&rec, &mine(), &wanted, &routes).unwrap();
        assert_eq!(
            again,
            ReconcileReport {
                repaired_weaves: vec!["a".into(), "b".into()],
                ..Default::default()
            }
        );
        assert!(!again.changed());
        assert!(!rec
            .mutations()
            .iter()
            .any(|c| matches!(c, crate::Call::ApplyNft(None, b)
                if b.iter().any(|op| op.table().name == TABLE))));
    }

    #[test]
    fn a_wanted_port_pointing_elsewhere_or_half_there_is_rewritten() {
        let rec = messy_host();
        // Port 81 should go to the address now; port 83's postrouting half is gone.
        rec.apply_nft(
            None,
            &crate::routes::delete_chain_ops("p83-a192.168.220.2-g80-src"),
        )
        .unwrap();
        let report = reconcile(&rec, &mine(), &[], &[a(81), a(83)]).unwrap();
        assert_eq!(report.errors, Vec::<String>::new());
        assert_eq!(report.removed_routes, vec![r(80, 3), r(81, 1)]);
        assert_eq!(report.added_routes, vec![a(81), a(83)]);
        assert_eq!(
            crate::list_routes(&rec).unwrap(),
            vec![a(81), a(83), r(90, 9)]
        );
        let chains = rec.list_nft_chains(None, &TABLE.into()).unwrap();
        assert!(chains.contains(&"p83-a192.168.220.2-g80-src".to_string()));
    }

    #[test]
    fn nothing_wanted_leaves_nothing_of_ours_and_everything_of_theirs() {
        let rec = messy_host();
        let report = reconcile(&rec, &mine(), &[], &[]).unwrap();
        assert_eq!(report.errors, Vec::<String>::new());
        assert_eq!(report.removed_netns, vec!["weft-a", "weft-old"]);
        assert_eq!(report.removed_routes, vec![r(80, 3), r(81, 1), a(83)]);
        assert_eq!(rec.netns(), vec!["other", "weft-theirs"]);
        assert_eq!(rec.links(None), vec!["eth0", "wh9"]);
        // Their route keeps the table.
        assert_eq!(rec.tables(None), vec!["filter", "weft"]);
        assert_eq!(crate::list_routes(&rec).unwrap(), vec![r(90, 9)]);
        // When they are gone too, the last owner's reconcile takes the table.
        let theirs = Owned {
            netns: ["weft-theirs".to_string()].into(),
            indices: [9].into(),
            ports: [90].into(),
        };
        reconcile(&rec, &theirs, &[], &[]).unwrap();
        assert_eq!(rec.tables(None), vec!["filter"]);
        assert_eq!(rec.netns(), vec!["other"]);
    }

    #[test]
    fn owning_nothing_removes_nothing() {
        let rec = messy_host();
        let before = (
            rec.netns(),
            rec.links(None),
            crate::list_routes(&rec).unwrap(),
        );
        let report = reconcile(&rec, &Owned::default(), &[], &[]).unwrap();
        assert_eq!(report, ReconcileReport::default());
        assert_eq!(
            (
                rec.netns(),
                rec.links(None),
                crate::list_routes(&rec).unwrap()
            ),
            before
        );
        assert!(rec.mutations().is_empty());
    }

    #[test]
    fn failures_are_reported_and_the_rest_is_done() {
        let rec = messy_host();
        // The first mutation (deleting weft-old) fails; the rest goes on.
        rec.fail_nth_mutation(1);
        let report = reconcile(&rec, &mine(), &[WeavePlan::new("a", 1)], &[r(81, 1)]).unwrap();
        assert_eq!(report.errors.len(), 1, "{report:?}");
        assert!(report.errors[0].contains("injected failure"), "{report:?}");
        assert!(report.removed_netns.is_empty());
        assert_eq!(report.repaired_weaves, vec!["a"]);
        assert_eq!(report.removed_routes, vec![r(80, 3), a(83)]);
    }

    #[test]
    fn inconsistent_requests_are_refused() {
        let rec = Recorder::new();
        let twice = [WeavePlan::new("a", 1), WeavePlan::new("a", 2)];
        assert!(reconcile(&rec, &mine(), &twice, &[]).is_err());
        let same_index = [WeavePlan::new("a", 1), WeavePlan::new("b", 1)];
        assert!(reconcile(&rec, &mine(), &same_index, &[]).is_err());
        assert!(reconcile(&rec, &mine(), &[], &[r(80, 1), r(80, 2)]).is_err());
        assert!(rec.calls().is_empty());
    }
}
