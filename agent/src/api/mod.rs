//! The HTTP/JSON API that weftd serves on its unix socket.
//!
//! Every route is listed once in [`routes`]; the router is built from that
//! list and a test checks it against the checked-in `docs/openapi.json`, so a
//! route cannot be added without being documented.

mod audit;
mod change;
mod compositions;
mod envs;
mod jobs;
mod net;
mod policies;
mod provenance;
mod snapshots;
mod store;
mod weaves;

use change::{audited, change, env_change, net_change, require_egress};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Path, Query, Request, State};
use axum::handler::Handler;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::UnixListener;
use tracing::Instrument;

use crate::catalog_snapshots::SnapshotFilter;
use crate::envs::Manager;
use crate::error::{error_chain, ApiError};
use crate::model::{
    AuditEntry, CreateEnvironment, CreateSnapshot, Environment, ErrorBody, ExposeRequest,
    GuestPlan, Job, NetSetup, PruneRequest, RestoreRequest, Snapshot, Status, UnexposeRequest,
};
use crate::policies::{Policy, SetPolicy};
use crate::roles::{Accounts, Actor, Role, Roles};
use crate::snapshots::Snapshots;
use crate::weaves::{CreateWeave, Weave, Weaves};
pub use weft_api::audit::AuditQuery;
pub use weft_api::composition::ApplyComposition;
pub use weft_api::env::{EnvironmentView, SetConfig};
pub use weft_api::net::RouteRequest;
pub use weft_api::policy::PolicyQuery;
pub use weft_api::snapshot::SnapshotQuery;
pub use weft_api::store::{GcRequest, TierRequest};
pub use weft_api::ACTOR_HEADER;

/// The OpenAPI document, served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// Environments.
    pub manager: Arc<Manager>,
    /// Snapshots, restores, jobs and the chunk store.
    pub snapshots: Arc<Snapshots>,
    /// Weaves.
    pub weaves: Arc<Weaves>,
    /// Compositions.
    pub compositions: Arc<crate::compositions::Compositions>,
    /// When weftd started.
    pub started: Instant,
    /// Who may call which route.
    pub access: Arc<Access>,
}

/// One route: method, path (axum syntax), the role it needs, and handler.
pub struct Route {
    /// HTTP method.
    pub method: Method,
    /// Path with `{param}` captures, as in OpenAPI.
    pub path: &'static str,
    /// The lowest role that may call it (`x-weft-role` in the OpenAPI document).
    pub role: Role,
    /// What it does in a refusal's words, e.g. `env delete`.
    pub what: &'static str,
    /// The handler.
    pub handler: MethodRouter<AppState>,
}

/// Binds `handler` to exactly `method`, so the table cannot disagree with the router.
fn route<H, T>(
    method: Method,
    path: &'static str,
    role: Role,
    what: &'static str,
    handler: H,
) -> Route
where
    H: Handler<T, AppState>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone())
        .unwrap_or_else(|_| panic!("route table uses an unsupported method {method}"));
    Route {
        method,
        path,
        role,
        what,
        handler: on(filter, handler),
    }
}

