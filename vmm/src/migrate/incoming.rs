//! The destination side: `vmm --incoming tcp:ADDR:PORT` or `tls:ADDR:PORT`.
//!
//! The destination listens until one connection brings a good start of a migration: with
//! `tls:`, a TLS handshake in which the source's certificate is signed by the CA of
//! `--migration-tls`; then a stream header of this format version and the VM config. Each
//! connection gets its own thread for that start, with [`PRE_ACCEPT_TIMEOUT`] in all, so
//! a client that connects and sends nothing (or a trickle) delays nobody: the real source
//! connecting meanwhile is served at once. A connection that fails its start (a refused
//! certificate, a plain TCP client on a `tls:` port, a port scan that closes at once,
//! garbage, another format version) is logged with the peer's address and why, and the
//! destination keeps waiting, until `--incoming-timeout` if one was given. Once a source's
//! start was accepted the migration is that source's: a failure after it ends this VMM
//! (exit 1), as before.

use std::io::{self, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use migration::{Control, StreamReader, StreamWriter, VmConfig, FLAG_LIVE, FLAG_REPLY};
use rustls::ServerConfig;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::error::{ReplyError, UrlError};
use super::tls::{arm as arm_deadline, Conn, TlsError};
use super::Transport;
use crate::config::tls::MigrationTlsConfig;
use crate::snapshot::SnapshotError;

/// A source that sends nothing for this long is gone.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection has, from accept, to complete the TLS handshake and send the
/// stream header and the VM config.
pub const PRE_ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections in their start at once; more are closed at once (and logged).
const MAX_PENDING: usize = 16;
/// How long the Abort to a refused stream may take.
const ABORT_TIMEOUT: Duration = Duration::from_secs(2);

/// What `--incoming` waits for.
#[derive(Clone, Debug)]
pub struct IncomingConfig {
    /// `tcp:ADDR:PORT` or `tls:ADDR:PORT`.
    pub url: String,
    /// `--migration-tls` (required with `tls:`, refused with `tcp:`).
    pub tls: Option<MigrationTlsConfig>,
    /// `--incoming-timeout`: give up when no source's start was accepted in this time.
    pub timeout: Option<Duration>,
}

/// Why the destination stopped waiting for a source.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// The URL cannot be used.
    #[error("--incoming: {0}")]
    Url(#[from] UrlError),
    /// `tls:` without `--migration-tls`.
    #[error("--incoming {url} needs this VMM's certificate, key and the CA it trusts: give --migration-tls cert=PATH,key=PATH,ca=PATH")]
    TlsNotConfigured {
        /// The URL.
        url: String,
    },
    /// `--migration-tls` with a clear-text URL.
    #[error("--migration-tls was given but --incoming {url} is clear text; use --incoming tls:ADDR:PORT")]
    TlsForTcp {
        /// The URL.
        url: String,
    },
    /// The TLS files cannot be used.
    #[error("--migration-tls: {0}")]
    Tls(#[from] TlsError),
    /// The address cannot be listened on.
    #[error("--incoming {url}: cannot listen: {source}")]
    Listen {
        /// The URL.
        url: String,
        /// Why.
        source: io::Error,
    },
    /// Waiting for connections failed.
    #[error("--incoming {url}: waiting for connections: {source}")]
    Wait {
        /// The URL.
        url: String,
        /// Why.
        source: io::Error,
    },
    /// `--incoming-timeout` passed.
    #[error("--incoming {url}: no migration source arrived within {secs} s ({refused} connection(s) refused, see the log); start the migration on the source in time or give a longer --incoming-timeout")]
    Timeout {
        /// The URL.
        url: String,
        /// The timeout.
        secs: u64,
        /// Connections refused meanwhile.
        refused: u64,
    },
}

/// Why one connection was refused before its migration started (logged; the destination
/// waits on).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// The socket could not be set up.
    #[error("setting up the socket: {0}")]
    Socket(#[source] io::Error),
    /// The TLS handshake failed (the peer's certificate, or not TLS at all).
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] io::Error),
    /// Nothing, or not enough, came in time.
    #[error("no complete TLS handshake, stream header and VM config within {} s", PRE_ACCEPT_TIMEOUT.as_secs())]
    Slow,
    /// It closed without a byte.
    #[error("it closed without sending anything (a port scan or a health check?)")]
    Empty,
    /// The start of the stream is wrong.
    #[error("not the start of a migration stream: {0}")]
    Stream(#[source] SnapshotError),
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A reader that, while `armed`, bounds every read by the start's deadline.
struct PreAccept {
    inner: Conn,
    until: Instant,
    armed: Arc<AtomicBool>,
}

impl Read for PreAccept {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.armed.load(Ordering::Relaxed) {
            arm_deadline(self.inner.socket(), self.until)?;
        }
        self.inner.read(buf)
    }
}

/// The answer channel to the source.
pub struct Reply {
    w: Option<StreamWriter<Conn>>,
    stream: Conn,
}

impl Reply {
    fn send(&mut self, msg: Control) -> Result<(), ReplyError> {
        if self.w.is_none() {
            let s = self.stream.try_clone().map_err(ReplyError::Clone)?;
            self.w = Some(
                StreamWriter::write_header(s, FLAG_LIVE | FLAG_REPLY).map_err(ReplyError::Open)?,
            );
        }
        let Some(w) = self.w.as_mut() else {
            unreachable!("the answer stream was opened just above")
        };
        w.write_control(&msg)
            .and_then(|()| w.flush())
            .map_err(ReplyError::Send)
    }

    /// The config fits: send the state.
    pub fn ready(&mut self) -> Result<(), ReplyError> {
        self.send(Control::Ready)
    }

    /// Pre-copy pass `iteration` is applied.
    pub fn synced(&mut self, iteration: u32) -> Result<(), ReplyError> {
        self.send(Control::Synced { iteration })
    }

    /// The guest runs here now.
    pub fn resumed(&mut self) -> Result<(), ReplyError> {
        self.send(Control::Resumed)
    }

    /// The migration failed here, and why (best effort: the source also sees the
    /// connection close).
    pub fn abort(&mut self, reason: &str) {
        if let Err(e) = self.send(Control::Abort {
            reason: reason.to_string(),
        }) {
            tracing::debug!("telling the source about the failure: {e}");
        }
    }
}

/// The accepted stream, ready to read sections after the config.
pub type Incoming = (StreamReader<Box<dyn Read + Send>>, VmConfig, Reply);

/// Listens on `cfg.url` until a source's migration starts well (see the module's
/// documentation); its stream past the VM config.
pub fn accept(cfg: &IncomingConfig) -> Result<Incoming, IncomingError> {
    let url = &cfg.url;
    let target = super::parse_url(url)?;
    let tls = match (target.transport, &cfg.tls) {
        (Transport::Tls, Some(t)) => Some(super::tls::server_config(t)?),
        (Transport::Tls, None) => return Err(IncomingError::TlsNotConfigured { url: url.clone() }),
        (Transport::Tcp, Some(_)) => return Err(IncomingError::TlsForTcp { url: url.clone() }),
        (Transport::Tcp, None) => None,
    };
    let listener = TcpListener::bind(target.addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| IncomingError::Listen {
            url: url.clone(),
            source,
        })?;
    let wait_err = |source| IncomingError::Wait {
        url: url.clone(),
        source,
    };
    let addr = target.addr;
    match &tls {
        Some(_) => tracing::info!(
            "waiting for a migration on {addr} (mutual TLS: the source's certificate must be signed by the --migration-tls CA)"
        ),
        None => {
            tracing::warn!(
                "--incoming {url} is clear text and unauthenticated: anyone who can reach {addr} can send this VMM a guest or read the stream; use tls:ADDR:PORT with --migration-tls outside a trusted network"
            );
            tracing::info!("waiting for a migration on {addr}");
        }
    }
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(wait_err)?);
    let (tx, rx) = mpsc::channel::<Incoming>();
    let pending = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let deadline = cfg.timeout.map(|t| Instant::now() + t);
    loop {
        if let Ok(incoming) = rx.try_recv() {
            return Ok(incoming);
        }
        let wait_ms: i32 = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(IncomingError::Timeout {
                        url: url.clone(),
                        secs: cfg.timeout.unwrap_or_default().as_secs(),
                        refused: refused.load(Ordering::Relaxed),
                    });
                }
                i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX)
            }
        };
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call, and
        // both descriptors stay open (owned by `listener` and `wake`) while it runs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(wait_err(e));
        }
        if fds[1].revents != 0 {
            let _ = wake.read();
        }
        if fds[0].revents == 0 {
            continue;
        }
        loop {
            let (stream, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. out of descriptors: wait a little rather than spin.
                    tracing::warn!("--incoming {url}: accepting a connection failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            };
            if pending.load(Ordering::Relaxed) >= MAX_PENDING {
                refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "migration connection from {peer} refused: {MAX_PENDING} others are still in their first {} s; still waiting on {addr}",
                    PRE_ACCEPT_TIMEOUT.as_secs()
                );
                continue;
            }
            pending.fetch_add(1, Ordering::Relaxed);
            let (tls, tx, wake, pending, refused) = (
                tls.clone(),
                tx.clone(),
                wake.clone(),
                pending.clone(),
                refused.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name("incoming".into())
                .spawn(move || {
                    match start(stream, tls) {
                        Ok(incoming) => {
                            if let Err(mpsc::SendError((_, _, mut reply))) = tx.send(incoming) {
                                tracing::warn!("migration from {peer} refused: another source's migration was accepted first");
                                reply.abort("the destination accepted another source's migration first");
                            }
                        }
                        Err(why) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                "migration connection from {peer} refused: {why}; still waiting on {addr}"
                            );
                        }
                    }
                    pending.fetch_sub(1, Ordering::Relaxed);
                    let _ = wake.write(1);
                });
            if let Err(e) = spawned {
                tracing::warn!("migration connection from {peer} dropped: no thread for it: {e}");
            }
        }
    }
}

