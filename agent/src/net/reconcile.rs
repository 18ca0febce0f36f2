//! Bringing the kernel's network state in step with the catalog after a restart.

use super::*;

impl Net {
    /// Brings the kernel in line with the catalog when weftd starts: every weave's
    /// namespace, links and NAT are repaired or re-created with its plan, every host
    /// port is routed where the catalog says, and what this weftd owns but no longer
    /// wants (namespaces, host links, route chains) is removed. Nothing owned by others
    /// is touched. Failures are logged and audited; they do not stop weftd.
    pub async fn reconcile(&self) -> Reconciled {
        let _lock = LOCK.lock().await;
        match self.reconcile_locked().await {
            Ok(report) => Reconciled {
                report: Some(report),
                failure: None,
            },
            Err(e) => {
                let e = e.one_line();
                warn!(error = %e, "cannot reconcile the network with the catalog");
                let _ = self
                    .catalog
                    .audit("weftd", "net.reconcile", None, Some(&e), "failed")
                    .await;
                Reconciled {
                    report: None,
                    failure: Some(e),
                }
            }
        }
    }

    pub(super) async fn reconcile_locked(&self) -> Result<ReconcileReport, ApiError> {
        let mut plans = Vec::new();
        let mut any_egress = false;
        let mut own = Vec::new();
        for w in self.catalog.weaves(None).await? {
            let Some(config) = self
                .catalog
                .environment(&w.name)
                .await?
                .and_then(|e| e.config)
            else {
                continue;
            };
            let plan = self.catalog.net_plan(&w.name).await?;
            let egress = self.catalog.net_setup(&w.name).await?.egress;
            any_egress |= egress != Egress::None;
            plans.push(crate::weavenet::weave_plan(
                &w.name,
                w.net_index,
                &config,
                &plan,
                egress,
            ));
            own.extend(own_weave(&w.name, w.net_index)?);
        }
        let mut routes = Vec::new();
        let mut problems = Vec::new();
        let mut home_taps = Vec::new();
        for (env, p) in self.catalog.host_ports(None).await? {
            own.push(own_port(p.host_port));
            match self.resolve(&env, &p).await {
                Ok(r) => {
                    if matches!(r.to, Target::Addr(_)) {
                        home_taps.extend(self.taps(&env).await?);
                    }
                    routes.push(r);
                }
                Err(e) => problems.push(e.one_line()),
            }
        }
        // Whatever the catalog wants is ours, also when an older weftd made it.
        self.catalog.own_net(&own).await?;
        let owned = self.catalog.owned_net().await?;
        if plans.is_empty() && routes.is_empty() && owned == Owned::default() {
            // Nothing of this weftd's in the kernel: nothing to look at.
            return Ok(ReconcileReport {
                errors: problems,
                ..ReconcileReport::default()
            });
        }
        let wanted_routes = routes.clone();
        let owned_k = owned.clone();
        let (mut report, present) = self
            .kernel(move |ops| {
                let mut report = weft_netns::reconcile(ops, &owned_k, &plans, &wanted_routes)?;
                let forwarding = if wanted_routes.is_empty() && !any_egress {
                    Ok(())
                } else {
                    weft_netns::enable_host_forwarding(ops)
                };
                for e in [forwarding, allow_host_clients(ops, &home_taps)]
                    .into_iter()
                    .filter_map(Result::err)
                {
                    report.errors.push(ErrorChain(&e).to_string());
                }
                let present = (
                    ops.list_netns()?,
                    ops.list_links(None)?,
                    weft_netns::list_routes(ops)?,
                );
                Ok((report, present))
            })
            .await
            .map_err(|e| kernel_err("reconcile the network", e))?;
        report.errors.extend(problems);
        // Forget what is gone and no longer wanted; keep what could not be removed.
        let (netns, links, present_routes) = present;
        let wanted_ports: BTreeSet<u16> = routes.iter().map(|r| r.host_port).collect();
        let wanted_ns: BTreeSet<String> = own
            .iter()
            .filter(|(k, _)| *k == OWN_NETNS)
            .map(|(_, n)| n.clone())
            .collect();
        let wanted_idx: BTreeSet<String> = own
            .iter()
            .filter(|(k, _)| *k == OWN_INDEX)
            .map(|(_, n)| n.clone())
            .collect();
        let mut gone = Vec::new();
        for ns in &owned.netns {
            if !wanted_ns.contains(ns) && !netns.contains(ns) {
                gone.push((OWN_NETNS, ns.clone()));
            }
        }
        for i in &owned.indices {
            let link = format!("{}{i}", weft_netns::LINK_PREFIX);
            if !wanted_idx.contains(&i.to_string()) && !links.contains(&link) {
                gone.push((OWN_INDEX, i.to_string()));
            }
        }
        for p in &owned.ports {
            if !wanted_ports.contains(p) && !present_routes.iter().any(|r| r.host_port == *p) {
                gone.push(own_port(*p));
            }
        }
        self.catalog.disown_net(&gone).await?;
        let summary = format!(
            "removed namespaces [{}], links [{}], routes [{}]; created weaves [{}]; added routes [{}]; errors [{}]",
            report.removed_netns.join(", "),
            report.removed_links.join(", "),
            report.removed_routes.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
            report.created_weaves.join(", "),
            report.added_routes.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
            report.errors.join("; "),
        );
        if report.changed() || !report.errors.is_empty() {
            info!(%summary, "network reconciled with the catalog");
            let result = if report.errors.is_empty() {
                "ok"
            } else {
                "failed"
            };
            self.catalog
                .audit("weftd", "net.reconcile", None, Some(&summary), result)
                .await?;
        }
        Ok(report)
    }
}
