//! Child processes of a test: started from the workspace's binaries, their output kept for
//! failure messages, killed and reaped when their handle drops (also when a test panics).

use crate::IO_TIMEOUT;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The path of a binary of this workspace (`polarisd`, `polaris-dispatch`, …), built in the
/// same profile as the running test.
///
/// A test binary lives in `target/<profile>/deps/`, the workspace's binaries one level up.
/// `cargo test` builds a package's binaries only for that package's own integration tests,
/// so every package whose binary another crate's tests start has one (`tests/cli.rs`): a
/// plain `cargo test` in the workspace root then has them all in place before any test runs.
pub fn binary(name: &str) -> PathBuf {
    built_artifact(Path::new(name))
}

/// The path of an example of this workspace (`examples/NAME.rs`), built in the same profile
/// as the running test (`cargo test` builds every example).
pub fn example(name: &str) -> PathBuf {
    built_artifact(&Path::new("examples").join(name))
}

fn built_artifact(relative: &Path) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's own path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("test binaries live in target/<profile>/deps");
    let path = profile_dir.join(relative);
    assert!(
        path.is_file(),
        "{} is not built; `cargo test` in the workspace root builds every binary and example \
         (or run `cargo build --workspace --all-targets` with this test's profile)",
        path.display()
    );
    path
}

/// A child process, killed (SIGKILL) and reaped when dropped. Whatever of its stdout and
/// stderr is piped to the test is collected for failure messages.
pub struct Proc {
    /// Short label for messages, e.g. "polarisd" or "agent web-01".
    pub name: String,
    child: Option<Child>,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Proc {
    /// Wraps a spawned child. Its piped stderr (if any) is drained into the output buffer
    /// now; piped stdout is left to the caller (see [`read_first_line`]).
    pub fn new(name: &str, mut child: Child) -> Proc {
        let output = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            drain_into(stderr, output.clone());
        }
        Proc { name: name.to_string(), child: Some(child), output }
    }

    /// The process id (0 once reaped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends a signal by name (e.g. "TERM", "USR1") with `kill(1)`.
    pub fn signal(&self, name: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{name} {} failed: {status}", self.pid());
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit; returns whether it exited with 0.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<bool> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status.success());
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Returns the exit status if the process has already exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// SIGKILL and reap (a crash, as far as the process can tell).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What the process has printed so far, lossily decoded, for failure messages.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&lock(&self.output)).into_owned()
    }

    /// The last `max` bytes the process printed, lossily decoded.
    pub fn output_tail(&self, max: usize) -> String {
        let output = lock(&self.output);
        String::from_utf8_lossy(&output[output.len().saturating_sub(max)..]).into_owned()
    }

    /// Reads the first line of the child's piped stdout within `timeout` (`""` if stdout
    /// closes first), then keeps draining stdout into the output buffer.
    pub fn first_stdout_line(&mut self, timeout: Duration) -> Result<String> {
        let stdout = self
            .child
            .as_mut()
            .and_then(|c| c.stdout.take())
            .ok_or_else(|| anyhow!("{}: stdout is not piped", self.name))?;
        read_first_line(stdout, self.output.clone())
            .recv_timeout(timeout)
            .map_err(|_| anyhow!("{} printed no line within {timeout:?}; output so far:\n{}", self.name, self.output()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn lock(output: &Mutex<Vec<u8>>) -> std::sync::MutexGuard<'_, Vec<u8>> {
    output.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Copies everything from `source` into `sink` on a background thread, so a chatty child
/// never blocks on a full pipe.
fn drain_into(mut source: impl Read + Send + 'static, sink: Arc<Mutex<Vec<u8>>>) {
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = source.read(&mut chunk) {
            if n == 0 {
                break;
            }
            lock(&sink).extend_from_slice(&chunk[..n]);
        }
    });
}

/// Reads the first stdout line on a thread (so the caller can time out), then keeps
/// draining stdout into `output`. Sends "" if stdout closes first.
pub fn read_first_line(stdout: ChildStdout, output: Arc<Mutex<Vec<u8>>>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        let mut chunk = [0u8; 4096];
        while let Ok(n) = reader.read(&mut chunk) {
            if n == 0 {
                break;
            }
            lock(&output).extend_from_slice(&chunk[..n]);
        }
    });
    rx
}

