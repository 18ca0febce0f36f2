//! Polling with a deadline: tests wait for a condition, never for a fixed time.
//!
//! ```
//! use std::time::Duration;
//! use wait_until::Wait;
//!
//! let dir = std::env::temp_dir();
//! let found = Wait::new("the temp dir", Duration::from_secs(5))
//!     .interval(Duration::from_millis(10))
//!     .until(|| std::fs::metadata(&dir).map(|m| m.is_dir()))
//!     .expect("it exists");
//! assert!(found);
//! ```
//!
//! A check says how things stand with an [`Outcome`]: `true`, `Some(v)` or `Ok(v)` ends the
//! wait with the value; `false`, `None` or `Err(observation)` asks again later, and the last
//! observation goes into the timeout error; [`Step::Fail`] ends the wait at once.

use std::fmt;
use std::time::{Duration, Instant};

/// The interval between two checks unless [`Wait::interval`] sets another.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(20);

/// How things stand after one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<T> {
    /// The condition holds; the wait returns this value.
    Ready(T),
    /// Not yet; this is what the check saw (it names the last observation on timeout).
    Pending(String),
    /// The condition can no longer come (the process died, the guest stopped): stop now.
    Fail(String),
}

/// What a check may return.
pub trait Outcome {
    /// What the wait returns when the condition holds.
    type Value;
    /// This result as a [`Step`].
    fn step(self) -> Step<Self::Value>;
}

impl<T> Outcome for Step<T> {
    type Value = T;
    fn step(self) -> Step<T> {
        self
    }
}

/// `true` holds; `false` is "not yet" with nothing more to say.
impl Outcome for bool {
    type Value = ();
    fn step(self) -> Step<()> {
        if self {
            Step::Ready(())
        } else {
            Step::Pending("the check was false".into())
        }
    }
}

/// `Some(v)` holds; `None` is "not yet".
impl<T> Outcome for Option<T> {
    type Value = T;
    fn step(self) -> Step<T> {
        match self {
            Some(v) => Step::Ready(v),
            None => Step::Pending("the check found nothing".into()),
        }
    }
}

/// `Ok(v)` holds; `Err(e)` is "not yet", and `e` is what was seen (a missing file, a refused
/// connection, "3 of 5 rows"). To give up at once, return a [`Step::Fail`].
impl<T, E: fmt::Display> Outcome for Result<T, E> {
    type Value = T;
    fn step(self) -> Step<T> {
        match self {
            Ok(v) => Step::Ready(v),
            Err(e) => Step::Pending(e.to_string()),
        }
    }
}

/// Why a wait ended without a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The deadline passed.
    TimedOut {
        /// What was awaited.
        what: String,
        /// The timeout.
        waited: Duration,
        /// How many checks returned.
        checks: u32,
        /// What the last check that returned saw.
        last: Option<String>,
        /// A check was still running at the deadline (async only) and was abandoned.
        hung: bool,
    },
    /// A check returned [`Step::Fail`].
    Failed {
        /// What was awaited.
        what: String,
        /// What the check said.
        reason: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TimedOut {
                what,
                waited,
                checks,
                last,
                hung,
            } => {
                write!(
                    f,
                    "timed out after {waited:?} waiting for {what} ({checks} checks"
                )?;
                if *hung {
                    write!(f, ", the last still running at the deadline")?;
                }
                match last {
                    Some(last) => write!(f, "; last seen: {last})"),
                    None => write!(f, ")"),
                }
            }
            Error::Failed { what, reason } => write!(f, "gave up waiting for {what}: {reason}"),
        }
    }
}

impl std::error::Error for Error {}

/// A wait: what is awaited, for how long, how often to look.
#[derive(Debug, Clone)]
pub struct Wait {
    what: String,
    timeout: Duration,
    interval: Duration,
    max_interval: Duration,
}

impl Wait {
    /// A wait for `what` (said in the timeout error: "waiting for {what}") of at most `timeout`.
    pub fn new(what: impl Into<String>, timeout: Duration) -> Self {
        Wait {
            what: what.into(),
            timeout,
            interval: DEFAULT_INTERVAL,
            max_interval: DEFAULT_INTERVAL,
        }
    }

