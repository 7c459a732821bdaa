//! Small facts about and actions on the system the agent runs on.

use std::ffi::CStr;
use std::fs;
use std::io;

use thiserror::Error;

/// Why a system action failed.
#[derive(Debug, Error)]
pub enum SysError {
    /// `reboot(2)` returned.
    #[error("reboot(LINUX_REBOOT_CMD_RESTART) failed: {0}")]
    Reboot(#[source] io::Error),
}

/// Whether this process is PID 1 (the guest's init).
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// The kernel release (`uname -r`), or `"unknown"` if uname fails.
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain old data; all-zero bytes are a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes into the struct we own and pass by valid pointer.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return "unknown".to_owned();
    }
    // SAFETY: the kernel NUL-terminates every utsname field and the zeroed struct ends in NUL.
    let release = unsafe { CStr::from_ptr(uts.release.as_ptr()) };
    release.to_string_lossy().into_owned()
}

/// Seconds since boot as written in the first field of /proc/uptime (e.g. `"12.34"`).
pub fn uptime_text() -> Option<String> {
    let text = fs::read_to_string("/proc/uptime").ok()?;
    text.split_whitespace().next().map(str::to_owned)
}

/// Milliseconds since boot, from the monotonic boot clock.
pub fn uptime_ms() -> u64 {
    // SAFETY: timespec is plain old data; all-zero bytes are a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes into the struct we own and pass by valid pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
}

/// Online CPUs: sysconf (cheap: glibc reads /sys/devices/system/cpu/online), else the
/// `processor` lines of /proc/cpuinfo (costly to generate in the emulated guest kernel), else 1.
pub fn online_cpus() -> u32 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if let Some(n) = u32::try_from(n).ok().filter(|&n| n > 0) {
        return n;
    }
    let counted = fs::read_to_string("/proc/cpuinfo").map(|info| {
        info.lines()
            .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
            .count()
    });
    counted
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// `MemAvailable` from /proc/meminfo in bytes, if readable.
pub fn mem_available() -> Option<u64> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The words of the kernel command line (empty if /proc/cmdline is unreadable).
pub fn kernel_cmdline() -> Vec<String> {
    fs::read_to_string("/proc/cmdline")
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Reaps every exited child without blocking (PID 1 inherits orphans).
pub fn reap_zombies() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local we own; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
    }
}

/// Flushes file systems.
pub fn sync() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

/// Syncs and restarts the machine; returns only on failure.
pub fn reboot() -> SysError {
    sync();
    // SAFETY: reboot has no memory-safety preconditions; it needs CAP_SYS_BOOT and otherwise
    // fails with EPERM.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_RESTART) };
    SysError::Reboot(io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_sane() {
        assert!(!kernel_release().is_empty());
        assert!(online_cpus() >= 1);
        assert!(uptime_ms() > 0);
        assert!(uptime_text().is_some());
        assert!(!is_pid1());
    }
}