/// Every route weftd serves, with the role each needs. Some handlers need more for
/// some bodies (they call [`Actor::require`]): `env create` of an attached VM, weave
/// create, compose apply and weave egress with egress `all`, replay with `--out` or
/// `--force`; docs/security.md has the table and the reasons.
pub fn routes() -> Vec<Route> {
    use Method as M;
    use Role::{Admin, Operator, Reader};
    vec![
        route(M::GET, "/v1/status", Reader, "status", status),
        route(M::GET, "/v1/openapi.json", Reader, "openapi", openapi),
        route(M::GET, "/v1/whoami", Reader, "whoami", whoami),
        route(
            M::GET,
            "/v1/environments",
            Reader,
            "env list",
            envs::list_envs,
        ),
        route(
            M::POST,
            "/v1/environments",
            Operator,
            "env create",
            envs::create_env,
        ),
        route(
            M::GET,
            "/v1/environments/{name}",
            Reader,
            "env show",
            envs::show_env,
        ),
        route(
            M::DELETE,
            "/v1/environments/{name}",
            Operator,
            "env delete",
            envs::delete_env,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/start",
            Operator,
            "env start",
            envs::start_env,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/stop",
            Operator,
            "env stop",
            envs::stop_env,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/pause",
            Operator,
            "env pause",
            envs::pause_env,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/resume",
            Operator,
            "env resume",
            envs::resume_env,
        ),
        route(
            M::GET,
            "/v1/environments/{name}/net",
            Reader,
            "env net",
            net::show_net,
        ),
        route(
            M::PUT,
            "/v1/environments/{name}/net",
            Admin,
            "env net --guest",
            net::set_net_plan,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/config",
            Operator,
            "env set",
            envs::set_env_config,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/expose",
            Admin,
            "env expose",
            net::expose_env,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/unexpose",
            Admin,
            "env unexpose",
            net::unexpose_env,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/activate",
            Operator,
            "env activate",
            net::activate_env,
        ),
        route(M::GET, "/v1/audit", Reader, "audit", audit::audit_log),
        route(
            M::GET,
            "/v1/audit/verify",
            Reader,
            "audit verify",
            audit::audit_verify,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/snapshots",
            Operator,
            "snapshot create",
            snapshots::create_snapshot,
        ),
        route(
            M::GET,
            "/v1/environments/{name}/snapshots",
            Reader,
            "snapshot list",
            snapshots::list_snapshots,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/snapshots/prune",
            Operator,
            "snapshot prune",
            snapshots::prune_snapshots,
        ),
        route(
            M::GET,
            "/v1/snapshots/{id}",
            Reader,
            "snapshot show",
            snapshots::show_snapshot,
        ),
        route(
            M::DELETE,
            "/v1/snapshots/{id}",
            Operator,
            "snapshot delete",
            snapshots::delete_snapshot,
        ),
        route(
            M::POST,
            "/v1/snapshots/{id}/verify",
            Operator,
            "snapshot verify",
            snapshots::verify_snapshot,
        ),
        route(
            M::POST,
            "/v1/snapshots/{id}/restore",
            Admin,
            "restore",
            snapshots::restore_snapshot,
        ),
        route(
            M::PUT,
            "/v1/environments/{name}/policies",
            Operator,
            "policy set",
            policies::set_policy,
        ),
        route(
            M::GET,
            "/v1/policies",
            Reader,
            "policy list",
            policies::list_policies,
        ),
        route(
            M::DELETE,
            "/v1/environments/{name}/policies/{resource}",
            Operator,
            "policy delete",
            policies::delete_policy,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/weaves",
            Operator,
            "weave create",
            weaves::create_weave,
        ),
        route(
            M::GET,
            "/v1/environments/{name}/weaves",
            Reader,
            "weave list",
            weaves::list_weaves,
        ),
        route(
            M::GET,
            "/v1/weaves/{name}",
            Reader,
            "weave show",
            weaves::show_weave,
        ),
        route(
            M::GET,
            "/v1/weaves/{name}/sources",
            Reader,
            "weave sources",
            weaves::weave_sources,
        ),
        route(
            M::GET,
            "/v1/compositions",
            Reader,
            "compose list",
            compositions::list_compositions,
        ),
        route(
            M::POST,
            "/v1/compositions",
            Operator,
            "compose create",
            compositions::create_composition,
        ),
        route(
            M::GET,
            "/v1/compositions/{name}",
            Reader,
            "compose plan",
            compositions::show_composition,
        ),
        route(
            M::DELETE,
            "/v1/compositions/{name}",
            Operator,
            "compose delete",
            compositions::delete_composition,
        ),
        route(
            M::GET,
            "/v1/compositions/{name}/conflicts",
            Reader,
            "compose conflicts",
            compositions::composition_conflicts,
        ),
        route(
            M::POST,
            "/v1/compositions/{name}/resolve",
            Operator,
            "compose resolve",
            compositions::resolve_composition,
        ),
        route(
            M::POST,
            "/v1/compositions/{name}/apply",
            Operator,
            "compose apply",
            compositions::apply_composition,
        ),
        route(
            M::DELETE,
            "/v1/weaves/{name}",
            Operator,
            "weave delete",
            weaves::delete_weave,
        ),
        route(
            M::POST,
            "/v1/weaves/{name}/limits",
            Operator,
            "weave limits",
            weaves::weave_limits,
        ),
        route(
            M::POST,
            "/v1/weaves/{name}/egress",
            Operator,
            "weave egress",
            weaves::weave_egress,
        ),
        route(
            M::POST,
            "/v1/weaves/{name}/sync",
            Operator,
            "weave sync",
            weaves::weave_sync,
        ),
        route(
            M::POST,
            "/v1/weaves/{name}/route",
            Admin,
            "weave route",
            weaves::weave_route,
        ),
        route(
            M::POST,
            "/v1/weaves/{name}/activate",
            Operator,
            "weave activate",
            weaves::weave_activate,
        ),
        route(
            M::POST,
            "/v1/weaves/{name}/start",
            Operator,
            "weave start",
            weaves::weave_start,
        ),
        route(
            M::POST,
            "/v1/weaves/{name}/stop",
            Operator,
            "weave stop",
            weaves::weave_stop,
        ),
        route(
            M::GET,
            "/v1/environments/{name}/provenance",
            Reader,
            "provenance",
            provenance::provenance_records,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/replay",
            Operator,
            "replay",
            provenance::replay,
        ),
        route(M::GET, "/v1/jobs", Reader, "job list", jobs::list_jobs),
        route(M::GET, "/v1/jobs/{id}", Reader, "job show", jobs::show_job),
        route(
            M::GET,
            "/v1/store",
            Reader,
            "store stats",
            store::store_stats,
        ),
        route(
            M::POST,
            "/v1/store/verify",
            Admin,
            "store verify",
            store::store_verify,
        ),
        route(M::POST, "/v1/store/gc", Admin, "store gc", store::store_gc),
        route(
            M::POST,
            "/v1/store/tier",
            Admin,
            "store tier",
            store::store_tier,
        ),
    ]
}

