//! Committing the upper images of a disk's backing chain down into a lower one, while
//! the disk stays in use: QEMU's *active commit* (`block-commit` on the node at the top
//! of the chain).
//!
//! The job copies the data of every image above the base into the base, then waits in
//! the `ready` state, mirroring the guest's new writes into the base as well, until it
//! is told to complete (`block-job-complete`); at that instant the device switches to
//! the base and the images above it drop out of the chain. Their files stay, for the
//! caller to remove.

use std::time::Duration;

use serde_json::json;

use crate::client::block_job_outcome;
use crate::{BlockJobOutcome, Error, Qmp};

/// Commits everything above `base_node` (or, without one, above the bottom image of the
/// chain) on the chain whose top node is `top` down into that base, as block job `job`,
/// and completes it: afterwards `top`'s users run on the base.
///
/// Each phase (until the job is ready, until it has completed) may take up to
/// `deadline`. A job that ends any other way, before or after it was ready, is
/// [`Error::BlockJob`] with how it ended; a refused command is QEMU's error. Either way
/// the chain is as it was: a commit writes into the base only what the images above
/// it hold, and the device switches only on completion.
pub async fn active_commit(
    qmp: &Qmp,
    job: &str,
    top: &str,
    base_node: Option<&str>,
    deadline: Duration,
) -> Result<(), Error> {
    let ready = qmp.wait_event(deadline, {
        let job = job.to_string();
        move |e| {
            (e.name == "BLOCK_JOB_READY" && e.data["device"] == job.as_str())
                || block_job_outcome(e, &job).is_some()
        }
    });
    let mut args = json!({"job-id": job, "device": top});
    if let Some(base) = base_node {
        args["base-node"] = json!(base);
    }
    qmp.execute_raw("block-commit", Some(args)).await?;
    let ready = ready.await?;
    if let Some(outcome) = block_job_outcome(&ready, job) {
        return Err(Error::BlockJob {
            job: job.to_string(),
            outcome,
        });
    }
    let done = qmp.wait_block_job(job, deadline);
    qmp.execute_raw("block-job-complete", Some(json!({ "device": job })))
        .await?;
    match done.await? {
        BlockJobOutcome::Completed { .. } => Ok(()),
        outcome => Err(Error::BlockJob {
            job: job.to_string(),
            outcome,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{Answer, FakeQemu};

    const T: Duration = Duration::from_secs(5);

    /// A QEMU whose commit jobs become ready and complete as asked; `query-block-jobs`
    /// lists the job until it completed.
    fn committing_qemu() -> FakeQemu {
        let fake = FakeQemu::start();
        let running = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        fake.on("block-commit", {
            let running = running.clone();
            move |call| {
                let job = call.arg_str("job-id").to_string();
                running.lock().expect("lock").push(job.clone());
                call.event_after(
                    "BLOCK_JOB_READY",
                    json!({"device": job, "type": "commit", "len": 4096, "offset": 4096, "speed": 0}),
                );
                Answer::ok()
            }
        })
        .on("query-block-jobs", {
            let running = running.clone();
            move |_| {
                let jobs: Vec<_> = running
                    .lock()
                    .expect("lock")
                    .iter()
                    .map(|j| json!({"device": j, "type": "commit"}))
                    .collect();
                Answer::Return(json!(jobs))
            }
        })
        .on("block-job-complete", move |call| {
            let job = call.arg_str("device").to_string();
            running.lock().expect("lock").retain(|j| *j != job);
            call.event_after(
                "BLOCK_JOB_COMPLETED",
                json!({"device": job, "type": "commit", "len": 4096, "offset": 4096, "speed": 0}),
            );
            Answer::ok()
        });
        fake
    }

    #[tokio::test]
    async fn commits_waits_until_ready_and_completes() {
        let fake = committing_qemu();
        let qmp = fake.connect().await;
        active_commit(&qmp, "weft-commit-vda", "vda-t1", Some("vda-b0"), T)
            .await
            .expect("committed");
        active_commit(&qmp, "weft-sync-commit", "weft-sync-layer", None, T)
            .await
            .expect("committed");
        assert_eq!(
            fake.executed(),
            [
                "block-commit",
                "block-job-complete",
                "query-block-jobs",
                "block-commit",
                "block-job-complete",
                "query-block-jobs"
            ]
        );
        assert_eq!(
            fake.args_of("block-commit"),
            [
                json!({"job-id": "weft-commit-vda", "device": "vda-t1", "base-node": "vda-b0"}),
                json!({"job-id": "weft-sync-commit", "device": "weft-sync-layer"}),
            ]
        );
        assert_eq!(
            fake.args_of("block-job-complete"),
            [
                json!({"device": "weft-commit-vda"}),
                json!({"device": "weft-sync-commit"})
            ]
        );
    }

    #[tokio::test]
    async fn a_refused_commit_is_qemus_error() {
        let fake = committing_qemu();
        fake.fail(
            "block-commit",
            "GenericError",
            "Node 'vda-b0' is not a backing image of 'vda-t1'",
        );
        let qmp = fake.connect().await;
        let err = active_commit(&qmp, "j", "vda-t1", Some("vda-b0"), T)
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, Error::Qmp { desc, .. } if desc.contains("not a backing image")),
            "{err:?}"
        );
        assert_eq!(fake.executed(), ["block-commit"]);
    }

    #[tokio::test]
    async fn a_job_failing_before_it_is_ready_ends_the_wait_at_once() {
        let fake = committing_qemu();
        fake.on("block-commit", |call| {
            let job = call.arg_str("job-id").to_string();
            call.event_after(
                "BLOCK_JOB_COMPLETED",
                json!({"device": job, "type": "commit", "len": 4096, "offset": 512,
                       "speed": 0, "error": "Input/output error"}),
            );
            Answer::ok()
        });
        let qmp = fake.connect().await;
        let start = std::time::Instant::now();
        let err = active_commit(&qmp, "j", "top", None, Duration::from_secs(30))
            .await
            .expect_err("failed");
        assert!(start.elapsed() < T, "no wait for a ready that never comes");
        match &err {
            Error::BlockJob {
                job,
                outcome: BlockJobOutcome::Failed { error, .. },
            } => {
                assert_eq!(job, "j");
                assert_eq!(error, "Input/output error");
            }
            other => panic!("want a failed block job, got {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "block job j did not complete: failed (commit): Input/output error"
        );
        assert_eq!(fake.executed(), ["block-commit"]);
    }

    #[tokio::test]
    async fn a_job_failing_on_completion_is_reported() {
        let fake = committing_qemu();
        fake.on("block-job-complete", |call| {
            let job = call.arg_str("device").to_string();
            call.event_after(
                "BLOCK_JOB_ERROR",
                json!({"device": job, "operation": "write", "action": "stop"}),
            );
            Answer::ok()
        });
        let qmp = fake.connect().await;
        let err = active_commit(&qmp, "j", "top", None, T)
            .await
            .expect_err("stopped");
        assert!(
            matches!(&err, Error::BlockJob { outcome: BlockJobOutcome::Stopped { operation }, .. } if operation == "write"),
            "{err:?}"
        );
        // A refused completion is QEMU's error.
        fake.fail(
            "block-job-complete",
            "GenericError",
            "The active block job 'j' cannot be completed",
        );
        let err = active_commit(&qmp, "j", "top", None, T)
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("cannot be completed"), "{err}");
    }

    #[tokio::test]
    async fn a_job_that_never_gets_ready_times_out() {
        let fake = committing_qemu();
        fake.reply("block-commit", json!({}));
        let qmp = fake.connect().await;
        let err = active_commit(&qmp, "j", "top", None, Duration::from_millis(100))
            .await
            .expect_err("never ready");
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    }
}
