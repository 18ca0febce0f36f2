//! Per-VM token buckets: a VM over its rate is slowed (weftd stops reading its
//! connection for a while), never refused, and never slows another VM.

use std::time::Duration;

use tokio::time::Instant;

/// A token bucket that may go into debt: a charge always succeeds and returns how
/// long the caller must wait before taking more, so one frame larger than the
/// burst still passes (after its wait) instead of blocking forever.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens per second; 0 means unlimited.
    rate: f64,
    /// Most tokens the bucket holds (one second's worth).
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket refilled with `per_sec` tokens per second (0: unlimited).
    pub fn new(per_sec: u64) -> Self {
        let rate = per_sec as f64;
        TokenBucket {
            rate,
            burst: rate,
            tokens: rate,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
    }

    /// Takes `n` tokens and returns how long to wait until the bucket is out of
    /// debt (zero when it is not in debt).
    pub fn charge(&mut self, n: u64, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        self.refill(now);
        self.tokens -= n as f64;
        self.debt(now)
    }

    /// How long until the bucket holds at least zero tokens.
    pub fn debt(&mut self, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        self.refill(now);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// The two limits of one VM: entries per second and bytes per second read from
/// its connection. Kept per VM, across its connections, so reconnecting does not
/// refill them.
#[derive(Debug, Clone)]
pub struct VmRate {
    /// Entries per second.
    pub entries: TokenBucket,
    /// Bytes per second.
    pub bytes: TokenBucket,
}

impl VmRate {
    /// Buckets for `entries_per_sec` and `bytes_per_sec` (0: unlimited).
    pub fn new(entries_per_sec: u64, bytes_per_sec: u64) -> Self {
        VmRate {
            entries: TokenBucket::new(entries_per_sec),
            bytes: TokenBucket::new(bytes_per_sec),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_passes_its_burst_then_makes_the_caller_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100);
        assert_eq!(b.charge(100, t0), Duration::ZERO);
        // 50 more: half a second of debt.
        let wait = b.charge(50, t0);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // After that half second the debt is paid.
        assert_eq!(b.debt(t0 + Duration::from_millis(500)), Duration::ZERO);
    }

    #[test]
    fn refill_is_capped_at_one_second() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10);
        // A long idle time does not bank more than the burst.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.charge(10, later), Duration::ZERO);
        assert!(b.charge(1, later) > Duration::ZERO);
    }

    #[test]
    fn an_oversize_charge_passes_after_its_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000);
        let wait = b.charge(5000, t0);
        assert!((wait.as_secs_f64() - 4.0).abs() < 1e-6, "{wait:?}");
    }

    #[test]
    fn zero_means_unlimited() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0);
        assert_eq!(b.charge(u64::MAX, t0), Duration::ZERO);
    }
}
