//! Changes through the API: each runs in a task of its own under a tracing span, and
//! is written to the audit log with its outcome, whatever it is.

use super::*;

/// Records a change in the audit log, whatever its outcome, then returns it.
pub(super) async fn audited<T>(
    state: &AppState,
    actor: &str,
    action: &str,
    target: &str,
    detail: Option<String>,
    result: Result<T, ApiError>,
) -> Result<T, ApiError> {
    let outcome = match &result {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("error: {}", e.one_line()),
    };
    if let Err(e) = state
        .manager
        .catalog()
        .audit(actor, action, Some(target), detail.as_deref(), &outcome)
        .await
    {
        tracing::error!(error = %error_chain(&e), action, target, "cannot write the audit log");
        if result.is_ok() {
            return Err(ApiError::catalog(
                "the change was made but the audit log could not be written",
                e,
            ));
        }
    }
    match &result {
        Ok(_) => tracing::info!(actor, action, target, "done"),
        Err(e) => tracing::warn!(actor, action, target, error = %e.one_line(), "refused or failed"),
    }
    result
}

/// Runs a change and writes its audit record in a task of its own, so a client
/// that hangs up cannot cut the change (or its record) in half.
pub(super) async fn change<T, F>(
    state: &AppState,
    actor: String,
    action: &'static str,
    target: String,
    detail: Option<String>,
    op: F,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
{
    let state = state.clone();
    // Everything the operation logs (QMP, netlink, the store, jobs) carries what it
    // was, on what, for whom.
    let span = tracing::info_span!("op", action, target = %target, actor = %actor);
    let task = tokio::spawn(
        async move {
            let result = op.await;
            audited(&state, &actor, action, &target, detail, result).await
        }
        .instrument(span),
    );
    task.await
        .map_err(|e| ApiError::task(format!("{action} failed"), e))?
}

/// A change to one environment that answers with the environment.
pub(super) async fn env_change<F, Fut>(
    state: AppState,
    actor: Actor,
    name: String,
    action: &'static str,
    op: F,
) -> Result<Json<EnvironmentView>, ApiError>
where
    F: FnOnce(Arc<Manager>, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Environment, ApiError>> + Send + 'static,
{
    let (manager, target) = (state.manager.clone(), name.clone());
    let env = change(&state, actor.name(), action, name, None, async move {
        op(manager, target).await
    })
    .await?;
    Ok(Json(envs::view(&state, env).await))
}

/// A change to an environment's `net` resource that answers with its setup.
pub(super) async fn net_change<F, Fut>(
    state: AppState,
    actor: Actor,
    name: String,
    action: &'static str,
    detail: Option<String>,
    op: F,
) -> Result<Json<NetSetup>, ApiError>
where
    F: FnOnce(crate::net::Net, String, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<NetSetup, ApiError>> + Send + 'static,
{
    let net = state.manager.net();
    let actor = actor.name();
    let (target, who) = (name.clone(), actor.clone());
    let setup = change(&state, actor, action, name, detail, async move {
        op(net, target, who).await
    })
    .await?;
    Ok(Json(setup))
}

/// Egress `all` opens the host and the operator's networks to a guest: an admin's call.
pub(super) fn require_egress(
    actor: &Actor,
    egress: crate::model::Egress,
    what: &str,
) -> Result<(), ApiError> {
    match egress {
        crate::model::Egress::All => actor.require(Role::Admin, what),
        crate::model::Egress::None | crate::model::Egress::Internet => Ok(()),
    }
}
