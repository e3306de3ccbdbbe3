//! polaris-agent's command line: `-V`/`--version`, and a `-h` that says what the program is,
//! the environment it reads and the signals it handles. (An integration test of this crate
//! also makes `cargo test` build the binary, which other crates' tests start.)

use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_polaris-agent")).args(args).output().expect("run polaris-agent");
    assert!(out.status.success(), "polaris-agent {args:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn version_both_ways() {
    let long = run(&["--version"]);
    assert!(long.starts_with("polaris-agent "), "{long}");
    assert_eq!(run(&["-V"]), long);
}

#[test]
fn help_names_the_program_its_environment_and_signals() {
    let help = run(&["-h"]);
    assert!(help.starts_with("polaris-agent: "), "-h opens with {:?}", help.lines().next());
    for word in ["POLARIS_TOKEN", "RUST_LOG", "SIGTERM"] {
        assert!(help.contains(word), "-h does not mention {word}:\n{help}");
    }
}
