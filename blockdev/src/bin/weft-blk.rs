//! `weft-blk`: serves one disk composed of weft chunk-store layers (plus a private
//! write layer) to QEMU as a vhost-user-blk device. weftd starts one per served disk;
//! it can also be run by hand (see `docs/weft-blk.md`).
//!
//! At its start it drops every capability (it stays uid 0, owner of its files); once
//! its files are open and its socket listens, and before it serves QEMU, it confines
//! itself with a seccomp allow-list (`--seccomp`, `weft_blockdev::blk::seccomp`).
//!
//! Exit codes: 0 after SIGTERM/SIGINT (the write layer flushed), 1 on a runtime
//! failure (or when the seccomp filter cannot be installed), 2 when the spec or its
//! files cannot be used; killed by SIGSYS when it makes a system call the filter forbids.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use weft_blockdev::blk::backend::{self, Counters};
use weft_blockdev::blk::seccomp;
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
    /// What a system call outside weft-blk's allow-list does: `kill` the process,
    /// `log` it (kernel log) and let it go ahead, or `off` (no filter).
    #[arg(long, default_value_t = seccomp::Mode::Kill)]
    seccomp: seccomp::Mode,
    /// Test only: once confined, make this forbidden system call (`socket`,
    /// `execve` or `fork`); with the filter on, the process is killed by SIGSYS.
    #[arg(long, hide = true, value_parser = ["socket", "execve", "fork"])]
    selftest_forbidden: Option<String>,
}

/// Makes the forbidden call `what`; returns only when the filter let it through.
fn selftest_forbidden(what: &str) {
    // SAFETY: plain system calls with valid (or null) arguments; a child made by
    // the raw fork exits at once without touching the parent's state.
    unsafe {
        match what {
            "socket" => {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if fd >= 0 {
                    libc::close(fd);
                }
            }
            "execve" => {
                let path = c"/bin/true".as_ptr();
                let argv = [path, std::ptr::null()];
                let envp = [std::ptr::null()];
                libc::execve(path, argv.as_ptr(), envp.as_ptr());
            }
            _ => {
                let pid = libc::syscall(libc::SYS_fork);
                if pid == 0 {
                    libc::_exit(0);
                }
            }
        }
    }
    eprintln!("weft-blk: selftest: {what} was not refused");
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
    // Before any thread starts (capabilities are per thread; new ones inherit them).
    if args.seccomp != seccomp::Mode::Off {
        if let Err(e) = seccomp::drop_capabilities() {
            eprintln!("weft-blk: cannot drop capabilities (or run with --seccomp off): {e}");
            return ExitCode::from(1);
        }
    }
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
    let mode = args.seccomp;
    let selftest = args.selftest_forbidden.clone();
    let res = backend::serve(
        dev,
        &args.socket,
        spec.queue_config(),
        counters,
        &stop,
        || {
            // Everything is open and the socket listens: from here on, the guest's
            // requests are served under the filter.
            if let Err(e) = seccomp::install(mode) {
                eprintln!("weft-blk: {e}");
                let _ = std::fs::remove_file(&socket);
                std::process::exit(1);
            }
            tracing::info!(
                socket = %socket.display(),
                size,
                layers = spec.layers.len(),
                read_only = spec.write_layer.is_none(),
                seccomp = %mode,
                "weft-blk: listening"
            );
            if let Some(what) = &selftest {
                selftest_forbidden(what);
                std::process::exit(3);
            }
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
