//! The audit log and its verification.

use super::*;

pub(super) async fn audit_log(
    State(state): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let limit = q.limit.unwrap_or(50).min(10_000);
    Ok(Json(state.manager.catalog().audit_log(limit).await?))
}

pub(super) async fn audit_verify(
    State(state): State<AppState>,
) -> Result<Json<crate::audit::AuditVerify>, ApiError> {
    Ok(Json(state.manager.catalog().verify_audit().await?))
}
