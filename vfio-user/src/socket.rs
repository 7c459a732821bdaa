//! A framed message channel over a Unix stream socket: whole vfio-user messages go out
//! with their file descriptors (`SCM_RIGHTS`) and come back complete, with a deadline on
//! every send and receive and a cap on message size and descriptor count.
//!
//! The socket stays in blocking mode; each `sendmsg`/`recvmsg` uses `MSG_DONTWAIT`, and
//! `poll()` waits, at most until the deadline, for the socket to be ready (before each
//! `recvmsg`; before a `sendmsg` only once the socket has said it would block).

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::proto::{Header, ProtoError, HEADER_SIZE, MAX_CAPABILITIES_LEN};

/// Most descriptors Linux accepts in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// Why a message could not be sent or received. Messages include their cause (which is
/// not a `source()`), as [`ClientError`](crate::ClientError)'s do.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The deadline passed before the whole message was sent or received.
    #[error("timed out: the peer did not complete the message before the deadline")]
    Timeout,
    /// The peer closed the connection (end of file, `EPIPE` or `ECONNRESET`).
    #[error("the peer closed the connection")]
    Disconnected,
    /// A system call failed for another reason.
    #[error("{op} failed: {error}")]
    Io {
        /// The failing operation.
        op: &'static str,
        /// The error it returned.
        error: io::Error,
    },
    /// The received header is malformed; the stream can no longer be trusted.
    #[error("received an invalid message header: {0}")]
    InvalidHeader(ProtoError),
    /// The received header announces a message bigger than allowed. Its payload was not
    /// read, so the stream is out of step.
    #[error(
        "message {} (command {}) of {} bytes exceeds the limit of {max} bytes",
        header.msg_id,
        header.command,
        header.msg_size
    )]
    MessageTooLarge {
        /// The header received.
        header: Header,
        /// The limit in bytes.
        max: usize,
    },
    /// The message (read completely, so the stream is still in step) carried more file
    /// descriptors than allowed; they were closed.
    #[error(
        "message {} (command {}) carried more than the {max} file descriptors allowed",
        header.msg_id,
        header.command
    )]
    TooManyFds {
        /// The header received.
        header: Header,
        /// The limit.
        max: usize,
    },
    /// The header given to `send` does not describe the payload given with it.
    #[error("header announces {header_size} bytes but the message has {actual}")]
    SizeMismatch {
        /// `msg_size` of the header.
        header_size: u32,
        /// Header plus payload length.
        actual: usize,
    },
    /// More descriptors were given to `send` than one message can carry.
    #[error("cannot send {count} file descriptors in one message (at most {MAX_FDS_PER_MESSAGE})")]
    TooManyFdsToSend {
        /// How many were given.
        count: usize,
    },
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// Limits applied to a received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvLimits {
    /// Largest message accepted, header included.
    pub max_size: usize,
    /// Most file descriptors accepted.
    pub max_fds: usize,
}

impl RecvLimits {
    /// Room for the fixed part of any payload beyond its data bytes.
    pub const PAYLOAD_OVERHEAD: usize = 4096;

    /// Limits before version negotiation: a version message with its capability string.
    pub fn for_version(max_fds: u32) -> Self {
        RecvLimits {
            max_size: HEADER_SIZE + 4 + MAX_CAPABILITIES_LEN,
            max_fds: max_fds as usize,
        }
    }

    /// Limits after negotiation: data transfers of up to `max_data_xfer_size` bytes.
    pub fn for_transfers(max_data_xfer_size: u32, max_fds: u32) -> Self {
        RecvLimits {
            max_size: HEADER_SIZE + Self::PAYLOAD_OVERHEAD + max_data_xfer_size as usize,
            max_fds: max_fds as usize,
        }
    }
}

/// A complete received message.
#[derive(Debug)]
pub struct Message {
    /// The validated header.
    pub header: Header,
    /// The payload (`header.msg_size - 16` bytes).
    pub payload: Vec<u8>,
    /// File descriptors that came with the message; any left unused are closed on drop.
    pub fds: Vec<OwnedFd>,
}

/// A message channel over a connected Unix stream socket.
#[derive(Debug)]
pub struct Channel {
    stream: UnixStream,
}

