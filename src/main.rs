//! The `hedf` binary: parses the command line and runs it (see `hedf::cli::commands`).

use std::process::ExitCode;

use clap::Parser;
use hedf::cli::commands::{run, Cli};
use hedf::HedfError;

fn main() -> ExitCode {
    let runtime = match hedf::engine::session::runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(Cli::parse()));
    // A cancelled query whose operators never yield may still hold a worker: do not wait.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(HedfError::Cancelled(_)) => {
            eprintln!("error: query cancelled");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {}", e.user_message());
            ExitCode::FAILURE
        }
    }
}
