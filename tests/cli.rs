//! polarisd's command line: beanstalkd's flags (`-v` version, `-V` verbosity) plus
//! `--version`; `-h` says what the program is, the environment it reads and the signals it
//! handles. (The other programs' command lines are tested in their own crates, which also
//! makes `cargo test` build their binaries for the tests that start them.)

use anyhow::{ensure, Result};
use std::process::Command;

fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_polarisd")).args(args).output()?;
    ensure!(out.status.success(), "polarisd {args:?} failed: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn version_both_ways() -> Result<()> {
    let short = run(&["-v"])?;
    assert!(short.starts_with("polarisd "), "{short}");
    assert_eq!(run(&["--version"])?, short);
    Ok(())
}

#[test]
fn help_names_the_program_its_environment_and_signals() -> Result<()> {
    let help = run(&["-h"])?;
    assert!(help.starts_with("polarisd: "), "-h opens with {:?}", help.lines().next());
    for word in ["RUST_LOG", "SIGTERM"] {
        assert!(help.contains(word), "-h does not mention {word}:\n{help}");
    }
    Ok(())
}

#[test]
fn polarisd_keeps_beanstalkds_verbosity_flag() -> Result<()> {
    // -V is beanstalkd's "more logging", not a version flag: with -v it still prints the version.
    let out = run(&["-V", "-V", "-v"])?;
    assert!(out.starts_with("polarisd "), "{out}");
    Ok(())
}

/// Under a `Type=notify` unit systemd names a datagram socket in `$NOTIFY_SOCKET`; polarisd
/// sends `READY=1` there once it is bound, both for a path and for an abstract name.
#[test]
fn polarisd_tells_the_service_manager_it_is_ready() -> Result<()> {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notify");
    let by_path = UnixDatagram::bind(&path)?;
    let abstract_name = format!("polaris-test-notify-{}", std::process::id());
    let by_name = {
        use std::os::linux::net::SocketAddrExt;
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(abstract_name.as_bytes())?)?
    };
    for (socket, value) in [(&by_path, path.display().to_string()), (&by_name, format!("@{abstract_name}"))] {
        socket.set_read_timeout(Some(polaris_testkit::IO_TIMEOUT))?;
        let server = polaris_testkit::spawn_announcing_with_env(
            std::path::Path::new(env!("CARGO_BIN_EXE_polarisd")),
            &[],
            &[("NOTIFY_SOCKET", &value)],
        )?;
        let mut message = [0u8; 64];
        let n = socket.recv(&mut message)?;
        ensure!(
            &message[..n] == b"READY=1\n",
            "NOTIFY_SOCKET={value}: got {:?}",
            String::from_utf8_lossy(&message[..n])
        );
        drop(server);
    }
    Ok(())
}
