//! The host's side effects as weftd's logic reaches them: built once, by the daemon
//! (the real kernel) or by a test (a recording double such as `weft_netns::Recorder`),
//! and handed down. No module builds its own kernel handle.
//!
//! Today it carries the network (netlink and nftables through `weft_netns::NetOps`).
//! cgroups (`crate::cgroups`) and helper processes (`weft_qmp::process`) are still
//! reached directly.

use std::sync::Arc;

use weft_netns::{Kernel, NetOps};

use crate::catalog::Catalog;
use crate::net::Net;

/// The host weftd changes.
#[derive(Clone)]
pub struct Host {
    net: Arc<dyn NetOps>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").finish_non_exhaustive()
    }
}

impl Host {
    /// The real host: the kernel's netlink and nftables.
    pub fn kernel() -> Host {
        Host::with_net(Arc::new(Kernel::new()))
    }

    /// A host whose network is `net` (a test double in unit tests).
    pub fn with_net(net: Arc<dyn NetOps>) -> Host {
        Host { net }
    }

    /// The `net` resource over `catalog`, on this host's network.
    pub fn net(&self, catalog: &Catalog) -> Net {
        Net::with_ops(catalog, self.net.clone())
    }
}
