//! Weaves' networks and the active environment: plans, creation and deletion of a weave's namespace, egress, switching traffic.

use super::*;

impl Net {
    /// Makes weave `name` the active branch of its environment: every host port of the
    /// environment (published by it, or routed to any of its weaves) moves to `name` in
    /// one nftables transaction. New connections go to the weave; established ones
    /// finish where they started (conntrack).
    pub async fn activate_weave(
        &self,
        name: &str,
        actor: &str,
    ) -> Result<serde_json::Value, ApiError> {
        let weave = self.weave(name).await?;
        let parent = weave.parent.clone();
        let _lock = LOCK.lock().await;
        let family: Vec<HostPort> = self
            .catalog
            .host_ports(None)
            .await?
            .into_iter()
            .filter(|(owner, _)| *owner == parent)
            .map(|(_, p)| p)
            .collect();
        if family.is_empty() {
            return Err(ApiError::Conflict(format!(
                "no host port leads to {parent:?} or its weaves: publish one with `weft env expose {parent}` or route one with `weft weave route {name}`"
            )));
        }
        let mut before = Vec::new();
        for p in &family {
            before.push(self.resolve(&parent, p).await?);
        }
        let routes: Vec<Route> = family
            .iter()
            .map(|p| Route::to_weave(p.host_port, weave.net_index, p.guest_port))
            .collect();
        let ports: Vec<u16> = family.iter().map(|p| p.host_port).collect();
        let mut changes: Vec<Change> = family
            .iter()
            .map(|p| Change::Retarget {
                port: p.host_port,
                target: name.to_string(),
            })
            .collect();
        changes.push(Change::Active {
            env: parent.clone(),
            active: Some(name.to_string()),
        });
        let record = Record {
            env: &parent,
            actor,
            note: format!("activate weave {name}: host ports {}", ports_text(&ports)),
        };
        self.move_ports(routes, before, |_| Ok(()), &changes, Some(&record))
            .await?;
        info!(weave = name, parent = %parent, ?ports, "weave activated");
        Ok(json!({"weave": name, "env": parent, "ports": ports}))
    }

    /// Makes environment `env` itself active again: the ports it published go back to its
    /// guest (in one nftables transaction); ports routed to a weave only stay there.
    pub async fn activate_env(&self, env: &str, actor: &str) -> Result<NetSetup, ApiError> {
        self.environment(env).await?;
        let _lock = LOCK.lock().await;
        let setup = self.catalog.net_setup(env).await?;
        let published: Vec<HostPort> = setup
            .ports
            .iter()
            .filter(|p| p.published)
            .cloned()
            .collect();
        let mut before = Vec::new();
        let mut routes = Vec::new();
        let mut changes = Vec::new();
        for p in &published {
            before.push(self.resolve(env, p).await?);
            let home = HostPort {
                target: env.to_string(),
                ..p.clone()
            };
            routes.push(self.resolve(env, &home).await?);
            if p.target != env {
                changes.push(Change::Retarget {
                    port: p.host_port,
                    target: env.to_string(),
                });
            }
        }
        let moved = !changes.is_empty() || setup.active.is_some();
        changes.push(Change::Active {
            env: env.to_string(),
            active: None,
        });
        let ports: Vec<u16> = published.iter().map(|p| p.host_port).collect();
        let record = moved.then(|| Record {
            env,
            actor,
            note: format!(
                "activate environment {env}: host ports {}",
                ports_text(&ports)
            ),
        });
        let taps = if routes.is_empty() {
            Vec::new()
        } else {
            self.taps(env).await?
        };
        self.move_ports(
            routes,
            before,
            move |ops| allow_host_clients(ops, &taps),
            &changes,
            record.as_ref(),
        )
        .await?;
        info!(env, ?ports, "environment active again");
        Ok(self.catalog.net_setup(env).await?)
    }

