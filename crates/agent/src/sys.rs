//! Every call the agent makes into the operating system, in one place.
//!
//! Pipes, `waitid`, process and process-group signals and file locks go through `rustix`,
//! which is safe to call. (cgroupfs, in `contain`, is plain file I/O.)
//! Only the utmpx database (logged-in users) stays `libc`: neither rustix nor nix reads
//! it, and glibc's `getutxent` hands out a pointer into a static buffer, so the one
//! `unsafe` block below says why reading it is sound.

use rustix::fs::{flock, FlockOperation};
pub use rustix::process::Signal;
use rustix::process::{kill_process, kill_process_group, waitid, Pid, WaitId, WaitIdOptions};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::process::Child;
use std::sync::Mutex;

/// A pipe whose both ends are close-on-exec (`pipe2(O_CLOEXEC)`).
pub fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// Whether `child` has exited, without reaping it (`waitid` with `WNOWAIT | WNOHANG`), so
/// its pid stays taken until [`Child::wait`].
pub fn has_exited(child: &Child) -> io::Result<bool> {
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    Ok(waitid(WaitId::Pid(Pid::from_child(child)), options)?.is_some())
}

/// Sends `signal` to the process group led by `leader` (`kill(-pgid, sig)`). A group that
/// no longer exists (ESRCH) is not an error worth reporting.
pub fn kill_group(leader: &Child, signal: Signal) {
    let _ = kill_process_group(Pid::from_child(leader), signal);
}

/// Sends `signal` to process group `pgid`, a group this agent did not start (a
/// predecessor's command). The caller has checked that the group is that command's.
pub fn kill_group_id(pgid: i32, signal: Signal) -> io::Result<()> {
    let pid = Pid::from_raw(pgid).filter(|_| pgid > 1).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok(kill_process_group(pid, signal)?)
}

/// Sends `signal` to process `pid`, a member of a cgroup this agent made (read from its
/// `cgroup.procs`). A process that has exited meanwhile (ESRCH) is not an error.
pub fn kill_pid(pid: i32, signal: Signal) {
    if let Some(pid) = Pid::from_raw(pid).filter(|_| pid > 1) {
        let _ = kill_process(pid, signal);
    }
}

/// Takes an exclusive `flock` on `file` without waiting; false if another process holds
/// it. The lock lasts while the file stays open (it is close-on-exec, so commands do not
/// inherit it).
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The conventional name of a signal number, for the signals a command commonly dies of.
pub fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match Signal::from_named_raw(signal)? {
        Signal::HUP => "SIGHUP",
        Signal::INT => "SIGINT",
        Signal::QUIT => "SIGQUIT",
        Signal::ILL => "SIGILL",
        Signal::TRAP => "SIGTRAP",
        Signal::ABORT => "SIGABRT",
        Signal::BUS => "SIGBUS",
        Signal::FPE => "SIGFPE",
        Signal::KILL => "SIGKILL",
        Signal::USR1 => "SIGUSR1",
        Signal::SEGV => "SIGSEGV",
        Signal::USR2 => "SIGUSR2",
        Signal::PIPE => "SIGPIPE",
        Signal::ALARM => "SIGALRM",
        Signal::TERM => "SIGTERM",
        Signal::XCPU => "SIGXCPU",
        Signal::XFSZ => "SIGXFSZ",
        _ => return None,
    })
}

/// Serialises the utmpx iteration below (it walks one process-wide cursor and buffer).
static UTMPX: Mutex<()> = Mutex::new(());

/// Users with a login session (`USER_PROCESS` entries of utmp), one entry per session.
pub fn logged_in_users() -> Vec<String> {
    let _cursor = UTMPX.lock().unwrap_or_else(|p| p.into_inner());
    let mut users = Vec::new();
    // SAFETY: setutxent/getutxent/endutxent share one static cursor and record buffer.
    // This function is their only caller in the agent and holds UTMPX while it iterates,
    // so no other thread moves the cursor or overwrites the buffer meanwhile; each
    // non-null record is read (its name copied out) before the next getutxent call.
    unsafe {
        libc::setutxent();
        loop {
            let entry = libc::getutxent();
            if entry.is_null() {
                break;
            }
            if (*entry).ut_type == libc::USER_PROCESS {
                let name = &(*entry).ut_user;
                let bytes: Vec<u8> = name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
                if !bytes.is_empty() {
                    users.push(String::from_utf8_lossy(&bytes).into_owned());
                }
            }
        }
        libc::endutxent();
    }
    users
}

/// Opens `path` for reading without following a symlink in its last component
/// (`O_NOFOLLOW`), without blocking on a FIFO swapped in for a file (`O_NONBLOCK`), and
/// without moving its access time where the kernel allows (`O_NOATIME`, refused with
/// EPERM on files of other owners unless root: then opened without it).
pub fn open_read_nofollow(path: &std::path::Path) -> io::Result<File> {
    use rustix::fs::{open, Mode, OFlags};
    let base = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = match open(path, base | OFlags::NOATIME, Mode::empty()) {
        Err(rustix::io::Errno::PERM) => open(path, base, Mode::empty())?,
        other => other?,
    };
    Ok(File::from(fd))
}

/// Whether the filesystem holding `path` is a kernel pseudo-filesystem (proc, sysfs,
/// devtmpfs, cgroup, debugfs, ...) whose "files" are views of kernel state: an integrity
/// scan walking into one would report noise and could block reading it.
pub fn is_pseudo_filesystem(path: &std::path::Path) -> io::Result<bool> {
    let stat = rustix::fs::statfs(path)?;
    // Magic numbers of linux/magic.h (configfs and fusectl are not listed there).
    const PSEUDO: &[i64] = &[
        0x9fa0,      // proc
        0x6265_6572, // sysfs
        0x1cd1,      // devpts
        0x0027_e0eb, // cgroup
        0x6367_7270, // cgroup2
        0x6462_6720, // debugfs
        0x7472_6163, // tracefs
        0x7363_6673, // securityfs
        0xf97c_ff8c, // selinuxfs
        0x6165_676c, // pstore
        0xcafe_4a11, // bpf
        0x6265_6570, // configfs
        0x6573_5546, // fusectl
        0x4249_4e4d, // binfmt_misc
        0x0187,      // autofs
        0xde5e_81e4, // efivarfs
        0x9fa2,      // usbdevfs
        0x6e73_6673, // nsfs
    ];
    #[allow(clippy::unnecessary_cast)]
    let magic = stat.f_type as i64;
    Ok(PSEUDO.contains(&magic))
}
