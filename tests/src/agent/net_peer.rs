//! The traffic peer of the NIC tests (`net-peer`, run in the peer namespace): accepts one
//! connection from the guest, sends it the peer→guest stream and checks the guest→peer one
//! ([`crate::agent::netstream`]), prints its [`DuplexReport`] as one JSON line on stdout and
//! exits 0, or 1 when anything failed. Its receiver's gap is measured on the host clock: the
//! authoritative traffic gap of a migration.
//!
//! ```text
//! net-peer --listen IP:PORT --seed N [--send-bytes N | --duration-ms N] [--pace BYTES_PER_S]
//!          [--no-receive] [--accept-timeout-ms N] [--io-timeout-ms N]
//! ```
//!
//! `--seed` is the guest's seed (`net_stream_start`'s): the peer checks records of it and
//! sends records of `reverse_seed(seed)`. Once listening it prints
//! `net-peer: listening on IP:PORT` on stderr (`harness::net_peer::RunningPeer` waits for
//! that line).
//!
//! It lives with the agent so that the guest image carries it too: `guest-agent --net-peer
//! ARGS` is the same program, for a peer inside the guest (over its loopback).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::netstream::{
    reverse_seed, run_duplex, DuplexConfig, DuplexProgress, DuplexReport, SendConfig,
};

/// Usage text.
pub const USAGE: &str =
    "usage: net-peer --listen IP:PORT --seed N [--send-bytes N | --duration-ms N] \
[--pace BYTES_PER_S] [--no-receive] [--accept-timeout-ms N] [--io-timeout-ms N]";
/// Default `--accept-timeout-ms`.
pub const DEFAULT_ACCEPT_TIMEOUT_MS: u64 = 300_000;
/// Default `--io-timeout-ms`.
pub const DEFAULT_IO_TIMEOUT_MS: u64 = 30_000;
/// What the peer prints on stderr once it listens, before the address.
pub const LISTENING: &str = "net-peer: listening on ";

/// The peer's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerArgs {
    /// Where to listen (port 0: any; the stderr line says which).
    pub listen: SocketAddr,
    /// The guest's seed.
    pub seed: u64,
    /// Send this many bytes to the guest.
    pub send_bytes: Option<u64>,
    /// Send for this long. With neither, the peer sends nothing.
    pub duration_ms: Option<u64>,
    /// Rate cap of the peer's sending.
    pub pace_bytes_per_s: Option<u64>,
    /// Check the guest's records (default true).
    pub receive: bool,
    /// Give up when no connection came in this long.
    pub accept_timeout_ms: u64,
    /// A stall this long is an error.
    pub io_timeout_ms: u64,
}

impl PeerArgs {
    /// A peer on `listen` for the guest's `seed`, sending nothing, receiving.
    pub fn new(listen: SocketAddr, seed: u64) -> Self {
        PeerArgs {
            listen,
            seed,
            send_bytes: None,
            duration_ms: None,
            pace_bytes_per_s: None,
            receive: true,
            accept_timeout_ms: DEFAULT_ACCEPT_TIMEOUT_MS,
            io_timeout_ms: DEFAULT_IO_TIMEOUT_MS,
        }
    }

    /// Parses the arguments (without the program name).
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Self, String> {
        let mut listen = None;
        let mut seed = None;
        let mut a = PeerArgs::new(SocketAddr::from(([0, 0, 0, 0], 0)), 0);
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            if flag == "--no-receive" {
                a.receive = false;
                continue;
            }
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let num = || {
                value
                    .parse::<u64>()
                    .map_err(|e| format!("{flag} {value:?}: {e}"))
            };
            match flag.as_str() {
                "--listen" => {
                    listen = Some(
                        value
                            .parse()
                            .map_err(|e| format!("--listen {value:?}: {e} (want IP:PORT)"))?,
                    )
                }
                "--seed" => seed = Some(num()?),
                "--send-bytes" => a.send_bytes = Some(num()?),
                "--duration-ms" => a.duration_ms = Some(num()?),
                "--pace" => a.pace_bytes_per_s = Some(num()?),
                "--accept-timeout-ms" => a.accept_timeout_ms = num()?,
                "--io-timeout-ms" => a.io_timeout_ms = num()?,
                _ => return Err(format!("unknown argument {flag:?}")),
            }
        }
        a.listen = listen.ok_or("--listen is required")?;
        a.seed = seed.ok_or("--seed is required")?;
        if a.accept_timeout_ms == 0 || a.io_timeout_ms == 0 {
            return Err("timeouts must not be 0".into());
        }
        Ok(a)
    }

    /// The command-line arguments that [`PeerArgs::parse`] turns back into `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--listen".to_owned(),
            self.listen.to_string(),
            "--seed".into(),
            self.seed.to_string(),
        ];
        let mut opt = |flag: &str, value: Option<u64>| {
            if let Some(x) = value {
                v.push(flag.into());
                v.push(x.to_string());
            }
        };
        opt("--send-bytes", self.send_bytes);
        opt("--duration-ms", self.duration_ms);
        opt("--pace", self.pace_bytes_per_s);
        opt("--accept-timeout-ms", Some(self.accept_timeout_ms));
        opt("--io-timeout-ms", Some(self.io_timeout_ms));
        if !self.receive {
            v.push("--no-receive".into());
        }
        v
    }

    fn duplex(&self) -> DuplexConfig {
        DuplexConfig {
            send: SendConfig {
                seed: reverse_seed(self.seed),
                bytes: self.send_bytes,
                duration_ms: self.duration_ms,
                pace_bytes_per_s: self.pace_bytes_per_s,
            },
            receive_seed: self.receive.then_some(self.seed),
            receive_pace_bytes_per_s: None,
            io_timeout: Duration::from_millis(self.io_timeout_ms),
        }
    }
}

