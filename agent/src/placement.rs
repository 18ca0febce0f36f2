//! Where an environment's QEMU runs: in the host's namespaces, or, for a weave, in the
//! weave's own network namespace and cgroups. Decided from the catalog (a weave is a
//! catalog row of its own) and weft's naming rules, so the environment manager needs
//! nothing of the weave machinery to launch a weave.

use std::path::PathBuf;

use crate::catalog::Catalog;
use crate::cgroups::Cgroups;

/// Where a QEMU runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// The network namespace file QEMU enters; `None` for the host's.
    pub netns: Option<PathBuf>,
    /// The cgroups QEMU joins (those of them that exist).
    pub cgroups: Vec<PathBuf>,
}

impl Placement {
    /// Whether this is a weave's placement (its own namespace).
    pub fn is_weave(&self) -> bool {
        self.netns.is_some()
    }
}

/// The network namespace file a weave's QEMU runs in.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/weft-{name}"))
}

/// Whether `name` is a weave (its QEMU then runs in its namespace and cgroups).
pub async fn is_weave(catalog: &Catalog, name: &str) -> bool {
    matches!(catalog.weave(name).await, Ok(Some(_)))
}

/// Where environment `name`'s QEMU runs: a weave's namespace and its existing cgroups
/// (as `cgroups` finds them), or the host's namespaces for any other environment.
pub async fn of(catalog: &Catalog, cgroups: &dyn Cgroups, name: &str) -> Placement {
    if !is_weave(catalog, name).await {
        return Placement::default();
    }
    Placement {
        netns: Some(netns_path(name)),
        cgroups: cgroups.dirs(name),
    }
}
