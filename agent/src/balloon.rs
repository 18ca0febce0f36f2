//! Guest memory through the QMP balloon (F10).
//!
//! A weave's memory limit (`weft weave limits W --memory M`) is its cgroup's limit.
//! Where its QEMU has a balloon device ([`VmConfig::balloon`], on by default) the
//! balloon's target follows that limit, at most the configured memory, so a guest with
//! a balloon driver hands memory back to the host instead of running into the cgroup
//! limit; without a limit the target is the configured memory. The target is set when
//! the limit changes and again whenever weftd starts the weave's QEMU, so it can always
//! be derived from the cgroup limit and the configuration ([`weave_target_mib`]).
//!
//! QEMU moves the balloon asynchronously: `query-balloon` reports where the guest is
//! (`actual`), which reaches the target once the guest driver has inflated or deflated.

use std::time::Duration;

use serde_json::json;
use tracing::{info, warn};
use weft_qmp::launch::VmConfig;
use weft_qmp::Qmp;

use crate::cgroups::{Cgroups, Limits};
use crate::envs::Manager;
use crate::error::{one_line, ApiError};
pub use weft_api::env::Balloon;

const MIB: u64 = 1024 * 1024;
/// How long one balloon QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a refused (busy) cgroup v1 memory limit waits for the guest to give
/// memory back through the balloon before it is tried again.
const SETTLE: Duration = Duration::from_secs(15);

/// The balloon target for a memory limit: the limit, at most the configured memory;
/// the configured memory without a limit.
pub fn target_mib(limit_mib: Option<u64>, configured_mib: u64) -> u64 {
    limit_mib.map_or(configured_mib, |l| l.min(configured_mib))
}

/// The balloon target of weave `name` with `config`: from its cgroup memory limit.
pub fn weave_target_mib(cgroups: &dyn Cgroups, name: &str, config: &VmConfig) -> u64 {
    target_mib(cgroups.memory_limit_mib(name), config.memory_mib)
}

/// Runs one QMP command with [`QMP_TIMEOUT`]; `Ok(None)` when the VM has no balloon.
async fn command(
    qmp: &Qmp,
    name: &str,
    args: Option<serde_json::Value>,
) -> Result<Option<serde_json::Value>, String> {
    match tokio::time::timeout(QMP_TIMEOUT, qmp.execute_raw(name, args)).await {
        Ok(Ok(v)) => Ok(Some(v)),
        // QEMU's answer when the VM has no balloon device.
        Ok(Err(weft_qmp::Error::Qmp { class, .. })) if class == "DeviceNotActive" => Ok(None),
        Ok(Err(e)) => Err(format!("{name}: {e}")),
        Err(_) => Err(format!(
            "{name}: no answer within {}s",
            QMP_TIMEOUT.as_secs()
        )),
    }
}

/// The guest's memory as the balloon reports it (MiB); none without a balloon device.
pub async fn actual_mib(qmp: &Qmp) -> Result<Option<u64>, String> {
    let Some(reply) = command(qmp, "query-balloon", None).await? else {
        return Ok(None);
    };
    let bytes = reply
        .get("actual")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| format!("query-balloon: unexpected reply {reply}"))?;
    Ok(Some(bytes / MIB))
}

/// Sets the balloon target of a running VM to `target_mib` (at least 1 MiB) and returns
/// the balloon right after; none without a balloon device.
pub async fn set(qmp: &Qmp, target_mib: u64) -> Result<Option<Balloon>, String> {
    let target_mib = target_mib.max(1);
    let bytes = target_mib.saturating_mul(MIB);
    if command(qmp, "balloon", Some(json!({ "value": bytes })))
        .await?
        .is_none()
    {
        return Ok(None);
    }
    Ok(actual_mib(qmp).await?.map(|actual_mib| Balloon {
        target_mib,
        actual_mib,
    }))
}

