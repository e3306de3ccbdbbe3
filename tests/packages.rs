//! The Debian packages (issue 18), installed on this machine the way an administrator
//! would: built with cargo-deb from the binaries this test run already built, installed
//! with `dpkg -i`, each program started the way its systemd unit's `ExecStart` would start
//! it (the unit's `EnvironmentFile` expanded, as the unit's `User`), polarisd also socket
//! activated, upgraded to a rebuilt package, removed and purged.
//!
//! It needs root, cargo-deb, dpkg, systemd-analyze, systemd-socket-activate and setpriv;
//! without them it prints SKIP (and fails under CI). It refuses to run on a machine where
//! any of the packages or the `polaris` user already exists, so that it never touches an
//! installation it did not make, and it purges what it installed even when a check fails.
//! No service manager is needed: the maintainer scripts start nothing, and the test starts
//! each program itself, by PID, on free loopback ports written into the packaged defaults.

use anyhow::{anyhow, bail, ensure, Context, Result};
use polaris_testkit::cluster::request;
use polaris_testkit::process::{spawn_with_banner, Proc};
use polaris_testkit::{free_port, skip_unless_ci, wait_until, RawConn, IO_TIMEOUT};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The packages, in the order they are built and installed.
const PACKAGES: [&str; 4] = ["polarisd", "polaris-dispatch", "polaris-agent", "polaris"];

/// The workspace package a Debian package is built from (the CLI's crate is `polaris-cli`,
/// its package and binary `polaris`).
fn crate_of(package: &str) -> &str {
    match package {
        "polaris" => "polaris-cli",
        other => other,
    }
}
/// Where the packages put their units (cargo-deb's, as debhelper's).
const UNIT_DIR: &str = "/usr/lib/systemd/system";
/// The workspace version, which the first build has as `VERSION-1` and the upgrade as `VERSION-2`.
const VERSION: &str = env!("CARGO_PKG_VERSION");

