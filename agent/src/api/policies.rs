//! Snapshot policies.

use super::*;

pub(super) async fn set_policy(
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

pub(super) async fn list_policies(
    State(state): State<AppState>,
    Query(q): Query<PolicyQuery>,
) -> Result<Json<Vec<Policy>>, ApiError> {
    Ok(Json(
        state.manager.catalog().policies(q.env.as_deref()).await?,
    ))
}

pub(super) async fn delete_policy(
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
