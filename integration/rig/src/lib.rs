//! The one weftd test rig, for every test and benchmark that runs weftd.
//!
//! - [`WeftdBuilder`] / [`Weftd`]: a private weftd on its own data and run directories,
//!   with a config written from the builder's knobs; it waits for the API socket,
//!   hands out a client and the socket path, keeps weftd's log, prints a failure report
//!   when a test fails, and on drop stops weftd (SIGTERM, then SIGKILL) and kills what
//!   was left running in its directory.
//! - [`find_bin`] / [`bin_path`]: where the workspace binaries are, looked up in one place.
//! - [`wait_until`]: polling with a deadline, in the shape the end-to-end tests use.
//! - [`Diagnostics`]: what a stalled wait reports (processes with their state, wchan and
//!   threads, command lines, sockets, file sizes, log tails); [`procs`]: `/proc` reads.
//!
//! It does not depend on the daemon (`weft`), so the daemon's own tests use it too.

mod diag;
mod paths;
pub mod procs;
mod wait;
mod weftd;

pub use diag::{tail, Diagnostics, TAIL_BYTES};
pub use paths::{bin_path, confined_dirs_toml, find_bin, target_dir, workspace_root};
pub use wait::{wait_until, wait_until_diagnosed};
pub use weftd::{LogOnDrop, Weftd, WeftdBuilder, START_TIMEOUT};