/// What the gate of one route checks.
#[derive(Clone)]
struct Gate {
    state: AppState,
    need: Role,
    what: &'static str,
}

/// A refusal in a response, for the gate to audit.
#[derive(Debug, Clone)]
struct Refused(String);

/// Runs before every handler: identifies the caller (its [`Actor`] is put in the
/// request), refuses it unless it holds the route's role, and writes every refusal
/// (its own, or one a handler made through [`Actor::require`]) to the audit log.
async fn gate(State(gate): State<Gate>, mut req: Request, next: Next) -> Response {
    let cred = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .and_then(|ConnectInfo(p)| p.cred);
    let claimed = req
        .headers()
        .get(ACTOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let access = gate.state.access.clone();
    // The user and group database may be remote (NSS): not on the runtime's threads.
    let actor = tokio::task::spawn_blocking(move || {
        access
            .roles
            .identify(access.accounts.as_ref(), cred, claimed.as_deref())
    })
    .await
    .unwrap_or_else(|_| Actor::unknown(None));
    // The path is the caller's text: bounded before it reaches the audit log.
    let path: String = req.uri().path().chars().take(256).collect();
    let target = format!("{} {path}", req.method());
    let response = match actor.require(gate.need, gate.what) {
        Err(refused) => refused.into_response(),
        Ok(()) => {
            req.extensions_mut().insert(actor.clone());
            next.run(req).await
        }
    };
    if let Some(Refused(why)) = response.extensions().get::<Refused>() {
        let (catalog, who, why) = (
            gate.state.manager.catalog().clone(),
            actor.name(),
            why.clone(),
        );
        tracing::warn!(actor = %who, target, "{why}");
        // In a task of its own: a caller that hangs up cannot cut its record short.
        let record = tokio::spawn(async move {
            let written = catalog
                .audit(
                    &who,
                    "api.forbidden",
                    Some(&target),
                    Some(&why),
                    "forbidden",
                )
                .await;
            if let Err(e) = written {
                tracing::error!(error = %e, target, "cannot write a refusal to the audit log");
            }
        });
        let _ = record.await;
    }
    response
}

/// The router over [`routes`], each behind its gate.
pub fn router(state: AppState) -> Router {
    let gated = |need: Role, what: &'static str| {
        axum::middleware::from_fn_with_state(
            Gate {
                state: state.clone(),
                need,
                what,
            },
            gate,
        )
    };
    let mut router = Router::new();
    for r in routes() {
        router = router.route(r.path, r.handler.route_layer(gated(r.role, r.what)));
    }
    // Unknown routes too: a caller without a role learns nothing, not even which exist.
    let fallback = axum::routing::any(|| async {
        error_response(
            StatusCode::NOT_FOUND,
            "no such API route; see /v1/openapi.json".into(),
        )
    })
    .layer(gated(Role::Reader, "the API"));
    router
        .fallback_service(fallback.with_state(state.clone()))
        .with_state(state)
}

