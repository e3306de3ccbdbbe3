//! `polarisd`: the queue server. Flag parsing, then one call into the library.

#![deny(unsafe_code)]

use clap::Parser;
use polarisd::config::Args;

fn main() {
    let args = Args::parse();
    if args.version {
        println!("polarisd {} (beanstalkd 1.12 protocol)", env!("CARGO_PKG_VERSION"));
        return;
    }
    let level = match args.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    if let Err(e) = polarisd::server::run(args.server_config()) {
        eprintln!("polarisd: {e:#}");
        std::process::exit(1);
    }
}
