//! weft: the command-line client of weftd.

use std::process::ExitCode;

use weft::cli::{self, Cli};

fn main() -> ExitCode {
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