    /// Time between the end of one check and the start of the next (at least 1 ms).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self.max_interval = self.interval;
        self
    }

    /// Doubles the interval after each check, up to `max` (for a check that is costly to
    /// repeat, such as a request to a busy guest: quick at first, then gentler).
    pub fn backoff(mut self, max: Duration) -> Self {
        self.max_interval = max.max(self.interval);
        self
    }

    fn next_interval(&self, interval: Duration) -> Duration {
        (interval * 2).min(self.max_interval)
    }

    /// Calls `check` until it holds, fails, or the timeout has passed; blocks the thread.
    ///
    /// The first check runs at once, and one runs at the deadline. A check that blocks is
    /// waited for: keep checks short.
    pub fn until<O: Outcome>(&self, mut check: impl FnMut() -> O) -> Result<O::Value, Error> {
        let deadline = Instant::now() + self.timeout;
        let mut checks = 0;
        let mut interval = self.interval;
        loop {
            let step = check().step();
            checks += 1;
            let last = match step {
                Step::Ready(v) => return Ok(v),
                Step::Fail(reason) => return Err(self.failed(reason)),
                Step::Pending(seen) => seen,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(self.timed_out(checks, Some(last), false));
            }
            std::thread::sleep(interval.min(deadline - now));
            interval = self.next_interval(interval);
        }
    }

    /// The async form of [`Wait::until`], on tokio's clock.
    ///
    /// A check still running at the deadline is dropped, and the error says so.
    #[cfg(feature = "tokio")]
    pub async fn until_async<O, F, Fut>(&self, mut check: F) -> Result<O::Value, Error>
    where
        O: Outcome,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = O>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut checks = 0;
        let mut last = None;
        let mut interval = self.interval;
        loop {
            let Ok(outcome) = tokio::time::timeout_at(deadline, check()).await else {
                return Err(self.timed_out(checks, last, true));
            };
            checks += 1;
            match outcome.step() {
                Step::Ready(v) => return Ok(v),
                Step::Fail(reason) => return Err(self.failed(reason)),
                Step::Pending(seen) => last = Some(seen),
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(self.timed_out(checks, last, false));
            }
            tokio::time::sleep_until((now + interval).min(deadline)).await;
            interval = self.next_interval(interval);
        }
    }

    fn timed_out(&self, checks: u32, last: Option<String>, hung: bool) -> Error {
        Error::TimedOut {
            what: self.what.clone(),
            waited: self.timeout,
            checks,
            last,
            hung,
        }
    }

    fn failed(&self, reason: String) -> Error {
        Error::Failed {
            what: self.what.clone(),
            reason,
        }
    }
}

/// [`Wait::until`] with the default interval.
pub fn wait_until<O: Outcome>(
    what: &str,
    timeout: Duration,
    check: impl FnMut() -> O,
) -> Result<O::Value, Error> {
    Wait::new(what, timeout).until(check)
}

