//! weftd: the weft host agent.

use std::process::ExitCode;

use weft::daemon::{self, Flags};

/// Exit code for a configuration the daemon cannot use.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let flags: Flags = weft_client::cli::parse_args_or_exit("weftd");
    let config = match flags.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("weftd: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weftd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line on stderr, which journald also records.
            eprintln!("weftd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
