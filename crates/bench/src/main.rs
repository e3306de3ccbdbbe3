//! `polaris-bench`: a load generator for any beanstalk server. Flag parsing,
//! then one call into the library (see `polaris_bench`).

#![deny(unsafe_code)]

use clap::Parser;

fn main() {
    std::process::exit(polaris_bench::main(polaris_bench::Cli::parse()));
}
