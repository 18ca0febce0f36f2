//! The `net` resource of environments (F7, F8): each environment's guest address plan,
//! the host ports it publishes (`weft env expose`) or routes to its weaves (`weft weave
//! route`), which of its branches those ports lead to (`activate`), the `net` snapshots
//! recorded whenever any of that changes, and bringing the kernel in line with the
//! catalog when weftd starts.
//!
//! An environment runs in the root network namespace on the operator's tap: its
//! published ports are DNATed straight to its guest's address (the plan's, or one given
//! per port). A weave's ports go through its namespace ([`weft_netns::Target::Weave`]).
//! Activating a weave moves every port of the environment to it in one nftables
//! transaction; activating the environment moves its published ports back.
//!
//! The catalog is the record. Kernel changes come first, and the catalog change (with
//! its `net` snapshot) is committed only if they succeeded; a failed catalog write puts
//! the kernel back. Every kernel object weftd may create is recorded in `net_owned`
//! before it is made and forgotten after it is removed, so that [`Net::reconcile`]
//! removes strays this weftd owns and nothing of anyone else's (several weftds with
//! their own catalogs may share a host).

mod ports;
mod reconcile;
mod weave_links;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::json;
use sqlx::{Row, SqliteConnection};
use tracing::{info, warn};
use weft_netns::{NetOps, Owned, ReconcileReport, Route, Target};
use weft_qmp::launch::VmConfig;

use crate::catalog::{now, Catalog, CatalogError};
use crate::catalog_snapshots::SnapshotFilter;
use crate::error::{one_line, ApiError};
use crate::model::{Egress, ExposeRequest, GuestPlan, HostPort, NetSetup, SnapshotKind};
use weft_api::weave::Weave;

/// Category of the `net` snapshots weft records when the network setup changes.
pub const CHANGE_CATEGORY: &str = "network change";

/// One network change at a time in this weftd: each reads the catalog and the kernel,
/// then changes both.
static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn corrupt(name: &str, reason: String) -> CatalogError {
    CatalogError::Corrupt {
        name: name.to_string(),
        reason,
    }
}

fn parse_ip(text: &str, row: &str) -> Result<Ipv4Addr, CatalogError> {
    text.parse()
        .map_err(|_| corrupt(row, format!("address {text:?}")))
}

fn port_of(v: i64, row: &str) -> Result<u16, CatalogError> {
    u16::try_from(v).map_err(|_| corrupt(row, format!("port {v}")))
}

async fn plan_in(conn: &mut SqliteConnection, env: &str) -> Result<GuestPlan, CatalogError> {
    let row = sqlx::query("SELECT guest_ip, guest_prefix, gateway FROM env_net WHERE env = ?")
        .bind(env)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(r) = row else {
        return Ok(GuestPlan::default());
    };
    let what = format!("net plan of {env}");
    let prefix: i64 = r.try_get("guest_prefix")?;
    Ok(GuestPlan {
        guest_ip: parse_ip(&r.try_get::<String, _>("guest_ip")?, &what)?,
        guest_prefix: u8::try_from(prefix)
            .map_err(|_| corrupt(&what, format!("prefix {prefix}")))?,
        gateway: parse_ip(&r.try_get::<String, _>("gateway")?, &what)?,
    })
}

async fn egress_in(conn: &mut SqliteConnection, env: &str) -> Result<Egress, CatalogError> {
    let row = sqlx::query("SELECT egress FROM env_net WHERE env = ?")
        .bind(env)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(r) = row else {
        return Ok(Egress::default());
    };
    let text: String = r.try_get("egress")?;
    text.parse()
        .map_err(|e: String| corrupt(&format!("net of {env}"), e))
}

async fn active_in(conn: &mut SqliteConnection, env: &str) -> Result<Option<String>, CatalogError> {
    let row = sqlx::query("SELECT active FROM env_net WHERE env = ?")
        .bind(env)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        Some(r) => r.try_get("active")?,
        None => None,
    })
}

