//! The `net_*` ops: list and configure network interfaces, and run checked TCP streams to a
//! traffic peer in the background ([`super::netstream`]).
//!
//! Interfaces are read with `if_nameindex(3)` and ioctls on a socket, so they are those of
//! the calling thread's network namespace; addresses and MACs are set with `ip` (busybox's
//! in the guest).

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::netstream::{
    clip, reverse_seed, run_duplex, DuplexConfig, DuplexProgress, DuplexReport, SendConfig,
    DEFAULT_IO_TIMEOUT,
};
use super::protocol::{
    NetConfigRequest, NetIface, NetIfacesReply, NetStreamFinishReply, NetStreamFinishRequest,
    NetStreamHandle, NetStreamStartRequest, NetStreamStatus,
};

/// Most streams kept at once (running or not yet finished).
pub const MAX_STREAMS: usize = 8;
/// Default wait of `net_stream_finish`.
pub const DEFAULT_FINISH_TIMEOUT: Duration = Duration::from_secs(60);

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned by the result.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

/// One interface's state.
pub fn iface(name: &str) -> io::Result<NetIface> {
    let sock = socket()?;
    let mut req = ifreq(name)?;
    let ctx = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what} {name}: {e}"));
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(ctx("SIOCGIFFLAGS", io::Error::last_os_error()));
    }
    // SAFETY: the kernel filled the flags member of the union.
    let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFHWADDR reads into the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return Err(ctx("SIOCGIFHWADDR", io::Error::last_os_error()));
    }
    // SAFETY: the kernel filled the hwaddr member of the union.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mac = hw.sa_data[..6]
        .iter()
        .map(|b| format!("{:02x}", *b as u8))
        .collect::<Vec<_>>()
        .join(":");
    let driver = std::fs::read_link(format!("/sys/class/net/{name}/device/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()));
    Ok(NetIface {
        name: name.to_owned(),
        mac,
        up: flags & libc::IFF_UP != 0,
        running: flags & libc::IFF_RUNNING != 0,
        loopback: flags & libc::IFF_LOOPBACK != 0,
        driver,
        addrs: addrs(name)?,
    })
}

/// The IPv4 addresses of `name` (`ip -o -4 addr show dev NAME`).
fn addrs(name: &str) -> io::Result<Vec<String>> {
    let out = ip(&["-o", "-4", "addr", "show", "dev", name])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next().map(str::to_owned)
        })
        .collect())
}