/// A server child process with the address it listens on.
pub struct ServerProcess {
    /// The process.
    pub proc: Proc,
    addr: SocketAddr,
}

impl ServerProcess {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Short label for messages.
    pub fn label(&self) -> &str {
        &self.proc.name
    }

    /// Opens a raw connection to the server.
    pub fn connect(&self) -> Result<crate::RawConn> {
        crate::RawConn::connect(self.addr).with_context(|| format!("connecting to {} at {}", self.label(), self.addr))
    }

    /// Sends a signal by name (e.g. "USR1") to the server process.
    pub fn signal(&self, name: &str) -> Result<()> {
        self.proc.signal(name)
    }

    /// What the process has printed so far.
    pub fn output(&self) -> String {
        self.proc.output()
    }

    /// The last `max` bytes the process printed.
    pub fn output_tail(&self, max: usize) -> String {
        self.proc.output_tail(max)
    }

    /// Returns the exit status if the process has already exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.proc.try_exit_status()
    }
}

/// Starts polarisd on a free loopback port (`-l 127.0.0.1 -p 0`, then `extra_args`) and
/// waits for its `listening on HOST:PORT` banner.
pub fn spawn_polarisd(extra_args: &[&str]) -> Result<ServerProcess> {
    spawn_announcing(&binary("polarisd"), extra_args)
}

/// Spawns `binary` with `listen_args` then `extra_args`, stdin closed and both outputs piped.
fn spawn_piped(binary: &Path, listen_args: &[&str], extra_args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
    let child = Command::new(binary)
        .args(listen_args)
        .args(extra_args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", binary.display()))?;
    let label = binary.file_name().map_or("server".into(), |n| n.to_string_lossy().into_owned());
    Ok(Proc::new(&label, child))
}

/// The address in a `listening on HOST:PORT` banner line.
pub fn listening_addr(line: &str) -> Option<&str> {
    line.trim_end().strip_prefix("listening on ")
}

/// Starts a server that supports `-p 0` and announces its address as the first line of
/// stdout (`listening on HOST:PORT`), as polarisd does.
pub fn spawn_announcing(binary: &Path, extra_args: &[&str]) -> Result<ServerProcess> {
    spawn_announcing_with_env(binary, extra_args, &[])
}

/// As [`spawn_announcing`], with extra environment variables for the server.
pub fn spawn_announcing_with_env(binary: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Result<ServerProcess> {
    let mut proc = spawn_piped(binary, &["-l", "127.0.0.1", "-p", "0"], extra_args, env)?;
    let line = proc.first_stdout_line(IO_TIMEOUT)?;
    let Some(addr_text) = listening_addr(&line) else {
        // Give a crashing process a moment to exit, so the message says how it ended.
        thread::sleep(Duration::from_millis(100));
        let status = proc.try_exit_status().map_or("still running".to_string(), |s| s.to_string());
        let first_line = if line.is_empty() {
            "it closed stdout without printing anything".to_string()
        } else {
            format!("its first stdout line was {line:?}")
        };
        bail!(
            "{} did not start: {first_line}, expected `listening on HOST:PORT`; \
             process status: {status}; output: {:?}",
            binary.display(),
            proc.output()
        );
    };
    let addr = addr_text.parse().with_context(|| format!("parsing the address in banner {line:?}"))?;
    Ok(ServerProcess { proc, addr })
}

/// Starts a program whose first stdout line is `listening on ADDR` (polarisd,
/// polaris-dispatch) from an already configured command, and returns it with that address.
pub fn spawn_with_banner(name: &str, command: &mut Command, timeout: Duration) -> Result<(Proc, String)> {
    let child = command.stdout(Stdio::piped()).spawn().with_context(|| format!("starting {name}"))?;
    let mut proc = Proc::new(name, child);
    let line = proc.first_stdout_line(timeout)?;
    let addr = listening_addr(&line)
        .ok_or_else(|| anyhow!("{name}: unexpected first stdout line {line:?}; output: {}", proc.output()))?
        .to_string();
    Ok((proc, addr))
}

/// Starts polarisd on a free loopback port with at most `nofile` open descriptors (set with
/// the shell's `ulimit` just before it starts), for tests that run it out of them or hold
/// many connections.
pub fn spawn_polarisd_with_nofile(nofile: u32, extra_args: &[&str]) -> Result<(Proc, SocketAddr)> {
    let (proc, addr) = spawn_with_banner(
        &format!("polarisd with {nofile} descriptors"),
        Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" -l 127.0.0.1 -p 0 \"$@\""))
            .arg(binary("polarisd"))
            .args(extra_args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped()),
        Duration::from_secs(10),
    )?;
    Ok((proc, addr.parse().with_context(|| format!("parsing {addr}"))?))
}

