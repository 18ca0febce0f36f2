//! Snapshot policies: `weft policy set ENV --resource R --every 15m --keep-last N …`.
//!
//! A scheduler task in weftd wakes every second, takes the policies that are due, and
//! for each runs a snapshot job and then the policy's retention. A run that fails is
//! recorded (`last_result`, the audit log, a warning in the log) and retried with a
//! backoff of 30 s, doubling, at most the policy's interval; nothing is skipped
//! silently. A policy that came due while weftd was down runs as soon as it starts.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tracing::Instrument;

use sqlx::Row;
use tracing::{info, warn};

use crate::catalog::{now, Catalog, CatalogError};
use crate::error::ApiError;
use crate::model::JobState;
use crate::snapshots::Snapshots;
use weft_api::policy::{after, next_run, rfc3339};
pub use weft_api::policy::{Policy, SetPolicy, MAX_EVERY_SECS};

/// First retry delay after a failed run.
const FIRST_RETRY: Duration = Duration::from_secs(30);

fn policy_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Policy, CatalogError> {
    let id: i64 = r.try_get("id")?;
    let keep: String = r.try_get("keep")?;
    Ok(Policy {
        id,
        env: r.try_get("env")?,
        resource: r.try_get("resource")?,
        every_secs: u64::try_from(r.try_get::<i64, _>("every_secs")?).unwrap_or(1),
        category: r.try_get("category")?,
        keep: serde_json::from_str(&keep).map_err(|e| CatalogError::Corrupt {
            name: format!("policy {id}"),
            reason: e.to_string(),
        })?,
        next_run: r.try_get("next_run")?,
        last_run: r.try_get("last_run")?,
        last_result: r.try_get("last_result")?,
        failures: u32::try_from(r.try_get::<i64, _>("failures")?).unwrap_or(u32::MAX),
    })
}

impl Catalog {
    /// Creates or replaces the policy of a resource; it first runs one interval from now.
    pub async fn set_policy(&self, env: &str, p: &SetPolicy) -> Result<Policy, CatalogError> {
        let keep = serde_json::to_string(&p.keep).map_err(|e| CatalogError::Corrupt {
            name: env.to_string(),
            reason: e.to_string(),
        })?;
        let next = next_run(SystemTime::now(), Duration::from_secs(p.every_secs));
        sqlx::query(
            "INSERT INTO policies (env, resource, every_secs, category, keep, next_run) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (env, resource) DO UPDATE SET every_secs = excluded.every_secs,
               category = excluded.category, keep = excluded.keep, next_run = excluded.next_run, failures = 0",
        )
        .bind(env)
        .bind(&p.resource)
        .bind(i64::try_from(p.every_secs).unwrap_or(i64::MAX))
        .bind(&p.category)
        .bind(keep)
        .bind(next)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT * FROM policies WHERE env = ? AND resource = ?")
            .bind(env)
            .bind(&p.resource)
            .fetch_one(&self.pool)
            .await?;
        policy_from_row(&row)
    }

