//! An environment's network: show, plan, expose, unexpose, activate.

use super::*;

pub(super) async fn show_net(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<NetSetup>, ApiError> {
    Ok(Json(state.manager.net().setup(&name).await?))
}

pub(super) async fn set_net_plan(
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

pub(super) async fn expose_env(
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

pub(super) async fn unexpose_env(
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

pub(super) async fn activate_env(
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
