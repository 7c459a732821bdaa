//! The agent as the guest's init: mount file systems, announce itself, serve forever.
//!
//! PID 1 must never exit (the kernel panics when it does), so every failure is logged to the
//! console and retried.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::panic::{self, AssertUnwindSafe};
use std::thread;
use std::time::Duration;

use thiserror::Error;

use super::server::{ServeEnd, Server};
use super::{sys, tty};

/// The prefix of the line benchmarks wait for on the console.
pub const BANNER_PREFIX: &str = "vmm-guest-agent: user space up";
/// The channel used unless the command line says `agent.port=...`.
pub const DEFAULT_PORT: &str = "/dev/ttyS1";
/// PATH for the agent and the programs it runs.
pub const PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";

/// Why a file system could not be mounted.
#[derive(Debug, Error)]
pub enum MountError {
    /// mkdir of the mount point failed.
    #[error("cannot create mount point {target}: {source}")]
    Mkdir {
        /// The mount point.
        target: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// mount(2) failed.
    #[error("cannot mount {fstype} on {target}: {source}")]
    Mount {
        /// The file system type.
        fstype: &'static str,
        /// The mount point.
        target: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What the kernel command line asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `agent.oneshot`: reboot right after the banner.
    pub oneshot: bool,
    /// `agent.port=PATH`: the channel device.
    pub port: String,
    /// `agent.debug`: log start-up steps and each request line to the console (slow).
    pub debug: bool,
}

impl Options {
    /// Reads the options from kernel command line words.
    pub fn from_cmdline<S: AsRef<str>>(words: &[S]) -> Self {
        let mut options = Options {
            oneshot: false,
            port: DEFAULT_PORT.to_owned(),
            debug: false,
        };
        for word in words {
            let word = word.as_ref();
            if word == "agent.oneshot" {
                options.oneshot = true;
            } else if word == "agent.debug" {
                options.debug = true;
            } else if let Some(port) = word.strip_prefix("agent.port=") {
                if !port.is_empty() {
                    options.port = port.to_owned();
                }
            }
        }
        options
    }
}

/// Runs the agent as init. Never returns.
pub fn run() -> ! {
    for failure in mount_all() {
        console(&format!("warning: {failure}"));
    }
    // Single-threaded here: nothing else reads the environment concurrently.
    std::env::set_var("PATH", PATH);
    console_line(&banner());

    let options = Options::from_cmdline(&sys::kernel_cmdline());
    if options.oneshot {
        let err = sys::reboot();
        console(&format!("{err}; serving instead"));
    }
    serve_forever(&options)
}

/// The banner line, without newline.
pub fn banner() -> String {
    let uptime = sys::uptime_text()
        .and_then(|t| t.parse::<f64>().ok())
        .unwrap_or_else(|| sys::uptime_ms() as f64 / 1000.0);
    format!(
        "{BANNER_PREFIX}, kernel {}, uptime {uptime:.2} s",
        sys::kernel_release()
    )
}

/// Mounts proc, sysfs, devtmpfs and tmpfs; returns the failures (already-mounted is fine).
fn mount_all() -> Vec<MountError> {
    const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let table: [(&'static str, &'static str, libc::c_ulong, &str); 4] = [
        ("proc", "/proc", NOSUID_NODEV_NOEXEC, ""),
        ("sysfs", "/sys", NOSUID_NODEV_NOEXEC, ""),
        ("devtmpfs", "/dev", libc::MS_NOSUID, "mode=0755"),
        (
            "tmpfs",
            "/tmp",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
    ];
    table
        .into_iter()
        .filter_map(|(fstype, target, flags, data)| mount(fstype, target, flags, data).err())
        .collect()
}

fn mount(
    fstype: &'static str,
    target: &'static str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), MountError> {
    if let Err(source) = std::fs::create_dir(target) {
        if source.kind() != io::ErrorKind::AlreadyExists {
            return Err(MountError::Mkdir { target, source });
        }
    }
    let invalid = |_| MountError::Mount {
        fstype,
        target,
        source: io::Error::from(io::ErrorKind::InvalidInput),
    };
    let c_fstype = CString::new(fstype).map_err(invalid)?;
    let c_target = CString::new(target).map_err(invalid)?;
    let c_data = CString::new(data).map_err(invalid)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c_fstype.as_ptr(),
            c_target.as_ptr(),
            c_fstype.as_ptr(),
            flags,
            c_data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let source = io::Error::last_os_error();
        if source.raw_os_error() != Some(libc::EBUSY) {
            return Err(MountError::Mount {
                fstype,
                target,
                source,
            });
        }
    }
    Ok(())
}

/// Serves on `port`, reopening it after any failure.
fn serve_forever(options: &Options) -> ! {
    let port = options.port.as_str();
    let mut server = Server::new(true);
    server.set_trace(options.debug);
    let mut last_complaint = String::new();
    loop {
        if options.debug {
            console(&format!("opening {port}"));
        }
        let complaint = match tty::open_raw(port) {
            Err(e) => e.to_string(),
            Ok(file) => {
                if options.debug {
                    console(&format!("serving on {port}"));
                }
                match panic::catch_unwind(AssertUnwindSafe(|| server.serve(&file, &file))) {
                    Ok(Ok(ServeEnd::Reboot)) => {
                        if let Err(e) = tty::drain(&file) {
                            console(&format!("tcdrain {port} failed: {e}"));
                        }
                        format!("{}", sys::reboot())
                    }
                    Ok(Ok(ServeEnd::Eof)) => format!("{port}: end of input"),
                    Ok(Err(e)) => format!("{port}: {e}"),
                    Err(_) => format!("{port}: the server panicked"),
                }
            }
        };
        // Repeating the same complaint every second would flood the (slow) console.
        if complaint != last_complaint {
            console(&format!("{complaint}; retrying every second"));
            last_complaint = complaint;
        }
        sys::reap_zombies();
        thread::sleep(Duration::from_secs(1));
    }
}

/// Logs `message` on the console, prefixed by the agent's name.
pub fn console(message: &str) {
    console_line(&format!("vmm-guest-agent: {message}"));
}

/// Writes `line` and a newline to /dev/console in one write (stderr if that fails).
fn console_line(line: &str) {
    let text = format!("{line}\n");
    let written = OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if written.is_err() {
        let _ = io::stderr().write_all(text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_from_cmdline() {
        let o = Options::from_cmdline(&["console=ttyS0", "quiet"]);
        assert_eq!(
            o,
            Options {
                oneshot: false,
                port: DEFAULT_PORT.into(),
                debug: false,
            }
        );
        assert!(Options::from_cmdline(&["agent.debug"]).debug);
        let o = Options::from_cmdline(&["agent.oneshot", "agent.port=/dev/ttyS2"]);
        assert!(o.oneshot);
        assert_eq!(o.port, "/dev/ttyS2");
        // Only the exact word counts.
        assert!(!Options::from_cmdline(&["agent.oneshots", "xagent.oneshot"]).oneshot);
    }

    #[test]
    fn banner_format() {
        let b = banner();
        assert!(b.starts_with(BANNER_PREFIX), "{b}");
        assert!(b.contains(", kernel "), "{b}");
        let uptime = b.rsplit(", uptime ").next().unwrap();
        let secs = uptime.strip_suffix(" s").unwrap();
        assert_eq!(secs.split('.').nth(1).map(str::len), Some(2), "{b}");
    }
}