/// Host ports with the environment they belong to: those of (or going to) `env`, or all.
async fn ports_in(
    conn: &mut SqliteConnection,
    env: Option<&str>,
) -> Result<Vec<(String, HostPort)>, CatalogError> {
    let sql = "SELECT host_port, env, guest_port, guest_ip, published, target FROM host_ports";
    let rows = match env {
        Some(e) => {
            sqlx::query(&format!(
                "{sql} WHERE env = ? OR target = ? ORDER BY host_port"
            ))
            .bind(e)
            .bind(e)
            .fetch_all(&mut *conn)
            .await?
        }
        None => {
            sqlx::query(&format!("{sql} ORDER BY host_port"))
                .fetch_all(&mut *conn)
                .await?
        }
    };
    rows.iter()
        .map(|r| {
            let host_port = r.try_get::<i64, _>("host_port")?;
            let what = format!("host port {host_port}");
            let guest_ip: Option<String> = r.try_get("guest_ip")?;
            Ok((
                r.try_get("env")?,
                HostPort {
                    host_port: port_of(host_port, &what)?,
                    guest_port: port_of(r.try_get("guest_port")?, &what)?,
                    guest_ip: guest_ip.map(|t| parse_ip(&t, &what)).transpose()?,
                    published: r.try_get::<i64, _>("published")? != 0,
                    target: r.try_get("target")?,
                },
            ))
        })
        .collect()
}

async fn setup_in(conn: &mut SqliteConnection, env: &str) -> Result<NetSetup, CatalogError> {
    Ok(NetSetup {
        env: env.to_string(),
        plan: plan_in(conn, env).await?,
        active: active_in(conn, env).await?,
        ports: ports_in(conn, Some(env))
            .await?
            .into_iter()
            .map(|(_, p)| p)
            .collect(),
        egress: egress_in(conn, env).await?,
    })
}

async fn insert_snapshot_in(
    conn: &mut SqliteConnection,
    setup: &NetSetup,
    actor: &str,
    category: Option<&str>,
    note: Option<&str>,
    taken_at: &str,
) -> Result<i64, CatalogError> {
    let net = serde_json::to_string(setup).map_err(|e| corrupt(&setup.env, e.to_string()))?;
    Ok(sqlx::query(
        "INSERT INTO snapshots (env, resource, state, kind, taken_at, finished_at, actor, category, note, net)
         VALUES (?, 'net', 'complete', ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&setup.env)
    .bind(SnapshotKind::Net.as_str())
    .bind(taken_at)
    .bind(now())
    .bind(actor)
    .bind(category)
    .bind(note)
    .bind(net)
    .execute(&mut *conn)
    .await?
    .last_insert_rowid())
}

/// One change of the network records, applied with others in one transaction.
#[derive(Debug, Clone)]
pub(super) enum Change {
    AddPort { env: String, port: HostPort },
    RemovePort(u16),
    Retarget { port: u16, target: String },
    Active { env: String, active: Option<String> },
    Plan { env: String, plan: GuestPlan },
    Egress { env: String, egress: Egress },
}

/// The `net` snapshot a change records: of which environment, by whom, saying what.
pub(super) struct Record<'a> {
    env: &'a str,
    actor: &'a str,
    note: String,
}

/// Kinds of owned kernel objects (see the `net_owned` table).
const OWN_NETNS: &str = "netns";
const OWN_INDEX: &str = "index";
const OWN_PORT: &str = "port";

impl Catalog {
    /// An environment's guest address plan (the default when none is recorded).
    pub async fn net_plan(&self, env: &str) -> Result<GuestPlan, CatalogError> {
        plan_in(&mut *self.pool.acquire().await?, env).await
    }

    /// An environment's (or weave's) network setup now.
    pub async fn net_setup(&self, env: &str) -> Result<NetSetup, CatalogError> {
        setup_in(&mut *self.pool.acquire().await?, env).await
    }

