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

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::json;
use sqlx::{Row, SqliteConnection};
use tracing::{info, warn};
use weft_netns::{Kernel, NetOps, Owned, ReconcileReport, Route, Target};
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
enum Change {
    AddPort { env: String, port: HostPort },
    RemovePort(u16),
    Retarget { port: u16, target: String },
    Active { env: String, active: Option<String> },
    Plan { env: String, plan: GuestPlan },
    Egress { env: String, egress: Egress },
}

/// The `net` snapshot a change records: of which environment, by whom, saying what.
struct Record<'a> {
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

    async fn host_ports(&self, env: Option<&str>) -> Result<Vec<(String, HostPort)>, CatalogError> {
        ports_in(&mut *self.pool.acquire().await?, env).await
    }

    async fn host_port(&self, port: u16) -> Result<Option<(String, HostPort)>, CatalogError> {
        Ok(self
            .host_ports(None)
            .await?
            .into_iter()
            .find(|(_, p)| p.host_port == port))
    }

    /// Applies `changes` and records the `net` snapshot in one transaction.
    async fn commit_net(
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
    async fn env_taps(&self, env: &str) -> Result<BTreeSet<String>, CatalogError> {
        let rows = sqlx::query("SELECT name FROM env_taps WHERE env = ?")
            .bind(env)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("name")?)).collect()
    }

    /// Records which of `env`'s taps its QEMU makes (`ours`) and forgets any record of
    /// the others (they exist already: someone else's), in one transaction.
    async fn set_env_taps(
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

    async fn own_net(&self, items: &[(&str, String)]) -> Result<(), CatalogError> {
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

    async fn disown_net(&self, items: &[(&str, String)]) -> Result<(), CatalogError> {
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
        other => ApiError::Internal(one_line(&format!("{what}: {}", ErrorChain(&other)))),
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
    /// Over `catalog` and the real kernel.
    pub fn new(catalog: &Catalog) -> Net {
        Net::with_ops(catalog, Arc::new(Kernel::new()))
    }

    /// Over `catalog` and `ops` (a test double in unit tests).
    pub fn with_ops(catalog: &Catalog, ops: Arc<dyn NetOps>) -> Net {
        Net {
            catalog: catalog.clone(),
            ops,
        }
    }

    /// Runs blocking kernel calls off the async workers.
    async fn kernel<T: Send + 'static>(
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
    async fn environment(&self, env: &str) -> Result<(), ApiError> {
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

    async fn weave(&self, name: &str) -> Result<Weave, ApiError> {
        self.catalog.weave(name).await?.ok_or_else(|| {
            ApiError::Missing(format!("no weave named {name:?} (see `weft weave list`)"))
        })
    }

    /// The kernel route of a host port of `env` (its target now).
    async fn resolve(&self, env: &str, port: &HostPort) -> Result<Route, ApiError> {
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
    async fn taps(&self, env: &str) -> Result<Vec<HostLink>, ApiError> {
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
    async fn add_port(
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
    async fn move_ports(
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

    async fn delete_weave_locked(&self, name: &str, index: u8, parent: &str) -> Result<(), String> {
        let text = |e: ApiError| e.to_string();
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
                let e = one_line(&e.to_string());
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

    async fn reconcile_locked(&self) -> Result<ReconcileReport, ApiError> {
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
                Err(e) => problems.push(e.to_string()),
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
struct HostLink {
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
mod tests {
    use super::*;
    use crate::catalog::NewEnvironment;
    use crate::model::{EnvKind, EnvState};
    use weft_netns::{Call, LinkEnd, Recorder, WeaveNet, WeavePlan};
    use weft_qmp::launch::NicConfig;

    const P0: u16 = 47290;
    const P1: u16 = 47291;
    const P2: u16 = 47292;

    fn config(tap: &str) -> VmConfig {
        VmConfig {
            nics: vec![NicConfig {
                id: "net0".into(),
                tap: tap.into(),
                mac: "52:54:00:12:34:56".into(),
            }],
            ..VmConfig::default()
        }
    }

    async fn add_env(catalog: &Catalog, name: &str, tap: &str) {
        let config = config(tap);
        catalog
            .insert_environment(&NewEnvironment {
                name,
                kind: EnvKind::Managed,
                config: Some(&config),
                qmp_socket: std::path::Path::new("/nonexistent.sock"),
                state: EnvState::Stopped,
                pid: None,
            })
            .await
            .unwrap();
    }

    /// A weave row of `web` (its environment row too), branched from `source` at `taken_at`.
    async fn add_weave(catalog: &Catalog, name: &str, index: u8, source: &str, taken_at: &str) {
        add_env(catalog, name, "weft-tap0").await;
        sqlx::query(
            "INSERT INTO weaves (name, parent, source, taken_at, net_index, created_at) VALUES (?, 'web', ?, ?, ?, ?)",
        )
        .bind(name)
        .bind(source)
        .bind(taken_at)
        .bind(i64::from(index))
        .bind(now())
        .execute(&catalog.pool)
        .await
        .unwrap();
    }

    /// A catalog with environment `web` (NIC on the operator's tap `tweb`, which
    /// exists) and the recording kernel double.
    async fn rig() -> (Catalog, Arc<Recorder>, Net) {
        let catalog = Catalog::open_in_memory().await.unwrap();
        add_env(&catalog, "web", "tweb").await;
        let rec = Arc::new(Recorder::new());
        let net = Net::with_ops(&catalog, rec.clone());
        // weftd starts web's QEMU, which makes its tap: weft's.
        net.claim_taps("web", &["tweb".to_string()]).await.unwrap();
        rec.create_netns("operator").unwrap();
        rec.create_veth(
            &LinkEnd::root("tweb"),
            &LinkEnd::in_netns("operator", "eth0"),
        )
        .unwrap();
        catalog
            .set_state("web", EnvState::Running, Some(1), None)
            .await
            .unwrap();
        rec.clear_calls();
        (catalog, rec, net)
    }

    #[tokio::test]
    async fn route_localnet_only_on_taps_weft_made() {
        let (catalog, rec, net) = rig().await;
        // An environment whose NIC names a link that existed before its QEMU started
        // (the host's uplink, say): publishing its port changes nothing of that link.
        add_env(&catalog, "ops", "eth9").await;
        rec.create_veth(
            &LinkEnd::root("eth9"),
            &LinkEnd::in_netns("operator", "eth1"),
        )
        .unwrap();
        net.claim_taps("ops", &["eth9".to_string()]).await.unwrap();
        catalog
            .set_state("ops", EnvState::Running, Some(2), None)
            .await
            .unwrap();
        rec.clear_calls();
        let e = net
            .expose("ops", &expose(80, P1), "alice")
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, ApiError::Conflict(_)), "{e:?}");
        assert!(text.contains("\"eth9\" was not made by weft"), "{text}");
        assert!(!text.contains('\n'), "{text}");
        assert!(!rec
            .mutations()
            .iter()
            .any(|c| matches!(c, Call::SetSysctl { key, .. } if key.contains("route_localnet"))));
        // Nothing of the refused port stays: no route, no record, no ownership.
        assert!(weft_netns::list_routes(rec.as_ref()).unwrap().is_empty());
        assert!(net.setup("ops").await.unwrap().ports.is_empty());
        assert!(!catalog.owned_net().await.unwrap().ports.contains(&P1));

        // weft's own tap, but its environment stopped: a link of that name now is not
        // the tap weft's QEMU made (that one went with QEMU).
        catalog
            .set_state("web", EnvState::Stopped, None, None)
            .await
            .unwrap();
        let e = net
            .expose("web", &expose(80, P2), "alice")
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("\"tweb\" was not made by weft"),
            "{e}"
        );
        // Running again on a tap its QEMU made: allowed.
        net.claim_taps("web", &["tweb2".to_string()]).await.unwrap();
        assert!(catalog.env_taps("web").await.unwrap().contains("tweb2"));
        assert!(catalog.env_taps("web").await.unwrap().contains("tweb"));
        // A tap that exists when weftd starts the QEMU loses its record.
        net.claim_taps("web", &["tweb".to_string()]).await.unwrap();
        assert!(!catalog.env_taps("web").await.unwrap().contains("tweb"));
    }

    fn expose(guest_port: u16, host_port: u16) -> ExposeRequest {
        ExposeRequest {
            guest_port,
            host_port: Some(host_port),
            guest_ip: None,
        }
    }

    fn home(host_port: u16, guest_port: u16) -> Route {
        Route {
            host_port,
            to: Target::Addr(Ipv4Addr::new(192, 168, 100, 2)),
            guest_port,
        }
    }

    /// Transactions on the root route table (the weaves' filters aside).
    fn nft_batches(rec: &Recorder) -> usize {
        rec.mutations()
            .iter()
            .filter(|c| {
                matches!(c, Call::ApplyNft(None, b)
                if b.iter().any(|op| op.table().name == weft_netns::TABLE))
            })
            .count()
    }

    async fn net_snapshots(catalog: &Catalog, env: &str) -> Vec<crate::model::Snapshot> {
        let filter = SnapshotFilter {
            resource: Some("net".into()),
            ..SnapshotFilter::default()
        };
        catalog.snapshots(env, &filter).await.unwrap()
    }

    #[tokio::test]
    async fn expose_routes_to_the_guest_and_records_a_net_snapshot() {
        let (catalog, rec, net) = rig().await;
        let setup = net.expose("web", &expose(80, P0), "alice").await.unwrap();
        assert_eq!(
            setup.ports,
            vec![HostPort {
                host_port: P0,
                guest_port: 80,
                guest_ip: None,
                published: true,
                target: "web".into()
            }]
        );
        assert_eq!(
            weft_netns::list_routes(rec.as_ref()).unwrap(),
            vec![home(P0, 80)]
        );
        // Host-local clients may leave through the operator's tap.
        assert!(rec.mutations().contains(&Call::SetSysctl {
            netns: None,
            key: "net/ipv4/conf/tweb/route_localnet".into(),
            value: "1".into()
        }));
        assert!(catalog.owned_net().await.unwrap().ports.contains(&P0));
        let snaps = net_snapshots(&catalog, "web").await;
        assert_eq!(snaps.len(), 1);
        let s = &snaps[0];
        assert_eq!(s.kind, SnapshotKind::Net);
        assert_eq!(s.actor, "alice");
        assert_eq!(s.category.as_deref(), Some(CHANGE_CATEGORY));
        assert_eq!(
            s.note.as_deref(),
            Some("expose host port 47290 -> guest port 80")
        );
        assert_eq!(s.net.as_ref(), Some(&setup));
    }

    #[tokio::test]
    async fn bad_exposes_are_refused_with_nothing_left_behind() {
        let (catalog, rec, net) = rig().await;
        add_weave(&catalog, "w1", 7, "now", &now()).await;
        net.expose("web", &expose(80, P0), "alice").await.unwrap();
        // Someone else's route on P1 (another weftd).
        weft_netns::route(rec.as_ref(), &Route::to_weave(P1, 200, 80)).unwrap();
        // A process on the host listens on a port.
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let busy = listener.local_addr().unwrap().port();
        rec.clear_calls();

        let cases: Vec<(&str, ExposeRequest, &str)> = vec![
            (
                "web",
                expose(81, P0),
                "already published by environment web",
            ),
            ("web", expose(0, P2), "ports must be 1-65535"),
            ("nope", expose(80, P2), "no environment named \"nope\""),
            ("w1", expose(80, P2), "is a weave of \"web\""),
            (
                "web",
                ExposeRequest {
                    guest_ip: Some(Ipv4Addr::LOCALHOST),
                    ..expose(80, P2)
                },
                "cannot be a guest address",
            ),
            ("web", expose(80, P1), "by someone else"),
            ("web", expose(80, busy), "in use by a process on the host"),
        ];
        for (env, req, want) in cases {
            let e = net
                .expose(env, &req, "alice")
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{env} {req:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        drop(listener);
        assert_eq!(catalog.net_setup("web").await.unwrap().ports.len(), 1);
        assert_eq!(catalog.owned_net().await.unwrap().ports, [P0].into());
        assert_eq!(net_snapshots(&catalog, "web").await.len(), 1);
        // The only kernel change tried was the refused route on P1: nothing was applied.
        assert_eq!(nft_batches(&rec), 0);
        assert_eq!(
            weft_netns::list_routes(rec.as_ref()).unwrap(),
            vec![home(P0, 80), Route::to_weave(P1, 200, 80)]
        );
    }

    #[tokio::test]
    async fn activate_moves_every_port_in_one_transaction_and_back() {
        let (catalog, rec, net) = rig().await;
        add_weave(&catalog, "w1", 7, "now", &now()).await;
        add_weave(&catalog, "w2", 8, "now", &now()).await;
        net.expose("web", &expose(80, P0), "alice").await.unwrap();
        net.route_weave("w1", P1, 8080, "alice").await.unwrap();
        // Routing the same again is a no-op; elsewhere is refused.
        net.route_weave("w1", P1, 8080, "alice").await.unwrap();
        let e = net.route_weave("w2", P1, 8080, "alice").await.unwrap_err();
        assert!(
            e.to_string().contains("already routed to weave w1 of web"),
            "{e}"
        );

        rec.clear_calls();
        let moved = net.activate_weave("w2", "bob").await.unwrap();
        assert_eq!(moved["ports"], json!([P0, P1]));
        assert_eq!(
            nft_batches(&rec),
            1,
            "one transaction: {:?}",
            rec.mutations()
        );
        assert_eq!(
            weft_netns::list_routes(rec.as_ref()).unwrap(),
            vec![Route::to_weave(P0, 8, 80), Route::to_weave(P1, 8, 8080)]
        );
        let setup = catalog.net_setup("web").await.unwrap();
        assert_eq!(setup.active.as_deref(), Some("w2"));
        assert!(setup.ports.iter().all(|p| p.target == "w2"));
        let last = net_snapshots(&catalog, "web").await.pop().unwrap();
        assert_eq!(last.actor, "bob");
        assert_eq!(
            last.note.as_deref(),
            Some("activate weave w2: host ports 47290, 47291")
        );

        // A port published while w2 is active goes to w2.
        net.expose("web", &expose(443, P2), "alice").await.unwrap();
        assert!(weft_netns::list_routes(rec.as_ref())
            .unwrap()
            .contains(&Route::to_weave(P2, 8, 443)));

        // And back: published ports go home, the weave-only route stays.
        rec.clear_calls();
        let setup = net.activate_env("web", "bob").await.unwrap();
        assert_eq!(nft_batches(&rec), 1);
        assert_eq!(setup.active, None);
        assert_eq!(
            weft_netns::list_routes(rec.as_ref()).unwrap(),
            vec![home(P0, 80), Route::to_weave(P1, 8, 8080), home(P2, 443)]
        );
        // Activating what is active changes nothing and records nothing.
        let count = net_snapshots(&catalog, "web").await.len();
        rec.clear_calls();
        net.activate_env("web", "bob").await.unwrap();
        assert_eq!(nft_batches(&rec), 0);
        assert_eq!(net_snapshots(&catalog, "web").await.len(), count);
        // Weaves have no published ports to take back.
        let e = net.activate_env("w1", "bob").await.unwrap_err();
        assert!(e.to_string().contains("is a weave"), "{e}");
    }

    #[tokio::test]
    async fn a_failed_switch_changes_neither_the_kernel_nor_the_catalog() {
        let (catalog, rec, net) = rig().await;
        add_weave(&catalog, "w1", 7, "now", &now()).await;
        net.expose("web", &expose(80, P0), "alice").await.unwrap();
        net.expose("web", &expose(81, P1), "alice").await.unwrap();
        let before = (
            catalog.net_setup("web").await.unwrap(),
            net_snapshots(&catalog, "web").await.len(),
            weft_netns::list_routes(rec.as_ref()).unwrap(),
        );
        rec.fail_nth_mutation(1);
        let e = net.activate_weave("w1", "bob").await.unwrap_err();
        assert!(e.to_string().contains("injected failure"), "{e}");
        let after = (
            catalog.net_setup("web").await.unwrap(),
            net_snapshots(&catalog, "web").await.len(),
            weft_netns::list_routes(rec.as_ref()).unwrap(),
        );
        assert_eq!(before, after);
        // Nothing routes to an empty family.
        let (catalog, _rec, net) = rig().await;
        add_weave(&catalog, "w1", 7, "now", &now()).await;
        let e = net.activate_weave("w1", "bob").await.unwrap_err();
        assert!(e.to_string().contains("weft env expose web"), "{e}");
    }

    #[tokio::test]
    async fn unexpose_and_plan_changes_follow_through() {
        let (catalog, rec, net) = rig().await;
        net.expose("web", &expose(80, P0), "alice").await.unwrap();
        let explicit = ExposeRequest {
            guest_ip: Some(Ipv4Addr::new(192, 168, 100, 9)),
            ..expose(22, P1)
        };
        net.expose("web", &explicit, "alice").await.unwrap();
        let plan = GuestPlan {
            guest_ip: Ipv4Addr::new(192, 168, 7, 2),
            guest_prefix: 24,
            gateway: Ipv4Addr::new(192, 168, 7, 1),
        };
        let setup = net.set_plan("web", plan, "alice").await.unwrap();
        assert_eq!(setup.plan, plan);
        // The port without an address of its own follows the plan; the other stays.
        assert_eq!(
            weft_netns::list_routes(rec.as_ref()).unwrap(),
            vec![
                Route {
                    host_port: P0,
                    to: Target::Addr(plan.guest_ip),
                    guest_port: 80
                },
                Route {
                    host_port: P1,
                    to: Target::Addr(Ipv4Addr::new(192, 168, 100, 9)),
                    guest_port: 22
                }
            ]
        );
        let bad = GuestPlan {
            gateway: Ipv4Addr::new(192, 168, 8, 1),
            ..plan
        };
        let e = net.set_plan("web", bad, "alice").await.unwrap_err();
        assert!(matches!(e, ApiError::BadRequest(_)), "{e}");
        assert!(e.to_string().contains("outside"), "{e}");

        net.unexpose("web", P0, "alice").await.unwrap();
        assert_eq!(
            weft_netns::list_routes(rec.as_ref())
                .unwrap()
                .iter()
                .map(|r| r.host_port)
                .collect::<Vec<_>>(),
            vec![P1]
        );
        assert_eq!(catalog.owned_net().await.unwrap().ports, [P1].into());
        let e = net.unexpose("web", P0, "alice").await.unwrap_err();
        assert!(e.to_string().contains("its host ports: 47291"), "{e}");
        let notes: Vec<String> = net_snapshots(&catalog, "web")
            .await
            .into_iter()
            .filter_map(|s| s.note)
            .collect();
        assert_eq!(
            notes,
            vec![
                "expose host port 47290 -> guest port 80",
                "expose host port 47291 -> guest port 22",
                "address plan 192.168.7.2/24 via 192.168.7.1",
                "unexpose host port 47290",
            ]
        );
    }

    /// A timestamp later than `t` (timestamps have microseconds: two in a row can be equal).
    fn later_than(t: &str) -> String {
        wait_until::wait_until(
            &format!("the clock to pass {t}"),
            std::time::Duration::from_secs(5),
            || {
                let n = now();
                if n.as_str() > t {
                    Ok(n)
                } else {
                    Err(n)
                }
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_weave_from_the_past_gets_the_plan_of_its_instant() {
        let (catalog, rec, net) = rig().await;
        let old = GuestPlan {
            guest_ip: Ipv4Addr::new(192, 168, 5, 2),
            guest_prefix: 24,
            gateway: Ipv4Addr::new(192, 168, 5, 1),
        };
        let new = GuestPlan {
            guest_ip: Ipv4Addr::new(10, 9, 0, 2),
            guest_prefix: 16,
            gateway: Ipv4Addr::new(10, 9, 0, 1),
        };
        // Before anything is recorded: the current (default) plan.
        assert_eq!(
            net.plan_at("web", false, &now()).await.unwrap(),
            GuestPlan::default()
        );
        net.set_plan("web", old, "alice").await.unwrap();
        let between = later_than(&now());
        later_than(&between);
        net.set_plan("web", new, "alice").await.unwrap();
        assert_eq!(net.plan_at("web", false, &between).await.unwrap(), old);
        assert_eq!(net.plan_at("web", false, &now()).await.unwrap(), new);
        assert_eq!(net.plan_at("web", true, &between).await.unwrap(), new);

        // The weave's namespace gets that plan, and keeps it as its own.
        add_weave(&catalog, "past", 7, "at past", &between).await;
        let weave = catalog.weave("past").await.unwrap().unwrap();
        net.create_weave(&weave, &config("weft-tap0"), None, Egress::None)
            .await
            .unwrap();
        assert_eq!(catalog.net_plan("past").await.unwrap(), old);
        assert_eq!(
            rec.rules(Some("weft-past"), weft_netns::TABLE, "prerouting"),
            vec![weft_netns::NftRule::DnatTcpFromLink {
                iif: "wn7".into(),
                to: old.guest_ip
            }]
        );
        assert!(rec.calls().contains(&Call::AddAddress(
            LinkEnd::in_netns("weft-past", "weft-tap0"),
            weft_netns::Prefix::new(old.gateway, 24)
        )));
        let owned = catalog.owned_net().await.unwrap();
        assert!(owned.netns.contains("weft-past") && owned.indices.contains(&7));
        // A weave's plan is not changed through its environment's commands.
        let e = net.set_plan("past", new, "alice").await.unwrap_err();
        assert!(e.to_string().contains("is a weave"), "{e}");

        // A plan a composition chose wins over the weave's instant's; a bad one is
        // refused before anything is made.
        add_weave(&catalog, "chosen", 8, "composition c", &now()).await;
        let weave = catalog.weave("chosen").await.unwrap().unwrap();
        let bad = GuestPlan {
            gateway: Ipv4Addr::new(172, 16, 0, 1),
            ..old
        };
        let e = net
            .create_weave(&weave, &config("weft-tap1"), Some(bad), Egress::None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("chosen address plan"), "{e}");
        net.create_weave(&weave, &config("weft-tap1"), Some(old), Egress::None)
            .await
            .unwrap();
        assert_eq!(catalog.net_plan("chosen").await.unwrap(), old);
    }

    #[tokio::test]
    async fn deleting_the_active_weave_sends_published_ports_home() {
        let (catalog, rec, net) = rig().await;
        add_weave(&catalog, "w1", 7, "now", &now()).await;
        let weave = catalog.weave("w1").await.unwrap().unwrap();
        net.create_weave(&weave, &config("weft-tap0"), None, Egress::None)
            .await
            .unwrap();
        net.expose("web", &expose(80, P0), "alice").await.unwrap();
        net.route_weave("w1", P1, 8080, "alice").await.unwrap();
        net.activate_weave("w1", "alice").await.unwrap();

        net.delete_weave("w1", 7, "web").await.unwrap();
        assert_eq!(
            weft_netns::list_routes(rec.as_ref()).unwrap(),
            vec![home(P0, 80)]
        );
        assert!(!rec.netns().contains(&"weft-w1".to_string()));
        let setup = catalog.net_setup("web").await.unwrap();
        assert_eq!(setup.active, None);
        assert_eq!(setup.ports.len(), 1);
        assert_eq!(setup.ports[0].target, "web");
        let owned = catalog.owned_net().await.unwrap();
        assert_eq!(owned.ports, [P0].into());
        assert!(owned.netns.is_empty() && owned.indices.is_empty());
        let last = net_snapshots(&catalog, "web").await.pop().unwrap();
        assert!(last.note.unwrap().starts_with("weave w1 deleted"));
    }

    #[tokio::test]
    async fn egress_is_set_at_create_changed_while_running_recorded_and_restored() {
        let (catalog, rec, net) = rig().await;
        let filter = weft_netns::filter_table();
        add_weave(&catalog, "e1", 7, "now", &now()).await;
        let weave = catalog.weave("e1").await.unwrap().unwrap();
        net.create_weave(&weave, &config("weft-tap0"), None, Egress::Internet)
            .await
            .unwrap();
        assert_eq!(
            catalog.net_setup("e1").await.unwrap().egress,
            Egress::Internet
        );
        assert_eq!(rec.chains(None, &filter), vec!["w7-fwd", "w7-in", "w7-nat"]);
        // Leaving the host needs the root namespace to forward.
        assert!(rec.calls().contains(&Call::SetSysctl {
            netns: None,
            key: "net/ipv4/ip_forward".into(),
            value: "1".into()
        }));

        // Changed while it runs: one filter transaction, recorded with a net snapshot.
        rec.clear_calls();
        let setup = net.set_egress("e1", Egress::None, "alice").await.unwrap();
        assert_eq!(setup.egress, Egress::None);
        assert_eq!(rec.chains(None, &filter), vec!["w7-fwd", "w7-in"]);
        assert_eq!(rec.mutations().len(), 1, "{:?}", rec.mutations());
        let snaps = net_snapshots(&catalog, "e1").await;
        let last = snaps.iter().max_by_key(|s| s.id).unwrap();
        assert_eq!(last.net.as_ref().unwrap().egress, Egress::None);
        assert_eq!(last.actor, "alice");

        // Only weaves have an egress policy.
        let e = net
            .set_egress("web", Egress::All, "alice")
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::Missing(_)), "{e}");
        // A kernel failure changes nothing.
        rec.fail_nth_mutation(1);
        assert!(net.set_egress("e1", Egress::All, "alice").await.is_err());
        assert_eq!(catalog.net_setup("e1").await.unwrap().egress, Egress::None);
        assert_eq!(rec.chains(None, &filter), vec!["w7-fwd", "w7-in"]);

        // After a reboot the filter is gone: reconcile puts back the recorded policy.
        net.set_egress("e1", Egress::All, "alice").await.unwrap();
        weft_netns::remove_filter(rec.as_ref(), 7).unwrap();
        assert!(rec.chains(None, &filter).is_empty());
        let report = net.reconcile().await.report.unwrap();
        assert_eq!(report.errors, Vec::<String>::new());
        assert_eq!(rec.chains(None, &filter), vec!["w7-fwd", "w7-in", "w7-nat"]);
        assert!(
            rec.rules_in(None, &filter, "w7-fwd").is_empty(),
            "egress all"
        );
    }

    #[tokio::test]
    async fn reconcile_removes_owned_strays_restores_the_rest_and_leaves_others_alone() {
        let (catalog, rec, net) = rig().await;
        add_weave(&catalog, "w1", 7, "now", &now()).await;
        net.expose("web", &expose(80, P0), "alice").await.unwrap();
        net.route_weave("w1", P1, 8080, "alice").await.unwrap();
        // A weave this weftd made and then lost from its catalog (a crash mid-delete).
        catalog
            .own_net(&[
                (OWN_NETNS, "weft-old".into()),
                (OWN_INDEX, "9".into()),
                own_port(P2),
            ])
            .await
            .unwrap();
        WeaveNet::create(rec.as_ref(), &WeavePlan::new("old", 9)).unwrap();
        weft_netns::route(rec.as_ref(), &Route::to_weave(P2, 9, 80)).unwrap();
        // Another weftd's weave and route on the same host.
        WeaveNet::create(rec.as_ref(), &WeavePlan::new("theirs", 10)).unwrap();
        let theirs = Route::to_weave(47298, 10, 80);
        weft_netns::route(rec.as_ref(), &theirs).unwrap();
        // After a reboot: w1's namespace and the environment's route are gone.
        weft_netns::unroute(rec.as_ref(), P0).unwrap();

        let done = net.reconcile().await;
        let report = done.report.clone().unwrap();
        assert_eq!(report.errors, Vec::<String>::new());
        assert_eq!(report.removed_netns, vec!["weft-old"]);
        assert_eq!(report.created_weaves, vec!["w1"]);
        assert!(done.weave("w1").is_ok());
        assert_eq!(
            weft_netns::list_routes(rec.as_ref()).unwrap(),
            vec![home(P0, 80), Route::to_weave(P1, 7, 8080), theirs]
        );
        assert_eq!(rec.netns(), vec!["operator", "weft-theirs", "weft-w1"]);
        assert!(rec.links(None).contains(&"wh10".to_string()));
        // What it removed it no longer owns; what the catalog wants it owns.
        let owned = catalog.owned_net().await.unwrap();
        assert_eq!(owned.netns, ["weft-w1".to_string()].into());
        assert_eq!(owned.indices, [7].into());
        assert_eq!(owned.ports, [P0, P1].into());
        let audit = catalog.audit_log(10).await.unwrap();
        assert!(audit
            .iter()
            .any(|a| a.action == "net.reconcile" && a.result == "ok"));
        // A second pass changes nothing.
        rec.clear_calls();
        let again = net.reconcile().await.report.unwrap();
        assert!(!again.changed(), "{again:?}");
        assert_eq!(nft_batches(&rec), 0);
    }

    #[tokio::test]
    async fn a_weftd_that_owns_nothing_leaves_the_kernel_alone() {
        let (_catalog, rec, net) = rig().await;
        WeaveNet::create(rec.as_ref(), &WeavePlan::new("theirs", 10)).unwrap();
        rec.clear_calls();
        let done = net.reconcile().await;
        assert_eq!(done.report, Some(ReconcileReport::default()));
        assert!(rec.calls().is_empty(), "{:?}", rec.calls());
    }

    #[tokio::test]
    async fn deleting_an_environment_sweeps_its_routes() {
        let (catalog, rec, net) = rig().await;
        net.expose("web", &expose(80, P0), "alice").await.unwrap();
        sqlx::query("DELETE FROM environments WHERE name = 'web'")
            .execute(&catalog.pool)
            .await
            .unwrap();
        net.sweep_ports().await.unwrap();
        assert!(weft_netns::list_routes(rec.as_ref()).unwrap().is_empty());
        assert!(catalog.owned_net().await.unwrap().ports.is_empty());
    }

    #[tokio::test]
    async fn migration_6_keeps_snapshots_their_parents_and_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v5.db");
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .foreign_keys(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        let mut names: Vec<_> =
            std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
        names.sort();
        let (before, after): (Vec<_>, Vec<_>) = names
            .into_iter()
            .partition(|p| p.file_name().unwrap().to_string_lossy().as_ref() < "0006");
        for m in &before {
            sqlx::raw_sql(&std::fs::read_to_string(m).unwrap())
                .execute(&pool)
                .await
                .unwrap();
        }
        let insert = "INSERT INTO snapshots (id, env, resource, state, kind, taken_at, actor, parent) VALUES (?, 'web', 'disk:vda', 'complete', ?, '2026-01-01T00:00:00Z', 'a', ?)";
        for (id, kind, parent) in [
            (1, "full", None),
            (2, "incremental", Some(1)),
            (5, "incremental", Some(2)),
        ] {
            sqlx::query(insert)
                .bind(id)
                .bind(kind)
                .bind(parent)
                .execute(&pool)
                .await
                .unwrap();
        }
        // Snapshot 7 was deleted: its id must never come back.
        sqlx::query("UPDATE sqlite_sequence SET seq = 7 WHERE name = 'snapshots'")
            .execute(&pool)
            .await
            .unwrap();
        let six = &after[0];
        assert!(six.ends_with("0006_net.sql"), "{six:?}");
        let mut tx = pool.begin().await.unwrap();
        sqlx::raw_sql(&std::fs::read_to_string(six).unwrap())
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let rows: Vec<(i64, Option<i64>)> =
            sqlx::query_as("SELECT id, parent FROM snapshots ORDER BY id")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(rows, vec![(1, None), (2, Some(1)), (5, Some(2))]);
        let id = sqlx::query(
            "INSERT INTO snapshots (env, resource, state, kind, taken_at, actor, net) VALUES ('web', 'net', 'complete', 'net', '2026-01-02T00:00:00Z', 'a', '{}')",
        )
        .execute(&pool)
        .await
        .unwrap()
        .last_insert_rowid();
        assert_eq!(id, 8);
        let fk: Vec<(String,)> = sqlx::query_as("SELECT \"table\" FROM pragma_foreign_key_check")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert!(fk.is_empty(), "{fk:?}");
        // The parent reference points at the new table.
        let bad = sqlx::query(insert)
            .bind(9)
            .bind("incremental")
            .bind(Some(99))
            .execute(&pool)
            .await;
        assert!(bad.is_err(), "a dangling parent must be refused");
    }
}