/// Starts beanstalkd (or a compatible binary) on a free loopback port with `extra_args`.
/// beanstalkd cannot bind port 0, so a free port is picked by binding and releasing it; if
/// another process grabs it in between, the start is retried on a new port.
///
/// Readiness is detected by finding the child's listening socket in /proc instead of
/// connecting to it: a probe connection would bump `total-connections` and make the server
/// differ from polarisd.
pub fn spawn_beanstalkd(binary: &Path, extra_args: &[&str]) -> Result<ServerProcess> {
    let mut last_error = anyhow!("no attempt made");
    for _attempt in 0..5 {
        let port = free_port()?;
        let mut proc = spawn_piped(binary, &["-l", "127.0.0.1", "-p", &port.to_string()], extra_args, &[])?;
        if let Some(stdout) = proc.child.as_mut().and_then(|c| c.stdout.take()) {
            drain_into(stdout, proc.output.clone());
        }
        let mut server = ServerProcess { proc, addr: SocketAddr::from(([127, 0, 0, 1], port)) };
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(status) = server.try_exit_status() {
                last_error =
                    anyhow!("{} exited with {status} on port {port}; output:\n{}", binary.display(), server.output());
                break;
            }
            if process_listens_on(server.pid(), port) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                last_error = anyhow!("{} did not listen on port {port} within {IO_TIMEOUT:?}", binary.display());
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
    Err(last_error)
}

/// Picks a loopback port that is free right now and that this test process has not handed
/// out before (so parallel spawns never get the same one).
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Default::default);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if handed_out.lock().unwrap_or_else(|p| p.into_inner()).insert(port) {
            return Ok(port);
        }
    }
    bail!("could not find a fresh free port")
}

/// True if process `pid` owns a TCP socket listening on `port` (IPv4 or IPv6).
fn process_listens_on(pid: u32, port: u16) -> bool {
    let mut listening_inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // fields: sl, local_address (HEXIP:HEXPORT), rem_address, st, ..., inode at 9
            let (Some(local), Some(state), Some(inode)) = (fields.get(1), fields.get(3), fields.get(9)) else {
                continue;
            };
            let local_port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && *state == "0A" {
                listening_inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if listening_inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .map(|target| listening_inodes.iter().any(|s| target.as_os_str() == s.as_str()))
            .unwrap_or(false)
    })
}

/// Waits until `addr` accepts TCP connections.
pub fn wait_accepting(addr: &str, timeout: Duration) {
    wait_until(timeout, &format!("{addr} accepting connections"), || TcpStream::connect(addr).is_ok());
}

/// Polls `check` every 20 ms until it is true, or panics naming `what`.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// Whether process `pid` is gone (a zombie counts as gone).
pub fn pid_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => true,
    }
}

/// Runs `program` with `args`, asserts it succeeded, and returns its stdout.
pub fn run_ok(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    assert!(out.status.success(), "{} {args:?} failed: {out:?}", program.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command-line promises of the ops programs: `-V` and `--version` agree and name the
/// program, and `-h` opens with the program's name and mentions each of `words` (the
/// environment it reads, the signals it handles).
pub fn assert_version_and_help(program: &Path, name: &str, words: &[&str]) {
    let long = run_ok(program, &["--version"]);
    assert!(long.starts_with(&format!("{name} ")), "{long}");
    assert_eq!(run_ok(program, &["-V"]), long);
    let help = run_ok(program, &["-h"]);
    assert!(help.starts_with(&format!("{name}: ")), "-h opens with {:?}", help.lines().next());
    for word in words {
        assert!(help.contains(word), "-h does not mention {word}:\n{help}");
    }
}
