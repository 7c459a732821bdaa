//! [`serve`]: the loop a device process runs on one client connection.
//!
//! It negotiates the version, then receives commands and answers each from the
//! [`Device`] until the client disconnects. A bad request (malformed payload, wrong file
//! descriptors, unknown or unsupported command, device failure) gets an error reply with
//! an errno and the loop goes on; a command sent with the *No_reply* flag gets no reply at
//! all, failed or not, so its failure is logged (warning) instead. Only a broken stream
//! ends it early: a malformed header, a message over the size limit (answered with
//! `E2BIG` first), a message not completed within [`ServerConfig::message_timeout`], or a
//! client proposing another major version (answered with `ENOTSUP` first).
//!
//! Between commands the loop polls adaptively: for [`ServerConfig::spin_window`] after
//! each command it keeps checking the socket without sleeping, and only then blocks in
//! `poll()`. A client sending a burst (a guest's trapped register writes, posted one
//! after another) then finds the server awake and does not pay for waking it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use crate::device::{Device, Errno};
use crate::dispatch::{self, Peer};
use crate::proto::{
    Capabilities, Command, Header, MigrationCapability, Version, DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_DMA_MAPS, DEFAULT_PGSIZES, PROTOCOL_MAJOR, PROTOCOL_MINOR,
};
use crate::socket::{Channel, Message, RecvLimits, SocketError, MAX_FDS_PER_MESSAGE};

/// Why serving a connection ended with an error (each message includes its cause, which
/// is not a `source()`).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// No client connection could be accepted.
    #[error("accepting a vfio-user connection failed: {0}")]
    Accept(io::Error),
    /// The stream broke (see [`SocketError`]); the connection was dropped.
    #[error("the vfio-user connection failed: {0}")]
    Socket(SocketError),
    /// The client proposed a protocol version this server does not implement.
    #[error("version negotiation failed: {0}")]
    Negotiation(String),
}

impl From<SocketError> for ServerError {
    fn from(e: SocketError) -> Self {
        ServerError::Socket(e)
    }
}

/// What the server advertises, and its per-message deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest data transfer accepted in one message.
    pub max_data_xfer_size: u32,
    /// Most file descriptors accepted in one message (at most 253).
    pub max_msg_fds: u32,
    /// Page sizes supported for DMA mappings.
    pub pgsizes: u64,
    /// Most DMA mappings kept at once (advertised; enforcing it is the device's job).
    pub max_dma_maps: u32,
    /// Migration capability, sent if the client offers migration too.
    pub migration: Option<MigrationCapability>,
    /// Once a message has begun to arrive, the time it has to complete; also the
    /// deadline of each reply sent.
    pub message_timeout: Duration,
    /// After each command, how long to keep checking the socket for the next one without
    /// sleeping ([`DEFAULT_SPIN_WINDOW`]; zero: block at once).
    pub spin_window: Duration,
}

/// Default [`ServerConfig::spin_window`].
///
/// The trade-off: a server thread asleep in `poll()` must be woken by the kernel when a
/// message arrives, and the *sender* pays for that inside its `sendmsg` (an
/// inter-processor interrupt, itself a VM exit when running nested): about 5 µs instead
/// of 1 µs for a posted write, taken from the VMM's vCPU thread, i.e. from the guest. A
/// server that is still spinning when the message arrives costs the sender nothing
/// extra. Spinning costs CPU time of the device process, but only within this window
/// after a command, so only while the guest is actively accessing the device; an idle
/// device blocks. 100 µs covers the gap between two trapped accesses of a guest loop
/// (one MMIO exit and re-entry, a few to a few tens of µs under nested virtualisation)
/// while keeping the spin after the last access of a burst short.
pub const DEFAULT_SPIN_WINDOW: Duration = Duration::from_micros(100);

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            max_msg_fds: 16,
            pgsizes: DEFAULT_PGSIZES,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            migration: None,
            message_timeout: Duration::from_secs(5),
            spin_window: DEFAULT_SPIN_WINDOW,
        }
    }
}

