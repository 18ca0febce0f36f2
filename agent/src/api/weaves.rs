//! Weaves: create, list, show, sources, delete, route, activate, egress, start, stop, run, limits, sync.

use super::*;

pub(super) async fn create_weave(
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

pub(super) async fn list_weaves(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Weave>>, ApiError> {
    state.manager.show(&name).await?;
    Ok(Json(state.weaves.list(&name).await?))
}

pub(super) async fn show_weave(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Weave>, ApiError> {
    Ok(Json(state.weaves.show(&name).await?))
}

pub(super) async fn weave_sources(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<crate::weaves::SourceRow>>, ApiError> {
    state.weaves.show(&name).await?;
    Ok(Json(state.manager.catalog().weave_sources(&name).await?))
}

pub(super) async fn delete_weave(
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

pub(super) async fn weave_route(
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

pub(super) async fn weave_activate(
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

pub(super) async fn weave_egress(
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

pub(super) async fn weave_start(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    weave_run(state, actor, name, true).await
}

pub(super) async fn weave_stop(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    weave_run(state, actor, name, false).await
}

/// Starts or stops a weave's QEMU; refuses an environment that is not a weave.
pub(super) async fn weave_run(
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

pub(super) async fn weave_limits(
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

pub(super) async fn weave_sync(
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
