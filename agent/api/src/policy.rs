//! Snapshot policies.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::snapshot::Keep;

/// Query of `GET /v1/policies`.
#[derive(Debug, Deserialize)]
pub struct PolicyQuery {
    /// Only this environment's policies.
    pub env: Option<String>,
}

/// Longest interval of a policy (100 years): its next run must be a time weftd can
/// write, and RFC 3339 ends with the year 9999.
pub const MAX_EVERY_SECS: u64 = 100 * 365 * 86_400;

/// The last instant RFC 3339 can write (9999-12-31T23:59:59Z).
const LAST_INSTANT_SECS: u64 = 253_402_300_799;

/// When a policy runs next, `wait` after `t`, as the catalog stores it (RFC 3339).
pub fn next_run(t: SystemTime, wait: Duration) -> String {
    rfc3339(after(t, wait))
}

/// `wait` after `t`, or the last instant RFC 3339 can write if that is later (an
/// addition past what `SystemTime` holds would panic).
pub fn after(t: SystemTime, wait: Duration) -> SystemTime {
    let last = SystemTime::UNIX_EPOCH + Duration::from_secs(LAST_INSTANT_SECS);
    t.checked_add(wait).map_or(last, |n| n.min(last))
}

/// `t` as the catalog stores it: RFC 3339 with microseconds, clamped to the instants
/// RFC 3339 can write.
pub fn rfc3339(t: SystemTime) -> String {
    let last = SystemTime::UNIX_EPOCH + Duration::from_secs(LAST_INSTANT_SECS);
    humantime::format_rfc3339_micros(t.clamp(SystemTime::UNIX_EPOCH, last)).to_string()
}

/// A snapshot policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Id.
    pub id: i64,
    /// Environment.
    pub env: String,
    /// `all`, `config` or `disk:<name>`.
    pub resource: String,
    /// Interval in seconds.
    pub every_secs: u64,
    /// Category given to the snapshots it takes.
    pub category: Option<String>,
    /// Retention applied after each successful run.
    pub keep: Keep,
    /// When it runs next (RFC 3339).
    pub next_run: String,
    /// When it last ran.
    pub last_run: Option<String>,
    /// `ok: …` or `error: …`.
    pub last_result: Option<String>,
    /// Consecutive failed runs.
    pub failures: u32,
}

/// Body of `PUT /v1/environments/{name}/policies`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPolicy {
    /// `all`, `config` or `disk:<name>`.
    pub resource: String,
    /// Interval in seconds (at least 1).
    pub every_secs: u64,
    /// Category given to the snapshots it takes.
    #[serde(default)]
    pub category: Option<String>,
    /// Retention applied after each run.
    #[serde(default, deserialize_with = "crate::strict::fields")]
    pub keep: Keep,
}

impl SetPolicy {
    /// Checks a policy as the API takes it: a known resource and an interval of 1 s
    /// to [`MAX_EVERY_SECS`]; the error is one line for the operator.
    pub fn check(&self) -> Result<(), String> {
        if self.every_secs == 0 {
            return Err("--every must be at least 1s".into());
        }
        if self.every_secs > MAX_EVERY_SECS {
            return Err(format!(
                "--every {}s is more than 100 years ({MAX_EVERY_SECS}s)",
                self.every_secs
            ));
        }
        if !(["all", "config", "net"].contains(&self.resource.as_str())
            || self.resource.starts_with("disk:"))
        {
            return Err(format!(
                "unknown resource {:?}: use all, config, net or disk:<name>",
                self.resource
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_next_run_is_always_a_time_rfc_3339_writes() {
        let now = SystemTime::now();
        let soon = after(now, Duration::from_secs(60));
        assert_eq!(soon.duration_since(now).unwrap(), Duration::from_secs(60));
        // Before this, `now + every` panicked for u64::MAX seconds, and formatting
        // panicked for anything after the year 9999.
        for wait in [u64::MAX, 1 << 40, MAX_EVERY_SECS * 100] {
            let t = next_run(now, Duration::from_secs(wait));
            assert_eq!(t, "9999-12-31T23:59:59.000000Z");
        }
        assert!(next_run(now, Duration::from_secs(MAX_EVERY_SECS)).as_str() < "2200");
    }
}
