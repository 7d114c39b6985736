//! `runnerd`: parse, validate, run until a signal (or one command: `health`,
//! `doctor`), map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser as _;
use runnerd::config::{Cli, Command, EXIT_CONFIG};

/// jemalloc: at 2,000 environments the process stayed at 44 MiB resident
/// against 69 MiB with glibc's allocator, which kept the peaks of large
/// describe pages (BENCHMARKS.md). Its settings: `.cargo/config.toml`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("runnerd: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Health { url, timeout }) = cli.command {
        return match runtime.block_on(runnerd::health::probe(&url, timeout)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(err) => {
                eprintln!("runnerd health: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match cli.daemon.validate() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("runnerd: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::Doctor { json }) = cli.command {
        return runtime.block_on(runnerd::doctor::command(config, json));
    }
    runnerd::telemetry::init_logs(config.log_format, &config.log);
    runtime.block_on(runnerd::daemon(config))
}
