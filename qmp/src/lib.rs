//! weft-qmp: an async QMP client and a QEMU launcher.
//!
//! - [`Qmp`]: one QMP connection, shared by any number of tasks; typed commands from
//!   [`qapi::qmp`], raw commands, a broadcast event stream, and waits for events and jobs.
//! - [`launch`]: the VM configuration, the QEMU command line built from it, and
//!   and [`process`]: [`process::spawn`], which starts QEMU and supervises it, and the helper-process supervisor.
//! - Recipes over QMP: [`backup`] (pull-mode backups), [`export`] (NBD exports),
//!   [`commit`] (active commits), [`block`] (the block graph), [`image`] (images made by
//!   QEMU).
//! - [`parse_message`]: the parser for what a QMP peer sends (fuzzed in `fuzz/`).
//! - `fake` (feature `test-util`): a scriptable QEMU stand-in for tests.
//!
//! This crate knows nothing of weft's daemon, catalog or environments.

#![warn(missing_docs)]

pub mod backup;
pub mod block;
mod client;
pub mod commit;
mod error;
pub mod export;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
pub mod image;
pub mod launch;
mod message;
pub mod process;

pub use client::{Qmp, DEFAULT_CONNECT_TIMEOUT};
pub use error::{BlockJobOutcome, Error, ExitInfo};
pub use message::{parse_message, Event, Greeting, Message, QmpError, Reply, MAX_MESSAGE_LEN};

/// The `qapi` crate, re-exported so callers use the same typed commands and events.
pub use qapi;

/// `path` as UTF-8, which QMP's JSON needs; an [`Error::InvalidConfig`] if it is not.
pub(crate) fn utf8_path(path: &std::path::Path) -> Result<&str, Error> {
    path.to_str()
        .ok_or_else(|| Error::InvalidConfig(format!("{} is not valid UTF-8", path.display())))
}