#[test]
fn packages_install_run_upgrade_remove_and_purge() -> Result<()> {
    if !prerequisites_met()? {
        return Ok(());
    }
    // One run at a time on this machine (other worktrees run this test too): a second run
    // would see the first one's packages, or purge them when it ends.
    let lock_path = if Path::new("/run/lock").is_dir() {
        "/run/lock/polaris-packages-test.lock"
    } else {
        "/tmp/polaris-packages-test.lock"
    };
    let lock = std::fs::File::create(lock_path)?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        skip_unless_ci(&format!("another run of the packages test holds {lock_path}"));
        return Ok(());
    }
    if !nothing_installed()? {
        return Ok(());
    }
    let target_dir = profile_dir()?;
    let out = tempfile::tempdir()?;
    let first = build_packages(&target_dir, out.path(), "1")?;
    let second = build_packages(&target_dir, out.path(), "2")?;

    let _purge_at_end = PurgeOnDrop;
    dpkg(&["-i"], &first)?;
    check_installed_files()?;
    verify_units()?;

    // Free loopback ports in the packaged defaults: an administrator's edit of conffiles,
    // which the upgrade must keep.
    let queue_port = free_port()?;
    let dispatch_port = free_port()?;
    set_default("/etc/default/polarisd", "POLARISD_LISTEN_PORT", &queue_port.to_string())?;
    set_default("/etc/default/polaris-dispatch", "POLARIS_DISPATCH_LISTEN", &format!("127.0.0.1:{dispatch_port}"))?;
    set_default("/etc/default/polaris-dispatch", "POLARIS_DISPATCH_QUEUE", &format!("127.0.0.1:{queue_port}"))?;
    set_default("/etc/default/polaris-agent", "POLARIS_AGENT_QUEUE", &format!("127.0.0.1:{queue_port}"))?;
    set_default(
        "/etc/default/polaris-agent",
        "POLARIS_AGENT_EXTRA",
        &format!(
            "\"--dispatch http://127.0.0.1:{dispatch_port} --token-file /etc/polaris/agent-token --host-id pkg-test\""
        ),
    )?;
    let secret = std::fs::read_to_string("/etc/polaris/secret")?;
    let admin_token = token_named("admin")?;

    // The three programs as their units start them; a job and a registered host are the data
    // the upgrade must keep.
    {
        let (mut queue, addr) = start_unit("polarisd")?;
        ensure!(addr == format!("127.0.0.1:{queue_port}"), "polarisd listens on {addr}, not on the configured port");
        let mut conn = RawConn::connect(addr.parse()?)?;
        conn.send(b"put 0 0 600 5\r\nhello\r\n")?;
        conn.expect(b"INSERTED 1\r\n")?;
        let (mut dispatch, dispatch_addr) = start_unit("polaris-dispatch")?;
        ensure!(dispatch_addr == format!("127.0.0.1:{dispatch_port}"), "the dispatcher listens on {dispatch_addr}");
        let hosts_url = format!("http://{dispatch_addr}/v1/hosts");
        let (status, _) = request("GET", &hosts_url, None, None);
        ensure!(status == 401, "GET /v1/hosts without a token answered {status}: the packaged tokens are not in force");
        let mut agent = start_unit_unannounced("polaris-agent")?;
        wait_until(Duration::from_secs(30), "the packaged agent registers with the packaged dispatcher", || {
            let (status, body) = request("GET", &hosts_url, None, Some(&admin_token));
            status == 200 && body.to_string().contains("pkg-test")
        });
        // `systemctl reload polaris-agent`: the unit's ExecReload with $MAINPID; the agent
        // re-reads agent.toml and goes on serving (the job below is its proof).
        reload_unit("polaris-agent", agent.pid())?;
        wait_until(Duration::from_secs(20), "the agent re-reads /etc/polaris/agent.toml", || {
            agent.output().contains("SIGHUP: reloaded /etc/polaris/agent.toml")
        });
        // A job through the whole chain: the dispatcher and the agent share the generated secret.
        let job = r#"{"hosts": ["pkg-test"], "method": "sync.bash", "cmd": "id -u", "timeout": 30}"#;
        let (status, body) = request("POST", &format!("http://{dispatch_addr}/v1/jobs"), Some(job), Some(&admin_token));
        ensure!(status == 200, "POST /v1/jobs answered {status}: {body}");
        let answer = &body["response"][0];
        ensure!(
            answer["resp"] == "success" && answer["data"] == "0\n",
            "the agent (root, as its unit) answered {body}; agent output: {}",
            agent.output_tail(2000)
        );
        stop(&mut agent)?;
        stop(&mut dispatch)?;
        stop(&mut queue)?;
    }

    socket_activated_polarisd()?;

    // The upgrade keeps the edited defaults, the generated secret and tokens, and the data.
    dpkg(&["-i", "--force-confold"], &second)?;
    for package in PACKAGES {
        let version = dpkg_query("${Version}", package)?;
        ensure!(version == format!("{VERSION}-2"), "{package} is at {version} after the upgrade");
    }
    ensure!(
        std::fs::read_to_string("/etc/default/polarisd")?.contains(&format!("POLARISD_LISTEN_PORT={queue_port}")),
        "the upgrade replaced the edited /etc/default/polarisd"
    );
    ensure!(std::fs::read_to_string("/etc/polaris/secret")? == secret, "the upgrade replaced the secret");
    ensure!(token_named("admin")? == admin_token, "the upgrade replaced the tokens");
    check_installed_files()?;
    {
        let (mut queue, addr) = start_unit("polarisd")?;
        let mut conn = RawConn::connect(addr.parse()?)?;
        conn.send(b"peek 1\r\n")?;
        conn.expect(b"FOUND 1 5\r\nhello\r\n")?;
        let (mut dispatch, dispatch_addr) = start_unit("polaris-dispatch")?;
        let (status, body) = request("GET", &format!("http://{dispatch_addr}/v1/hosts"), None, Some(&admin_token));
        ensure!(
            status == 200 && body.to_string().contains("pkg-test"),
            "after the upgrade GET /v1/hosts is {status} {body}"
        );
        stop(&mut dispatch)?;
        stop(&mut queue)?;
    }
    let host_state = std::fs::read_to_string("/var/lib/polaris-agent/state.json")?;

    // remove: programs and units go, configuration, data and the user stay.
    dpkg(&["-r"], &PACKAGES.map(PathBuf::from))?;
    for gone in ["/usr/bin/polarisd", "/usr/bin/polaris-dispatch", "/usr/bin/polaris-agent", "/usr/bin/polaris"] {
        ensure!(!Path::new(gone).exists(), "{gone} is still there after dpkg -r");
    }
    for kept in [
        "/var/lib/polarisd",
        "/var/lib/polaris-dispatch",
        "/etc/default/polarisd",
        "/etc/polaris/agent.toml",
        "/etc/polaris/secret",
        "/etc/polaris/dispatch-tokens.json",
    ] {
        ensure!(Path::new(kept).exists(), "{kept} is gone after dpkg -r (only purge may remove it)");
    }
    ensure!(std::fs::read_to_string("/var/lib/polaris-agent/state.json")? == host_state, "remove changed the host id");
    ensure!(user_exists("polaris")?, "dpkg -r removed the polaris user");

    // purge: everything goes.
    dpkg(&["-P"], &PACKAGES.map(PathBuf::from))?;
    for gone in [
        "/var/lib/polarisd",
        "/var/lib/polaris-dispatch",
        "/var/lib/polaris-agent",
        "/etc/default/polarisd",
        "/etc/default/polaris-dispatch",
        "/etc/default/polaris-agent",
        "/etc/polaris",
        "/usr/lib/systemd/system/polarisd.service",
    ] {
        ensure!(!Path::new(gone).exists(), "{gone} is still there after dpkg -P");
    }
    ensure!(!user_exists("polaris")?, "dpkg -P left the polaris user");
    ensure!(!group_exists("polaris")?, "dpkg -P left the polaris group");
    Ok(())
}