impl Channel {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> Self {
        Channel { stream }
    }

    /// Shuts both directions down, so the peer sees end of file (errors are ignored: the
    /// socket may already be dead).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Sends one message: `header` (whose `msg_size` must be 16 + `payload.len()`),
    /// `payload`, and `fds` as `SCM_RIGHTS` data attached to its first byte.
    pub fn send(
        &self,
        header: &Header,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        deadline: Instant,
    ) -> Result<(), SocketError> {
        let actual = HEADER_SIZE.saturating_add(payload.len());
        if header.msg_size as usize != actual {
            return Err(SocketError::SizeMismatch {
                header_size: header.msg_size,
                actual,
            });
        }
        if fds.len() > MAX_FDS_PER_MESSAGE {
            return Err(SocketError::TooManyFdsToSend { count: fds.len() });
        }
        let head = header.to_bytes();
        let raw_fds: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        // A small message without descriptors (a posted register write) goes out as one
        // contiguous buffer with send(2): the kernel then reads no msghdr or iovec from
        // user memory, which counts right after a KVM exit, when little of it is cached.
        let mut small = [0u8; SMALL_MESSAGE];
        let contiguous = (fds.is_empty() && actual <= SMALL_MESSAGE).then(|| {
            small[..HEADER_SIZE].copy_from_slice(&head);
            small[HEADER_SIZE..actual].copy_from_slice(payload);
            &small[..actual]
        });
        let mut sent = 0;
        // Try at once and poll only once the socket says it would block: a send into a
        // socket with room costs one system call, not two.
        let mut wait = false;
        while sent < actual {
            if wait {
                self.poll(libc::POLLOUT, Some(deadline))?;
            }
            let result = match contiguous {
                Some(message) => self.send_plain(&message[sent..]),
                None => {
                    let (first, second) = match head.get(sent..) {
                        Some(rest) if !rest.is_empty() => (rest, payload),
                        _ => (
                            payload
                                .get(sent.saturating_sub(HEADER_SIZE)..)
                                .unwrap_or_default(),
                            &[][..],
                        ),
                    };
                    let with_fds = if sent == 0 { &raw_fds[..] } else { &[][..] };
                    self.send_some(first, second, with_fds)
                }
            };
            match result {
                Ok(n) => {
                    sent += n;
                    wait = false;
                }
                Err(e) if retry(&e) => {
                    wait = true;
                    continue;
                }
                Err(e) if peer_gone(&e) => return Err(SocketError::Disconnected),
                Err(error) => {
                    return Err(SocketError::Io {
                        op: "sendmsg",
                        error,
                    })
                }
            }
        }
        Ok(())
    }

    /// Reads and drops the `len` payload bytes that follow a header refused with
    /// [`SocketError::MessageTooLarge`], without allocating them, so that the stream is in
    /// step again; descriptors that come with them are closed.
    pub fn discard(&self, mut len: usize, deadline: Instant) -> Result<(), SocketError> {
        let mut sink = [0u8; 4096];
        let mut fds = Vec::new();
        let mut truncated = false;
        while len > 0 {
            let n = len.min(sink.len());
            let Some(chunk) = sink.get_mut(..n) else {
                break;
            };
            self.recv_exact(chunk, &mut fds, &mut truncated, 0, deadline)?;
            fds.clear();
            len -= n;
        }
        Ok(())
    }

    /// Waits until data (or end of file) can be read, or until `deadline` if there is one.
    pub fn wait_readable(&self, deadline: Option<Instant>) -> Result<(), SocketError> {
        self.poll(libc::POLLIN, deadline)
    }