    /// Records a `net` snapshot of `setup` (part of `weft snapshot create ENV
    /// --resource net|all`); returns its id.
    pub async fn insert_net_snapshot(
        &self,
        setup: &NetSetup,
        actor: &str,
        category: Option<&str>,
        note: Option<&str>,
        taken_at: &str,
    ) -> Result<i64, CatalogError> {
        let mut conn = self.pool.acquire().await?;
        insert_snapshot_in(&mut conn, setup, actor, category, note, taken_at).await
    }

    pub(super) async fn host_ports(
        &self,
        env: Option<&str>,
    ) -> Result<Vec<(String, HostPort)>, CatalogError> {
        ports_in(&mut *self.pool.acquire().await?, env).await
    }

    pub(super) async fn host_port(
        &self,
        port: u16,
    ) -> Result<Option<(String, HostPort)>, CatalogError> {
        Ok(self
            .host_ports(None)
            .await?
            .into_iter()
            .find(|(_, p)| p.host_port == port))
    }

    /// Applies `changes` and records the `net` snapshot in one transaction.
    pub(super) async fn commit_net(
        &self,
        changes: &[Change],
        record: Option<&Record<'_>>,
    ) -> Result<(), CatalogError> {
        let mut tx = self.pool.begin().await?;
        for change in changes {
            match change {
                Change::AddPort { env, port } => {
                    sqlx::query(
                        "INSERT INTO host_ports (host_port, env, guest_port, guest_ip, published, target, created_at)
                         VALUES (?, ?, ?, ?, ?, ?, ?)",
                    )
                    .bind(i64::from(port.host_port))
                    .bind(env)
                    .bind(i64::from(port.guest_port))
                    .bind(port.guest_ip.map(|ip| ip.to_string()))
                    .bind(i64::from(port.published))
                    .bind(&port.target)
                    .bind(now())
                    .execute(&mut *tx)
                    .await?;
                }
                Change::RemovePort(port) => {
                    sqlx::query("DELETE FROM host_ports WHERE host_port = ?")
                        .bind(i64::from(*port))
                        .execute(&mut *tx)
                        .await?;
                }
                Change::Retarget { port, target } => {
                    sqlx::query("UPDATE host_ports SET target = ? WHERE host_port = ?")
                        .bind(target)
                        .bind(i64::from(*port))
                        .execute(&mut *tx)
                        .await?;
                }
                Change::Active { env, active } => {
                    let d = GuestPlan::default();
                    sqlx::query(
                        "INSERT INTO env_net (env, guest_ip, guest_prefix, gateway, active) VALUES (?, ?, ?, ?, ?)
                         ON CONFLICT (env) DO UPDATE SET active = excluded.active",
                    )
                    .bind(env)
                    .bind(d.guest_ip.to_string())
                    .bind(i64::from(d.guest_prefix))
                    .bind(d.gateway.to_string())
                    .bind(active)
                    .execute(&mut *tx)
                    .await?;
                }
                Change::Plan { env, plan } => {
                    sqlx::query(
                        "INSERT INTO env_net (env, guest_ip, guest_prefix, gateway, active) VALUES (?, ?, ?, ?, NULL)
                         ON CONFLICT (env) DO UPDATE SET guest_ip = excluded.guest_ip,
                           guest_prefix = excluded.guest_prefix, gateway = excluded.gateway",
                    )
                    .bind(env)
                    .bind(plan.guest_ip.to_string())
                    .bind(i64::from(plan.guest_prefix))
                    .bind(plan.gateway.to_string())
                    .execute(&mut *tx)
                    .await?;
                }
                Change::Egress { env, egress } => {
                    let d = GuestPlan::default();
                    sqlx::query(
                        "INSERT INTO env_net (env, guest_ip, guest_prefix, gateway, active, egress) VALUES (?, ?, ?, ?, NULL, ?)
                         ON CONFLICT (env) DO UPDATE SET egress = excluded.egress",
                    )
                    .bind(env)
                    .bind(d.guest_ip.to_string())
                    .bind(i64::from(d.guest_prefix))
                    .bind(d.gateway.to_string())
                    .bind(egress.as_str())
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        if let Some(r) = record {
            let setup = setup_in(&mut tx, r.env).await?;
            insert_snapshot_in(
                &mut tx,
                &setup,
                r.actor,
                Some(CHANGE_CATEGORY),
                Some(&r.note),
                &now(),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// What this weftd may have made in the kernel.
    pub async fn owned_net(&self) -> Result<Owned, CatalogError> {
        let rows = sqlx::query("SELECT kind, name FROM net_owned")
            .fetch_all(&self.pool)
            .await?;
        let mut owned = Owned::default();
        for r in rows {
            let (kind, name): (String, String) = (r.try_get("kind")?, r.try_get("name")?);
            let bad = || corrupt("net_owned", format!("{kind} {name:?}"));
            match kind.as_str() {
                OWN_NETNS => {
                    owned.netns.insert(name);
                }
                OWN_INDEX => {
                    owned.indices.insert(name.parse().map_err(|_| bad())?);
                }
                OWN_PORT => {
                    owned.ports.insert(name.parse().map_err(|_| bad())?);
                }
                _ => return Err(bad()),
            }
        }
        Ok(owned)
    }

    /// The taps `env`'s QEMU made (table `env_taps`).
    pub(super) async fn env_taps(&self, env: &str) -> Result<BTreeSet<String>, CatalogError> {
        let rows = sqlx::query("SELECT name FROM env_taps WHERE env = ?")
            .bind(env)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("name")?)).collect()
    }

    /// Records which of `env`'s taps its QEMU makes (`ours`) and forgets any record of
    /// the others (they exist already: someone else's), in one transaction.
    pub(super) async fn set_env_taps(
        &self,
        env: &str,
        ours: &[&String],
        theirs: &[&String],
    ) -> Result<(), CatalogError> {
        let mut tx = self.pool.begin().await?;
        for t in theirs {
            sqlx::query("DELETE FROM env_taps WHERE name = ?")
                .bind(t.as_str())
                .execute(&mut *tx)
                .await?;
        }
        for t in ours {
            sqlx::query("INSERT OR REPLACE INTO env_taps (name, env) VALUES (?, ?)")
                .bind(t.as_str())
                .bind(env)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn own_net(&self, items: &[(&str, String)]) -> Result<(), CatalogError> {
        let mut tx = self.pool.begin().await?;
        for (kind, name) in items {
            sqlx::query("INSERT OR IGNORE INTO net_owned (kind, name) VALUES (?, ?)")
                .bind(kind)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn disown_net(&self, items: &[(&str, String)]) -> Result<(), CatalogError> {
        let mut tx = self.pool.begin().await?;
        for (kind, name) in items {
            sqlx::query("DELETE FROM net_owned WHERE kind = ? AND name = ?")
                .bind(kind)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

fn own_port(port: u16) -> (&'static str, String) {
    (OWN_PORT, port.to_string())
}

fn own_weave(name: &str, index: u8) -> Result<[(&'static str, String); 2], ApiError> {
    let netns =
        weft_netns::namespace_name(name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok([(OWN_NETNS, netns), (OWN_INDEX, index.to_string())])
}

/// Checks host and guest ports.
fn check_ports(host_port: u16, guest_port: u16) -> Result<(), ApiError> {
    if host_port == 0 || guest_port == 0 {
        return Err(ApiError::BadRequest(
            "ports must be 1-65535 (--host-port, --guest-port)".into(),
        ));
    }
    Ok(())
}

/// An address a published port may lead to.
fn check_guest_ip(ip: Ipv4Addr) -> Result<(), ApiError> {
    let reserved = ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_loopback()
        || weft_netns::LINK_NET.contains(ip);
    if reserved {
        return Err(ApiError::BadRequest(format!(
            "--guest-ip {ip} cannot be a guest address (unspecified, broadcast, multicast, loopback or weft's own {})",
            weft_netns::LINK_NET
        )));
    }
    Ok(())
}

/// Refuses a host port a process on the host listens on: the DNAT would hide it.
fn check_free_on_host(port: u16) -> Result<(), ApiError> {
    match std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(ApiError::Conflict(format!(
            "host port {port} is in use by a process on the host; pick another --host-port"
        ))),
        // Anything else (e.g. a privileged port for an unprivileged test) is not a user error here.
        Err(_) => Ok(()),
    }
}

/// Says who has a host port, and how to free it.
fn taken(owner: &str, p: &HostPort) -> ApiError {
    let how = format!(
        "remove it first with `weft env unexpose {owner} --host-port {}`",
        p.host_port
    );
    if p.published {
        ApiError::Conflict(format!(
            "host port {} is already published by environment {owner} (guest port {}); {how}",
            p.host_port, p.guest_port
        ))
    } else {
        ApiError::Conflict(format!(
            "host port {} is already routed to weave {} of {owner} (guest port {}); {how}",
            p.host_port, p.target, p.guest_port
        ))
    }
}

fn kernel_err(what: &str, e: weft_netns::Error) -> ApiError {
    match e {
        weft_netns::Error::PortInUse { port, to } => ApiError::Conflict(format!(
            "host port {port} is already routed to {to} by someone else (another weftd on this host?); pick another --host-port"
        )),
        weft_netns::Error::InvalidPlan(why) => ApiError::BadRequest(format!("{what}: {why}")),
        e @ (weft_netns::Error::ForeignLink(_) | weft_netns::Error::InvalidLink(_)) => {
            ApiError::Conflict(one_line(&format!("{what}: {e}; let weftd start the environment on a tap that does not exist yet, or publish the port through a weave")))
        }
        other => ApiError::net(what, other),
    }
}

/// An error with its causes, `a: b: c`.
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

fn ports_text(ports: &[u16]) -> String {
    if ports.is_empty() {
        return "none".into();
    }
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What [`Net::reconcile`] found, per weave (for the caller's own recovery steps).
#[derive(Debug, Default)]
pub struct Reconciled {
    /// The kernel's report, when reconciling could run at all.
    pub report: Option<ReconcileReport>,
    /// Why it could not run.
    pub failure: Option<String>,
}

impl Reconciled {
    /// Whether weave `name`'s namespace, links and NAT are in place.
    pub fn weave(&self, name: &str) -> Result<(), String> {
        if let Some(f) = &self.failure {
            return Err(f.clone());
        }
        let prefix = format!("weave {name}: ");
        match self
            .report
            .as_ref()
            .and_then(|r| r.errors.iter().find(|e| e.starts_with(&prefix)))
        {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

/// The network records of a catalog and the kernel they describe.
pub struct Net {
    catalog: Catalog,
    ops: Arc<dyn NetOps>,
}

impl Net {
    /// Over `catalog` and `ops` (a test double in unit tests).
    pub fn with_ops(catalog: &Catalog, ops: Arc<dyn NetOps>) -> Net {
        Net {
            catalog: catalog.clone(),
            ops,
        }
    }

    /// Runs blocking kernel calls off the async workers.
    pub(super) async fn kernel<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn NetOps) -> weft_netns::Result<T> + Send + 'static,
    ) -> weft_netns::Result<T> {
        let ops = Arc::clone(&self.ops);
        match tokio::task::spawn_blocking(move || f(ops.as_ref())).await {
            Ok(r) => r,
            Err(e) => Err(weft_netns::Error::Os {
                op: "run a network task".into(),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    /// An environment that is not a weave.
    pub(super) async fn environment(&self, env: &str) -> Result<(), ApiError> {
        if self.catalog.environment(env).await?.is_none() {
            return Err(ApiError::NotFound(env.to_string()));
        }
        if let Some(w) = self.catalog.weave(env).await? {
            return Err(ApiError::BadRequest(format!(
                "{env:?} is a weave of {:?}: its host ports are its environment's (`weft weave route {env}`, `weft weave activate {env}`) and its address plan is the one of its instant",
                w.parent
            )));
        }
        Ok(())
    }

    pub(super) async fn weave(&self, name: &str) -> Result<Weave, ApiError> {
        self.catalog.weave(name).await?.ok_or_else(|| {
            ApiError::Missing(format!("no weave named {name:?} (see `weft weave list`)"))
        })
    }

    /// The kernel route of a host port of `env` (its target now).
    pub(super) async fn resolve(&self, env: &str, port: &HostPort) -> Result<Route, ApiError> {
        let to = if port.target == env {
            let ip = match port.guest_ip {
                Some(ip) => ip,
                None => self.catalog.net_plan(env).await?.guest_ip,
            };
            Target::Addr(ip)
        } else {
            let w = self.catalog.weave(&port.target).await?.ok_or_else(|| {
                ApiError::Internal(format!(
                    "host port {} of {env} goes to weave {}, which does not exist",
                    port.host_port, port.target
                ))
            })?;
            Target::Weave(w.net_index)
        };
        Ok(Route {
            host_port: port.host_port,
            to,
            guest_port: port.guest_port,
        })
    }

    /// The taps of an environment's NICs (in the root namespace), each with whether
    /// weft made it: its QEMU, started by weftd, created it and still runs (a tap QEMU
    /// creates goes when QEMU ends).
    pub(super) async fn taps(&self, env: &str) -> Result<Vec<HostLink>, ApiError> {
        let Some(e) = self.catalog.environment(env).await? else {
            return Ok(Vec::new());
        };
        let running = e.state == crate::model::EnvState::Running;
        let ours = self.catalog.env_taps(env).await?;
        Ok(e.config
            .map(|c| {
                c.nics
                    .into_iter()
                    .map(|n| HostLink {
                        ours: running && ours.contains(&n.tap),
                        name: n.tap,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Before weftd starts `env`'s QEMU on `taps` in the root namespace: a tap that does
    /// not exist yet is created by that QEMU and recorded as weft's; one that exists
    /// already is someone else's, and no record says otherwise.
    pub async fn claim_taps(&self, env: &str, taps: &[String]) -> Result<(), ApiError> {
        if taps.is_empty() {
            return Ok(());
        }
        let present = self
            .kernel(|ops| ops.list_links(None))
            .await
            .map_err(|e| kernel_err("list links", e))?;
        let (theirs, ours): (Vec<&String>, Vec<&String>) =
            taps.iter().partition(|t| present.contains(t));
        if !theirs.is_empty() {
            info!(env, taps = ?theirs, "taps exist before QEMU starts: they are not weft's, and weft changes none of their settings");
        }
        Ok(self.catalog.set_env_taps(env, &ours, &theirs).await?)
    }

    /// An environment's network setup.
    pub async fn setup(&self, env: &str) -> Result<NetSetup, ApiError> {
        if self.catalog.environment(env).await?.is_none() {
            return Err(ApiError::NotFound(env.to_string()));
        }
        Ok(self.catalog.net_setup(env).await?)
    }
}

/// A weave whose guest may leave the host needs the root namespace to forward.
fn forwarding_for(ops: &dyn NetOps, egress: Egress) -> weft_netns::Result<()> {
    if egress == Egress::None {
        Ok(())
    } else {
        weft_netns::enable_host_forwarding(ops)
    }
}

/// A link of the root namespace that a VM's NIC uses, and whether weft made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HostLink {
    name: String,
    ours: bool,
}

/// `route_localnet` on each of `links` that exists in the root namespace (a stopped
/// environment's tap may not). A link that exists but that weft did not make is
/// refused before any is changed: its name comes from a caller's NIC and may be any
/// of the host's links.
fn allow_host_clients(ops: &dyn NetOps, links: &[HostLink]) -> weft_netns::Result<()> {
    if links.is_empty() {
        return Ok(());
    }
    let present = ops.list_links(None)?;
    let present: Vec<&HostLink> = links.iter().filter(|l| present.contains(&l.name)).collect();
    if let Some(foreign) = present.iter().find(|l| !l.ours) {
        return Err(weft_netns::Error::ForeignLink(foreign.name.clone()));
    }
    for link in present {
        weft_netns::allow_host_clients(ops, &link.name)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
