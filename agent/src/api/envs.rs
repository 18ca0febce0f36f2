//! Environments: list, show, create, start, stop, pause, resume, delete, configuration.

use super::*;

pub(super) async fn list_envs(
    State(state): State<AppState>,
) -> Result<Json<Vec<EnvironmentView>>, ApiError> {
    let list = state.manager.list().await?;
    Ok(Json(
        list.into_iter()
            .map(|(env, runstate)| EnvironmentView { env, runstate })
            .collect(),
    ))
}

pub(super) async fn show_env(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    let (env, runstate) = state.manager.show(&name).await?;
    Ok(Json(EnvironmentView { env, runstate }))
}

pub(super) async fn view(state: &AppState, env: Environment) -> EnvironmentView {
    let runstate = state
        .manager
        .show(&env.name)
        .await
        .ok()
        .and_then(|(_, r)| r);
    EnvironmentView { env, runstate }
}

pub(super) async fn create_env(
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

pub(super) async fn start_env(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    env_change(state, actor, name, "env.start", |m, n| async move {
        let env = m.start(&n).await?;
        // QEMU made the tap anew: its published ports' host-local clients need it again.
        m.net().after_env_start(&n).await;
        Ok(env)
    })
    .await
}

pub(super) async fn stop_env(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    env_change(state, actor, name, "env.stop", |m, n| async move {
        m.stop(&n).await
    })
    .await
}

pub(super) async fn pause_env(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    env_change(state, actor, name, "env.pause", |m, n| async move {
        m.pause(&n, true).await
    })
    .await
}

pub(super) async fn resume_env(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    env_change(state, actor, name, "env.resume", |m, n| async move {
        m.pause(&n, false).await
    })
    .await
}

pub(super) async fn delete_env(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (manager, target) = (state.manager.clone(), name.clone());
    change(&state, actor.name(), "env.delete", name, None, async move {
        manager.delete(&target).await?;
        // Its host ports went with its rows: their routes go too.
        manager.net().sweep_ports().await
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn set_env_config(
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