/// Points the balloon of weave `name` at the memory limit `limit_mib` (none: the
/// configured memory). Nothing to do (`None`) when it is not running or has no balloon.
pub async fn follow_limit(
    manager: &Manager,
    name: &str,
    limit_mib: Option<u64>,
) -> Result<Option<Balloon>, ApiError> {
    let Some(qmp) = manager.live_qmp(name) else {
        return Ok(None);
    };
    let Some(config) = manager
        .catalog()
        .environment(name)
        .await?
        .and_then(|e| e.config)
    else {
        return Ok(None);
    };
    if !config.balloon {
        return Ok(None);
    }
    let target = target_mib(limit_mib, config.memory_mib);
    let balloon = set(&qmp, target)
        .await
        .map_err(|e| ApiError::Qemu(one_line(&format!("balloon of weave {name}: {e}"))))?;
    if let Some(b) = balloon {
        info!(
            weave = name,
            target_mib = b.target_mib,
            "balloon target set"
        );
    }
    Ok(balloon)
}

/// Applies `limits` to weave `name`: the balloon target first, then the cgroups (a
/// guest that gives memory back eases a lower limit). A cgroup v1 hierarchy refuses a
/// memory limit below what QEMU uses and cannot reclaim (EBUSY): then the guest gets
/// up to 15 s to reach the balloon target and the limit is tried once more; if it is
/// still refused, the balloon goes back to the previous limit's target and the error
/// says so. Returns the balloon as it is after.
pub async fn apply_limits(
    manager: &Manager,
    name: &str,
    limits: &Limits,
) -> Result<Option<Balloon>, ApiError> {
    let cgroups = manager.host().cgroups();
    let previous = cgroups.memory_limit_mib(name);
    let mut balloon = follow_limit(manager, name, limits.memory_mib).await?;
    let busy =
        |r: &std::io::Result<()>| matches!(r, Err(e) if e.raw_os_error() == Some(libc::EBUSY));
    let mut applied = cgroups.apply(name, limits);
    if busy(&applied) {
        if let (Some(b), Some(qmp)) = (balloon, manager.live_qmp(name)) {
            let deadline = tokio::time::Instant::now() + SETTLE;
            while tokio::time::Instant::now() < deadline {
                match actual_mib(&qmp).await {
                    Ok(Some(actual)) if actual > b.target_mib => {
                        tokio::time::sleep(Duration::from_millis(250)).await
                    }
                    _ => break,
                }
            }
            applied = cgroups.apply(name, limits);
            if let Ok(Some(actual_mib)) = actual_mib(&qmp).await {
                balloon = Some(Balloon { actual_mib, ..b });
            }
        }
    }
    match applied {
        Ok(()) => Ok(balloon),
        Err(e) => {
            let restored = match balloon {
                Some(_) => follow_limit(manager, name, previous).await.is_ok(),
                None => true,
            };
            let note = if restored {
                ""
            } else {
                "; its balloon target could not be restored"
            };
            match limits.memory_mib {
                Some(m) if e.raw_os_error() == Some(libc::EBUSY) => {
                    Err(ApiError::Conflict(one_line(&format!(
                        "cannot lower the memory limit of weave {name} to {m} MiB: its QEMU uses more that the kernel cannot reclaim ({e}); give a higher --memory{note}"
                    ))))
                }
                _ => Err(ApiError::Internal(one_line(&format!(
                    "cannot set the limits of weave {name}: {e}{note}"
                )))),
            }
        }
    }
}

/// After weftd launched weave `name`'s QEMU: sets the balloon target its cgroup memory
/// limit asks for (a new QEMU starts with the whole configured memory). Failures are
/// logged: they do not stop the start.
pub async fn after_launch(cgroups: &dyn Cgroups, name: &str, config: &VmConfig, qmp: &Qmp) {
    if !config.balloon {
        return;
    }
    let target = weave_target_mib(cgroups, name, config);
    if target >= config.memory_mib {
        return;
    }
    if let Err(e) = set(qmp, target).await {
        warn!(weave = name, error = %e, "cannot set the balloon target");
    }
}