/// Runs `ip ARGS`: its stdout, or an error with its stderr.
fn ip(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run ip: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            clip(String::from_utf8_lossy(&out.stderr).trim())
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every interface, in index order.
pub fn ifaces() -> io::Result<NetIfacesReply> {
    // SAFETY: if_nameindex returns a heap array ending in a zero entry, or null.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut names = Vec::new();
    let mut p = list;
    // SAFETY: walking the array up to its terminating entry, then freeing it once.
    unsafe {
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            names.push((
                (*p).if_index,
                CStr::from_ptr((*p).if_name).to_string_lossy().into_owned(),
            ));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    names.sort();
    let ifaces = names
        .into_iter()
        .map(|(_, n)| iface(&n))
        .collect::<io::Result<_>>()?;
    Ok(NetIfacesReply { ifaces })
}

/// `net_config`: set the MAC (link down meanwhile), add the address, bring the link up.
pub fn config(req: &NetConfigRequest) -> io::Result<NetIface> {
    let name = req.iface.as_str();
    iface(name)?; // exists?
    if let Some(mac) = &req.mac {
        ip(&["link", "set", "dev", name, "down"])?;
        ip(&["link", "set", "dev", name, "address", mac])?;
    }
    ip(&["link", "set", "dev", name, "up"])?;
    if let Some(cidr) = &req.addr_cidr {
        if !addrs(name)?.iter().any(|a| a == cidr) {
            ip(&["addr", "add", cidr, "dev", name])?;
        }
    }
    iface(name)
}

struct Job {
    start: Instant,
    connected: Arc<AtomicBool>,
    progress: Arc<DuplexProgress>,
    thread: JoinHandle<DuplexReport>,
}

/// The agent's streams, by handle.
#[derive(Default)]
pub struct Streams {
    next: u64,
    jobs: BTreeMap<u64, Job>,
}

impl Streams {
    /// `net_stream_start`: validates the request and starts the connection on a thread.
    pub fn start(&mut self, req: &NetStreamStartRequest) -> Result<NetStreamHandle, String> {
        let peer: SocketAddr = req
            .peer
            .parse()
            .map_err(|e| format!("bad peer {:?} (want ip:port): {e}", req.peer))?;
        if self.jobs.len() >= MAX_STREAMS {
            return Err(format!(
                "{MAX_STREAMS} streams already kept: finish some first"
            ));
        }
        let cfg = DuplexConfig {
            send: SendConfig {
                seed: req.seed,
                bytes: req.send_bytes,
                duration_ms: req.duration_ms,
                pace_bytes_per_s: req.pace_bytes_per_s,
            },
            receive_seed: req.receive.then(|| reverse_seed(req.seed)),
            receive_pace_bytes_per_s: req.receive_pace_bytes_per_s,
            io_timeout: req
                .io_timeout_ms
                .map_or(DEFAULT_IO_TIMEOUT, Duration::from_millis),
        };
        let connect_timeout = req
            .connect_timeout_ms
            .map_or(DEFAULT_IO_TIMEOUT, Duration::from_millis);
        if cfg.io_timeout.is_zero() || connect_timeout.is_zero() {
            return Err("timeouts must not be 0".into());
        }
        let connected = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(DuplexProgress::default());
        let (c, p) = (Arc::clone(&connected), Arc::clone(&progress));
        let thread = thread::Builder::new()
            .name("net-stream".into())
            .spawn(
                move || match TcpStream::connect_timeout(&peer, connect_timeout) {
                    Err(e) => DuplexReport::failed(&format!("connecting to {peer}: {e}")),
                    Ok(stream) => {
                        c.store(true, Ordering::Relaxed);
                        run_duplex(stream, &cfg, &p)
                    }
                },
            )
            .map_err(|e| format!("spawning the stream thread: {e}"))?;
        self.next += 1;
        let handle = self.next;
        self.jobs.insert(
            handle,
            Job {
                start: Instant::now(),
                connected,
                progress,
                thread,
            },
        );
        Ok(NetStreamHandle { handle })
    }

    /// `net_stream_hold`: the receiver reads nothing for `for_`; the status now.
    pub fn hold(&self, handle: u64, for_: Duration) -> Result<NetStreamStatus, String> {
        let job = self.jobs.get(&handle).ok_or_else(|| unknown(handle))?;
        job.progress.received.hold(for_);
        self.status(handle)
    }

    /// `net_stream_status`.
    pub fn status(&self, handle: u64) -> Result<NetStreamStatus, String> {
        let job = self.jobs.get(&handle).ok_or_else(|| unknown(handle))?;
        let (sent_records, sent_bytes) = job.progress.sent.get();
        let (received_records, received_bytes) = job.progress.received.get();
        Ok(NetStreamStatus {
            handle,
            connected: job.connected.load(Ordering::Relaxed),
            running: !job.thread.is_finished(),
            elapsed_ms: job.start.elapsed().as_millis() as u64,
            sent_records,
            sent_bytes,
            received_records,
            received_bytes,
        })
    }

    /// `net_stream_finish`: waits up to the timeout for the stream to end; then forgets it and
    /// returns its report, or keeps it and fails.
    pub fn finish(&mut self, req: &NetStreamFinishRequest) -> Result<NetStreamFinishReply, String> {
        let timeout = req
            .timeout_ms
            .map_or(DEFAULT_FINISH_TIMEOUT, Duration::from_millis);
        let job = self
            .jobs
            .get(&req.handle)
            .ok_or_else(|| unknown(req.handle))?;
        let deadline = Instant::now() + timeout;
        while !job.thread.is_finished() {
            if Instant::now() >= deadline {
                let (_, sent) = job.progress.sent.get();
                let (_, received) = job.progress.received.get();
                return Err(format!(
                    "stream {} still running after {} ms (sent {sent} bytes, received {received}); it is kept",
                    req.handle,
                    timeout.as_millis()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
        let job = self.jobs.remove(&req.handle).expect("looked up above");
        let elapsed_ms = job.start.elapsed().as_millis() as u64;
        let report = job
            .thread
            .join()
            .unwrap_or_else(|_| DuplexReport::failed("the stream thread panicked"));
        Ok(NetStreamFinishReply {
            handle: req.handle,
            elapsed_ms,
            report,
        })
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        for job in self.jobs.values() {
            job.progress.stop.store(true, Ordering::Relaxed);
        }
    }
}

fn unknown(handle: u64) -> String {
    format!("no stream with handle {handle}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::netstream::{DuplexConfig, DEFAULT_IO_TIMEOUT};
    use std::net::TcpListener;

    #[test]
    fn lists_loopback() {
        let list = ifaces().unwrap();
        let lo = list.ifaces.iter().find(|i| i.name == "lo").unwrap();
        assert!(lo.loopback);
        assert_eq!(lo.mac, "00:00:00:00:00:00");
        assert!(iface("no-such-if0").is_err());
        assert!(iface("much-too-long-interface-name").is_err());
    }

    #[test]
    fn config_in_a_fresh_namespace() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        // A thread of its own in a new network namespace; `ip` children inherit it.
        thread::spawn(|| {
            // SAFETY: unshare affects only this thread's network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let before = iface("lo").unwrap();
            assert!(!before.up);
            let req = NetConfigRequest {
                iface: "lo".into(),
                addr_cidr: Some("127.0.0.1/8".into()),
                mac: None,
            };
            let lo = config(&req).unwrap();
            assert!(lo.up && lo.running, "{lo:?}");
            assert_eq!(lo.addrs, ["127.0.0.1/8"]);
            // Again: the address is already there, which is fine.
            assert_eq!(config(&req).unwrap(), lo);
            let e = config(&NetConfigRequest {
                iface: "nope0".into(),
                addr_cidr: None,
                mac: None,
            })
            .unwrap_err();
            assert!(e.to_string().contains("nope0"), "{e}");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn stream_to_a_peer_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seed = 11;
        let peer = thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let cfg = DuplexConfig {
                send: SendConfig {
                    seed: reverse_seed(seed),
                    bytes: Some(300_000),
                    duration_ms: None,
                    pace_bytes_per_s: None,
                },
                receive_seed: Some(seed),
                receive_pace_bytes_per_s: None,
                io_timeout: DEFAULT_IO_TIMEOUT,
            };
            run_duplex(s, &cfg, &Arc::default())
        });
        let mut streams = Streams::default();
        let h = streams
            .start(&NetStreamStartRequest {
                duration_ms: Some(300),
                pace_bytes_per_s: Some(1_000_000),
                ..NetStreamStartRequest::new(addr.to_string(), seed)
            })
            .unwrap();
        let status = streams.status(h.handle).unwrap();
        assert_eq!(status.handle, h.handle);
        let done = streams
            .finish(&NetStreamFinishRequest {
                handle: h.handle,
                timeout_ms: Some(20_000),
            })
            .unwrap();
        assert!(done.report.is_ok(), "{done:?}");
        let theirs = peer.join().unwrap();
        assert!(theirs.is_ok(), "{theirs:?}");
        assert_eq!(theirs.received.unwrap().bytes, done.report.sent.bytes);
        assert_eq!(done.report.received.unwrap().bytes, theirs.sent.bytes);
        assert!(streams.status(h.handle).is_err());
    }

    #[test]
    fn dead_peer_is_a_report_not_a_hang() {
        // A port nothing listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut streams = Streams::default();
        let req = NetStreamStartRequest {
            send_bytes: Some(1000),
            connect_timeout_ms: Some(2000),
            ..NetStreamStartRequest::new(format!("127.0.0.1:{port}"), 1)
        };
        let h = streams.start(&req).unwrap();
        let done = streams
            .finish(&NetStreamFinishRequest {
                handle: h.handle,
                timeout_ms: Some(10_000),
            })
            .unwrap();
        let e = done.report.setup_error.unwrap();
        assert!(e.contains("connecting to"), "{e}");
        assert!(streams
            .start(&NetStreamStartRequest {
                peer: "nonsense".into(),
                ..req
            })
            .unwrap_err()
            .contains("bad peer"));
    }
}
