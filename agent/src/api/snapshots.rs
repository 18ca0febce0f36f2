//! Snapshots: take, list, prune, show, delete, verify, restore.

use super::*;

pub(super) async fn create_snapshot(
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

pub(super) fn rfc3339(field: &str, v: Option<String>) -> Result<Option<String>, ApiError> {
    v.map(|t| {
        weft_api::resource::Timestamp::parse(&t)
            .map(|ts| ts.canonical())
            .map_err(|e| {
                ApiError::BadRequest(format!(
                    "--{field} {t:?}: {e}; use e.g. 2026-11-22T10:00:00Z"
                ))
            })
    })
    .transpose()
}

pub(super) async fn list_snapshots(
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

pub(super) async fn prune_snapshots(
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

pub(super) fn snapshot_id(id: &str) -> Result<i64, ApiError> {
    id.parse().map_err(|_| {
        ApiError::BadRequest(format!(
            "{id:?} is not a snapshot id (see `weft snapshot list ENV`)"
        ))
    })
}

pub(super) async fn show_snapshot(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Snapshot>, ApiError> {
    Ok(Json(state.snapshots.get(snapshot_id(&id)?).await?))
}

pub(super) async fn delete_snapshot(
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

pub(super) async fn verify_snapshot(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(state.snapshots.verify(snapshot_id(&id)?).await?))
}

pub(super) async fn restore_snapshot(
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
