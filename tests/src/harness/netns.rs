//! Two "hosts" on one machine: a pair of network namespaces joined by a veth pair, for the
//! live-migration tests (source VMM and vfsim in one, destination in the other).
//!
//! The veth ends are created directly inside the namespaces, so their names (`veth0`) and the
//! addresses ([`ADDR_A`], [`ADDR_B`] on a /24) never meet the machine's own network or another
//! pair's: every pair is its own little network. Needs root and iproute2's `ip`.
//!
//! ```no_run
//! use std::net::{TcpListener, TcpStream};
//! use vmm_tests::harness::{NetnsPair, Side};
//!
//! let pair = NetnsPair::create("mig")?;
//! // A process in namespace B ...
//! let mut vmm = pair.command(Side::B, "vmm");
//! vmm.args(["--incoming", &format!("tcp:{}:7000", pair.addr(Side::B))]);
//! // ... or a socket made in it by this process.
//! let listener = pair.within(Side::B, || TcpListener::bind((pair.addr(Side::B), 0)))??;
//! pair.link_down()?; // cut the cable
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use thiserror::Error;

/// Address of namespace A's end of the link.
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Address of namespace B's end of the link.
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// Prefix length of the link's subnet.
pub const PREFIX_LEN: u8 = 24;
/// Name of the veth end inside each namespace.
pub const LINK: &str = "veth0";
/// Where `ip netns add` puts its namespace handles.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// One of the two namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first ("source host").
    A,
    /// The second ("destination host").
    B,
}

impl Side {
    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// Why a namespace pair could not be set up or used.
#[derive(Debug, Error)]
pub enum NetnsError {
    /// `ip` is not installed.
    #[error("the `{program}` command is missing ({source}): network namespace tests need iproute2 (apt-get install iproute2; scripts/test.sh installs it)")]
    IpMissing {
        /// The program looked for.
        program: String,
        /// The spawn error.
        #[source]
        source: io::Error,
    },
    /// Not running as root.
    #[error("network namespace tests must run as root (euid is {euid}): creating namespaces and veth links needs CAP_SYS_ADMIN and CAP_NET_ADMIN")]
    NotRoot {
        /// The effective uid.
        euid: u32,
    },
    /// The prefix would make a bad namespace name.
    #[error("namespace prefix {0:?} must be 1-20 characters of [A-Za-z0-9_-]")]
    BadPrefix(String),
    /// An `ip` command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Ip {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// `ip` could not be run.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Entering a namespace from this process failed.
    #[error("cannot enter network namespace {name}: {source}")]
    Enter {
        /// The namespace.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The closure run in a namespace panicked.
    #[error("the code run in network namespace {0} panicked")]
    Panicked(String),
}

/// Two network namespaces joined by a veth pair, both ends and both loopbacks up; deleted on
/// drop (processes still inside keep their namespace alive until they exit: nothing is
/// killed).
#[derive(Debug)]
pub struct NetnsPair {
    ip: PathBuf,
    names: [String; 2],
    /// Namespaces that exist and must be deleted on drop.
    created: [bool; 2],
}

impl NetnsPair {
    /// Creates namespaces `<prefix>-<pid>-<n>-a` and `-b`, the veth pair between them with
    /// [`ADDR_A`] and [`ADDR_B`], and brings everything up.
    pub fn create(prefix: &str) -> Result<Self, NetnsError> {
        Self::create_with(Path::new("ip"), prefix)
    }

    /// [`NetnsPair::create`] with another `ip` program.
    pub fn create_with(ip: &Path, prefix: &str) -> Result<Self, NetnsError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if prefix.is_empty() || prefix.len() > 20 || !prefix.chars().all(valid) {
            return Err(NetnsError::BadPrefix(prefix.to_owned()));
        }
        preflight(ip)?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let base = format!("{prefix}-{}-{n}", std::process::id());
        let mut pair = NetnsPair {
            ip: ip.to_owned(),
            names: [format!("{base}-a"), format!("{base}-b")],
            created: [false; 2],
        };
        // On any error below, dropping `pair` deletes what was made.
        for i in 0..2 {
            let name = pair.names[i].clone();
            // A namespace of that name can only be left over by a dead process with our pid.
            if Path::new(NETNS_DIR).join(&name).exists() {
                let _ = pair.ip(&["netns", "del", &name]);
            }
            pair.ip(&["netns", "add", &name])?;
            pair.created[i] = true;
        }
        let [a, b] = pair.names.clone();
        pair.ip(&[
            "link", "add", LINK, "netns", &a, "type", "veth", "peer", "name", LINK, "netns", &b,
        ])?;
        for (name, addr) in [(&a, ADDR_A), (&b, ADDR_B)] {
            let cidr = format!("{addr}/{PREFIX_LEN}");
            pair.ip(&["-n", name, "addr", "add", &cidr, "dev", LINK])?;
            pair.ip(&["-n", name, "link", "set", "lo", "up"])?;
            pair.ip(&["-n", name, "link", "set", LINK, "up"])?;
        }
        Ok(pair)
    }

    /// The namespace's name (as `ip netns list` shows it).
    pub fn name(&self, side: Side) -> &str {
        &self.names[side as usize]
    }

    /// The address of the side's end of the link.
    pub fn addr(&self, side: Side) -> Ipv4Addr {
        match side {
            Side::A => ADDR_A,
            Side::B => ADDR_B,
        }
    }