/// Serves `device` on a connected stream until the client disconnects (`Ok`) or the
/// stream breaks (`Err`). [`Device::client_disconnected`] is called in both cases.
pub fn serve<D: Device + ?Sized>(
    stream: UnixStream,
    device: &mut D,
    config: &ServerConfig,
) -> Result<(), ServerError> {
    let mut session = Session {
        channel: Channel::new(stream),
        config,
        peer: None,
    };
    let result = session.run(device);
    device.client_disconnected();
    match &result {
        Ok(()) => tracing::debug!("vfio-user client disconnected"),
        Err(e) => tracing::warn!(error = %e, "vfio-user connection ended"),
    }
    result
}

/// Accepts one connection on `listener` and [`serve`]s it.
pub fn accept_and_serve<D: Device + ?Sized>(
    listener: &UnixListener,
    device: &mut D,
    config: &ServerConfig,
) -> Result<(), ServerError> {
    let (stream, _) = listener.accept().map_err(ServerError::Accept)?;
    serve(stream, device, config)
}

/// One connection's state.
struct Session<'a> {
    channel: Channel,
    config: &'a ServerConfig,
    /// The client's capabilities, once negotiated.
    peer: Option<Peer>,
}

/// What handling one command produced.
enum Outcome {
    /// Reply with this payload and these descriptors.
    Reply(Vec<u8>, Vec<OwnedFd>),
    /// Reply with this errno.
    Fail(Errno),
    /// Reply with this errno, then close the connection for this reason.
    Fatal(Errno, String),
}

