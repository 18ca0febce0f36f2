//! Polling with a deadline; tests never sleep for a fixed time.

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::time::Instant;

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
    let deadline = Instant::now() + timeout;
    let mut interval = FIRST_INTERVAL;
    loop {
        let attempt = tokio::time::timeout_at(deadline, check()).await;
        match attempt {
            Ok(result) => {
                if let Some(value) = result.with_context(|| format!("while waiting for {what}"))? {
                    return Ok(value);
                }
            }
            Err(_elapsed) => break,
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep_until((now + interval).min(deadline)).await;
        interval = (interval * 2).min(MAX_INTERVAL);
    }
    bail!("timed out after {timeout:?} waiting for {what}")
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
        let start = Instant::now();
        let err = wait_until(Duration::from_secs(30), "a dead guest", || async {
            Err::<Option<()>, _>(anyhow::anyhow!("guest exited"))
        })
        .await
        .expect_err("check failed");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(format!("{err:#}").contains("guest exited"), "{err:#}");
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
