//! `weft-dpa`: weft's data provenance agent, run inside a guest. See
//! `docs/provenance-dpa.md`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use weft_dpa::agent::{self, config::DEFAULT_CONFIG, Options};

/// Captures application data changes (SQLite rows, JSON keys, key-value keys) and
/// streams them to the host over virtio-vsock.
#[derive(Debug, Parser)]
#[command(name = "weft-dpa", version)]
struct Args {
    /// The configuration file (TOML); a missing default file means no sources yet.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Where weftd listens: `vsock`, `vsock:CID:PORT` or `unix:/path`.
    #[arg(long, value_name = "ENDPOINT")]
    connect: Option<String>,
    /// The spool directory (overrides the file).
    #[arg(long, value_name = "DIR")]
    spool_dir: Option<PathBuf>,
    /// Check the configuration file and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEFT_DPA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let opts = Options {
        config_required: args.config.is_some(),
        config_path: args.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG)),
        connect: args.connect,
        spool_dir: args.spool_dir,
    };
    if args.check {
        return match opts.load() {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weft-dpa: {}", chain(&e));
                ExitCode::from(2)
            }
        };
    }
    match agent::run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-dpa: {}", chain(&e));
            match e {
                agent::Error::Config(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