impl Session<'_> {
    fn run<D: Device + ?Sized>(&mut self, device: &mut D) -> Result<(), ServerError> {
        // No spinning for the first message: the client sends it when it likes.
        let mut spin = false;
        loop {
            // Waiting for the next command has no deadline: an idle client is fine.
            self.wait_for_command(spin)?;
            // Every way round the loop handled (or refused) a message: spin before the
            // next one.
            spin = true;
            let deadline = Instant::now() + self.config.message_timeout;
            let msg = match self.channel.recv(self.limits(), deadline) {
                Ok(msg) => msg,
                Err(SocketError::Disconnected) => return Ok(()),
                Err(SocketError::TooManyFds { header, .. }) => {
                    // The message was read whole (and its descriptors closed): refuse it.
                    if !header.no_reply() {
                        self.send_error(&header, Errno(libc::EINVAL))?;
                    }
                    continue;
                }
                Err(e @ SocketError::MessageTooLarge { header, .. }) => {
                    let _ = self.send_error(&header, Errno(libc::E2BIG));
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            };
            let header = msg.header;
            if header.is_reply() {
                tracing::warn!(
                    id = header.msg_id,
                    command = header.command,
                    "ignoring a reply from the vfio-user client: no command was sent to it"
                );
                continue;
            }
            let outcome = self.handle(device, msg);
            let fatal = match outcome {
                Outcome::Reply(_, _) | Outcome::Fail(_) => None,
                Outcome::Fatal(_, ref reason) => Some(reason.clone()),
            };
            if header.no_reply() {
                // A posted command (e.g. a region write the client did not wait for): its
                // failure has no reply to travel in, so this log is all that records it.
                if let Outcome::Fail(errno) | Outcome::Fatal(errno, _) = &outcome {
                    tracing::warn!(
                        command = ?header.known_command(),
                        raw_command = header.command,
                        id = header.msg_id,
                        %errno,
                        "vfio-user command sent without wanting a reply failed"
                    );
                }
            } else {
                let sent = match outcome {
                    Outcome::Reply(payload, fds) => self.send_reply(&header, &payload, &fds),
                    Outcome::Fail(errno) | Outcome::Fatal(errno, _) => {
                        self.send_error(&header, errno)
                    }
                };
                match sent {
                    Err(ServerError::Socket(SocketError::Disconnected)) => return Ok(()),
                    other => other?,
                }
            }
            if let Some(reason) = fatal {
                return Err(ServerError::Negotiation(reason));
            }
        }
    }

    /// Waits until the next message (or end of file) can be read: first, if `spin`, by
    /// checking without sleeping for up to [`ServerConfig::spin_window`], then by
    /// blocking. Only readiness is checked, nothing is read, so the message (with any
    /// descriptors) is received as usual by the caller.
    fn wait_for_command(&self, spin: bool) -> Result<(), SocketError> {
        if spin && !self.config.spin_window.is_zero() {
            let until = Instant::now() + self.config.spin_window;
            loop {
                if self.channel.readable_now()? {
                    return Ok(());
                }
                if Instant::now() >= until {
                    break;
                }
                std::hint::spin_loop();
                // Hand the CPU over if another thread wants it: with as many runnable
                // threads as CPUs (the sender's among them), a spin that does not yield
                // delays the very sender it waits for (measured: 15-33 µs per posted
                // write instead of 5-7 µs with a blocking server, or 1 µs yielding).
                std::thread::yield_now();
            }
        }
        self.channel.wait_readable(None)
    }

    fn limits(&self) -> RecvLimits {
        let fds = self.config.max_msg_fds.min(MAX_FDS_PER_MESSAGE as u32);
        match self.peer {
            None => RecvLimits::for_version(fds),
            Some(_) => RecvLimits::for_transfers(self.config.max_data_xfer_size, fds),
        }
    }

    fn handle<D: Device + ?Sized>(&mut self, device: &mut D, msg: Message) -> Outcome {
        let command = msg.header.known_command();
        tracing::trace!(?command, id = msg.header.msg_id, "vfio-user command");
        let result = match (command, &self.peer) {
            (Some(Command::Version), None) => return self.negotiate(&msg.payload),
            (Some(Command::Version), Some(_)) => Err(Errno(libc::EINVAL)),
            (_, None) => {
                tracing::warn!(?command, "vfio-user command before version negotiation");
                Err(Errno(libc::EINVAL))
            }
            (None, Some(_)) => Err(Errno(libc::ENOTSUP)),
            (Some(command), Some(peer)) => {
                dispatch::handle(device, self.config, peer, command, msg.payload, msg.fds)
            }
        };
        match result {
            Ok((payload, fds)) => Outcome::Reply(payload, fds),
            Err(errno) => {
                tracing::debug!(?command, %errno, "vfio-user command refused");
                Outcome::Fail(errno)
            }
        }
    }

    /// Answers the client's version proposal.
    fn negotiate(&mut self, payload: &[u8]) -> Outcome {
        let proposal = match Version::parse(payload) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "malformed vfio-user version proposal");
                return Outcome::Fail(Errno(libc::EINVAL));
            }
        };
        if proposal.major != PROTOCOL_MAJOR {
            return Outcome::Fatal(
                Errno(libc::ENOTSUP),
                format!(
                    "client proposed major version {}, only {PROTOCOL_MAJOR} is implemented",
                    proposal.major
                ),
            );
        }
        let theirs = proposal.capabilities.unwrap_or_default();
        let pgsizes = match theirs.pgsizes {
            Some(p) => p & self.config.pgsizes,
            None => self.config.pgsizes,
        };
        // The highest minor version both sides implement.
        let minor = proposal.minor.min(PROTOCOL_MINOR);
        let reply = Version {
            major: PROTOCOL_MAJOR,
            minor,
            capabilities: Some(Capabilities {
                max_msg_fds: Some(self.config.max_msg_fds.min(MAX_FDS_PER_MESSAGE as u32)),
                max_data_xfer_size: Some(self.config.max_data_xfer_size),
                max_dma_maps: Some(self.config.max_dma_maps),
                pgsizes: Some(pgsizes),
                migration: theirs.migration.as_ref().and(self.config.migration.clone()),
                // Not offered: this server sends no commands to the client.
                twin_socket: None,
            }),
        };
        self.peer = Some(Peer {
            max_msg_fds: theirs.max_msg_fds_or_default(),
        });
        Outcome::Reply(reply.to_bytes(), Vec::new())
    }

    fn send_reply(
        &self,
        request: &Header,
        payload: &[u8],
        fds: &[OwnedFd],
    ) -> Result<(), ServerError> {
        let header = match Header::reply(request, payload.len()) {
            Ok(h) => h,
            // Cannot happen with replies bounded by the transfer size; refuse cleanly.
            Err(_) => return self.send_error(request, Errno(libc::E2BIG)),
        };
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        let deadline = Instant::now() + self.config.message_timeout;
        self.channel.send(&header, payload, &borrowed, deadline)?;
        Ok(())
    }

    fn send_error(&self, request: &Header, errno: Errno) -> Result<(), ServerError> {
        let header = Header::error_reply(request, errno.0);
        let deadline = Instant::now() + self.config.message_timeout;
        self.channel.send(&header, &[], &[], deadline)?;
        Ok(())
    }
}
