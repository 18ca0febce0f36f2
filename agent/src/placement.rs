//! Where an environment's QEMU runs: in the host's namespaces, or, for a weave, in the
//! weave's own network namespace and cgroups. The placement is stored with the
//! environment when it is made (table `env_placement`, written in the same transaction
//! as a weave's rows), so the environment manager reads it back at each launch and needs
//! nothing of the weave machinery to launch a weave.

use std::path::PathBuf;

use sqlx::{Row, Sqlite, Transaction};

use crate::catalog::{Catalog, CatalogError};
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

/// A placement as the catalog stores it (table `env_placement`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// The network namespace file; `None` for the host's.
    pub netns: Option<String>,
    /// The name of its cgroups (see [`Cgroups`]); `None` for none of its own.
    pub cgroup: Option<String>,
}

impl Stored {
    /// A weave's: its own namespace and cgroups, named after it.
    pub fn weave(name: &str) -> Stored {
        Stored {
            netns: Some(netns_path(name).to_string_lossy().into_owned()),
            cgroup: Some(name.to_string()),
        }
    }
}

/// Records `env`'s placement inside a transaction that creates it.
pub async fn insert_in(
    tx: &mut Transaction<'_, Sqlite>,
    env: &str,
    stored: &Stored,
) -> Result<(), CatalogError> {
    sqlx::query("INSERT INTO env_placement (env, netns, cgroup) VALUES (?, ?, ?)")
        .bind(env)
        .bind(&stored.netns)
        .bind(&stored.cgroup)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

impl Catalog {
    /// `env`'s stored placement; `None` when it has none (the host's namespaces).
    pub async fn placement(&self, env: &str) -> Result<Option<Stored>, CatalogError> {
        let row = sqlx::query("SELECT netns, cgroup FROM env_placement WHERE env = ?")
            .bind(env)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| Stored {
            netns: r.get("netns"),
            cgroup: r.get("cgroup"),
        }))
    }
}

/// Where environment `name`'s QEMU runs: the stored namespace and the cgroups of the
/// stored name that exist (as `cgroups` finds them), or the host's namespaces for an
/// environment without a stored placement.
pub async fn of(
    catalog: &Catalog,
    cgroups: &dyn Cgroups,
    name: &str,
) -> Result<Placement, CatalogError> {
    let Some(stored) = catalog.placement(name).await? else {
        return Ok(Placement::default());
    };
    Ok(Placement {
        netns: stored.netns.map(PathBuf::from),
        cgroups: stored.cgroup.map(|g| cgroups.dirs(&g)).unwrap_or_default(),
    })
}
