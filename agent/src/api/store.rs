//! The chunk store: stats, verify, gc, tiering.

use super::*;

/// Runs a blocking store operation and returns its report as JSON.
pub(super) async fn store_op<T: Serialize + Send + 'static>(
    state: &AppState,
    op: impl FnOnce(&weft_blockdev::store::ChunkStore) -> Result<T, weft_blockdev::store::Error>
        + Send
        + 'static,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = state.snapshots.store().clone();
    let report = tokio::task::spawn_blocking(move || op(&store))
        .await
        .map_err(|e| ApiError::task("store task failed", e))?
        .map_err(ApiError::from)?;
    serde_json::to_value(report)
        .map(Json)
        .map_err(|e| ApiError::json("", e))
}

pub(super) async fn store_stats(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    store_op(&state, |s| s.stats()).await
}

pub(super) async fn store_verify(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    store_op(&state, |s| s.verify()).await
}

pub(super) async fn store_gc(
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

pub(super) async fn store_tier(
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