    /// Changes an environment's guest address plan. Its published ports without an
    /// address of their own follow the new guest address at once; weaves keep the plan
    /// they were made with.
    pub async fn set_plan(
        &self,
        env: &str,
        plan: GuestPlan,
        actor: &str,
    ) -> Result<NetSetup, ApiError> {
        weft_netns::check_guest_plan(plan.guest_ip, plan.guest_prefix, plan.gateway)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        self.environment(env).await?;
        let _lock = LOCK.lock().await;
        let setup = self.catalog.net_setup(env).await?;
        let mut before = Vec::new();
        let mut routes = Vec::new();
        for p in setup
            .ports
            .iter()
            .filter(|p| p.target == env && p.guest_ip.is_none())
        {
            before.push(self.resolve(env, p).await?);
            routes.push(Route {
                host_port: p.host_port,
                to: Target::Addr(plan.guest_ip),
                guest_port: p.guest_port,
            });
        }
        let record = Record {
            env,
            actor,
            note: format!(
                "address plan {}/{} via {}",
                plan.guest_ip, plan.guest_prefix, plan.gateway
            ),
        };
        let changes = [Change::Plan {
            env: env.to_string(),
            plan,
        }];
        self.move_ports(routes, before, |_| Ok(()), &changes, Some(&record))
            .await?;
        Ok(self.catalog.net_setup(env).await?)
    }

    /// The guest plan a new weave of `parent` gets: the environment's plan now for a
    /// weave from now, else the plan of its newest `net` snapshot at or before
    /// `taken_at` (the current plan when none is that old).
    pub async fn plan_at(
        &self,
        parent: &str,
        from_now: bool,
        taken_at: &str,
    ) -> Result<GuestPlan, ApiError> {
        if !from_now {
            let filter = SnapshotFilter {
                resource: Some("net".into()),
                until: Some(taken_at.to_string()),
                ..SnapshotFilter::default()
            };
            let newest = self
                .catalog
                .snapshots(parent, &filter)
                .await?
                .into_iter()
                .filter_map(|s| s.net.map(|n| (s.taken_at, s.id, n.plan)))
                .max_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
            if let Some((_, _, plan)) = newest {
                return Ok(plan);
            }
        }
        Ok(self.catalog.net_plan(parent).await?)
    }

    /// Creates the network of a new weave (its rows exist): its namespace, links and
    /// NAT with the guest plan `chosen` (a composition's `net` rule chose it), else the
    /// plan of its instant, and its filter for `egress`; plan and egress are recorded
    /// as the weave's.
    pub async fn create_weave(
        &self,
        weave: &Weave,
        config: &VmConfig,
        chosen: Option<GuestPlan>,
        egress: Egress,
    ) -> Result<(), ApiError> {
        let plan = match chosen {
            Some(plan) => {
                weft_netns::check_guest_plan(plan.guest_ip, plan.guest_prefix, plan.gateway)
                    .map_err(|e| ApiError::BadRequest(format!("the chosen address plan: {e}")))?;
                plan
            }
            None => {
                self.plan_at(&weave.parent, weave.source == "now", &weave.taken_at)
                    .await?
            }
        };
        self.catalog
            .commit_net(
                &[
                    Change::Plan {
                        env: weave.name.clone(),
                        plan,
                    },
                    Change::Egress {
                        env: weave.name.clone(),
                        egress,
                    },
                ],
                None,
            )
            .await?;
        self.catalog
            .own_net(&own_weave(&weave.name, weave.net_index)?)
            .await?;
        let wplan =
            crate::weavenet::weave_plan(&weave.name, weave.net_index, config, &plan, egress);
        self.kernel(move |ops| {
            weft_netns::WeaveNet::create(ops, &wplan)?;
            forwarding_for(ops, egress)
        })
        .await
        .map_err(|e| kernel_err(&format!("network of weave {}", weave.name), e))?;
        info!(weave = %weave.name, plan = %format!("{}/{} via {}", plan.guest_ip, plan.guest_prefix, plan.gateway), egress = egress.as_str(), "weave network created");
        Ok(())
    }

    /// Changes what weave `name`'s guest may open connections to, while it runs or
    /// not: the root filter first (one transaction), then the record and its `net`
    /// snapshot; a failed record puts the old policy back.
    pub async fn set_egress(
        &self,
        name: &str,
        egress: Egress,
        actor: &str,
    ) -> Result<NetSetup, ApiError> {
        let weave = self.weave(name).await?;
        let _lock = LOCK.lock().await;
        let before = self.catalog.net_setup(name).await?.egress;
        let index = weave.net_index;
        self.kernel(move |ops| {
            weft_netns::set_egress(ops, index, crate::weavenet::kernel_egress(&egress))?;
            forwarding_for(ops, egress)
        })
        .await
        .map_err(|e| kernel_err(&format!("egress of weave {name}"), e))?;
        let record = Record {
            env: name,
            actor,
            note: format!("egress {} -> {}", before.as_str(), egress.as_str()),
        };
        let changes = [Change::Egress {
            env: name.to_string(),
            egress,
        }];
        if let Err(e) = self.catalog.commit_net(&changes, Some(&record)).await {
            let back = self
                .kernel(move |ops| {
                    weft_netns::set_egress(ops, index, crate::weavenet::kernel_egress(&before))
                })
                .await;
            if let Err(b) = back {
                warn!(weave = name, error = %b, "cannot put the old egress policy back");
            }
            return Err(e.into());
        }
        info!(
            weave = name,
            egress = egress.as_str(),
            "weave egress changed"
        );
        Ok(self.catalog.net_setup(name).await?)
    }