/// Root, the tools, and a machine without a Polaris installation of its own.
fn prerequisites_met() -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        skip_unless_ci("the packages test installs Debian packages (run as root)");
        return Ok(false);
    }
    let has_cargo_deb = Command::new(cargo())
        .args(["deb", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_cargo_deb {
        skip_unless_ci("the packages test needs cargo-deb (`cargo install cargo-deb --locked`)");
        return Ok(false);
    }
    for (tool, package) in [
        ("dpkg", "dpkg"),
        ("adduser", "adduser"),
        ("setpriv", "util-linux"),
        ("systemd-analyze", "systemd"),
        ("systemd-socket-activate", "systemd"),
    ] {
        if !on_path(tool) {
            skip_unless_ci(&format!("the packages test needs `{tool}` (Debian package {package})"));
            return Ok(false);
        }
    }
    Ok(true)
}

/// Neither the packages nor their user are on this machine, so the purge at the end removes
/// only what the test installed.
fn nothing_installed() -> Result<bool> {
    for package in PACKAGES {
        let status = dpkg_query("${db:Status-Status}", package).unwrap_or_default();
        if !status.is_empty() && status != "not-installed" {
            skip_unless_ci(&format!(
                "{package} is already on this machine ({status}); the test installs only where it may purge"
            ));
            return Ok(false);
        }
    }
    if user_exists("polaris")? || group_exists("polaris")? {
        skip_unless_ci("a `polaris` user or group already exists; the test would remove it on purge");
        return Ok(false);
    }
    Ok(true)
}

/// The cargo running this test (cargo sets `CARGO`), whose `deb` subcommand is cargo-deb.
fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        || Path::new("/usr/sbin").join(tool).is_file()
        || Path::new("/sbin").join(tool).is_file()
}

/// `target/<profile>` of this test run, where cargo put the binaries the packages take.
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("no target dir above {}", exe.display()))
}

/// Builds the three packages from the binaries of this run's profile (no cargo build), with
/// Debian revision `revision`, into `out`; returns their paths.
fn build_packages(profile_dir: &Path, out: &Path, revision: &str) -> Result<Vec<PathBuf>> {
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| anyhow!("profile dir name"))?;
    let target_dir = profile_dir.parent().ok_or_else(|| anyhow!("target dir"))?;
    let mut debs = Vec::new();
    for package in PACKAGES {
        let deb = out.join(format!("{package}_{VERSION}-{revision}.deb"));
        let output = Command::new(cargo())
            .args([
                "deb",
                "--no-build",
                "--fast",
                "--profile",
                profile,
                "-p",
                crate_of(package),
                "--deb-revision",
                revision,
            ])
            .arg("--output")
            .arg(&deb)
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .context("running cargo deb")?;
        ensure!(
            output.status.success() && deb.is_file(),
            "cargo deb -p {package} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        debs.push(deb);
    }
    Ok(debs)
}

