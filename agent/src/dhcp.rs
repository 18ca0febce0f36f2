//! The weaves' DHCP servers ([`weft_netns::dhcp`]) fed with what weftd knows of each
//! weave: its guest plan (from the catalog, see [`crate::net`]), its namespace
//! ([`crate::placement::netns_path`]) and its guest's tap (its VM's first NIC's).

use std::sync::Arc;

use weft_netns::dhcp::Lease;
use weft_qmp::launch::VmConfig;

use crate::catalog::Catalog;
use crate::error::error_chain;
use crate::model::GuestPlan;

/// The lease of a guest plan.
pub fn lease(plan: &GuestPlan) -> Lease {
    Lease::new(plan.guest_ip, plan.guest_prefix, plan.gateway)
}

/// The tap a weave's guest is on: its first NIC's (as [`crate::weavenet::create`]
/// makes it); none when the VM has no NIC.
pub fn guest_tap(config: &VmConfig) -> Option<String> {
    config.nics.first().map(|n| n.tap.clone())
}

/// The DHCP servers of the weaves, one thread each, by weave name.
#[derive(Default)]
pub struct Servers {
    inner: Arc<weft_netns::dhcp::Servers>,
}

impl Servers {
    /// No servers yet.
    pub fn new() -> Arc<Servers> {
        Arc::new(Servers::default())
    }

    /// Serves the guest plan `catalog` records for `weave` to its guest, described by
    /// `config` (on its first NIC's tap); nothing to do for a VM without a NIC.
    pub async fn start_for(
        &self,
        catalog: &Catalog,
        weave: &str,
        config: &VmConfig,
    ) -> Result<(), String> {
        let Some(tap) = guest_tap(config) else {
            return Ok(());
        };
        let plan = catalog
            .net_plan(weave)
            .await
            .map_err(|e| format!("guest plan of weave {weave}: {e}"))?;
        self.start(weave, &tap, lease(&plan)).await
    }

    /// Starts serving `lease` on `tap` in the namespace of `weave` (which must exist).
    /// A server of `weave` that runs already is kept. Returns once the socket is
    /// bound, or why it could not be.
    async fn start(&self, weave: &str, tap: &str, lease: Lease) -> Result<(), String> {
        let inner = Arc::clone(&self.inner);
        let (weave, tap) = (weave.to_string(), tap.to_string());
        let netns = crate::placement::netns_path(&weave);
        match tokio::task::spawn_blocking(move || inner.start(&weave, &netns, &tap, lease)).await {
            Ok(r) => r.map_err(|e| error_chain(&e)),
            Err(e) => Err(format!("dhcp task failed: {e}")),
        }
    }

    /// Stops the server of `weave` (if any) and waits until its thread has left the
    /// namespace, so the namespace can go.
    pub async fn stop(&self, weave: &str) {
        let inner = Arc::clone(&self.inner);
        let weave = weave.to_string();
        if let Err(e) = tokio::task::spawn_blocking(move || inner.stop(&weave)).await {
            tracing::warn!(error = %e, "the DHCP stop task failed");
        }
    }
}