    /// Removes a weave's network: ports published by its environment that go to it go
    /// back to the environment, ports routed to it alone are removed, then its
    /// namespace, links and every route to it. The catalog is updated even when a
    /// kernel step fails (that step is retried when weftd starts).
    pub async fn delete_weave(&self, name: &str, index: u8, parent: &str) -> Result<(), String> {
        let _lock = LOCK.lock().await;
        let result = self.delete_weave_locked(name, index, parent).await;
        if let Err(e) = &result {
            warn!(weave = name, error = %e, "weave network removed with problems");
        }
        result
    }

    pub(super) async fn delete_weave_locked(
        &self,
        name: &str,
        index: u8,
        parent: &str,
    ) -> Result<(), String> {
        let text = |e: ApiError| e.one_line();
        let family: Vec<HostPort> = self
            .catalog
            .host_ports(None)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|(owner, p)| owner == parent && p.target == name)
            .map(|(_, p)| p)
            .collect();
        let mut changes = Vec::new();
        let mut back = Vec::new();
        let mut removed = Vec::new();
        for p in &family {
            if p.published {
                let home = HostPort {
                    target: parent.to_string(),
                    ..p.clone()
                };
                back.push(self.resolve(parent, &home).await.map_err(text)?);
                changes.push(Change::Retarget {
                    port: p.host_port,
                    target: parent.to_string(),
                });
            } else {
                removed.push(p.host_port);
                changes.push(Change::RemovePort(p.host_port));
            }
        }
        let setup = self
            .catalog
            .net_setup(parent)
            .await
            .map_err(|e| e.to_string())?;
        if setup.active.as_deref() == Some(name) {
            changes.push(Change::Active {
                env: parent.to_string(),
                active: None,
            });
        }
        let taps = if back.is_empty() {
            Vec::new()
        } else {
            self.taps(parent).await.map_err(text)?
        };
        let owned_name = name.to_string();
        let kernel = self
            .kernel(move |ops| {
                let moved =
                    weft_netns::set_routes(ops, &back).and_then(|_| allow_host_clients(ops, &taps));
                let deleted = weft_netns::WeaveNet::delete(ops, &owned_name, index);
                moved.and(deleted)
            })
            .await;
        let record = (!changes.is_empty()).then(|| Record {
            env: parent,
            actor: "weftd",
            note: format!(
                "weave {name} deleted: its host ports go back to {parent} or are removed ({})",
                ports_text(&family.iter().map(|p| p.host_port).collect::<Vec<_>>())
            ),
        });
        if !changes.is_empty() {
            self.catalog
                .commit_net(&changes, record.as_ref())
                .await
                .map_err(|e| e.to_string())?;
        }
        kernel.map_err(|e| ErrorChain(&e).to_string())?;
        let mut gone: Vec<(&str, String)> = own_weave(name, index).map_err(text)?.into();
        gone.extend(removed.into_iter().map(own_port));
        self.catalog
            .disown_net(&gone)
            .await
            .map_err(|e| e.to_string())
    }

    /// After an environment's QEMU started (and re-created its tap): host-local clients
    /// of its published ports may leave through the tap again.
    pub async fn after_env_start(&self, env: &str) {
        if !matches!(self.catalog.weave(env).await, Ok(None)) {
            return;
        }
        let leads_home = match self.catalog.net_setup(env).await {
            Ok(s) => s.ports.iter().any(|p| p.target == env),
            Err(_) => false,
        };
        if !leads_home {
            return;
        }
        let Ok(taps) = self.taps(env).await else {
            return;
        };
        if let Err(e) = self.kernel(move |ops| allow_host_clients(ops, &taps)).await {
            warn!(env, error = %e, "cannot let host-local clients reach the environment's published ports");
        }
    }
}