/// The start of one connection: TLS handshake (for `tls:`), stream header and VM config,
/// all within [`PRE_ACCEPT_TIMEOUT`].
fn start(stream: TcpStream, tls: Option<Arc<ServerConfig>>) -> Result<Incoming, Refusal> {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a: SocketAddr| a.to_string());
    let until = Instant::now() + PRE_ACCEPT_TIMEOUT;
    let _ = stream.set_nodelay(true);
    arm_deadline(&stream, until).map_err(Refusal::Socket)?;
    let conn = match tls {
        Some(config) => Conn::accept_tls(stream, config, until).map_err(|e| {
            if timed_out(&e) {
                Refusal::Slow
            } else if e.kind() == io::ErrorKind::UnexpectedEof {
                Refusal::Empty
            } else {
                Refusal::Handshake(e)
            }
        })?,
        None => Conn::plain(stream),
    };
    let armed = Arc::new(AtomicBool::new(true));
    let mut reply = Reply {
        w: None,
        stream: conn.try_clone().map_err(Refusal::Socket)?,
    };
    let socket = conn.try_clone().map_err(Refusal::Socket)?;
    let r: Box<dyn Read + Send> = Box::new(BufReader::with_capacity(
        1 << 20,
        PreAccept {
            inner: conn,
            until,
            armed: armed.clone(),
        },
    ));
    match crate::snapshot::restore::open(r) {
        Ok((reader, config)) => {
            armed.store(false, Ordering::Relaxed);
            let s = socket.socket();
            s.set_read_timeout(Some(IO_TIMEOUT))
                .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
                .map_err(Refusal::Socket)?;
            tracing::info!(
                "migration from {peer}{}",
                if socket.is_tls() {
                    " (TLS, its certificate verified)"
                } else {
                    " (clear text, unauthenticated)"
                }
            );
            Ok((reader, config, reply))
        }
        Err(e) => {
            let refusal = match &e {
                SnapshotError::Stream(migration::Error::TruncatedHeader { got: 0, .. }) => {
                    Refusal::Empty
                }
                SnapshotError::Stream(migration::Error::Io { source, .. }) if timed_out(source) => {
                    Refusal::Slow
                }
                _ => Refusal::Stream(e),
            };
            if !matches!(refusal, Refusal::Empty | Refusal::Slow) {
                // Tell a real source of another version why (best effort, briefly).
                let _ = socket.socket().set_write_timeout(Some(ABORT_TIMEOUT));
                reply.abort(&refusal.to_string());
            }
            Err(refusal)
        }
    }
}