/// Runs `dpkg ARGS... PACKAGES...` without a terminal and fails with its output.
fn dpkg(args: &[&str], packages: &[PathBuf]) -> Result<()> {
    let output = Command::new("dpkg")
        .args(args)
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .context("running dpkg")?;
    ensure!(
        output.status.success(),
        "dpkg {args:?} {packages:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn dpkg_query(format: &str, package: &str) -> Result<String> {
    let output = Command::new("dpkg-query").args(["-W", "-f", format, package]).stderr(Stdio::null()).output()?;
    ensure!(output.status.success(), "dpkg-query {package}: not known");
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Purges the packages when the test ends, passed or failed, so nothing stays installed.
struct PurgeOnDrop;

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .arg("-P")
            .args(PACKAGES)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn user_exists(name: &str) -> Result<bool> {
    Ok(Command::new("getent").args(["passwd", name]).stdout(Stdio::null()).status()?.success())
}

fn group_exists(name: &str) -> Result<bool> {
    Ok(Command::new("getent").args(["group", name]).stdout(Stdio::null()).status()?.success())
}

/// The numeric id of a user or group (`getent passwd|group NAME`, third field).
fn id_of(database: &str, name: &str) -> Result<u32> {
    let output = Command::new("getent").args([database, name]).output()?;
    let line = String::from_utf8_lossy(&output.stdout).into_owned();
    line.split(':').nth(2).and_then(|id| id.parse().ok()).ok_or_else(|| anyhow!("no {database} entry {name}: {line:?}"))
}

/// Owner, group and permission bits of `path`.
fn check_mode(path: &str, user: &str, group: &str, mode: u32) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("{path} is missing"))?;
    let (uid, gid) = (id_of("passwd", user)?, id_of("group", group)?);
    let bits = meta.permissions().mode() & 0o7777;
    ensure!(
        meta.uid() == uid && meta.gid() == gid && bits == mode,
        "{path} is {}:{} {bits:04o}, expected {user}:{group} {mode:04o}",
        meta.uid(),
        meta.gid()
    );
    Ok(())
}

fn check_installed_files() -> Result<()> {
    let passwd = Command::new("getent").args(["passwd", "polaris"]).output()?;
    let entry = String::from_utf8_lossy(&passwd.stdout).trim().to_string();
    let fields: Vec<&str> = entry.split(':').collect();
    ensure!(fields.len() == 7, "no polaris user: {entry:?}");
    let uid: u32 = fields[2].parse()?;
    ensure!(uid < 1000 && fields[6] == "/usr/sbin/nologin", "polaris is not a system user without a login: {entry}");
    // The CLI is installed and runs: its version and its completions.
    let cli = Command::new("/usr/bin/polaris").arg("--version").output().context("running /usr/bin/polaris")?;
    ensure!(
        cli.status.success() && String::from_utf8_lossy(&cli.stdout).starts_with("polaris "),
        "polaris --version: {cli:?}"
    );
    ensure!(
        Path::new("/usr/share/bash-completion/completions/polaris").is_file(),
        "the CLI's bash completion is not installed"
    );
    check_mode("/var/lib/polarisd", "polaris", "polaris", 0o750)?;
    check_mode("/var/lib/polaris-dispatch", "polaris", "polaris", 0o750)?;
    check_mode("/var/lib/polaris-agent", "root", "root", 0o750)?;
    check_mode("/etc/polaris/secret", "root", "polaris", 0o640)?;
    check_mode("/etc/polaris/dispatch-tokens.json", "root", "polaris", 0o640)?;
    check_mode("/etc/polaris/agent-token", "root", "root", 0o600)?;
    check_mode("/etc/polaris/agent.toml", "root", "root", 0o644)?;
    let secret = std::fs::read_to_string("/etc/polaris/secret")?;
    let hex = secret.trim_end_matches('\n');
    ensure!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "the secret is not 32 bytes of hex: {} chars",
        hex.len()
    );
    for (package, conffiles) in [
        ("polarisd", &["/etc/default/polarisd"][..]),
        ("polaris-dispatch", &["/etc/default/polaris-dispatch"][..]),
        ("polaris-agent", &["/etc/default/polaris-agent", "/etc/polaris/agent.toml"][..]),
    ] {
        let listed = dpkg_query("${Conffiles}", package)?;
        for conffile in conffiles {
            ensure!(listed.contains(conffile), "{package} does not list {conffile} as a conffile: {listed}");
        }
    }
    Ok(())
}

