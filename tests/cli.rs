//! The three programs' command lines: polarisd keeps beanstalkd's flags (`-v` version,
//! `-V` verbosity) and also takes `--version`; every `-h` says which program it is, the
//! environment it reads and the signals it handles.

use anyhow::{ensure, Result};
use polaris_testkit::binary;
use std::process::Command;

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(binary(program)).args(args).output()?;
    ensure!(out.status.success(), "{program} {args:?} failed: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn every_program_answers_version_both_ways() -> Result<()> {
    let short = run("polarisd", &["-v"])?;
    assert!(short.starts_with("polarisd "), "{short}");
    assert_eq!(run("polarisd", &["--version"])?, short);
    for program in ["polaris-dispatch", "polaris-agent"] {
        let long = run(program, &["--version"])?;
        assert!(long.starts_with(&format!("{program} ")), "{long}");
        assert_eq!(run(program, &["-V"])?, long);
    }
    Ok(())
}

#[test]
fn every_help_names_its_program_environment_and_signals() -> Result<()> {
    for (program, env) in
        [("polarisd", "RUST_LOG"), ("polaris-dispatch", "POLARIS_SECRET"), ("polaris-agent", "POLARIS_TOKEN")]
    {
        let help = run(program, &["-h"])?;
        assert!(help.starts_with(&format!("{program}: ")), "{program} -h opens with {:?}", help.lines().next());
        for word in [env, "RUST_LOG", "SIGTERM"] {
            assert!(help.contains(word), "{program} -h does not mention {word}:\n{help}");
        }
    }
    Ok(())
}

#[test]
fn polarisd_keeps_beanstalkds_verbosity_flag() -> Result<()> {
    // -V is beanstalkd's "more logging", not a version flag: with -v it still prints the version.
    let out = run("polarisd", &["-V", "-V", "-v"])?;
    assert!(out.starts_with("polarisd "), "{out}");
    Ok(())
}
