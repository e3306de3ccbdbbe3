//! polaris-dispatch's command line: `-V`/`--version`, and a `-h` that says what the program is,
//! the environment it reads and the signals it handles. (An integration test of this crate
//! also makes `cargo test` build the binary, which other crates' tests start.)

use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_polaris-dispatch")).args(args).output().expect("run polaris-dispatch");
    assert!(out.status.success(), "polaris-dispatch {args:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn version_both_ways() {
    let long = run(&["--version"]);
    assert!(long.starts_with("polaris-dispatch "), "{long}");
    assert_eq!(run(&["-V"]), long);
}

#[test]
fn help_names_the_program_its_environment_and_signals() {
    let help = run(&["-h"]);
    assert!(help.starts_with("polaris-dispatch: "), "-h opens with {:?}", help.lines().next());
    for word in ["POLARIS_SECRET", "RUST_LOG", "SIGTERM"] {
        assert!(help.contains(word), "-h does not mention {word}:\n{help}");
    }
}
