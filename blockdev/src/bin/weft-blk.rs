//! `weft-blk`: serves one disk composed of weft chunk-store layers (plus a private
//! write layer) to QEMU as a vhost-user-blk device. weftd starts one per served disk;
//! it can also be run by hand (see `docs/weft-blk.md`).
//!
//! Exit codes: 0 after SIGTERM/SIGINT (the write layer flushed), 1 on a runtime
//! failure, 2 when the spec or its files cannot be used.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use weft_blockdev::blk::backend::{self, Counters};
use weft_blockdev::blk::spec::DiskSpec;
use weft_blockdev::blk::BlockDevice;

/// Serve a disk composed of weft chunk-store snapshots over vhost-user-blk.
#[derive(Debug, Parser)]
#[command(name = "weft-blk", version)]
struct Args {
    /// The disk spec (JSON): store, layers, write layer, trace.
    #[arg(long)]
    spec: PathBuf,
    /// The vhost-user socket to listen on (replaced if it exists).
    #[arg(long)]
    socket: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let spec = match DiskSpec::load(&args.spec) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("weft-blk: {e}");
            return ExitCode::from(2);
        }
    };
    let disk = match spec.open() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("weft-blk: {e}");
            return ExitCode::from(2);
        }
    };
    let dev: Arc<dyn BlockDevice> = disk.clone();
    let counters = Arc::new(Counters::default());
    // SIGTERM/SIGINT: make the write layer durable, then exit.
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("weft-blk: signals: {e}");
            return ExitCode::from(1);
        }
    };
    {
        let dev = Arc::clone(&dev);
        let socket = args.socket.clone();
        let counters = Arc::clone(&counters);
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let code = match dev.flush() {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("weft-blk: flush at exit failed: {e}");
                        1
                    }
                };
                let _ = std::fs::remove_file(&socket);
                tracing::info!(
                    signal = sig,
                    requests = counters.requests.load(std::sync::atomic::Ordering::Relaxed),
                    errors = counters.errors.load(std::sync::atomic::Ordering::Relaxed),
                    "weft-blk: stopping"
                );
                std::process::exit(code);
            }
        });
    }
    let size = dev.size();
    let stop = AtomicBool::new(false);
    let socket = args.socket.clone();
    let res = backend::serve(
        dev,
        &args.socket,
        spec.queue_config(),
        counters,
        &stop,
        || {
            tracing::info!(
                socket = %socket.display(),
                size,
                layers = spec.layers.len(),
                read_only = spec.write_layer.is_none(),
                "weft-blk: listening"
            );
        },
    );
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-blk: {e}");
            ExitCode::from(1)
        }
    }
}
