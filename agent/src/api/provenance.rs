//! The provenance log and replays.

use super::*;

pub(super) async fn replay(
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

pub(super) async fn provenance_records(
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
