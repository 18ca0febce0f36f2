//! Host ports: exposing an environment's or a weave's guest port, moving and sweeping them.

use super::*;

impl Net {
    /// Publishes guest port `req.guest_port` of environment `env` on a host port: new
    /// connections to it (on any local address) go to the guest, or to the weave that is
    /// active for `env`.
    pub async fn expose(
        &self,
        env: &str,
        req: &ExposeRequest,
        actor: &str,
    ) -> Result<NetSetup, ApiError> {
        let host_port = req.host_port.unwrap_or(req.guest_port);
        check_ports(host_port, req.guest_port)?;
        if let Some(ip) = req.guest_ip {
            check_guest_ip(ip)?;
        }
        self.environment(env).await?;
        let _lock = LOCK.lock().await;
        if let Some((owner, p)) = self.catalog.host_port(host_port).await? {
            return Err(taken(&owner, &p));
        }
        check_free_on_host(host_port)?;
        let target = self.catalog.net_setup(env).await?.active;
        let port = HostPort {
            host_port,
            guest_port: req.guest_port,
            guest_ip: req.guest_ip,
            published: true,
            target: target.unwrap_or_else(|| env.to_string()),
        };
        let route = self.resolve(env, &port).await?;
        let note = format!(
            "expose host port {host_port} -> guest port {}",
            req.guest_port
        );
        self.add_port(env, port, route, note, actor).await?;
        Ok(self.catalog.net_setup(env).await?)
    }

    /// Routes `host_port` to guest port `guest_port` of weave `name` (a port of its
    /// environment that only this weave's branch serves until an activate moves it).
    pub async fn route_weave(
        &self,
        name: &str,
        host_port: u16,
        guest_port: u16,
        actor: &str,
    ) -> Result<NetSetup, ApiError> {
        let weave = self.weave(name).await?;
        check_ports(host_port, guest_port)?;
        let _lock = LOCK.lock().await;
        if let Some((owner, p)) = self.catalog.host_port(host_port).await? {
            let same = owner == weave.parent
                && p.target == name
                && p.guest_port == guest_port
                && !p.published;
            if same {
                return Ok(self.catalog.net_setup(name).await?);
            }
            return Err(taken(&owner, &p));
        }
        check_free_on_host(host_port)?;
        let port = HostPort {
            host_port,
            guest_port,
            guest_ip: None,
            published: false,
            target: name.to_string(),
        };
        let route = Route::to_weave(host_port, weave.net_index, guest_port);
        let note = format!("route host port {host_port} -> weave {name} guest port {guest_port}");
        self.add_port(&weave.parent, port, route, note, actor)
            .await?;
        Ok(self.catalog.net_setup(name).await?)
    }

    /// Records a new port of `env`, routes it, and records the `net` snapshot.
    pub(super) async fn add_port(
        &self,
        env: &str,
        port: HostPort,
        route: Route,
        note: String,
        actor: &str,
    ) -> Result<(), ApiError> {
        let host_port = port.host_port;
        let taps = match route.to {
            Target::Addr(_) => self.taps(env).await?,
            Target::Weave(_) => Vec::new(),
        };
        self.catalog.own_net(&[own_port(host_port)]).await?;
        let routed = self
            .kernel(move |ops| {
                weft_netns::route(ops, &route)?;
                let made = (|| {
                    weft_netns::enable_host_forwarding(ops)?;
                    allow_host_clients(ops, &taps)
                })();
                if made.is_err() {
                    let _ = weft_netns::unroute(ops, route.host_port);
                }
                made
            })
            .await;
        if let Err(e) = routed {
            let _ = self.catalog.disown_net(&[own_port(host_port)]).await;
            return Err(kernel_err(&format!("route host port {host_port}"), e));
        }
        let record = Record { env, actor, note };
        let committed = self
            .catalog
            .commit_net(
                &[Change::AddPort {
                    env: env.to_string(),
                    port,
                }],
                Some(&record),
            )
            .await;
        if let Err(e) = committed {
            let _ = self
                .kernel(move |ops| weft_netns::unroute(ops, host_port))
                .await;
            let _ = self.catalog.disown_net(&[own_port(host_port)]).await;
            return Err(e.into());
        }
        info!(env, host_port, route = %route, "host port routed");
        Ok(())
    }

    /// Removes a host port of environment `env` (published by it, or routed to one of
    /// its weaves).
    pub async fn unexpose(
        &self,
        env: &str,
        host_port: u16,
        actor: &str,
    ) -> Result<NetSetup, ApiError> {
        self.environment(env).await?;
        let _lock = LOCK.lock().await;
        let ports = self.catalog.host_ports(None).await?;
        let Some((_, port)) = ports
            .iter()
            .find(|(owner, p)| owner == env && p.host_port == host_port)
        else {
            let mine: Vec<u16> = ports
                .iter()
                .filter(|(owner, _)| owner == env)
                .map(|(_, p)| p.host_port)
                .collect();
            return Err(ApiError::BadRequest(format!(
                "host port {host_port} is not a port of environment {env} (its host ports: {})",
                ports_text(&mine)
            )));
        };
        let before = self.resolve(env, port).await?;
        self.kernel(move |ops| weft_netns::unroute(ops, host_port))
            .await
            .map_err(|e| kernel_err(&format!("unroute host port {host_port}"), e))?;
        let record = Record {
            env,
            actor,
            note: format!("unexpose host port {host_port}"),
        };
        let committed = self
            .catalog
            .commit_net(&[Change::RemovePort(host_port)], Some(&record))
            .await;
        if let Err(e) = committed {
            let _ = self
                .kernel(move |ops| weft_netns::route(ops, &before))
                .await;
            return Err(e.into());
        }
        self.catalog.disown_net(&[own_port(host_port)]).await?;
        info!(env, host_port, "host port removed");
        Ok(self.catalog.net_setup(env).await?)
    }

    /// Moves ports in the kernel (one transaction) and then in the catalog; if the
    /// catalog write fails, the kernel goes back to `before`.
    pub(super) async fn move_ports(
        &self,
        routes: Vec<Route>,
        before: Vec<Route>,
        extra: impl FnOnce(&dyn NetOps) -> weft_netns::Result<()> + Send + 'static,
        changes: &[Change],
        record: Option<&Record<'_>>,
    ) -> Result<(), ApiError> {
        self.kernel(move |ops| {
            weft_netns::set_routes(ops, &routes)?;
            extra(ops)
        })
        .await
        .map_err(|e| kernel_err("switch host ports", e))?;
        if let Err(e) = self.catalog.commit_net(changes, record).await {
            let _ = self
                .kernel(move |ops| weft_netns::set_routes(ops, &before))
                .await;
            return Err(e.into());
        }
        Ok(())
    }

    /// Removes the routes of owned host ports the catalog no longer has (after an
    /// environment was deleted with its ports).
    pub async fn sweep_ports(&self) -> Result<(), ApiError> {
        let _lock = LOCK.lock().await;
        let wanted: BTreeSet<u16> = self
            .catalog
            .host_ports(None)
            .await?
            .iter()
            .map(|(_, p)| p.host_port)
            .collect();
        let stray: Vec<u16> = self
            .catalog
            .owned_net()
            .await?
            .ports
            .into_iter()
            .filter(|p| !wanted.contains(p))
            .collect();
        for port in stray {
            self.kernel(move |ops| weft_netns::unroute(ops, port))
                .await
                .map_err(|e| kernel_err(&format!("unroute host port {port}"), e))?;
            self.catalog.disown_net(&[own_port(port)]).await?;
        }
        Ok(())
    }
}
