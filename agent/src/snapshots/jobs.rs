//! Snapshot jobs: long operations with progress, recorded in the catalog.

use super::*;
use tracing::Instrument;

impl Snapshots {
    /// One job, with live progress while it runs.
    pub async fn job(&self, id: i64) -> Result<Job, ApiError> {
        let mut job = self
            .manager
            .catalog()
            .job(id)
            .await?
            .ok_or_else(|| ApiError::Missing(format!("no job {id} (see `weft job list`)")))?;
        if job.state == JobState::Running {
            if let Some(ended) = self.lock_unrecorded().get(&id) {
                return Ok(ended.clone());
            }
            if let Some(p) = self.lock_progress().get(&id) {
                job.done_bytes = p.0.load(Ordering::Relaxed);
                job.total_bytes = p.1.load(Ordering::Relaxed);
            }
        }
        Ok(job)
    }

    /// The newest `limit` jobs, as [`Snapshots::job`] shows each.
    pub async fn jobs(&self, limit: u32) -> Result<Vec<Job>, ApiError> {
        let mut jobs = self.manager.catalog().jobs(limit).await?;
        let unrecorded = self.lock_unrecorded();
        for job in jobs.iter_mut().filter(|j| j.state == JobState::Running) {
            if let Some(ended) = unrecorded.get(&job.id) {
                *job = ended.clone();
            }
        }
        Ok(jobs)
    }

    pub(super) fn lock_unrecorded(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Job>> {
        self.progress
            .unrecorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn lock_progress(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<i64, Arc<(AtomicU64, AtomicU64)>>> {
        self.progress
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `work` as a job and returns at once; the job records its outcome.
    pub(super) async fn spawn_job<F, Fut>(
        self: &Arc<Self>,
        kind: &str,
        target: &str,
        actor: &str,
        work: F,
    ) -> Result<Job, ApiError>
    where
        F: FnOnce(Arc<Snapshots>, Arc<(AtomicU64, AtomicU64)>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<serde_json::Value, ApiError>> + Send + 'static,
    {
        let catalog = self.manager.catalog().clone();
        let id = catalog.insert_job(kind, target, actor).await?;
        let progress = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        self.lock_progress().insert(id, Arc::clone(&progress));
        let me = Arc::clone(self);
        let (kind, target) = (kind.to_string(), target.to_string());
        // Everything the job logs (QMP, NBD, the store) carries its id, kind and target,
        // inside the span of the request that started it (action, target, actor).
        let span = tracing::info_span!("job", job = id, kind = %kind, target = %target);
        tokio::spawn(async move {
            let outcome = work(Arc::clone(&me), Arc::clone(&progress)).await;
            let (done, total) = (
                progress.0.load(Ordering::Relaxed),
                progress.1.load(Ordering::Relaxed),
            );
            let message = outcome.as_ref().err().map(ApiError::one_line);
            let ended = match &outcome {
                Ok(v) => Ok(v),
                Err(_) => Err(message.as_deref().unwrap_or("failed")),
            };
            match &message {
                None => info!(job = id, %kind, %target, "job succeeded"),
                Some(m) => warn!(job = id, %kind, %target, error = %m, "job failed"),
            }
            if let Err(e) = catalog.finish_job(id, ended, done, total).await {
                // Callers following the job must still see it end: keep its end here
                // and write it once the catalog can take it.
                warn!(job = id, error = %e, "cannot record the end of a job yet; retrying every {}s", RECORD_RETRY.as_secs());
                if let Ok(Some(mut job)) = catalog.job(id).await {
                    job.state = if ended.is_ok() {
                        JobState::Succeeded
                    } else {
                        JobState::Failed
                    };
                    job.finished_at = Some(crate::catalog::now());
                    job.result = ended.ok().cloned();
                    job.error = ended.err().map(str::to_string);
                    job.done_bytes = done;
                    job.total_bytes = total;
                    me.lock_unrecorded().insert(id, job);
                }
                me.lock_progress().remove(&id);
                while catalog.finish_job(id, ended, done, total).await.is_err() {
                    tokio::time::sleep(RECORD_RETRY).await;
                }
                info!(job = id, "the end of the job is recorded");
                me.lock_unrecorded().remove(&id);
            }
            me.lock_progress().remove(&id);
        }.instrument(span));
        self.job(id).await
    }
}
