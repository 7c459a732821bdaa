//! Commands the server sends to the client (`DMA_READ`, `DMA_WRITE`), served whenever they
//! arrive: inline by a caller waiting for its own reply, or by the reader thread
//! ([`Client::spawn_reader`]) while no request is in flight.
//!
//! The reader never takes the session lock while a caller holds it, so a synchronous call
//! pays nothing for it: no hand-off, no futex wake on unlock. It polls the socket for
//! input only while the client is idle. Input that arrives while a call is in flight is
//! that call's business (its reply, or a server command before it, which the caller
//! serves itself); the reader then only `try_lock`s, finds the lock taken and, until the
//! call is over, polls for hang-up alone, checking every [`BUSY_RECHECK`] whether the
//! client is idle again and input is waiting (a command that came just after the reply).
//! So a reply wakes the reader at most once per idle period, and a command is served
//! within [`BUSY_RECHECK`] of arriving at worst.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::negotiate::{CLIENT_MAX_DATA_XFER_SIZE, CLIENT_MAX_MSG_FDS};
use super::session::Session;
use super::{ClientError, Shared};
use crate::device::Errno;
use crate::proto::{Command, DmaAccess, DmaAccessData, Header};
use crate::socket::{Message, RecvLimits, SocketError};

/// How often the reader checks whether the client went idle after finding a call in
/// flight: the longest a server command that arrives right after a reply waits.
pub const BUSY_RECHECK: Duration = Duration::from_millis(1);

/// What serves the server's commands: guest memory reached by DMA address. Called with the
/// client's session lock held, from the thread of a call in flight or from the reader
/// thread: an implementation must not call the [`Client`](super::Client) back, and should
/// return quickly (the server waits).
pub trait ServerRequests: Send + Sync {
    /// `VFIO_USER_DMA_READ`: fills `buf` from DMA address `addr`. An address outside the
    /// memory is an error (e.g. `EFAULT`), sent back to the server.
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno>;

    /// `VFIO_USER_DMA_WRITE`: writes `data` at DMA address `addr`.
    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), Errno>;
}

impl Session {
    /// Serves one command received from the server and answers it (unless it asked for no
    /// reply). A command the client cannot serve gets an error reply; only a failure to
    /// send the reply is an error here.
    pub(super) fn serve(
        &mut self,
        request: &Message,
        deadline: Instant,
    ) -> Result<(), SocketError> {
        let h = request.header;
        let result = match h.known_command() {
            Some(Command::DmaRead) => self.dma_read(&request.payload),
            Some(Command::DmaWrite) => self.dma_write(&request.payload),
            _ => Err(Errno(libc::ENOTSUP)),
        };
        match &result {
            Ok(_) => tracing::trace!(
                command = h.command,
                id = h.msg_id,
                "served a server command"
            ),
            Err(errno) => tracing::warn!(
                command = h.command,
                id = h.msg_id,
                %errno,
                "refused a command from the vfio-user server"
            ),
        }
        if h.no_reply() {
            return Ok(());
        }
        match result {
            Ok(payload) => {
                let reply = Header::reply(&h, payload.len()).map_err(SocketError::InvalidHeader)?;
                self.channel.send(&reply, &payload, &[], deadline)
            }
            Err(Errno(errno)) => {
                let reply = Header::error_reply(&h, errno);
                self.channel.send(&reply, &[], &[], deadline)
            }
        }
    }

    /// Refuses a command whose payload was too large to receive: drops the payload
    /// unread and answers `E2BIG`.
    pub(super) fn refuse_too_large(
        &mut self,
        header: &Header,
        deadline: Instant,
    ) -> Result<(), SocketError> {
        tracing::warn!(
            command = header.command,
            id = header.msg_id,
            size = header.msg_size,
            "refused a command from the vfio-user server: too large to receive"
        );
        self.channel.discard(header.payload_len(), deadline)?;
        if header.no_reply() {
            return Ok(());
        }
        let reply = Header::error_reply(header, libc::E2BIG);
        self.channel.send(&reply, &[], &[], deadline)
    }

    /// `DMA_READ`: the reply carries the address, the count and the data.
    fn dma_read(&self, payload: &[u8]) -> Result<Vec<u8>, Errno> {
        let access = DmaAccess::parse(payload).map_err(|_| Errno(libc::EINVAL))?;
        let handler = self.handler.as_ref().ok_or(Errno(libc::ENOTSUP))?;
        // The count is checked before anything of that size is allocated.
        let count = usize::try_from(access.count)
            .ok()
            .filter(|&c| c <= CLIENT_MAX_DATA_XFER_SIZE as usize)
            .ok_or(Errno(libc::EINVAL))?;
        let mut reply = vec![0u8; DmaAccessData::HEADER_SIZE + count];
        let (head, data) = reply.split_at_mut(DmaAccessData::HEADER_SIZE);
        head.copy_from_slice(&access.to_bytes());
        handler.dma_read(access.address, data)?;
        Ok(reply)
    }

