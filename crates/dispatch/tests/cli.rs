//! polaris-dispatch's command line: `-V`/`--version`, and a `-h` that says what the program is,
//! the environment it reads and the signals it handles. (An integration test of this crate
//! also makes `cargo test` build the binary, which other crates' tests start.)

use std::path::Path;

#[test]
fn version_and_help() {
    polaris_testkit::process::assert_version_and_help(
        Path::new(env!("CARGO_BIN_EXE_polaris-dispatch")),
        "polaris-dispatch",
        &["POLARIS_SECRET", "RUST_LOG", "SIGTERM"],
    );
}