/// Accepts one connection within `timeout`.
fn accept(listener: &TcpListener, timeout: Duration) -> io::Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {} ms", timeout.as_millis()),
            ));
        }
        let mut fds = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(1000) as libc::c_int;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut fds, 1, ms.max(1)) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n > 0 {
            let (stream, _) = listener.accept()?;
            return Ok(stream);
        }
    }
}

/// Listens, calls `on_listening` with the bound address, accepts one connection and runs it.
pub fn serve(args: &PeerArgs, on_listening: impl FnOnce(SocketAddr)) -> DuplexReport {
    let listener = match TcpListener::bind(args.listen) {
        Ok(l) => l,
        Err(e) => return DuplexReport::failed(&format!("binding {}: {e}", args.listen)),
    };
    on_listening(listener.local_addr().unwrap_or(args.listen));
    let stream = match accept(&listener, Duration::from_millis(args.accept_timeout_ms)) {
        Ok(s) => s,
        Err(e) => return DuplexReport::failed(&format!("accepting: {e}")),
    };
    drop(listener);
    run_duplex(stream, &args.duplex(), &Arc::new(DuplexProgress::default()))
}

/// `net-peer`'s `main`, with the arguments after the program name.
pub fn main<I: IntoIterator<Item = String>>(args: I) -> ExitCode {
    let args = match PeerArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("net-peer: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let report = serve(&args, |addr| eprintln!("{LISTENING}{addr}"));
    println!(
        "{}",
        serde_json::to_string(&report)
            .unwrap_or_else(|e| format!("{{\"unserializable\":\"{e}\"}}"))
    );
    match report.problem() {
        None => ExitCode::SUCCESS,
        Some(p) => {
            eprintln!("net-peer: {p}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;
    use std::sync::mpsc;
    use std::thread;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_and_round_trips() {
        let a = PeerArgs::parse(args(&[
            "--listen",
            "10.78.0.100:7100",
            "--seed",
            "5",
            "--duration-ms",
            "2000",
            "--pace",
            "1000000",
            "--no-receive",
        ]))
        .unwrap();
        assert_eq!(a.listen, "10.78.0.100:7100".parse().unwrap());
        assert_eq!((a.seed, a.duration_ms, a.send_bytes), (5, Some(2000), None));
        assert!(!a.receive);
        assert_eq!(PeerArgs::parse(a.to_args()).unwrap(), a);
        for bad in [
            &["--seed", "1"][..],
            &["--listen", "1.2.3.4:5"],
            &["--listen", "nope", "--seed", "1"],
            &["--listen", "1.2.3.4:5", "--seed", "x"],
            &["--listen", "1.2.3.4:5", "--seed", "1", "--what", "2"],
            &["--listen", "1.2.3.4:5", "--seed"],
        ] {
            assert!(PeerArgs::parse(args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serves_one_connection() {
        let mut a = PeerArgs::new("127.0.0.1:0".parse().unwrap(), 21);
        a.send_bytes = Some(50_000);
        let (tx, rx) = mpsc::channel();
        let peer = thread::spawn(move || serve(&a, |addr| tx.send(addr).unwrap()));
        let addr = rx.recv().unwrap();
        let guest = DuplexConfig {
            send: SendConfig {
                seed: 21,
                bytes: Some(70_000),
                duration_ms: None,
                pace_bytes_per_s: None,
            },
            receive_seed: Some(reverse_seed(21)),
            receive_pace_bytes_per_s: None,
            io_timeout: Duration::from_secs(10),
        };
        let mine = run_duplex(TcpStream::connect(addr).unwrap(), &guest, &Arc::default());
        let theirs = peer.join().unwrap();
        assert!(mine.is_ok() && theirs.is_ok(), "{mine:?} {theirs:?}");
        assert_eq!(theirs.received.unwrap().bytes, mine.sent.bytes);
    }

    #[test]
    fn accept_times_out() {
        let mut a = PeerArgs::new("127.0.0.1:0".parse().unwrap(), 1);
        a.accept_timeout_ms = 200;
        let r = serve(&a, |_| {});
        assert!(r
            .setup_error
            .unwrap()
            .contains("no connection within 200 ms"));
    }
}