    /// `DMA_WRITE`: the reply echoes the address and the count.
    fn dma_write(&self, payload: &[u8]) -> Result<Vec<u8>, Errno> {
        let (address, data) = DmaAccessData::split(payload).map_err(|_| Errno(libc::EINVAL))?;
        let handler = self.handler.as_ref().ok_or(Errno(libc::ENOTSUP))?;
        if data.len() > CLIENT_MAX_DATA_XFER_SIZE as usize {
            return Err(Errno(libc::EINVAL));
        }
        handler.dma_write(address, data)?;
        Ok(DmaAccess {
            address,
            count: data.len() as u64,
        }
        .to_bytes())
    }

    /// Serves every server command waiting on the socket, without blocking for more. A
    /// reply (no request is in flight) is a protocol violation, and like any failure it
    /// breaks the connection.
    pub(super) fn serve_pending(&mut self, timeout: Duration) -> Result<(), ClientError> {
        loop {
            if let Some(reason) = &self.broken {
                return Err(ClientError::Broken {
                    reason: reason.clone(),
                });
            }
            match self.channel.readable_now() {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) => return Err(self.break_with(idle_error(e))),
            }
            let deadline = Instant::now() + timeout;
            let limits = RecvLimits::for_transfers(CLIENT_MAX_DATA_XFER_SIZE, CLIENT_MAX_MSG_FDS);
            match self.recv_or_serve(limits, deadline) {
                Ok(None) => {}
                Ok(Some(reply)) => {
                    let h = reply.header;
                    return Err(self.break_with(ClientError::Unsolicited {
                        reason: format!(
                            "a reply (message ID {}, command {}) arrived with no request in \
                             flight",
                            h.msg_id, h.command
                        ),
                    }));
                }
                Err(e) => return Err(self.break_with(idle_error(e))),
            }
        }
    }
}

/// A socket failure met while no request was in flight.
fn idle_error(e: SocketError) -> ClientError {
    match e {
        SocketError::Disconnected => ClientError::Hangup,
        e => ClientError::Unsolicited {
            reason: e.to_string(),
        },
    }
}

/// The reader thread of a client, stopped and joined on drop.
#[derive(Debug)]
pub(super) struct Reader {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl Reader {
    /// Starts the reader of `shared`'s socket (`fd`, which stays open as long as `shared`).
    pub(super) fn spawn(shared: Arc<Shared>, fd: RawFd) -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; it returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` was just created and is owned by nothing else.
        let stop = unsafe { OwnedFd::from_raw_fd(raw) };
        let stopped = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("vfio-user-reader".into())
            .spawn(move || read_loop(&shared, fd, &stopped))?;
        Ok(Reader {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from an 8-byte buffer to the eventfd we own.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_loop(shared: &Shared, fd: RawFd, stop: &OwnedFd) {
    let hangup = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
    // Whether a call was in flight at the last look: then only hang-ups wake the poll.
    let mut busy = false;
    loop {
        let (events, timeout_ms) = if busy {
            let ms = i32::try_from(BUSY_RECHECK.as_millis()).unwrap_or(1).max(1);
            (libc::POLLRDHUP, ms)
        } else {
            (libc::POLLIN | libc::POLLRDHUP, -1)
        };
        let mut fds = [
            libc::pollfd {
                fd,
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is an array of two initialised pollfds over descriptors that stay
        // open for the call (the socket lives as long as `shared`, the eventfd as long as
        // `stop`); poll only writes their `revents`.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(
                "{}: the vfio-user reader stops, commands from the server will be served \
                 only during calls: poll: {e}",
                shared.lock().name
            );
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        let revents = fds[0].revents;
        if revents & hangup != 0 {
            on_hangup(shared);
            return;
        }
        if !busy && revents & libc::POLLIN == 0 {
            continue;
        }
        let mut session = match shared.session.try_lock() {
            Ok(s) => s,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                busy = true;
                continue;
            }
        };
        busy = false;
        if session.serve_pending(shared.timeout).is_err() {
            // The failure broke the connection (and was logged); nothing more to read.
            return;
        }
    }
}

/// The server hung up: serves what it sent before (or finds the end of the stream), so
/// that the connection is marked broken with the reason (and logged, once).
fn on_hangup(shared: &Shared) {
    let mut session = shared.lock();
    if session.broken.is_some() {
        // This client closed it, or a call found out first; both logged why.
        return;
    }
    if session.serve_pending(shared.timeout).is_ok() {
        session.break_with(ClientError::Hangup);
    }
}
