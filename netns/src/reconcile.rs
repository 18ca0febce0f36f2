//! Bringing the kernel in line with what the catalog says should exist.

use std::collections::BTreeSet;

use crate::ops::{NetOps, NftOp};
use crate::plan::{parse_host_link, NETNS_PREFIX, TABLE};
use crate::routes::{self, Route};
use crate::{Error, Result, WeaveNet, WeavePlan};

/// What [`reconcile`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Stray `weft-*` namespaces removed.
    pub removed_netns: Vec<String>,
    /// Stray `wh*` host links removed.
    pub removed_links: Vec<String>,
    /// Stray `weft*` nftables tables (other than `weft`) removed from the root namespace.
    pub removed_tables: Vec<String>,
    /// Routes removed (not wanted, or pointing elsewhere than wanted).
    pub removed_routes: Vec<Route>,
    /// Weaves whose namespace was missing and was created.
    pub created_weaves: Vec<String>,
    /// Weaves whose namespace existed; their links, addresses and table were re-applied.
    pub repaired_weaves: Vec<String>,
    /// Routes added.
    pub added_routes: Vec<Route>,
    /// Steps that failed (the rest was still done).
    pub errors: Vec<String>,
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

/// Make the kernel match `wanted` weaves and `routes`: remove stray `weft-*`
/// namespaces, `wh*` links, `weft*` tables and route chains; create or repair
/// every wanted weave; add missing routes. Everything is attempted; failures are
/// listed in the report. Fails early only on an inconsistent request or when
/// the current state cannot be read.
pub fn reconcile(
    ops: &dyn NetOps,
    wanted: &[WeavePlan],
    routes: &[Route],
) -> Result<ReconcileReport> {
    check_wanted(wanted, routes)?;
    let mut report = ReconcileReport::default();
    let wanted_ns: BTreeSet<String> = wanted.iter().filter_map(|p| p.netns().ok()).collect();
    let wanted_idx: BTreeSet<u8> = wanted.iter().map(|p| p.index).collect();

    // 1. Strays.
    let present_ns = ops.list_netns()?;
    for ns in present_ns
        .iter()
        .filter(|n| n.starts_with(NETNS_PREFIX) && !wanted_ns.contains(*n))
    {
        match ops.delete_netns(ns) {
            Ok(()) => report.removed_netns.push(ns.clone()),
            Err(e) => report.errors.push(format!("{}", ErrorChain(&e))),
        }
    }
    for link in ops.list_links(None)? {
        if parse_host_link(&link).is_some_and(|i| !wanted_idx.contains(&i)) {
            match ops.delete_link(None, &link) {
                Ok(()) => report.removed_links.push(link),
                Err(e) => report.errors.push(format!("{}", ErrorChain(&e))),
            }
        }
    }
    let tables = ops.list_nft_tables(None)?;
    let stray_tables: Vec<String> = tables
        .iter()
        .filter(|t| t.starts_with(TABLE) && t.as_str() != TABLE)
        .cloned()
        .collect();
    if !stray_tables.is_empty() {
        let batch: Vec<NftOp> = stray_tables
            .iter()
            .map(|t| NftOp::DeleteTable { table: t.clone() })
            .collect();
        match ops.apply_nft(None, &batch) {
            Ok(()) => report.removed_tables = stray_tables,
            Err(e) => report.errors.push(format!("{}", ErrorChain(&e))),
        }
    }

    // 2. Weaves.
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
    let chains = if tables.iter().any(|t| t == TABLE) {
        ops.list_nft_chains(None, TABLE)?
    } else {
        Vec::new()
    };
    let present = routes::routes_of(&chains);
    let wanted_routes: BTreeSet<Route> = routes.iter().copied().collect();
    let batch = if wanted_routes.is_empty() {
        report.removed_routes = present;
        if tables.iter().any(|t| t == TABLE) {
            vec![NftOp::DeleteTable {
                table: TABLE.into(),
            }]
        } else {
            Vec::new()
        }
    } else {
        let mut batch = routes::base_ops();
        for chain in &chains {
            let keep = match routes::parse_chain_route(chain) {
                Some(r) => wanted_routes.contains(&r) && routes::both_sides(&chains, &r),
                None => chain == routes::ROOT_POSTROUTING,
            };
            if !keep {
                batch.extend(routes::delete_chain_ops(chain));
            }
        }
        for r in &present {
            if !wanted_routes.contains(r) {
                report.removed_routes.push(*r);
            }
        }
        for r in &wanted_routes {
            if !(present.contains(r) && routes::both_sides(&chains, r)) {
                batch.extend(routes::add_ops(r));
                report.added_routes.push(*r);
            }
        }
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
    use crate::routes::route;

    fn r(host_port: u16, weave_index: u8) -> Route {
        Route {
            host_port,
            weave_index,
            guest_port: 80,
        }
    }

    /// A host after a crash: weave a (index 1) is half there, weave old (index 3)
    /// should not exist, plus things weft does not own.
    fn messy_host() -> Recorder {
        let rec = Recorder::new();
        WeaveNet::create(&rec, &WeavePlan::new("old", 3)).unwrap();
        rec.create_netns("weft-a").unwrap();
        rec.create_netns("other").unwrap();
        rec.create_veth(&LinkEnd::root("eth0"), &LinkEnd::in_netns("other", "eth0"))
            .unwrap();
        rec.create_veth(&LinkEnd::root("wh9"), &LinkEnd::in_netns("other", "x9"))
            .unwrap();
        route(&rec, &r(80, 3)).unwrap();
        route(&rec, &r(81, 1)).unwrap();
        rec.apply_nft(
            None,
            &[
                NftOp::AddTable {
                    table: "weft-v0".into(),
                },
                NftOp::AddTable {
                    table: "filter".into(),
                },
            ],
        )
        .unwrap();
        rec.clear_calls();
        rec
    }

    #[test]
    fn strays_go_missing_pieces_come_back() {
        let rec = messy_host();
        let wanted = [WeavePlan::new("a", 1), WeavePlan::new("b", 2)];
        let routes = [r(81, 1), r(82, 2)];
        let report = reconcile(&rec, &wanted, &routes).unwrap();
        assert_eq!(report.errors, Vec::<String>::new());
        assert_eq!(report.removed_netns, vec!["weft-old"]);
        assert_eq!(report.removed_links, vec!["wh9"]);
        assert_eq!(report.removed_tables, vec!["weft-v0"]);
        assert_eq!(report.removed_routes, vec![r(80, 3)]);
        assert_eq!(report.repaired_weaves, vec!["a"]);
        assert_eq!(report.created_weaves, vec!["b"]);
        assert_eq!(report.added_routes, vec![r(82, 2)]);

        assert_eq!(rec.netns(), vec!["other", "weft-a", "weft-b"]);
        assert_eq!(rec.links(None), vec!["eth0", "wh1", "wh2"]);
        assert_eq!(rec.tables(None), vec!["filter", "weft"]);
        assert_eq!(crate::list_routes(&rec).unwrap(), vec![r(81, 1), r(82, 2)]);
        assert_eq!(rec.tables(Some("weft-a")), vec!["weft"]);

        // A second pass finds nothing to remove or add.
        let again = reconcile(&rec, &wanted, &routes).unwrap();
        assert_eq!(
            again,
            ReconcileReport {
                repaired_weaves: vec!["a".into(), "b".into()],
                ..Default::default()
            }
        );
    }

    #[test]
    fn nothing_wanted_leaves_nothing_of_weft() {
        let rec = messy_host();
        let report = reconcile(&rec, &[], &[]).unwrap();
        assert_eq!(report.removed_netns, vec!["weft-a", "weft-old"]);
        assert_eq!(report.removed_routes, vec![r(80, 3), r(81, 1)]);
        assert_eq!(rec.netns(), vec!["other"]);
        assert_eq!(rec.links(None), vec!["eth0"]);
        assert_eq!(rec.tables(None), vec!["filter"]);
    }

    #[test]
    fn failures_are_reported_and_the_rest_is_done() {
        let rec = messy_host();
        // The first mutation (deleting weft-old) fails; the rest goes on.
        rec.fail_nth_mutation(1);
        let report = reconcile(&rec, &[WeavePlan::new("a", 1)], &[r(81, 1)]).unwrap();
        assert_eq!(report.errors.len(), 1, "{report:?}");
        assert!(report.errors[0].contains("injected failure"), "{report:?}");
        assert!(report.removed_netns.is_empty());
        assert_eq!(report.repaired_weaves, vec!["a"]);
        assert_eq!(report.removed_routes, vec![r(80, 3)]);
    }

    #[test]
    fn inconsistent_requests_are_refused() {
        let rec = Recorder::new();
        let twice = [WeavePlan::new("a", 1), WeavePlan::new("a", 2)];
        assert!(reconcile(&rec, &twice, &[]).is_err());
        let same_index = [WeavePlan::new("a", 1), WeavePlan::new("b", 1)];
        assert!(reconcile(&rec, &same_index, &[]).is_err());
        assert!(reconcile(&rec, &[], &[r(80, 1), r(80, 2)]).is_err());
        assert!(rec.calls().is_empty());
    }
}