/// The balloon as a step of every launch: a weave's new QEMU has all its memory, and
/// its balloon follows the weave's memory limit again ([`after_launch`]).
#[derive(Debug)]
pub struct BalloonHook {
    cgroups: std::sync::Arc<dyn Cgroups>,
}

impl BalloonHook {
    /// The hook, reading weaves' memory limits from `cgroups`.
    pub fn new(cgroups: std::sync::Arc<dyn Cgroups>) -> BalloonHook {
        BalloonHook { cgroups }
    }
}

impl crate::launch::LaunchHook for BalloonHook {
    fn after_launch<'a>(
        &'a self,
        cx: &'a crate::launch::LaunchContext<'a>,
        config: &'a VmConfig,
        qmp: &'a Qmp,
    ) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            if cx.placement.is_weave() {
                after_launch(self.cgroups.as_ref(), cx.env, config, qmp).await;
            }
        })
    }
}

/// The balloon of weave `name` if it runs with one (errors are reported as none).
pub async fn of_weave(manager: &Manager, name: &str) -> Option<Balloon> {
    let qmp = manager.live_qmp(name)?;
    let config = manager.catalog().environment(name).await.ok()??.config?;
    if !config.balloon {
        return None;
    }
    let actual_mib = actual_mib(&qmp).await.ok()??;
    Some(Balloon {
        target_mib: weave_target_mib(manager.host().cgroups().as_ref(), name, &config),
        actual_mib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_the_limit_at_most_the_configured_memory() {
        assert_eq!(target_mib(None, 256), 256);
        assert_eq!(target_mib(Some(128), 256), 128);
        assert_eq!(target_mib(Some(512), 256), 256);
        assert_eq!(target_mib(Some(256), 256), 256);
    }

    /// A QEMU with (`Some(actual bytes)`) or without (`None`) a balloon device.
    fn fake_qemu(balloon: Option<u64>) -> weft_qmp::fake::FakeQemu {
        let fake = weft_qmp::fake::FakeQemu::start();
        match balloon {
            Some(actual) => fake
                .reply("balloon", json!({}))
                .reply("query-balloon", json!({ "actual": actual })),
            None => fake
                .fail(
                    "balloon",
                    "DeviceNotActive",
                    "No balloon device has been activated",
                )
                .fail(
                    "query-balloon",
                    "DeviceNotActive",
                    "No balloon device has been activated",
                ),
        };
        fake
    }

    #[tokio::test]
    async fn set_sends_the_target_in_bytes_and_reads_the_guest_back() {
        let fake = fake_qemu(Some(256 * MIB));
        let qmp = fake.connect().await;
        let b = set(&qmp, 128).await.expect("set");
        assert_eq!(
            b,
            Some(Balloon {
                target_mib: 128,
                actual_mib: 256
            })
        );
        assert_eq!(actual_mib(&qmp).await.expect("query"), Some(256));
        assert_eq!(fake.args_of("balloon"), [json!({ "value": 128 * MIB })]);
        assert_eq!(
            fake.executed(),
            ["balloon", "query-balloon", "query-balloon"]
        );
    }

    #[tokio::test]
    async fn a_vm_without_a_balloon_device_has_none() {
        let fake = fake_qemu(None);
        let qmp = fake.connect().await;
        assert_eq!(set(&qmp, 128).await.expect("set"), None);
        assert_eq!(actual_mib(&qmp).await.expect("query"), None);
    }

    #[tokio::test]
    async fn other_qemu_errors_are_reported_with_the_command() {
        let fake = fake_qemu(Some(256 * MIB));
        fake.fail(
            "balloon",
            "GenericError",
            "Parameter 'value' expects a size",
        );
        let qmp = fake.connect().await;
        let err = set(&qmp, 128).await.expect_err("fails");
        assert!(err.starts_with("balloon: "), "{err}");
        assert!(err.contains("expects a size"), "{err}");
        fake.reply("query-balloon", json!({ "actual": "lots" }));
        let err = actual_mib(&qmp).await.expect_err("bad reply");
        assert!(err.contains("unexpected reply"), "{err}");
    }
}
