//! Every call polarisd makes into the operating system, in one place.
//!
//! Most go through `rustix` (sockets, `uname`, `flock`) or `nix` (the user database,
//! process-wide `setgid`/`setuid`, `getrusage`), which are safe to call. What neither
//! offers safely stays `libc` here, each `unsafe` block with the reason it is sound:
//! - ignoring SIGPIPE (`signal`): both crates mark installing a disposition `unsafe`;
//! - taking over the socket of systemd socket activation: it arrives as a bare number
//!   (fd 3), which must be checked with a raw `getsockname` before anything may own it.

use anyhow::{bail, Context};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The first descriptor of systemd socket activation (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// True if the peer of a connected socket has hung up, checked without consuming input
/// (a `recv` of one byte with `MSG_PEEK | MSG_DONTWAIT` that reads end-of-file).
pub fn peer_closed(socket: impl AsFd) -> bool {
    use rustix::net::{recv, RecvFlags};
    let mut byte = [0u8; 1];
    matches!(recv(socket, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT), Ok((_, 0)))
}

/// A non-blocking TCP listener on `addr` with `SO_REUSEADDR` and a listen queue of
/// `backlog` connections (std's `bind` fixes it at 128; beanstalkd asks for 1024).
pub fn tcp_listener(addr: std::net::SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    use rustix::net::{bind, listen, socket_with, sockopt, AddressFamily, SocketFlags, SocketType};
    let family = if addr.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
    let socket = socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK, None)?;
    sockopt::set_socket_reuseaddr(&socket, true)?;
    bind(&socket, &addr)?;
    listen(&socket, backlog)?;
    Ok(std::net::TcpListener::from(socket))
}

/// Whether an `accept` failed because the process or the system ran out of descriptors
/// (the connection waits in the listen queue until one is freed).
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::MFILE.raw_os_error() || code == rustix::io::Errno::NFILE.raw_os_error())
}

/// Grows this process's descriptor table to hold `count` descriptors (at most the soft
/// `RLIMIT_NOFILE`) now, while the process has one thread. The kernel grows the table by
/// doubling as descriptors are opened, and in a process with several threads each growth
/// waits for an RCU grace period (`synchronize_rcu`): with the store's threads running, the
/// `accept` that crossed 256, 512, 1,024… connections took 8–20 ms, and the event loop
/// with it. The table never shrinks, so growing it once up front (a descriptor duplicated
/// to the top number, then closed) leaves no growth for later.
pub fn reserve_descriptor_table(count: usize) {
    use nix::sys::resource::{getrlimit, Resource};
    let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    let top = count.min(usize::try_from(soft).unwrap_or(usize::MAX)).saturating_sub(1);
    let Ok(top) = RawFd::try_from(top) else { return };
    if top <= LISTEN_FDS_START {
        return;
    }
    let grown = File::open("/dev/null").and_then(|null| Ok(rustix::io::fcntl_dupfd_cloexec(&null, top)?));
    if let Err(e) = grown {
        log::debug!("growing the descriptor table to {} entries failed: {e}", top + 1);
    }
}

/// A listening socket handed over by the service manager.
pub enum InheritedListener {
    /// A TCP (or other non-Unix) stream socket.
    Tcp(std::net::TcpListener),
    /// A Unix-domain socket.
    Unix(std::os::unix::net::UnixListener),
}

/// Set once fd 3 has been taken, so it is never owned twice.
static LISTEN_FD_TAKEN: AtomicBool = AtomicBool::new(false);

