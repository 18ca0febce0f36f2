//! The HTTP/JSON API that weftd serves on its unix socket.
//!
//! Every route is listed once in [`routes`]; the router is built from that
//! list and a test checks it against the checked-in `docs/openapi.json`, so a
//! route cannot be added without being documented.

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

use crate::catalog_snapshots::SnapshotFilter;
use crate::envs::Manager;
use crate::error::{one_line, ApiError};
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
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

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
        route(M::GET, "/v1/environments", Reader, "env list", list_envs),
        route(
            M::POST,
            "/v1/environments",
            Operator,
            "env create",
            create_env,
        ),
        route(
            M::GET,
            "/v1/environments/{name}",
            Reader,
            "env show",
            show_env,
        ),
        route(
            M::DELETE,
            "/v1/environments/{name}",
            Operator,
            "env delete",
            delete_env,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/start",
            Operator,
            "env start",
            start_env,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/stop",
            Operator,
            "env stop",
            stop_env,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/pause",
            Operator,
            "env pause",
            pause_env,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/resume",
            Operator,
            "env resume",
            resume_env,
        ),
        route(
            M::GET,
            "/v1/environments/{name}/net",
            Reader,
            "env net",
            show_net,
        ),
        route(
            M::PUT,
            "/v1/environments/{name}/net",
            Admin,
            "env net --guest",
            set_net_plan,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/config",
            Operator,
            "env set",
            set_env_config,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/expose",
            Admin,
            "env expose",
            expose_env,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/unexpose",
            Admin,
            "env unexpose",
            unexpose_env,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/activate",
            Operator,
            "env activate",
            activate_env,
        ),
        route(M::GET, "/v1/audit", Reader, "audit", audit_log),
        route(
            M::GET,
            "/v1/audit/verify",
            Reader,
            "audit verify",
            audit_verify,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/snapshots",
            Operator,
            "snapshot create",
            create_snapshot,
        ),
        route(
            M::GET,
            "/v1/environments/{name}/snapshots",
            Reader,
            "snapshot list",
            list_snapshots,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/snapshots/prune",
            Operator,
            "snapshot prune",
            prune_snapshots,
        ),
        route(
            M::GET,
            "/v1/snapshots/{id}",
            Reader,
            "snapshot show",
            show_snapshot,
        ),
        route(
            M::DELETE,
            "/v1/snapshots/{id}",
            Operator,
            "snapshot delete",
            delete_snapshot,
        ),
        route(
            M::POST,
            "/v1/snapshots/{id}/verify",
            Operator,
            "snapshot verify",
            verify_snapshot,
        ),
        route(
            M::POST,
            "/v1/snapshots/{id}/restore",
            Admin,
            "restore",
            restore_snapshot,
        ),
        route(
            M::PUT,
            "/v1/environments/{name}/policies",
            Operator,
            "policy set",
            set_policy,
        ),
        route(M::GET, "/v1/policies", Reader, "policy list", list_policies),
        route(
            M::DELETE,
            "/v1/environments/{name}/policies/{resource}",
            Operator,
            "policy delete",
            delete_policy,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/weaves",
            Operator,
            "weave create",
            create_weave,
        ),
        route(
            M::GET,
            "/v1/environments/{name}/weaves",
            Reader,
            "weave list",
            list_weaves,
        ),
        route(
            M::GET,
            "/v1/weaves/{name}",
            Reader,
            "weave show",
            show_weave,
        ),
        route(
            M::GET,
            "/v1/weaves/{name}/sources",
            Reader,
            "weave sources",
            weave_sources,
        ),
        route(
            M::GET,
            "/v1/compositions",
            Reader,
            "compose list",
            list_compositions,
        ),
        route(
            M::POST,
            "/v1/compositions",
            Operator,
            "compose create",
            create_composition,
        ),
        route(
            M::GET,
            "/v1/compositions/{name}",
            Reader,
            "compose plan",
            show_composition,
        ),
        route(
            M::DELETE,
            "/v1/compositions/{name}",
            Operator,
            "compose delete",
            delete_composition,
        ),
        route(
            M::GET,
            "/v1/compositions/{name}/conflicts",
            Reader,
            "compose conflicts",
            composition_conflicts,
        ),
        route(
            M::POST,
            "/v1/compositions/{name}/resolve",
            Operator,
            "compose resolve",
            resolve_composition,
        ),
        route(
            M::POST,
            "/v1/compositions/{name}/apply",
            Operator,
            "compose apply",
            apply_composition,
        ),
        route(
            M::DELETE,
            "/v1/weaves/{name}",
            Operator,
            "weave delete",
            delete_weave,
        ),
        route(
            M::POST,
            "/v1/weaves/{name}/limits",
            Operator,
            "weave limits",
            weave_limits,
        ),
        route(
            M::POST,
            "/v1/weaves/{name}/egress",
            Operator,
            "weave egress",
            weave_egress,
        ),
        route(
            M::POST,
            "/v1/weaves/{name}/sync",
            Operator,
            "weave sync",
            weave_sync,
        ),
        route(
            M::POST,
            "/v1/weaves/{name}/route",
            Admin,
            "weave route",
            weave_route,
        ),
        route(
            M::POST,
            "/v1/weaves/{name}/activate",
            Operator,
            "weave activate",
            weave_activate,
        ),
        route(
            M::POST,
            "/v1/weaves/{name}/start",
            Operator,
            "weave start",
            weave_start,
        ),
        route(
            M::POST,
            "/v1/weaves/{name}/stop",
            Operator,
            "weave stop",
            weave_stop,
        ),
        route(
            M::GET,
            "/v1/environments/{name}/provenance",
            Reader,
            "provenance",
            provenance_records,
        ),
        route(
            M::POST,
            "/v1/environments/{name}/replay",
            Operator,
            "replay",
            replay,
        ),
        route(M::GET, "/v1/jobs", Reader, "job list", list_jobs),
        route(M::GET, "/v1/jobs/{id}", Reader, "job show", show_job),
        route(M::GET, "/v1/store", Reader, "store stats", store_stats),
        route(
            M::POST,
            "/v1/store/verify",
            Admin,
            "store verify",
            store_verify,
        ),
        route(M::POST, "/v1/store/gc", Admin, "store gc", store_gc),
        route(M::POST, "/v1/store/tier", Admin, "store tier", store_tier),
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
    .map_err(|e| ApiError::Internal(format!("whoami failed: {e}")))?;
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
            ApiError::Qemu(_) => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
        };
        let message = one_line(&self.to_string());
        let mut response = error_response(status, message.clone());
        if status == StatusCode::FORBIDDEN {
            response.extensions_mut().insert(Refused(message));
        }
        response
    }
}