    /// Whether data (or end of file, or an error) can be read right now: one `poll()`
    /// with a zero timeout. Nothing is read, so descriptors sent with the next message
    /// stay queued for [`Channel::recv`].
    pub fn readable_now(&self) -> Result<bool, SocketError> {
        loop {
            match self.poll_once(libc::POLLIN, 0) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(SocketError::Io { op: "poll", error }),
                Ok(ready) => return Ok(ready),
            }
        }
    }

    /// Receives one complete message before `deadline`. Descriptors beyond
    /// `limits.max_fds` are closed and reported as [`SocketError::TooManyFds`] once the
    /// message has been read; a message over `limits.max_size` is refused after its
    /// header ([`SocketError::MessageTooLarge`]).
    pub fn recv(&self, limits: RecvLimits, deadline: Instant) -> Result<Message, SocketError> {
        let mut fds = Vec::new();
        let mut truncated = false;
        let mut head = [0u8; HEADER_SIZE];
        self.recv_exact(
            &mut head,
            &mut fds,
            &mut truncated,
            limits.max_fds,
            deadline,
        )?;
        let header = Header::parse(&head).map_err(SocketError::InvalidHeader)?;
        let size = header.msg_size as usize;
        if size > limits.max_size {
            return Err(SocketError::MessageTooLarge {
                header,
                max: limits.max_size,
            });
        }
        let mut payload = vec![0u8; size - HEADER_SIZE];
        self.recv_exact(
            &mut payload,
            &mut fds,
            &mut truncated,
            limits.max_fds,
            deadline,
        )?;
        if truncated || fds.len() > limits.max_fds {
            return Err(SocketError::TooManyFds {
                header,
                max: limits.max_fds,
            });
        }
        Ok(Message {
            header,
            payload,
            fds,
        })
    }

    fn recv_exact(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        truncated: &mut bool,
        max_fds: usize,
        deadline: Instant,
    ) -> Result<(), SocketError> {
        let mut got = 0;
        while got < buf.len() {
            self.poll(libc::POLLIN, Some(deadline))?;
            let Some(rest) = buf.get_mut(got..) else {
                break;
            };
            match self.recv_some(rest, fds, max_fds) {
                Ok((0, _)) => return Err(SocketError::Disconnected),
                Ok((n, cut)) => {
                    got += n;
                    *truncated |= cut;
                }
                Err(e) if retry(&e) => continue,
                Err(e) if peer_gone(&e) => return Err(SocketError::Disconnected),
                Err(error) => {
                    return Err(SocketError::Io {
                        op: "recvmsg",
                        error,
                    })
                }
            }
        }
        Ok(())
    }

    /// Waits for `events` until `deadline` (forever without one).
    fn poll(&self, events: libc::c_short, deadline: Option<Instant>) -> Result<(), SocketError> {
        loop {
            let timeout_ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(SocketError::Timeout);
                    }
                    // Round up so that poll does not return just before the deadline.
                    i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
                }
            };
            match self.poll_once(events, timeout_ms) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(SocketError::Io { op: "poll", error }),
                // Timed out (or woke early): the loop re-checks the deadline.
                Ok(false) => continue,
                // Readable, writable, hung up or in error: the next call reports which.
                Ok(true) => return Ok(()),
            }
        }
    }

    /// One `poll()` for `events` with `timeout_ms` (-1: forever): whether the socket is
    /// ready (or hung up, or in error). `EBADF` if the descriptor is not open.
    fn poll_once(&self, events: libc::c_short, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid, initialised pollfd and we pass a count of 1; poll
        // only writes `revents` within it.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if r == 0 {
            return Ok(false);
        }
        if pfd.revents & libc::POLLNVAL != 0 {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        Ok(true)
    }

    /// One `send` of `bytes`.
    fn send_plain(&self, bytes: &[u8]) -> io::Result<usize> {
        // SAFETY: `bytes` is a live buffer that send(2) only reads, for its length.
        let n = unsafe {
            libc::send(
                self.stream.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// One `sendmsg` of `first` then `second`, with `fds` attached if not empty.
    fn send_some(&self, first: &[u8], second: &[u8], fds: &[RawFd]) -> io::Result<usize> {
        let mut iov = [
            libc::iovec {
                iov_base: first.as_ptr() as *mut libc::c_void,
                iov_len: first.len(),
            },
            libc::iovec {
                iov_base: second.as_ptr() as *mut libc::c_void,
                iov_len: second.len(),
            },
        ];
        let fd_bytes = std::mem::size_of_val(fds);
        let space = cmsg_space(fd_bytes);
        // No allocation without descriptors: posted writes take this path per guest access.
        let mut control = if fds.is_empty() {
            Vec::new()
        } else {
            vec![0u64; space.div_ceil(size_of::<u64>())]
        };
        // SAFETY: msghdr is a plain C struct for which all-zero bytes are a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = if second.is_empty() { 1 } else { 2 };
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: `msg` points at `control`, a zeroed, u64-aligned buffer of
            // CMSG_SPACE(fd_bytes) bytes, so CMSG_FIRSTHDR returns a non-null header with
            // room for CMSG_LEN(fd_bytes) bytes; the descriptors are written unaligned
            // into CMSG_DATA, within that room.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for (i, fd) in fds.iter().enumerate() {
                    data.add(i).write_unaligned(*fd);
                }
            }
        }
        // SAFETY: `msg` describes live buffers (`iov` over `first`/`second`, which
        // sendmsg only reads, and `control`), all outliving the call; the descriptors
        // are borrowed and stay open for its duration.
        let n = unsafe {
            libc::sendmsg(
                self.stream.as_raw_fd(),
                &msg,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// One `recvmsg` into `buf`; descriptors received are appended to `fds` as owned
    /// descriptors. Returns the byte count and whether control data was cut short.
    fn recv_some(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        max_fds: usize,
    ) -> io::Result<(usize, bool)> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // Room for at least one descriptor, so that unexpected ones are seen (and closed)
        // rather than only flagged.
        let space = cmsg_space(max_fds.clamp(1, MAX_FDS_PER_MESSAGE) * size_of::<RawFd>());
        let mut control = vec![0u64; space.div_ceil(size_of::<u64>())];
        // SAFETY: msghdr is a plain C struct for which all-zero bytes are a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` describes `buf` (writable, `buf.len()` bytes) and `control`
        // (writable, `space` bytes), both alive for the call.
        let n = unsafe {
            libc::recvmsg(
                self.stream.as_raw_fd(),
                &mut msg,
                libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
        // SAFETY: the kernel filled `control` with `msg.msg_controllen` bytes of
        // well-formed control messages; CMSG_FIRSTHDR/CMSG_NXTHDR stay within them and
        // return null at the end. SCM_RIGHTS data holds `(cmsg_len - CMSG_LEN(0)) / 4`
        // descriptors, read unaligned; each was just installed in our table for us
        // alone, so wrapping it in an OwnedFd (which closes it) is sound.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data_len =
                        ((*cmsg).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    for i in 0..data_len / size_of::<RawFd>() {
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        Ok((n as usize, truncated))
    }
}

/// `CMSG_SPACE(len)`.
fn cmsg_space(len: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    unsafe { libc::CMSG_SPACE(len as u32) as usize }
}

fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Messages up to this size without descriptors are sent from one stack buffer.
const SMALL_MESSAGE: usize = 256;

fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE) | Some(libc::ECONNRESET) | Some(libc::ENOTCONN)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Command;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::time::Duration;

    const LIMITS: RecvLimits = RecvLimits {
        max_size: 4096,
        max_fds: 2,
    };

    fn pair() -> (Channel, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Channel::new(a), b)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(r, 0);
        // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn message_with_fds_round_trip() {
        let (a, b) = pair();
        let b = Channel::new(b);
        let (r, w) = pipe();
        let payload = vec![7u8; 100];
        let h = Header::command(3, Command::DmaMap, payload.len()).unwrap();
        a.send(&h, &payload, &[w.as_fd()], soon()).unwrap();
        let m = b.recv(LIMITS, soon()).unwrap();
        assert_eq!(m.header, h);
        assert_eq!(m.payload, payload);
        assert_eq!(m.fds.len(), 1);
        // The received descriptor is the pipe's write end.
        let mut f = std::fs::File::from(m.fds.into_iter().next().unwrap());
        f.write_all(b"x").unwrap();
        let mut byte = [0u8];
        // SAFETY: reading one byte into a one-byte buffer from an open descriptor.
        let n = unsafe { libc::read(r.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        assert_eq!((n, byte[0]), (1, b'x'));
    }

    #[test]
    fn partial_writes_are_reassembled() {
        let (a, mut b) = pair();
        let h = Header::command(1, Command::RegionWrite, 3).unwrap();
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(&[1, 2, 3]);
        let t = std::thread::spawn(move || {
            for chunk in bytes.chunks(5) {
                b.write_all(chunk).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            b
        });
        let m = a.recv(LIMITS, soon()).unwrap();
        assert_eq!(m.payload, vec![1, 2, 3]);
        drop(t.join().unwrap());
    }

    #[test]
    fn timeout_eof_and_limits() {
        let (a, mut b) = pair();
        let start = Instant::now();
        let deadline = start + Duration::from_millis(100);
        assert!(matches!(
            a.recv(LIMITS, deadline),
            Err(SocketError::Timeout)
        ));
        assert!(start.elapsed() >= Duration::from_millis(100));

        // Half a header, then the deadline.
        b.write_all(&[0u8; 5]).unwrap();
        let deadline = Instant::now() + Duration::from_millis(50);
        assert!(matches!(
            a.recv(LIMITS, deadline),
            Err(SocketError::Timeout)
        ));

        // Too large.
        let (a, mut b) = pair();
        let h = Header::command(1, Command::RegionWrite, 5000).unwrap();
        b.write_all(&h.to_bytes()).unwrap();
        assert!(matches!(
            a.recv(LIMITS, soon()),
            Err(SocketError::MessageTooLarge { max: 4096, .. })
        ));

        // Garbage header.
        let (a, mut b) = pair();
        b.write_all(&[0xffu8; 16]).unwrap();
        assert!(matches!(
            a.recv(LIMITS, soon()),
            Err(SocketError::InvalidHeader(_))
        ));

        // End of file in the middle of a payload.
        let (a, mut b) = pair();
        let h = Header::command(1, Command::RegionWrite, 8).unwrap();
        b.write_all(&h.to_bytes()).unwrap();
        b.write_all(&[1, 2]).unwrap();
        drop(b);
        assert!(matches!(
            a.recv(LIMITS, soon()),
            Err(SocketError::Disconnected)
        ));

        // Sending to a closed peer.
        let (a, b) = pair();
        drop(b);
        let h = Header::command(1, Command::DeviceReset, 0).unwrap();
        assert!(matches!(
            a.send(&h, &[], &[], soon()),
            Err(SocketError::Disconnected)
        ));
    }

    #[test]
    fn a_message_too_large_can_be_discarded_and_the_next_one_read() {
        let (a, b) = pair();
        let b = Channel::new(b);
        let big = vec![0x5a; 10_000];
        let h = Header::command(1, Command::DmaWrite, big.len()).unwrap();
        let (r, w) = pipe();
        a.send(&h, &big, &[w.as_fd()], soon()).unwrap();
        let h2 = Header::command(2, Command::DeviceReset, 0).unwrap();
        a.send(&h2, &[], &[], soon()).unwrap();
        let header = match b.recv(LIMITS, soon()) {
            Err(SocketError::MessageTooLarge { header, .. }) => header,
            other => panic!("unexpected {other:?}"),
        };
        b.discard(header.payload_len(), soon()).unwrap();
        assert_eq!(b.recv(LIMITS, soon()).unwrap().header, h2);
        drop(w);
        // The descriptor that came with the big message was closed: the pipe reads EOF.
        let mut byte = [0u8];
        // SAFETY: reading one byte into a one-byte buffer from an open descriptor.
        let n = unsafe { libc::read(r.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        assert_eq!(n, 0);
    }

    #[test]
    fn too_many_fds_are_closed_and_stream_stays_in_step() {
        let (a, b) = pair();
        let b = Channel::new(b);
        let pipes: Vec<_> = (0..4).map(|_| pipe()).collect();
        let fds: Vec<_> = pipes.iter().map(|p| p.1.as_fd()).collect();
        let h = Header::command(9, Command::DeviceSetIrqs, 0).unwrap();
        a.send(&h, &[], &fds, soon()).unwrap();
        let h2 = Header::command(10, Command::DeviceReset, 0).unwrap();
        a.send(&h2, &[], &[], soon()).unwrap();
        match b.recv(LIMITS, soon()) {
            Err(SocketError::TooManyFds { header, max: 2 }) => assert_eq!(header, h),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(b.recv(LIMITS, soon()).unwrap().header, h2);

        let bad = Header::command(1, Command::DeviceReset, 4).unwrap();
        assert!(matches!(
            a.send(&bad, &[], &[], soon()),
            Err(SocketError::SizeMismatch { .. })
        ));
    }
}
