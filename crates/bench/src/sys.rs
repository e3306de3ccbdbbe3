//! Every call the load generator makes into the operating system, in one place, all
//! through `rustix`. The one `unsafe` block left is `Command::pre_exec` itself, which std
//! marks unsafe because the closure runs between `fork` and `exec`.

use rustix::process::{getrlimit, kill_process, set_parent_process_death_signal, setrlimit, Pid, Resource, Signal};
use std::process::{Child, Command};

/// The kernel's clock tick rate (`sysconf(_SC_CLK_TCK)`), the unit of `/proc/PID/stat` times.
pub(crate) fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

/// CPU seconds (user and system) used by this process so far.
///
/// `CLOCK_PROCESS_CPUTIME_ID` is the sum that `getrusage` splits into user and system
/// time, read in nanoseconds instead of microseconds.
pub(crate) fn self_cpu_secs() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// Raises the soft open-file limit to the hard one; returns the new soft limit
/// (`u64::MAX` for unlimited).
pub(crate) fn raise_nofile() -> u64 {
    let mut lim = getrlimit(Resource::Nofile);
    // `None` is RLIM_INFINITY, the largest value.
    let (soft, hard) = (lim.current.unwrap_or(u64::MAX), lim.maximum.unwrap_or(u64::MAX));
    if soft < hard {
        lim.current = lim.maximum;
        // If the kernel refuses, the run finds out when it runs out of descriptors.
        let _ = setrlimit(Resource::Nofile, lim);
    }
    lim.current.unwrap_or(u64::MAX)
}

/// Makes the child that `cmd` spawns get SIGTERM when this process dies
/// (`prctl(PR_SET_PDEATHSIG)`), so a benchmark server never outlives its benchmark.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe work is allowed: it makes one prctl system call (rustix issues it
    // directly: no allocation, no lock) and touches no other state.
    unsafe {
        cmd.pre_exec(|| {
            let _ = set_parent_process_death_signal(Some(Signal::TERM));
            Ok(())
        });
    }
}

/// Sends SIGTERM to `child` (`kill(pid, SIGTERM)`); a child already gone is no error.
pub(crate) fn terminate(child: &Child) {
    let _ = kill_process(Pid::from_child(child), Signal::TERM);
}
