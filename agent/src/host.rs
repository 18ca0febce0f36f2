//! The host's side effects as weftd's logic reaches them: built once, by the daemon
//! ([`Host::kernel`]) or by a test (recording doubles), and handed down. No module
//! builds its own kernel handle.
//!
//! It carries
//! - the network: netlink and nftables through `weft_netns::NetOps` (double:
//!   `weft_netns::Recorder`);
//! - the weaves' cgroups through [`Cgroups`] (double: [`crate::cgroups::Recorder`]).

use std::sync::Arc;

use weft_netns::{Kernel, NetOps};

use crate::catalog::Catalog;
use crate::cgroups::Cgroups;
use crate::net::Net;

/// The host weftd changes.
#[derive(Clone)]
pub struct Host {
    net: Arc<dyn NetOps>,
    cgroups: Arc<dyn Cgroups>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").finish_non_exhaustive()
    }
}

impl Host {
    /// The real host: the kernel's netlink and nftables, `/sys/fs/cgroup`.
    pub fn kernel() -> Host {
        Host {
            net: Arc::new(Kernel::new()),
            cgroups: Arc::new(crate::cgroups::Kernel),
        }
    }

    /// A host whose network is `net` and whose cgroups are `cgroups` (test doubles in
    /// unit tests).
    pub fn new(net: Arc<dyn NetOps>, cgroups: Arc<dyn Cgroups>) -> Host {
        Host { net, cgroups }
    }

    /// The `net` resource over `catalog`, on this host's network.
    pub fn net(&self, catalog: &Catalog) -> Net {
        Net::with_ops(catalog, self.net.clone())
    }

    /// The weaves' cgroups.
    pub fn cgroups(&self) -> &Arc<dyn Cgroups> {
        &self.cgroups
    }
}
