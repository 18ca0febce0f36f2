//! Temporal compositions: create, list, show, delete, conflicts, resolve, apply.

use super::*;

pub(super) async fn list_compositions(
    State(state): State<AppState>,
) -> Result<Json<Vec<crate::compositions::Composition>>, ApiError> {
    Ok(Json(state.compositions.list().await?))
}

pub(super) async fn create_composition(
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

pub(super) async fn show_composition(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<crate::compositions::CompositionView>, ApiError> {
    Ok(Json(state.compositions.plan(&name).await?))
}

pub(super) async fn delete_composition(
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

pub(super) async fn composition_conflicts(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<weft_api::composition::Conflict>>, ApiError> {
    Ok(Json(state.compositions.conflicts(&name).await?))
}

pub(super) async fn resolve_composition(
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

pub(super) async fn apply_composition(
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
