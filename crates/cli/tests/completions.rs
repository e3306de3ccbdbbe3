//! The shell completions the Debian package installs (`packaging/completions/`) are what
//! `polaris completions SHELL` prints, so they cannot drift from the flags.

use std::path::Path;
use std::process::Command;

#[test]
fn packaged_completions_are_current() {
    let packaged = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/completions");
    for (shell, file) in [("bash", "polaris.bash"), ("zsh", "_polaris"), ("fish", "polaris.fish")] {
        let out = Command::new(env!("CARGO_BIN_EXE_polaris")).args(["completions", shell]).output().expect("run");
        assert!(out.status.success(), "{shell}: {out:?}");
        let kept = std::fs::read(packaged.join(file)).expect("packaged completion");
        assert!(
            kept == out.stdout,
            "packaging/completions/{file} is stale: regenerate it with `polaris completions {shell} > packaging/completions/{file}`"
        );
    }
}
