//! weft: the command-line client of weftd.

use std::process::ExitCode;

use weft_client::cli::{self, Cli};

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`weft env list | head -1`) instead of panicking on EPIPE.
    // SAFETY: resetting SIGPIPE to its default action before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli: Cli = cli::parse_args_or_exit("weft");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(cli::run(cli))
}
