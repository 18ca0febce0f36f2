//! Long operations.

use super::*;

pub(super) async fn list_jobs(
    State(state): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<Job>>, ApiError> {
    let limit = q.limit.unwrap_or(50).min(10_000);
    Ok(Json(state.snapshots.jobs(limit).await?))
}

pub(super) async fn show_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let n: i64 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{id:?} is not a job id")))?;
    Ok(Json(state.snapshots.job(n).await?))
}
