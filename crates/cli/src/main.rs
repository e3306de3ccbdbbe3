//! `polaris`: the command line for polaris-dispatch. See `docs/CLI.md`.

#![deny(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    polaris_cli::main(polaris_cli::cli::Cli::parse())
}