    /// Policies, of one environment or all.
    pub async fn policies(&self, env: Option<&str>) -> Result<Vec<Policy>, CatalogError> {
        let rows = match env {
            Some(e) => {
                sqlx::query("SELECT * FROM policies WHERE env = ? ORDER BY id")
                    .bind(e)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM policies ORDER BY id")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(policy_from_row).collect()
    }

    /// Removes a policy.
    pub async fn delete_policy(&self, env: &str, resource: &str) -> Result<bool, CatalogError> {
        let done = sqlx::query("DELETE FROM policies WHERE env = ? AND resource = ?")
            .bind(env)
            .bind(resource)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn record_run(
        &self,
        id: i64,
        result: &str,
        failures: u32,
        next: SystemTime,
    ) -> Result<(), CatalogError> {
        sqlx::query("UPDATE policies SET last_run = ?, last_result = ?, failures = ?, next_run = ? WHERE id = ?")
            .bind(now())
            .bind(result)
            .bind(i64::from(failures))
            .bind(rfc3339(next))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Runs due policies until the process ends.
pub async fn scheduler(snapshots: Arc<Snapshots>) {
    let running: Arc<Mutex<HashSet<i64>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let policies = match snapshots.catalog().policies(None).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read policies");
                continue;
            }
        };
        let now = rfc3339(SystemTime::now());
        for policy in policies.into_iter().filter(|p| p.next_run <= now) {
            let fresh = running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(policy.id);
            if !fresh {
                continue;
            }
            let (snapshots, running) = (Arc::clone(&snapshots), Arc::clone(&running));
            let span = tracing::info_span!("policy", policy = policy.id, env = %policy.env);
            tokio::spawn(
                async move {
                    run(&snapshots, &policy).await;
                    running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&policy.id);
                }
                .instrument(span),
            );
        }
    }
}

/// One run of a policy: snapshot, then retention; records the outcome.
async fn run(snapshots: &Arc<Snapshots>, policy: &Policy) {
    let actor = format!("policy:{}", policy.id);
    let outcome = run_once(snapshots, policy, &actor).await;
    let every = Duration::from_secs(policy.every_secs);
    let (result, failures, next) = match &outcome {
        Ok(summary) => (format!("ok: {summary}"), 0, after(SystemTime::now(), every)),
        Err(e) => {
            let failures = policy.failures.saturating_add(1);
            let backoff = FIRST_RETRY
                .saturating_mul(1 << (failures - 1).min(16))
                .min(every.max(FIRST_RETRY));
            (
                format!("error: {}", e.one_line()),
                failures,
                after(SystemTime::now(), backoff),
            )
        }
    };
    let catalog = snapshots.catalog();
    if let Err(e) = catalog.record_run(policy.id, &result, failures, next).await {
        warn!(policy = policy.id, error = %e, "cannot record a policy run");
    }
    let audit_result = if outcome.is_ok() {
        "ok"
    } else {
        result.as_str()
    };
    let _ = catalog
        .audit(
            &actor,
            "policy.run",
            Some(&policy.env),
            Some(&policy.resource),
            audit_result,
        )
        .await;
    match outcome {
        Ok(_) => {
            info!(policy = policy.id, env = %policy.env, resource = %policy.resource, "policy ran")
        }
        Err(e) => {
            warn!(policy = policy.id, env = %policy.env, failures, error = %e.one_line(), "policy run failed; will retry")
        }
    }
}

async fn run_once(
    snapshots: &Arc<Snapshots>,
    policy: &Policy,
    actor: &str,
) -> Result<String, ApiError> {
    let job = snapshots
        .create(
            &policy.env,
            Some(&policy.resource),
            policy.category.clone(),
            None,
            actor,
        )
        .await?;
    let mut job = job;
    while job.state == JobState::Running {
        tokio::time::sleep(Duration::from_millis(250)).await;
        job = snapshots.job(job.id).await?;
    }
    if job.state == JobState::Failed {
        return Err(ApiError::Internal(format!(
            "snapshot job {} failed: {}",
            job.id,
            job.error.unwrap_or_default()
        )));
    }
    let mut summary = format!("job {}", job.id);
    if !policy.keep.is_empty() {
        let resource = (policy.resource != "all").then_some(policy.resource.as_str());
        let report = snapshots
            .prune(&policy.env, resource, &policy.keep, false)
            .await?;
        let removed: usize = report["resources"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|v| v["removed"].as_array())
                    .map(Vec::len)
                    .sum()
            })
            .unwrap_or(0);
        summary.push_str(&format!(", pruned {removed}"));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::Keep;

    fn policy(resource: &str, every_secs: u64) -> SetPolicy {
        SetPolicy {
            resource: resource.into(),
            every_secs,
            category: None,
            keep: Keep::default(),
        }
    }

    #[test]
    fn intervals_past_what_a_next_run_can_hold_are_refused() {
        assert!(policy("disk:vda", 900).check().is_ok());
        assert!(policy("all", MAX_EVERY_SECS).check().is_ok());
        for (p, needle) in [
            (policy("config", 0), "at least 1s"),
            (policy("config", MAX_EVERY_SECS + 1), "more than 100 years"),
            (policy("config", u64::MAX), "more than 100 years"),
            (policy("disks", 60), "unknown resource"),
        ] {
            let e = p.check().unwrap_err();
            assert!(e.contains(needle) && !e.contains('\n'), "{e}");
        }
    }
}
