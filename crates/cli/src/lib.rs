//! `polaris`: the command line for `polaris-dispatch`. Runs a command on hosts and follows
//! it with a live progress bar, lists jobs, hosts, the fleet tree and a host's standing
//! tasks, cancels jobs; tables for people, `--json` for scripts. See `docs/CLI.md`.
//!
//! # Layout
//! - [`cli`]: the command line (clap): every command, its flags and its help.
//! - [`config`]: where the dispatcher is and the token: flags, then the environment
//!   (`POLARIS_URL`, `POLARIS_TOKEN`), then the config file, then the default.
//! - [`api`]: blocking HTTP calls (ureq) and the API's documented error shape.
//! - [`progress`]: where a followed job's state comes from ([`progress::ProgressSource`]);
//!   today polling `GET /v1/jobs/{id}`.
//! - [`follow`]: `run` and `job --follow`: the progress bar, each host's output as it
//!   finishes, the summary, the exit code.
//! - [`table`]: plain-text tables and colour (only on a terminal, never with `NO_COLOR`).
//! - [`commands`]: `jobs`, `job`, `cancel`, `hosts`, `tree`, `tasks`.
//! - [`exit`]: the exit codes.

#![deny(unsafe_code)]

pub mod api;
pub mod cli;
pub mod commands;
pub mod config;
pub mod exit;
pub mod follow;
pub mod progress;
pub mod table;

use std::process::ExitCode;

/// Runs the parsed command line; what `main` returns.
pub fn main(cli: cli::Cli) -> ExitCode {
    match commands::dispatch(cli) {
        Ok(code) => code.into(),
        Err(e) => {
            let code = exit::code_of(&e);
            eprintln!("polaris: {}", exit::describe(&e));
            code.into()
        }
    }
}