/// Serves `app` (the [`router`]) on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app.into_make_service_with_connect_info::<Peer>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The process on the other end of the API socket: its uid and gid (SO_PEERCRED).
#[derive(Debug, Clone)]
pub struct Peer {
    cred: Option<(u32, u32)>,
}

impl Connected<axum::serve::IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        Peer {
            cred: stream.io().peer_cred().ok().map(|c| (c.uid(), c.gid())),
        }
    }
}

/// Who holds which role, and the user database that names peers.
pub struct Access {
    /// `[roles]` of weftd.toml, resolved.
    pub roles: Roles,
    /// The user and group database.
    pub accounts: Box<dyn Accounts>,
}

async fn whoami(
    State(state): State<AppState>,
    actor: Actor,
) -> Result<Json<crate::roles::Whoami>, ApiError> {
    let access = state.access.clone();
    let groups = actor.groups.clone();
    let names = tokio::task::spawn_blocking(move || {
        groups
            .iter()
            .map(|g| {
                access
                    .accounts
                    .group_name(*g)
                    .unwrap_or_else(|| g.to_string())
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ApiError::task("whoami failed", e))?;
    Ok(Json(crate::roles::Whoami {
        uid: actor.uid,
        user: actor.user.clone(),
        groups: names,
        role: actor.role,
        actor: actor.name(),
    }))
}

fn error_response(status: StatusCode, error: String) -> Response {
    (status, Json(ErrorBody { error })).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::NotFound(_) | ApiError::Missing(_) => StatusCode::NOT_FOUND,
            ApiError::Duplicate(_) | ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Qemu(_) | ApiError::Qmp { .. } | ApiError::Nbd { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ApiError::Internal(_)
            | ApiError::Io { .. }
            | ApiError::Catalog { .. }
            | ApiError::Task { .. }
            | ApiError::Store { .. }
            | ApiError::Pull { .. }
            | ApiError::Restore { .. }
            | ApiError::Net { .. }
            | ApiError::Provenance { .. }
            | ApiError::Replay { .. }
            | ApiError::Json { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
        };
        let message = self.one_line();
        let mut response = error_response(status, message.clone());
        if status == StatusCode::FORBIDDEN {
            response.extensions_mut().insert(Refused(message));
        }
        response
    }
}

async fn status(State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    let (environments, running) = state.manager.counts().await?;
    let config = state.manager.config();
    let kvm = weft_qmp::launch::kvm_probe();
    Ok(Json(Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        uptime_secs: state.started.elapsed().as_secs(),
        data_dir: config.data_dir.clone(),
        socket: config.socket_path(),
        environments,
        running,
        default_accel: config.accel,
        kvm_usable: kvm.is_ok(),
        kvm_detail: kvm.err(),
    }))
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}

/// Parses a JSON body, turning a bad one (unknown fields included) into a one-line 400.
fn body<T>(b: Result<Json<T>, axum::extract::rejection::JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v)
        .map_err(|e| ApiError::BadRequest(crate::strict::body_error(&e.body_text())))
}

#[cfg(test)]
mod tests;
