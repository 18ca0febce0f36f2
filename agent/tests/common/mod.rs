//! A weftd started for a test (the workspace's one rig, `weft-rig`), with the `weft` CLI
//! pointed at it.
// Shared by several test files; each uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

use weft_rig::LogOnDrop;

/// A weftd on `<dir>/data` and `<dir>/run`; stopped on drop, its failure report (log
/// tail, its guests' logs and process states) printed when the test panics.
pub struct Weftd {
    rig: weft_rig::Weftd,
    pub socket: PathBuf,
}

impl Weftd {
    /// Starts weftd and waits until it answers. Images and outputs live in `dir`
    /// (weftd confines the host paths callers name to `image_dirs` and `export_dirs`).
    pub async fn start(dir: &Path) -> Weftd {
        Weftd::launch(weft_rig::WeftdBuilder::new(dir).confined_exactly(&[dir], &[dir])).await
    }

    /// Starts weftd with `config` as its weftd.toml and waits until it answers.
    pub async fn start_with(dir: &Path, config: &str) -> Weftd {
        Weftd::launch(weft_rig::WeftdBuilder::new(dir).config(config)).await
    }

    async fn launch(builder: weft_rig::WeftdBuilder) -> Weftd {
        let rig = builder
            .rust_log("weft=debug,info")
            .log_on_drop(LogOnDrop::Panicking)
            .start()
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        Weftd {
            socket: rig.socket(),
            rig,
        }
    }

    /// Runs `weft` against this weftd.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.rig.cli(args)
    }
}

/// The `weft` CLI (package `weft-client`), built next to `weftd` by
/// `cargo build --workspace --bins` or a workspace test run.
pub fn weft_cli_path() -> PathBuf {
    weft_rig::bin_path("weft")
}