    /// A command that runs `program` inside the side's namespace (`ip netns exec NAME
    /// program`); add arguments, environment and stdio to it as usual. `ip` execs the
    /// program, so the child's pid is the program's.
    pub fn command<S: AsRef<OsStr>>(&self, side: Side, program: S) -> Command {
        let mut cmd = Command::new(&self.ip);
        cmd.args([OsStr::new("netns"), OsStr::new("exec")])
            .arg(self.name(side))
            .arg(program);
        cmd
    }

    /// `cmd` rewritten to run inside the side's namespace: its program, arguments, explicitly
    /// set or removed environment variables and working directory are carried over; stdio
    /// settings and `env_clear` cannot be read back from a `Command`, so set those on the
    /// result.
    pub fn run_in(&self, side: Side, cmd: &Command) -> Command {
        let mut wrapped = self.command(side, cmd.get_program());
        wrapped.args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(v) => wrapped.env(key, v),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }

    /// Runs `f` on a thread that has entered the side's namespace (with `setns(2)`), e.g. to
    /// bind or connect a socket there: sockets stay in the namespace they were made in, and
    /// can be used from any thread afterwards.
    pub fn within<T, F>(&self, side: Side, f: F) -> Result<T, NetnsError>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        enter(self.name(side), f)
    }

    /// Takes both ends of the link down: packets between the namespaces are dropped (existing
    /// TCP connections stall, new ones fail), as when a cable is pulled.
    pub fn link_down(&self) -> Result<(), NetnsError> {
        self.set_link("down")
    }

    /// Brings both ends of the link back up.
    pub fn link_up(&self) -> Result<(), NetnsError> {
        self.set_link("up")
    }

    fn set_link(&self, state: &str) -> Result<(), NetnsError> {
        for name in &self.names {
            self.ip(&["-n", name, "link", "set", LINK, state])?;
        }
        Ok(())
    }

    /// Runs `ip ARGS`, failing with its stderr.
    fn ip(&self, args: &[&str]) -> Result<Output, NetnsError> {
        run_ip(&self.ip, args)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace removes the veth pair with it.
        for i in 0..2 {
            if self.created[i] {
                if let Err(e) = run_ip(&self.ip, &["netns", "del", &self.names[i]]) {
                    eprintln!("warning: {e}");
                }
            }
        }
    }
}

/// The names `ip netns list` shows.
pub fn list_namespaces() -> Result<Vec<String>, NetnsError> {
    let out = run_ip(Path::new("ip"), &["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// Runs `f` on a thread that has entered network namespace `name` (one of `ip netns`'s); see
/// [`NetnsPair::within`].
pub(crate) fn enter<T, F>(name: &str, f: F) -> Result<T, NetnsError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let path = Path::new(NETNS_DIR).join(name);
    let enter_err = |source| NetnsError::Enter {
        name: name.to_owned(),
        source,
    };
    let handle = File::open(&path).map_err(enter_err)?;
    thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns with an open namespace fd changes only this thread's network
            // namespace; no memory is involved.
            if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(enter_err(io::Error::last_os_error()));
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(NetnsError::Panicked(name.to_owned())))
    })
}

/// Checks that `ip` runs and that we are root, with errors that say what to do.
pub(crate) fn preflight(ip: &Path) -> Result<(), NetnsError> {
    match Command::new(ip)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Err(source) if source.kind() == io::ErrorKind::NotFound => {
            return Err(NetnsError::IpMissing {
                program: ip.display().to_string(),
                source,
            })
        }
        Err(source) => {
            return Err(NetnsError::Spawn {
                command: format!("{} -V", ip.display()),
                source,
            })
        }
        Ok(_) => {}
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(NetnsError::NotRoot { euid });
    }
    Ok(())
}

/// Runs `ip ARGS` (or another program: `bridge`), failing with its stderr.
pub(crate) fn run_ip(ip: &Path, args: &[&str]) -> Result<Output, NetnsError> {
    let command = format!("{} {}", ip.display(), args.join(" "));
    let out = Command::new(ip)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Ip {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_ip_is_named() {
        let e = NetnsPair::create_with(Path::new("/nonexistent/ip"), "t").unwrap_err();
        assert!(matches!(e, NetnsError::IpMissing { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("/nonexistent/ip") && msg.contains("iproute2"),
            "{msg}"
        );
    }

    #[test]
    fn bad_prefixes_are_refused() {
        for p in ["", "a b", "x/y", "much-too-long-a-prefix-here"] {
            let e = NetnsPair::create(p).unwrap_err();
            assert!(matches!(e, NetnsError::BadPrefix(_)), "{p:?}: {e}");
        }
    }

    #[test]
    fn run_in_carries_the_command_over() {
        let pair = NetnsPair {
            ip: PathBuf::from("ip"),
            names: ["x-a".into(), "x-b".into()],
            created: [false; 2],
        };
        let mut cmd = Command::new("vmm");
        cmd.args(["--incoming", "tcp:10.77.0.2:7000"])
            .env("RUST_LOG", "debug")
            .env_remove("HOME")
            .current_dir("/tmp");
        let w = pair.run_in(Side::B, &cmd);
        assert_eq!(w.get_program(), "ip");
        let args: Vec<_> = w.get_args().collect();
        assert_eq!(
            args,
            [
                "netns",
                "exec",
                "x-b",
                "vmm",
                "--incoming",
                "tcp:10.77.0.2:7000"
            ]
        );
        let envs: Vec<_> = w.get_envs().collect();
        assert!(envs.contains(&(OsStr::new("RUST_LOG"), Some(OsStr::new("debug")))));
        assert!(envs.contains(&(OsStr::new("HOME"), None)));
        assert_eq!(w.get_current_dir(), Some(Path::new("/tmp")));
        assert_eq!(Side::A.other(), Side::B);
    }
}
