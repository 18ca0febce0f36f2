//! Polling with a deadline for the rig and the end-to-end tests: the `wait-until` crate, in
//! the shape these tests use (a check that can fail outright with an `anyhow::Error`).

use std::future::Future;
use std::time::Duration;

use wait_until::{Step, Wait};

const FIRST_INTERVAL: Duration = Duration::from_millis(10);
const MAX_INTERVAL: Duration = Duration::from_millis(200);

/// Calls `check` until it yields a value, fails, or `timeout` has passed.
///
/// `check` returns `Ok(Some(value))` when the condition holds, `Ok(None)` to be asked again
/// (after a short, growing interval: 10 ms up to 200 ms), and `Err(_)` to give up at once
/// (for a condition that can no longer become true, such as a guest that died).
/// A check that is still running at the deadline is abandoned.
/// The timeout error names `what`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let waited = Wait::new(what, timeout)
        .interval(FIRST_INTERVAL)
        .backoff(MAX_INTERVAL)
        .until_async(|| {
            let attempt = check();
            async move {
                match attempt.await {
                    Ok(Some(value)) => Step::Ready(value),
                    Ok(None) => Step::Pending("not yet".into()),
                    Err(e) => Step::Fail(format!("{e:#}")),
                }
            }
        })
        .await;
    Ok(waited?)
}

/// [`wait_until`], and when it fails (a timeout, or a check that gave up), the error
/// carries `diag`'s report as it is at that moment: what was awaited, then the state of the
/// processes, sockets and logs the test registered.
pub async fn wait_until_diagnosed<T, F, Fut>(
    timeout: Duration,
    what: &str,
    diag: &crate::Diagnostics,
    check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    wait_until(timeout, what, check).await.map_err(|e| {
        let report = diag.report(&format!("stalled: {e:#}"));
        e.context(report)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_value_once_check_holds() {
        let calls = AtomicU32::new(0);
        let v = wait_until(Duration::from_secs(5), "third call", || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Ok((n == 3).then_some(n))
        })
        .await
        .expect("condition holds on the third call");
        assert_eq!(v, 3);
    }

    #[tokio::test]
    async fn times_out_naming_what() {
        let err = wait_until(Duration::from_millis(50), "the impossible", || async {
            Ok::<Option<()>, anyhow::Error>(None)
        })
        .await
        .expect_err("never true");
        assert!(err.to_string().contains("the impossible"), "{err}");
    }

    #[tokio::test]
    async fn error_stops_at_once() {
        let calls = AtomicU32::new(0);
        let err = wait_until(Duration::from_secs(3600), "a dead guest", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<Option<()>, _>(anyhow::anyhow!("guest exited").context("qemu"))
        })
        .await
        .expect_err("check failed");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            format!("{err:#}"),
            "gave up waiting for a dead guest: qemu: guest exited"
        );
    }

    #[tokio::test]
    async fn a_diagnosed_timeout_reports_what_it_waited_for_and_the_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let serial = dir.path().join("serial.log");
        std::fs::write(&serial, b"").expect("serial");
        let diag = crate::Diagnostics::new();
        diag.file_size("serial log", &serial);
        let err = wait_until_diagnosed(Duration::from_millis(50), "WEFT-READY", &diag, || async {
            Ok::<Option<()>, anyhow::Error>(None)
        })
        .await
        .expect_err("never true");
        let text = format!("{err:#}");
        assert!(text.contains("==== stalled: "), "{text}");
        assert!(text.contains("WEFT-READY"), "{text}");
        assert!(text.contains("serial.log: 0 bytes"), "{text}");
    }

    #[tokio::test]
    async fn abandons_a_hanging_check() {
        let err = wait_until(Duration::from_millis(50), "a hung check", || async {
            std::future::pending::<anyhow::Result<Option<()>>>().await
        })
        .await
        .expect_err("check never returns");
        assert!(err.to_string().contains("a hung check"), "{err}");
    }
}