/// Records a change in the audit log, whatever its outcome, then returns it.
async fn audited<T>(
    state: &AppState,
    actor: &str,
    action: &str,
    target: &str,
    detail: Option<String>,
    result: Result<T, ApiError>,
) -> Result<T, ApiError> {
    let outcome = match &result {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("error: {}", one_line(&e.to_string())),
    };
    if let Err(e) = state
        .manager
        .catalog()
        .audit(actor, action, Some(target), detail.as_deref(), &outcome)
        .await
    {
        tracing::error!(error = %e, action, target, "cannot write the audit log");
        if result.is_ok() {
            return Err(ApiError::Internal(format!(
                "the change was made but the audit log could not be written: {e}"
            )));
        }
    }
    match &result {
        Ok(_) => tracing::info!(actor, action, target, "done"),
        Err(e) => tracing::warn!(actor, action, target, error = %e, "refused or failed"),
    }
    result
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

async fn list_envs(State(state): State<AppState>) -> Result<Json<Vec<EnvironmentView>>, ApiError> {
    let list = state.manager.list().await?;
    Ok(Json(
        list.into_iter()
            .map(|(env, runstate)| EnvironmentView { env, runstate })
            .collect(),
    ))
}

async fn show_env(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    let (env, runstate) = state.manager.show(&name).await?;
    Ok(Json(EnvironmentView { env, runstate }))
}

/// Runs a change and writes its audit record in a task of its own, so a client
/// that hangs up cannot cut the change (or its record) in half.
async fn change<T, F>(
    state: &AppState,
    actor: String,
    action: &'static str,
    target: String,
    detail: Option<String>,
    op: F,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
{
    let state = state.clone();
    let task = tokio::spawn(async move {
        let result = op.await;
        audited(&state, &actor, action, &target, detail, result).await
    });
    task.await
        .map_err(|e| ApiError::Internal(format!("{action} failed: {e}")))?
}

async fn view(state: &AppState, env: Environment) -> EnvironmentView {
    let runstate = state
        .manager
        .show(&env.name)
        .await
        .ok()
        .and_then(|(_, r)| r);
    EnvironmentView { env, runstate }
}

async fn create_env(
    State(state): State<AppState>,
    actor: Actor,
    body: Result<Json<CreateEnvironment>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<EnvironmentView>), ApiError> {
    let req = self::body(body)?;
    if matches!(req, CreateEnvironment::Attached { .. }) {
        // weftd (root) would drive a VM someone else started, through a socket path of
        // the caller's choosing.
        actor.require(Role::Admin, "env attach")?;
    }
    let (CreateEnvironment::Managed { name, .. } | CreateEnvironment::Attached { name, .. }) = &req;
    let name = name.clone();
    let detail = serde_json::to_string(&req).ok();
    let manager = state.manager.clone();
    let env = change(
        &state,
        actor.name(),
        "env.create",
        name,
        detail,
        async move { manager.create(req).await },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(view(&state, env).await)))
}

/// A change to one environment that answers with the environment.
async fn env_change<F, Fut>(
    state: AppState,
    actor: Actor,
    name: String,
    action: &'static str,
    op: F,
) -> Result<Json<EnvironmentView>, ApiError>
where
    F: FnOnce(Arc<Manager>, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Environment, ApiError>> + Send + 'static,
{
    let (manager, target) = (state.manager.clone(), name.clone());
    let env = change(&state, actor.name(), action, name, None, async move {
        op(manager, target).await
    })
    .await?;
    Ok(Json(view(&state, env).await))
}

async fn start_env(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    env_change(state, actor, name, "env.start", |m, n| async move {
        let env = m.start(&n).await?;
        // QEMU made the tap anew: its published ports' host-local clients need it again.
        crate::net::Net::new(m.catalog()).after_env_start(&n).await;
        Ok(env)
    })
    .await
}

async fn stop_env(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    env_change(state, actor, name, "env.stop", |m, n| async move {
        m.stop(&n).await
    })
    .await
}

async fn pause_env(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    env_change(state, actor, name, "env.pause", |m, n| async move {
        m.pause(&n, true).await
    })
    .await
}

async fn resume_env(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    env_change(state, actor, name, "env.resume", |m, n| async move {
        m.pause(&n, false).await
    })
    .await
}

async fn delete_env(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (manager, target) = (state.manager.clone(), name.clone());
    change(&state, actor.name(), "env.delete", name, None, async move {
        manager.delete(&target).await?;
        // Its host ports went with its rows: their routes go too.
        crate::net::Net::new(manager.catalog()).sweep_ports().await
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn audit_log(
    State(state): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let limit = q.limit.unwrap_or(50).min(10_000);
    Ok(Json(state.manager.catalog().audit_log(limit).await?))
}

async fn audit_verify(
    State(state): State<AppState>,
) -> Result<Json<crate::audit::AuditVerify>, ApiError> {
    Ok(Json(state.manager.catalog().verify_audit().await?))
}

/// Parses a JSON body, turning a bad one (unknown fields included) into a one-line 400.
fn body<T>(b: Result<Json<T>, axum::extract::rejection::JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v)
        .map_err(|e| ApiError::BadRequest(crate::strict::body_error(&e.body_text())))
}

async fn create_snapshot(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    req: Result<Json<CreateSnapshot>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    let req = body(req)?;
    let actor = actor.name();
    let snapshots = state.snapshots.clone();
    let (target, who) = (name.clone(), actor.clone());
    let detail = serde_json::to_string(&req).ok();
    let job = change(&state, actor, "snapshot.create", name, detail, async move {
        snapshots
            .create(
                &target,
                req.resource.as_deref(),
                req.category,
                req.note,
                &who,
            )
            .await
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

fn rfc3339(field: &str, v: Option<String>) -> Result<Option<String>, ApiError> {
    v.map(|t| {
        humantime::parse_rfc3339_weak(&t)
            .map(|st| humantime::format_rfc3339_micros(st).to_string())
            .map_err(|e| {
                ApiError::BadRequest(format!(
                    "--{field} {t:?}: {e}; use e.g. 2026-11-22T10:00:00Z"
                ))
            })
    })
    .transpose()
}

async fn list_snapshots(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<SnapshotQuery>,
) -> Result<Json<Vec<Snapshot>>, ApiError> {
    let filter = SnapshotFilter {
        resource: q.resource,
        since: rfc3339("since", q.since)?,
        until: rfc3339("until", q.until)?,
        category: q.category,
        all_states: q.all,
    };
    Ok(Json(state.snapshots.list(&name, &filter).await?))
}

async fn prune_snapshots(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    req: Result<Json<PruneRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req = body(req)?;
    let snapshots = state.snapshots.clone();
    let target = name.clone();
    let detail = serde_json::to_string(&req).ok();
    let report = change(
        &state,
        actor.name(),
        "snapshot.prune",
        name,
        detail,
        async move {
            snapshots
                .prune(&target, req.resource.as_deref(), &req.keep, req.dry_run)
                .await
        },
    )
    .await?;
    Ok(Json(report))
}

fn snapshot_id(id: &str) -> Result<i64, ApiError> {
    id.parse().map_err(|_| {
        ApiError::BadRequest(format!(
            "{id:?} is not a snapshot id (see `weft snapshot list ENV`)"
        ))
    })
}

async fn show_snapshot(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Snapshot>, ApiError> {
    Ok(Json(state.snapshots.get(snapshot_id(&id)?).await?))
}

async fn delete_snapshot(
    State(state): State<AppState>,
    actor: Actor,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let n = snapshot_id(&id)?;
    let snapshots = state.snapshots.clone();
    change(
        &state,
        actor.name(),
        "snapshot.delete",
        id,
        None,
        async move { snapshots.delete(n).await },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn verify_snapshot(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(state.snapshots.verify(snapshot_id(&id)?).await?))
}

async fn restore_snapshot(
    State(state): State<AppState>,
    actor: Actor,
    Path(id): Path<String>,
    req: Result<Json<RestoreRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    let req = body(req)?;
    let n = snapshot_id(&id)?;
    let actor = actor.name();
    let snapshots = state.snapshots.clone();
    let who = actor.clone();
    let detail = serde_json::to_string(&req).ok();
    let job = change(&state, actor, "snapshot.restore", id, detail, async move {
        snapshots
            .restore(n, &req.output, req.format.as_deref(), req.force, &who)
            .await
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

async fn set_policy(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    req: Result<Json<SetPolicy>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Policy>, ApiError> {
    let req = body(req)?;
    req.check().map_err(ApiError::BadRequest)?;
    state.manager.show(&name).await?;
    let catalog = state.manager.catalog().clone();
    let target = name.clone();
    let detail = serde_json::to_string(&req).ok();
    let policy = change(
        &state,
        actor.name(),
        "policy.set",
        name,
        detail,
        async move { Ok(catalog.set_policy(&target, &req).await?) },
    )
    .await?;
    Ok(Json(policy))
}

async fn list_policies(
    State(state): State<AppState>,
    Query(q): Query<PolicyQuery>,
) -> Result<Json<Vec<Policy>>, ApiError> {
    Ok(Json(
        state.manager.catalog().policies(q.env.as_deref()).await?,
    ))
}

async fn delete_policy(
    State(state): State<AppState>,
    actor: Actor,
    Path((name, resource)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let catalog = state.manager.catalog().clone();
    let (env, res) = (name.clone(), resource.clone());
    change(
        &state,
        actor.name(),
        "policy.delete",
        name,
        Some(resource),
        async move {
            if catalog.delete_policy(&env, &res).await? {
                Ok(())
            } else {
                Err(ApiError::Missing(format!(
                    "no policy for {res} of {env} (see `weft policy list`)"
                )))
            }
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create_weave(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    req: Result<Json<CreateWeave>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Weave>), ApiError> {
    let req = body(req)?;
    require_egress(&actor, req.egress, "weave create --egress all")?;
    let weaves = state.weaves.clone();
    let parent = name.clone();
    let detail = serde_json::to_string(&req).ok();
    let weave = change(
        &state,
        actor.name(),
        "weave.create",
        name,
        detail,
        async move { weaves.create(&parent, req).await },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(weave)))
}

async fn list_weaves(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Weave>>, ApiError> {
    state.manager.show(&name).await?;
    Ok(Json(state.weaves.list(&name).await?))
}

async fn show_weave(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Weave>, ApiError> {
    Ok(Json(state.weaves.show(&name).await?))
}

async fn weave_sources(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<crate::weaves::SourceRow>>, ApiError> {
    state.weaves.show(&name).await?;
    Ok(Json(state.manager.catalog().weave_sources(&name).await?))
}

async fn list_compositions(
    State(state): State<AppState>,
) -> Result<Json<Vec<crate::compositions::Composition>>, ApiError> {
    Ok(Json(state.compositions.list().await?))
}

async fn create_composition(
    State(state): State<AppState>,
    actor: Actor,
    req: Result<
        Json<crate::compositions::CreateComposition>,
        axum::extract::rejection::JsonRejection,
    >,
) -> Result<(StatusCode, Json<crate::compositions::CompositionView>), ApiError> {
    let req = body(req)?;
    let comps = state.compositions.clone();
    let who = actor.name();
    let target = req.name.clone();
    let detail = serde_json::to_string(&req).ok();
    let by = who.clone();
    let view = change(&state, who, "compose.create", target, detail, async move {
        comps.create(req, &by).await
    })
    .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn show_composition(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<crate::compositions::CompositionView>, ApiError> {
    Ok(Json(state.compositions.plan(&name).await?))
}

async fn delete_composition(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let comps = state.compositions.clone();
    let target = name.clone();
    change(
        &state,
        actor.name(),
        "compose.delete",
        target,
        None,
        async move { comps.delete(&name).await },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn composition_conflicts(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<weft_api::composition::Conflict>>, ApiError> {
    Ok(Json(state.compositions.conflicts(&name).await?))
}

async fn resolve_composition(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    req: Result<Json<crate::compositions::ResolveRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Vec<weft_api::composition::Conflict>>, ApiError> {
    let req = body(req)?;
    let comps = state.compositions.clone();
    let who = actor.name();
    let detail = serde_json::to_string(&req).ok();
    let (by, target) = (who.clone(), name.clone());
    let out = change(&state, who, "compose.resolve", target, detail, async move {
        comps.resolve(&name, req, &by).await
    })
    .await?;
    Ok(Json(out))
}

async fn apply_composition(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    req: Result<Json<ApplyComposition>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Weave>), ApiError> {
    let req = body(req)?;
    require_egress(&actor, req.egress, "compose apply --egress all")?;
    let comp = state.compositions.get(&name).await?;
    let weaves = state.weaves.clone();
    let detail = serde_json::to_string(&req).ok();
    let weave = change(
        &state,
        actor.name(),
        "compose.apply",
        name.clone(),
        detail,
        async move {
            weaves
                .create(
                    &comp.env,
                    CreateWeave {
                        name: req.weave,
                        source: Some(crate::weaves::Source::Composition(name)),
                        live: req.live,
                        egress: req.egress,
                    },
                )
                .await
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(weave)))
}

async fn delete_weave(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let weaves = state.weaves.clone();
    let target = name.clone();
    change(
        &state,
        actor.name(),
        "weave.delete",
        name,
        None,
        async move { weaves.delete(&target).await },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn show_net(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<NetSetup>, ApiError> {
    Ok(Json(
        crate::net::Net::new(state.manager.catalog())
            .setup(&name)
            .await?,
    ))
}

/// A change to an environment's `net` resource that answers with its setup.
async fn net_change<F, Fut>(
    state: AppState,
    actor: Actor,
    name: String,
    action: &'static str,
    detail: Option<String>,
    op: F,
) -> Result<Json<NetSetup>, ApiError>
where
    F: FnOnce(crate::net::Net, String, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<NetSetup, ApiError>> + Send + 'static,
{
    let net = crate::net::Net::new(state.manager.catalog());
    let actor = actor.name();
    let (target, who) = (name.clone(), actor.clone());
    let setup = change(&state, actor, action, name, detail, async move {
        op(net, target, who).await
    })
    .await?;
    Ok(Json(setup))
}

async fn set_env_config(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    req: Result<Json<SetConfig>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<EnvironmentView>, ApiError> {
    let req = body(req)?;
    let detail = serde_json::to_string(&req).ok();
    let manager = state.manager.clone();
    let target = name.clone();
    let env = change(
        &state,
        actor.name(),
        "env.config",
        target,
        detail,
        async move { manager.set_resources(&name, req.memory_mib, req.cpus).await },
    )
    .await?;
    Ok(Json(view(&state, env).await))
}

async fn set_net_plan(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    req: Result<Json<crate::strict::Strict<GuestPlan>>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<NetSetup>, ApiError> {
    let plan = body(req)?.0;
    let detail = serde_json::to_string(&plan).ok();
    net_change(
        state,
        actor,
        name,
        "env.net",
        detail,
        move |net, env, who| async move { net.set_plan(&env, plan, &who).await },
    )
    .await
}

async fn expose_env(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    req: Result<Json<ExposeRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<NetSetup>, ApiError> {
    let req = body(req)?;
    let detail = serde_json::to_string(&req).ok();
    net_change(
        state,
        actor,
        name,
        "env.expose",
        detail,
        move |net, env, who| async move { net.expose(&env, &req, &who).await },
    )
    .await
}

async fn unexpose_env(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    req: Result<Json<UnexposeRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<NetSetup>, ApiError> {
    let req = body(req)?;
    let detail = serde_json::to_string(&req).ok();
    net_change(
        state,
        actor,
        name,
        "env.unexpose",
        detail,
        move |net, env, who| async move { net.unexpose(&env, req.host_port, &who).await },
    )
    .await
}

async fn activate_env(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<NetSetup>, ApiError> {
    net_change(
        state,
        actor,
        name,
        "env.activate",
        None,
        |net, env, who| async move { net.activate_env(&env, &who).await },
    )
    .await
}

async fn weave_route(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    req: Result<Json<RouteRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Weave>, ApiError> {
    let req = body(req)?;
    let weaves = state.weaves.clone();
    let target = name.clone();
    let detail = serde_json::to_string(&req).ok();
    let actor = actor.name();
    let who = actor.clone();
    let weave = change(&state, actor, "weave.route", name, detail, async move {
        weaves
            .route(
                &target,
                req.host_port.unwrap_or(req.guest_port),
                req.guest_port,
                &who,
            )
            .await
    })
    .await?;
    Ok(Json(weave))
}

async fn weave_activate(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let weaves = state.weaves.clone();
    let target = name.clone();
    let actor = actor.name();
    let who = actor.clone();
    let report = change(&state, actor, "weave.activate", name, None, async move {
        weaves.activate(&target, &who).await
    })
    .await?;
    Ok(Json(report))
}

async fn weave_egress(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    req: Result<Json<crate::model::EgressRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<NetSetup>, ApiError> {
    let req = body(req)?;
    require_egress(&actor, req.egress, "weave egress all")?;
    net_change(
        state,
        actor,
        name,
        "weave.egress",
        serde_json::to_string(&req).ok(),
        move |net, weave, who| async move { net.set_egress(&weave, req.egress, &who).await },
    )
    .await
}

/// Egress `all` opens the host and the operator's networks to a guest: an admin's call.
fn require_egress(actor: &Actor, egress: crate::model::Egress, what: &str) -> Result<(), ApiError> {
    match egress {
        crate::model::Egress::All => actor.require(Role::Admin, what),
        crate::model::Egress::None | crate::model::Egress::Internet => Ok(()),
    }
}

async fn weave_start(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    weave_run(state, actor, name, true).await
}

async fn weave_stop(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    weave_run(state, actor, name, false).await
}

/// Starts or stops a weave's QEMU; refuses an environment that is not a weave.
async fn weave_run(
    state: AppState,
    actor: Actor,
    name: String,
    start: bool,
) -> Result<Json<EnvironmentView>, ApiError> {
    let weaves = state.weaves.clone();
    let (action, verb) = if start {
        ("weave.start", "start")
    } else {
        ("weave.stop", "stop")
    };
    env_change(state, actor, name, action, move |m, n| async move {
        weaves.ensure(&n, verb).await?;
        if start {
            m.start(&n).await
        } else {
            m.stop(&n).await
        }
    })
    .await
}

async fn weave_limits(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    req: Result<Json<crate::cgroups::Limits>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Weave>, ApiError> {
    let limits = body(req)?;
    let weaves = state.weaves.clone();
    let target = name.clone();
    let detail = serde_json::to_string(&limits).ok();
    let weave = change(
        &state,
        actor.name(),
        "weave.limits",
        name,
        detail,
        async move { weaves.set_limits(&target, &limits).await },
    )
    .await?;
    Ok(Json(weave))
}

async fn weave_sync(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    req: Result<Json<crate::sync::SyncRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<crate::sync::SyncReport>, ApiError> {
    let req = body(req)?;
    let (manager, snapshots) = (state.manager.clone(), state.snapshots.clone());
    let src = name.clone();
    let detail = serde_json::to_string(&req).ok();
    let report = change(
        &state,
        actor.name(),
        "weave.sync",
        name,
        detail,
        async move { crate::sync::sync(&manager, &snapshots, &src, &req).await },
    )
    .await?;
    Ok(Json(report))
}

async fn replay(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    req: Result<Json<weft_api::provenance::ReplayRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<weft_api::provenance::ReplayReport>, ApiError> {
    let req = body(req)?;
    // Into a weave of the environment is an operator's; files written on the host,
    // or a push into anything else, are an admin's.
    if req.out.is_some() {
        actor.require(Role::Admin, "replay --out")?;
    }
    if req.force {
        actor.require(Role::Admin, "replay --force")?;
    }
    let manager = state.manager.clone();
    let snapshots = state.snapshots.clone();
    let env = name.clone();
    let detail = serde_json::to_string(&req).ok();
    let actor = actor.name();
    let audit = state.clone();
    let forced_by = actor.clone();
    let report = change(
        &state,
        actor,
        "provenance.replay",
        name,
        detail,
        async move {
            // A push forced into something that is not one of the environment's weaves
            // gets a record of its own, on the target, with its outcome.
            let forced = match (&req.into, req.force) {
                (Some(into), true) => {
                    crate::provenance::replay::not_a_weave_of(&manager, &env, into)
                        .await
                        .ok()
                        .flatten()
                        .map(|why| (into.clone(), why))
                }
                _ => None,
            };
            let result = crate::provenance::replay::run(&manager, &snapshots, &env, &req).await;
            match forced {
                Some((into, why)) => {
                    let detail = format!("state of {env:?} pushed with --force: {why}");
                    audited(
                        &audit,
                        &forced_by,
                        "provenance.replay.force",
                        &into,
                        Some(detail),
                        result,
                    )
                    .await
                }
                None => result,
            }
        },
    )
    .await?;
    Ok(Json(report))
}

async fn provenance_records(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<weft_api::provenance::PageQuery>,
) -> Result<Response, ApiError> {
    // A `Page`, serialised record by record as the log streamed into it.
    let body = crate::provenance::service::page(&state.manager, &name, q).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

async fn list_jobs(
    State(state): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<Job>>, ApiError> {
    let limit = q.limit.unwrap_or(50).min(10_000);
    Ok(Json(state.snapshots.jobs(limit).await?))
}

async fn show_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let n: i64 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{id:?} is not a job id")))?;
    Ok(Json(state.snapshots.job(n).await?))
}

/// Runs a blocking store operation and returns its report as JSON.
async fn store_op<T: Serialize + Send + 'static>(
    state: &AppState,
    op: impl FnOnce(&weft_blockdev::store::ChunkStore) -> Result<T, weft_blockdev::store::Error>
        + Send
        + 'static,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = state.snapshots.store().clone();
    let report = tokio::task::spawn_blocking(move || op(&store))
        .await
        .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    serde_json::to_value(report)
        .map(Json)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

async fn store_stats(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    store_op(&state, |s| s.stats()).await
}

async fn store_verify(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    store_op(&state, |s| s.verify()).await
}

async fn store_gc(
    State(state): State<AppState>,
    actor: Actor,
    req: Result<Json<GcRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let grace = std::time::Duration::from_secs(body(req)?.grace_secs.unwrap_or(24 * 3600 + 300));
    let st = state.clone();
    change(
        &state,
        actor.name(),
        "store.gc",
        "store".into(),
        Some(format!("grace {}s", grace.as_secs())),
        async move { store_op(&st, move |s| s.gc(grace)).await },
    )
    .await
}

async fn store_tier(
    State(state): State<AppState>,
    actor: Actor,
    req: Result<Json<TierRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req = body(req)?;
    let mut policy = weft_blockdev::store::TierPolicy::default();
    let secs = std::time::Duration::from_secs;
    if let Some(v) = req.cold_after_secs {
        policy.cold_after = secs(v);
    }
    if let Some(v) = req.frequent_reads {
        policy.frequent_reads = v;
    }
    if let Some(v) = req.frequent_cold_after_secs {
        policy.frequent_cold_after = secs(v);
    }
    if let Some(v) = req.promote_after_cold_reads {
        policy.promote_after_cold_reads = v;
    }
    let st = state.clone();
    let detail = serde_json::to_string(&req).ok();
    change(
        &state,
        actor.name(),
        "store.tier",
        "store".into(),
        detail,
        async move { store_op(&st, move |s| s.tier(&policy)).await },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Every documented operation with its `x-weft-role` (empty when it has none).
    fn documented() -> BTreeMap<(String, String), String> {
        let doc: serde_json::Value =
            serde_json::from_str(OPENAPI).expect("docs/openapi.json is JSON");
        let mut out = BTreeMap::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                    let role = op["x-weft-role"].as_str().unwrap_or_default().to_string();
                    out.insert((method.to_uppercase(), path.clone()), role);
                }
            }
        }
        out
    }

    #[test]
    fn openapi_documents_exactly_the_served_routes_and_their_roles() {
        let served: BTreeMap<(String, String), String> = routes()
            .iter()
            .map(|r| {
                (
                    (r.method.to_string(), r.path.to_string()),
                    r.role.to_string(),
                )
            })
            .collect();
        let documented = documented();
        let served_keys: BTreeSet<_> = served.keys().collect();
        let documented_keys: BTreeSet<_> = documented.keys().collect();
        let undocumented: Vec<_> = served_keys.difference(&documented_keys).collect();
        let unserved: Vec<_> = documented_keys.difference(&served_keys).collect();
        assert!(
            undocumented.is_empty(),
            "routes served but not in docs/openapi.json: {undocumented:?}"
        );
        assert!(
            unserved.is_empty(),
            "routes in docs/openapi.json that weftd does not serve: {unserved:?}"
        );
        let wrong: Vec<_> = served
            .iter()
            .filter(|(k, role)| documented[*k] != **role)
            .map(|(k, role)| {
                format!(
                    "{} {}: x-weft-role {:?}, served as {role}",
                    k.0, k.1, documented[k]
                )
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "docs/openapi.json's x-weft-role differs from the route table: {wrong:#?}"
        );
    }

    #[test]
    fn every_get_is_for_readers_and_every_change_needs_more() {
        for r in routes() {
            assert_eq!(
                r.method == Method::GET,
                r.role == Role::Reader,
                "{} {} needs {}",
                r.method,
                r.path,
                r.role
            );
        }
    }
}