/// The first socket passed by systemd socket activation: `None` unless `LISTEN_PID` is
/// this process and `LISTEN_FDS` is at least 1 (and on every call after the first).
/// An error means fd [`LISTEN_FDS_START`] is not a socket; it is then left alone.
pub fn systemd_listener() -> Option<io::Result<InheritedListener>> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || fds == 0 || LISTEN_FD_TAKEN.swap(true, Ordering::SeqCst) {
        return None;
    }
    let fd = LISTEN_FDS_START;
    // rustix's getsockname wants a descriptor we already hold, which is what is in doubt
    // here, so this one call is raw.
    // SAFETY: an all-zero sockaddr_storage is a valid value of this plain C struct.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname takes any integer (a closed or foreign descriptor is EBADF or
    // ENOTSOCK) and writes at most `len` bytes into `addr`, which is valid for that size.
    let r = unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_storage).cast(), &mut len) };
    if r != 0 {
        return Some(Err(io::Error::last_os_error()));
    }
    // SAFETY: fd 3 is an open socket (just checked); by the socket-activation protocol
    // (LISTEN_PID names this process) the service manager passed it for this process to
    // own, nothing else in polarisd claims it, and LISTEN_FD_TAKEN lets this happen once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Some(Ok(if i32::from(addr.ss_family) == libc::AF_UNIX {
        InheritedListener::Unix(owned.into())
    } else {
        InheritedListener::Tcp(owned.into())
    }))
}

/// Ignores SIGPIPE: a peer that vanishes mid-write is then an ordinary EPIPE.
pub fn ignore_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code and has
    // no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Takes the group and then the user id of `user` (`-u`), process-wide.
pub fn become_user(user: &str) -> anyhow::Result<()> {
    use nix::unistd::{setgid, setuid, User};
    if user.contains('\0') {
        bail!("user name contains NUL");
    }
    let pw = match User::from_name(user) {
        Ok(Some(pw)) => pw,
        Ok(None) => bail!("no such user: {user}"),
        Err(e) => bail!("no such user: {user} ({e})"),
    };
    let (uid, gid) = (pw.uid, pw.gid);
    // The user's own supplementary groups, not root's, as beanstalkd's -u does
    // (initgroups, then setgid, then setuid).
    let name = std::ffi::CString::new(user).context("user name")?;
    nix::unistd::initgroups(&name, gid).map_err(io::Error::from).with_context(|| format!("initgroups({user})"))?;
    setgid(gid).map_err(io::Error::from).with_context(|| format!("setgid({gid})"))?;
    setuid(uid).map_err(io::Error::from).with_context(|| format!("setuid({uid})"))?;
    Ok(())
}

/// The kernel's names for this machine (`uname`).
pub struct Uname {
    /// The host name (`nodename`).
    pub hostname: String,
    /// The kernel build (`version`).
    pub os: String,
    /// The hardware (`machine`).
    pub machine: String,
}

/// `uname`, as text.
pub fn uname() -> Uname {
    let uts = rustix::system::uname();
    Uname {
        hostname: uts.nodename().to_string_lossy().into_owned(),
        os: uts.version().to_string_lossy().into_owned(),
        machine: uts.machine().to_string_lossy().into_owned(),
    }
}

/// User and system CPU time used by this process so far (zero if unknown).
pub fn cpu_times() -> (Duration, Duration) {
    use nix::sys::resource::{getrusage, UsageWho};
    let Ok(ru) = getrusage(UsageWho::RUSAGE_SELF) else { return (Duration::ZERO, Duration::ZERO) };
    let time = |t: nix::sys::time::TimeVal| {
        Duration::new(t.tv_sec().max(0) as u64, 0) + Duration::from_micros(t.tv_usec().max(0) as u64)
    };
    (time(ru.user_time()), time(ru.system_time()))
}

/// Takes an exclusive `flock` on `file` without waiting; fails if another process holds it.
pub fn try_lock_exclusive(file: &File) -> io::Result<()> {
    use rustix::fs::{flock, FlockOperation};
    Ok(flock(file, FlockOperation::NonBlockingLockExclusive)?)
}

/// Tells the service manager that polarisd is ready (`READY=1`, the sd_notify protocol of
/// `Type=notify` units): one datagram to the Unix socket named by `$NOTIFY_SOCKET`, a path
/// or, with a leading `@`, an abstract name. Without `$NOTIFY_SOCKET` (not started by
/// systemd, or not `Type=notify`) it does nothing. polarisd starts no child processes, so
/// the variable is left in place.
pub fn notify_ready() -> io::Result<()> {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(()) };
    let target = target.into_encoded_bytes();
    let addr = match target.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        None => {
            use std::os::unix::ffi::OsStrExt;
            SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(&target))?
        }
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(b"READY=1\n", &addr)?;
    Ok(())
}
