//! The launch pipeline: what runs around every QEMU launch of a managed environment
//! besides QEMU itself.
//!
//! The environment manager ([`crate::envs::Manager`]) places QEMU (see
//! [`crate::placement`]), checks its files and starts it; everything else a launch
//! needs is a [`LaunchHook`] that the daemon registers once: the guests' vsock device
//! and DPA listener ([`crate::dpa::VsockHost`]), the `weft-blk` backends of disks served
//! from the chunk store ([`crate::blk::WeftBlk`]) and the balloon of weaves
//! ([`crate::balloon::BalloonHook`]). New capabilities (shadows, pre-assembly) plug in
//! as hooks without editing the manager.
//!
//! Hooks run in the order they were registered. A `prepare` that fails stops the
//! launch, and every hook is then released, as after QEMU ends.

use std::path::Path;

use futures::future::BoxFuture;
use weft_qmp::launch::VmConfig;
use weft_qmp::Qmp;

use crate::error::ApiError;
use crate::placement::Placement;

/// What a hook learns about the launch it takes part in.
#[derive(Debug)]
pub struct LaunchContext<'a> {
    /// The environment (or weave) being launched.
    pub env: &'a str,
    /// Its directory under the data directory (logs, sockets).
    pub dir: &'a Path,
    /// Where its QEMU runs.
    pub placement: &'a Placement,
}

/// A step of every launch. Each method has a default that does nothing.
pub trait LaunchHook: Send + Sync + std::fmt::Debug {
    /// Before QEMU starts: may add to the configuration QEMU is given (a device); the
    /// stored configuration is not changed. An error stops the launch.
    fn prepare<'a>(
        &'a self,
        cx: &'a LaunchContext<'a>,
        config: &'a mut VmConfig,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        let _ = (cx, config);
        Box::pin(async { Ok(()) })
    }

    /// QEMU runs and answers on QMP.
    fn after_launch<'a>(
        &'a self,
        cx: &'a LaunchContext<'a>,
        config: &'a VmConfig,
        qmp: &'a Qmp,
    ) -> BoxFuture<'a, ()> {
        let _ = (cx, config, qmp);
        Box::pin(async {})
    }

    /// A QEMU that ran before weftd restarted is monitored again (or runs without
    /// answering on QMP, its guest still live).
    fn reattach<'a>(&'a self, env: &'a str) -> BoxFuture<'a, ()> {
        let _ = env;
        Box::pin(async {})
    }

    /// The environment's QEMU is gone, or its launch failed after `prepare`: end what
    /// was started for it. Called also when nothing was (it must be harmless then).
    fn release<'a>(&'a self, env: &'a str) -> BoxFuture<'a, ()> {
        let _ = env;
        Box::pin(async {})
    }

    /// The environment is deleted: remove what the hook keeps for it.
    fn forget<'a>(&'a self, env: &'a str) -> BoxFuture<'a, ()> {
        let _ = env;
        Box::pin(async {})
    }
}