fn verify_units() -> Result<()> {
    let units = ["polarisd.service", "polarisd.socket", "polaris-dispatch.service", "polaris-agent.service"];
    let paths: Vec<String> = units.iter().map(|u| format!("{UNIT_DIR}/{u}")).collect();
    let output = Command::new("systemd-analyze").args(["verify", "--man=no"]).args(&paths).output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "systemd-analyze verify failed: {stderr}");
    // verify reports some problems (e.g. a unit's unknown setting) as warnings with exit 0.
    let ours: Vec<&str> = stderr.lines().filter(|l| units.iter().any(|u| l.contains(u))).collect();
    ensure!(ours.is_empty(), "systemd-analyze verify warns about the units: {ours:?}");
    Ok(())
}

/// Sets `KEY=value` in a defaults file (the line that assigns it).
fn set_default(path: &str, key: &str, value: &str) -> Result<()> {
    let text = std::fs::read_to_string(path)?;
    let prefix = format!("{key}=");
    ensure!(text.lines().any(|l| l.starts_with(&prefix)), "{path} assigns no {key}");
    let edited: String = text
        .lines()
        .map(|l| if l.starts_with(&prefix) { format!("{prefix}{value}\n") } else { format!("{l}\n") })
        .collect();
    std::fs::write(path, edited)?;
    Ok(())
}

fn token_named(name: &str) -> Result<String> {
    let tokens: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("/etc/polaris/dispatch-tokens.json")?)?;
    tokens["tokens"]
        .as_array()
        .and_then(|all| all.iter().find(|t| t["name"] == name))
        .and_then(|t| t["token"].as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no token {name} in /etc/polaris/dispatch-tokens.json"))
}

/// A unit's settings as the test needs them: `Key=value` lines of the installed unit file.
fn unit_settings(unit: &str) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(format!("{UNIT_DIR}/{unit}"))?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect())
}

/// The variables of an `EnvironmentFile` (`KEY=value`, `KEY="value"`, comments).
fn environment_file(path: &str) -> Result<BTreeMap<String, String>> {
    let path = path.trim_start_matches('-');
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect())
}

/// `ExecStart` as systemd runs it: `${KEY}` is one word, `$KEY` splits into words at
/// whitespace (an empty value is no word at all).
fn exec_start_argv(unit: &str) -> Result<(Vec<String>, BTreeMap<String, String>)> {
    let settings = unit_settings(unit)?;
    let env = match settings.get("EnvironmentFile") {
        Some(path) => environment_file(path)?,
        None => BTreeMap::new(),
    };
    let exec = settings.get("ExecStart").ok_or_else(|| anyhow!("{unit} has no ExecStart"))?;
    let mut argv = Vec::new();
    for word in exec.split_whitespace() {
        if let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            argv.push(env.get(name).cloned().ok_or_else(|| anyhow!("{unit}: ${{{name}}} is not set"))?);
        } else if let Some(name) = word.strip_prefix('$') {
            argv.extend(
                env.get(name).map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>()).unwrap_or_default(),
            );
        } else {
            ensure!(!word.contains('$'), "{unit}: cannot expand {word:?}");
            argv.push(word.to_string());
        }
    }
    Ok((argv, settings))
}

/// The command that runs `argv` as the unit's `User`/`Group` (root without them), as a
/// service manager would: `setpriv` with the user's supplementary groups and no new privileges
/// where the unit says so.
fn as_unit_user(argv: &[String], settings: &BTreeMap<String, String>) -> Command {
    let mut command;
    if let Some(user) = settings.get("User") {
        command = Command::new("setpriv");
        let group = settings.get("Group").cloned().unwrap_or_else(|| user.clone());
        command.args(["--reuid", user, "--regid", &group, "--init-groups"]);
        if settings.get("NoNewPrivileges").is_some_and(|v| v == "yes") {
            command.arg("--no-new-privs");
        }
        command.arg("--").args(argv);
    } else {
        command = Command::new(&argv[0]);
        command.args(&argv[1..]);
    }
    command.current_dir("/").stdin(Stdio::null()).stderr(Stdio::piped()).env_remove("POLARIS_SECRET");
    command
}

