//! A weftd started for a test, with the `weft` CLI pointed at it.
// Shared by several test files; each uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use wait_until::{Step, Wait};
use weft_client::{Client, ClientError};

/// A weftd on `<dir>/data` and `<dir>/run`; killed on drop, its log printed when the
/// test panics.
pub struct Weftd {
    child: Child,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Drop for Weftd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "weftd's log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Weftd {
    /// Starts weftd and waits until it answers. Images and outputs live in `dir`
    /// (weftd confines the host paths callers name to `image_dirs` and `export_dirs`).
    #[allow(dead_code)] // not every test binary that shares this module calls it
    pub async fn start(dir: &Path) -> Weftd {
        let quoted = serde_json::to_string(&dir.to_string_lossy()).unwrap();
        Weftd::start_with(
            dir,
            &format!("image_dirs = [{quoted}]\nexport_dirs = [{quoted}]\n"),
        )
        .await
    }

    /// Starts weftd with `config` as its weftd.toml and waits until it answers.
    pub async fn start_with(dir: &Path, config: &str) -> Weftd {
        let log = dir.join("weftd.log");
        let out = std::fs::File::create(&log).unwrap();
        let socket = dir.join("run/weftd.sock");
        let config_path = dir.join("weftd.toml");
        std::fs::write(&config_path, config).unwrap();
        let config = config_path;
        let child = Command::new(env!("CARGO_BIN_EXE_weftd"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "weft=debug,info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("weftd starts");
        let weftd = Weftd { child, socket, log };
        let client = Client::new(&weftd.socket);
        Wait::new("weftd to answer", Duration::from_secs(30))
            .until_async(|| async {
                match client.get::<serde_json::Value>("/v1/status").await {
                    Ok(_) => Step::Ready(()),
                    Err(e @ ClientError::Unreachable { .. }) => Step::Pending(e.to_string()),
                    Err(e) => Step::Fail(e.to_string()),
                }
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        weftd
    }

    /// Runs `weft` against this weftd.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(weft_cli_path())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("weft runs")
    }
}

/// The `weft` CLI (package `weft-client`), built next to `weftd` by
/// `cargo build --workspace --bins` or a workspace test run.
pub fn weft_cli_path() -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_weftd")).with_file_name("weft");
    assert!(
        path.is_file(),
        "the weft CLI is not built at {}: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}
