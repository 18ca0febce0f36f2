//! The weaves' DHCP servers ([`weft_netns::dhcp`]) fed with what weftd knows of each
//! weave: its guest plan (from the catalog, see [`crate::net`]), its namespace
//! ([`crate::placement::netns_path`]) and its guest's tap (its VM's first NIC's).
//!
//! The servers themselves are reached through the [`Dhcp`] trait, built once with the
//! rest of the host ([`crate::host::Host`]): [`Threads`] runs them (a thread in each
//! weave's namespace); [`Recorder`] is the test double.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

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

/// Weaves' DHCP servers, by weave name. Calls block: call them off the runtime.
pub trait Dhcp: Send + Sync + std::fmt::Debug {
    /// Serves `lease` on `tap` in the network namespace bound at `netns` (which must
    /// exist) as the server of `weave`; one that runs already is kept. Returns once the
    /// socket is bound, or why it could not be.
    fn start(&self, weave: &str, netns: &Path, tap: &str, lease: Lease) -> weft_netns::Result<()>;
    /// Stops the server of `weave` (if any) and waits until it has left the namespace.
    fn stop(&self, weave: &str);
}

/// The real servers: a thread in each weave's namespace ([`weft_netns::dhcp::Servers`]).
#[derive(Default)]
pub struct Threads(weft_netns::dhcp::Servers);

impl std::fmt::Debug for Threads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Threads").finish_non_exhaustive()
    }
}

impl Dhcp for Threads {
    fn start(&self, weave: &str, netns: &Path, tap: &str, lease: Lease) -> weft_netns::Result<()> {
        self.0.start(weave, netns, tap, lease)
    }

    fn stop(&self, weave: &str) {
        self.0.stop(weave)
    }
}

/// One call a [`Recorder`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// [`Dhcp::start`]: weave, namespace file, tap, lease.
    Start(String, PathBuf, String, Lease),
    /// [`Dhcp::stop`]
    Stop(String),
}

#[derive(Debug, Default)]
struct RecorderState {
    calls: Vec<Call>,
    running: BTreeMap<String, Lease>,
    fail_next_start: bool,
}

/// A recording [`Dhcp`] double for unit tests: records every call, models which
/// servers run, binds nothing, and fails the next start when told to.
#[derive(Debug, Default)]
pub struct Recorder {
    state: Mutex<RecorderState>,
}

impl Recorder {
    /// No servers.
    pub fn new() -> Recorder {
        Recorder::default()
    }

    fn lock(&self) -> MutexGuard<'_, RecorderState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the next start fail (EIO).
    pub fn fail_next_start(&self) {
        self.lock().fail_next_start = true;
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The weaves whose servers run.
    pub fn running(&self) -> Vec<String> {
        self.lock().running.keys().cloned().collect()
    }
}

impl Dhcp for Recorder {
    fn start(&self, weave: &str, netns: &Path, tap: &str, lease: Lease) -> weft_netns::Result<()> {
        let mut st = self.lock();
        st.calls.push(Call::Start(
            weave.to_string(),
            netns.to_path_buf(),
            tap.to_string(),
            lease,
        ));
        if std::mem::take(&mut st.fail_next_start) {
            return Err(weft_netns::Error::Os {
                op: format!("bind the DHCP socket of weave {weave}"),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        st.running.entry(weave.to_string()).or_insert(lease);
        Ok(())
    }

    fn stop(&self, weave: &str) {
        let mut st = self.lock();
        st.calls.push(Call::Stop(weave.to_string()));
        st.running.remove(weave);
    }
}

/// The DHCP servers of the weaves, fed from the catalog.
#[derive(Debug)]
pub struct Servers {
    inner: Arc<dyn Dhcp>,
}

impl Servers {
    /// Servers started through `inner` (the host's).
    pub fn new(inner: Arc<dyn Dhcp>) -> Arc<Servers> {
        Arc::new(Servers { inner })
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