/// [`Wait::until_async`] with the default interval.
#[cfg(feature = "tokio")]
pub async fn wait_until_async<O, F, Fut>(
    what: &str,
    timeout: Duration,
    check: F,
) -> Result<O::Value, Error>
where
    O: Outcome,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = O>,
{
    Wait::new(what, timeout).until_async(check).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn returns_the_value_once_the_check_holds() {
        let mut n = 0;
        let v = wait_until("the third check", Duration::from_secs(30), || {
            n += 1;
            if n == 3 {
                Ok(n * 10)
            } else {
                Err(format!("check {n}"))
            }
        })
        .expect("holds on the third check");
        assert_eq!((v, n), (30, 3));
    }

    #[test]
    fn bool_and_option_checks() {
        let mut n = 0;
        wait_until("a flag", Duration::from_secs(30), || {
            n += 1;
            n > 1
        })
        .expect("true on the second check");
        let v = wait_until("a value", Duration::from_secs(30), || Some("here")).unwrap();
        assert_eq!(v, "here");
    }

    #[test]
    fn a_value_set_by_another_thread_is_found() {
        let flag = Arc::new(AtomicU32::new(0));
        let setter = {
            let flag = flag.clone();
            std::thread::spawn(move || flag.store(7, Ordering::SeqCst))
        };
        let v = Wait::new("the other thread's value", Duration::from_secs(30))
            .interval(Duration::from_millis(1))
            .until(|| match flag.load(Ordering::SeqCst) {
                0 => Err("still 0"),
                v => Ok(v),
            })
            .unwrap();
        setter.join().unwrap();
        assert_eq!(v, 7);
    }

    #[test]
    fn the_timeout_error_names_what_and_the_last_observation() {
        let mut n = 0;
        let err = Wait::new("the impossible", Duration::from_millis(30))
            .interval(Duration::from_millis(5))
            .until(|| -> Result<(), String> {
                n += 1;
                Err(format!("{n} rows"))
            })
            .expect_err("never holds");
        let Error::TimedOut {
            ref what,
            checks,
            ref last,
            hung,
            ..
        } = err
        else {
            panic!("not a timeout: {err}");
        };
        assert_eq!(what, "the impossible");
        assert_eq!(checks, n);
        assert!(
            checks >= 2,
            "a check at once and one at the deadline: {checks}"
        );
        assert_eq!(last.as_deref(), Some(format!("{n} rows").as_str()));
        assert!(!hung);
        let line = err.to_string();
        assert!(
            line.starts_with("timed out after 30ms waiting for the impossible ("),
            "{line}"
        );
        assert!(line.ends_with(&format!("; last seen: {n} rows)")), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn a_zero_timeout_checks_once() {
        let mut n = 0;
        let err = wait_until("anything", Duration::ZERO, || {
            n += 1;
            false
        })
        .expect_err("false");
        assert_eq!(n, 1);
        assert!(matches!(err, Error::TimedOut { checks: 1, .. }), "{err}");
        let v = wait_until("anything", Duration::ZERO, || true);
        assert_eq!(v, Ok(()));
    }

    #[test]
    fn a_failed_check_stops_the_wait_at_once() {
        let mut n = 0;
        let err = wait_until("a dead guest's login", Duration::from_secs(3600), || {
            n += 1;
            Step::<()>::Fail("qemu exited with status 1".into())
        })
        .expect_err("fails");
        assert_eq!(n, 1);
        assert_eq!(
            err.to_string(),
            "gave up waiting for a dead guest's login: qemu exited with status 1"
        );
    }

    // The async tests run on the real clock, so they assert only what sleeping guarantees:
    // an interval is never shorter than asked, hence a bound on the number of checks.
    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn async_checks_every_interval_until_the_deadline() {
        let start = tokio::time::Instant::now();
        let calls = AtomicU32::new(0);
        let err = Wait::new("a row", Duration::from_millis(300))
            .interval(Duration::from_millis(100))
            .until_async(|| async {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                Err::<(), _>(format!("{n} rows"))
            })
            .await
            .expect_err("never holds");
        assert!(start.elapsed() >= Duration::from_millis(300));
        // at 0, 100, 200 and 300 ms at the most; at 0 and at the deadline at the least
        let n = calls.load(Ordering::SeqCst);
        assert!((2..=4).contains(&n), "{n} checks");
        assert_eq!(
            err.to_string(),
            format!("timed out after 300ms waiting for a row ({n} checks; last seen: {n} rows)")
        );
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn backoff_doubles_the_interval_up_to_its_limit() {
        let start = Instant::now();
        let mut at = Vec::new();
        Wait::new("a slow thing", Duration::from_millis(700))
            .interval(Duration::from_millis(10))
            .backoff(Duration::from_millis(200))
            .until_async(|| {
                at.push(start.elapsed());
                async { false }
            })
            .await
            .expect_err("never true");
        // 10, 20, 40, 80, 160, then 200 each; the last check is at the deadline
        let want = [10, 20, 40, 80, 160, 200, 200, 200].map(Duration::from_millis);
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.len() <= want.len(), "{gaps:?}");
        for (gap, want) in gaps.iter().zip(want).take(gaps.len() - 1) {
            assert!(*gap >= want, "{gaps:?}");
        }
        assert!(*at.last().unwrap() >= Duration::from_millis(700), "{at:?}");
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn async_returns_what_another_task_makes_true() {
        let flag = Arc::new(AtomicU32::new(0));
        let setter = {
            let flag = flag.clone();
            tokio::spawn(async move { flag.store(5, Ordering::SeqCst) })
        };
        let v = wait_until_async("the flag", Duration::from_secs(30), || {
            let flag = flag.clone();
            async move { (flag.load(Ordering::SeqCst) == 5).then_some(5) }
        })
        .await
        .unwrap();
        setter.await.unwrap();
        assert_eq!(v, 5);
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn async_abandons_a_check_that_hangs_past_the_deadline() {
        let calls = AtomicU32::new(0);
        let err = wait_until_async("a hung socket", Duration::from_millis(50), || async {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                Err::<(), _>("refused")
            } else {
                std::future::pending().await
            }
        })
        .await
        .expect_err("the second check never returns");
        assert_eq!(
            err,
            Error::TimedOut {
                what: "a hung socket".into(),
                waited: Duration::from_millis(50),
                checks: 1,
                last: Some("refused".into()),
                hung: true,
            }
        );
        assert_eq!(
            err.to_string(),
            "timed out after 50ms waiting for a hung socket (1 checks, the last still running at the deadline; last seen: refused)"
        );
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn async_fail_stops_at_once() {
        let calls = AtomicU32::new(0);
        let err = wait_until_async("a guest", Duration::from_secs(3600), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Step::<()>::Fail("guest exited".into())
        })
        .await
        .expect_err("fails");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(matches!(err, Error::Failed { .. }), "{err}");
    }
}
