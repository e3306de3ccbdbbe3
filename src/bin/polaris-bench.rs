//! `polaris-bench`: a load generator for any beanstalk server. Flag parsing,
//! then one call into the library (see `polaris::loadgen`).

use clap::Parser;

fn main() {
    std::process::exit(polaris::loadgen::main(polaris::loadgen::Cli::parse()));
}