/// Starts a unit's program that announces `listening on ADDR`; returns it and the address.
/// A `Type=notify` unit's program must also send `READY=1` to `$NOTIFY_SOCKET`, which is
/// here an abstract socket, so the unit's user can reach it without file permissions.
fn start_unit(package: &str) -> Result<(Proc, String)> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let unit = format!("{package}.service");
    let (argv, settings) = exec_start_argv(&unit)?;
    let mut command = as_unit_user(&argv, &settings);
    let notify = if settings.get("Type").is_some_and(|t| t == "notify") {
        let name = format!("polaris-packages-test-{}-{package}", std::process::id());
        let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
        socket.set_read_timeout(Some(Duration::from_secs(20)))?;
        command.env("NOTIFY_SOCKET", format!("@{name}"));
        Some(socket)
    } else {
        None
    };
    let (proc, addr) = spawn_with_banner(package, &mut command, Duration::from_secs(20))
        .with_context(|| format!("starting {argv:?} as {unit} would"))?;
    if let Some(socket) = notify {
        let mut message = [0u8; 64];
        let n =
            socket.recv(&mut message).with_context(|| format!("{unit} is Type=notify, but {package} sent nothing"))?;
        ensure!(message[..n] == *b"READY=1\n", "{package} notified {:?}", String::from_utf8_lossy(&message[..n]));
    }
    Ok((proc, addr))
}

/// Starts a unit's program that prints no banner (the agent).
fn start_unit_unannounced(package: &str) -> Result<Proc> {
    let unit = format!("{package}.service");
    let (argv, settings) = exec_start_argv(&unit)?;
    let child =
        as_unit_user(&argv, &settings).stdout(Stdio::null()).spawn().with_context(|| format!("starting {argv:?}"))?;
    Ok(Proc::new(package, child))
}

/// Runs a unit's `ExecReload` as systemd would for the main process `pid`.
fn reload_unit(package: &str, pid: u32) -> Result<()> {
    let unit = format!("{package}.service");
    let settings = unit_settings(&unit)?;
    let reload = settings.get("ExecReload").ok_or_else(|| anyhow!("{unit} has no ExecReload"))?;
    let argv: Vec<String> = reload.split_whitespace().map(|w| w.replace("$MAINPID", &pid.to_string())).collect();
    let status = Command::new(&argv[0]).args(&argv[1..]).status().with_context(|| format!("running {argv:?}"))?;
    ensure!(status.success(), "{unit}'s ExecReload {argv:?} failed: {status}");
    Ok(())
}

/// SIGTERM, as `systemctl stop` sends it, and a clean exit.
fn stop(proc: &mut Proc) -> Result<()> {
    proc.signal("TERM")?;
    match proc.wait_exit(Duration::from_secs(40)) {
        Some(true) => Ok(()),
        other => bail!("{} did not exit cleanly on SIGTERM ({other:?}): {}", proc.name, proc.output_tail(2000)),
    }
}

/// polarisd started by `systemd-socket-activate` (the stand-in for polarisd.socket) with the
/// service's ExecStart: it serves on the socket it is given, not on its -l/-p.
fn socket_activated_polarisd() -> Result<()> {
    let socket = unit_settings("polarisd.socket")?;
    ensure!(socket.get("ListenStream").is_some_and(|l| l == "127.0.0.1:11300"), "polarisd.socket: {socket:?}");
    let port = free_port()?;
    let (argv, settings) = exec_start_argv("polarisd.service")?;
    let inner = as_unit_user(&argv, &settings);
    let mut command = Command::new("systemd-socket-activate");
    command.args(["-l", &format!("127.0.0.1:{port}"), "--"]);
    command.arg(inner.get_program()).args(inner.get_args());
    command.current_dir("/").stdin(Stdio::null()).stderr(Stdio::piped()).stdout(Stdio::piped());
    let child = command.spawn().context("starting systemd-socket-activate")?;
    let mut activated = Proc::new("socket-activated polarisd", child);
    // systemd-socket-activate listens at once and starts polarisd on the first connection.
    let addr = format!("127.0.0.1:{port}");
    let mut conn = None;
    wait_until(IO_TIMEOUT, "systemd-socket-activate listens", || {
        conn = RawConn::connect(addr.parse().expect("a socket address")).ok();
        conn.is_some()
    });
    let mut conn = conn.ok_or_else(|| anyhow!("no connection to {addr}"))?;
    let line = activated.first_stdout_line(Duration::from_secs(20))?;
    ensure!(line.trim_end() == format!("listening on {addr}"), "socket-activated polarisd says {line:?}");
    conn.send(b"peek 1\r\n")?;
    conn.expect(b"FOUND 1 5\r\nhello\r\n")?;
    stop(&mut activated)
}
