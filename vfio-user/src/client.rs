//! [`Client`]: the VMM's side of a vfio-user connection.
//!
//! Every request has a deadline (the client's timeout, 5 s by default). Requests may come
//! from several threads: a mutex around the socket keeps **one request in flight at a
//! time** (the protocol allows pipelining; this client does not use it). After a timeout,
//! a dead peer or any protocol violation the stream can no longer be trusted: the client
//! marks itself broken, shuts the socket down, and fails every later call at once with
//! [`ClientError::Broken`]. An error reply from the server is not a violation: it becomes
//! [`ClientError::Remote`] and the client stays usable.
//!
//! One exception to "a request, then its reply": [`Client::region_write_posted`] sends a
//! region write with the *No_reply* flag and returns once it is on the socket. The server
//! serves commands in order, so the next request's reply comes after the write was done.
//!
//! Migration (device features, migration data, DMA logging) is in `migration.rs`:
//! [`Client::migration_flags`], [`Client::set_mig_state`], [`Client::mig_data_read`],
//! [`Client::dma_logging_report`] and their siblings.
//!
//! Commands the server sends to the client (`DMA_READ`/`DMA_WRITE`: the server reaches
//! guest memory through the client, for memory mapped without a file descriptor or
//! because it chooses to) are served by the [`ServerRequests`] handler set with
//! [`Client::set_server_requests`], or refused with an `ENOTSUP` error reply without one;
//! either way the stream stays in step. A caller waiting for its reply serves those that
//! arrive first; while no request is in flight the reader thread started by
//! [`Client::spawn_reader`] serves them (see `requests.rs` for how it stays off the
//! callers' path). The reader also notices at once when the server hangs up. It stops
//! when the client is dropped.

mod migration;
mod negotiate;
mod requests;
mod session;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK,
};

use crate::proto::{
    Command, DeviceInfo as DeviceInfoMsg, DmaMap, DmaUnmap, IrqInfo as IrqInfoMsg, IrqSet,
    NoPayload, RegionAccess, RegionAccessData, RegionInfoReply, RegionInfoRequest, RegionType,
    REGION_INFO_SIZE,
};
use crate::socket::{Channel, Message, RecvLimits, SocketError};
use crate::types::{DeviceInfo, IrqInfo, RegionInfo};
pub use migration::FeatureOp;
pub use negotiate::Negotiated;
use negotiate::{CLIENT_MAX_DATA_XFER_SIZE, CLIENT_MAX_MSG_FDS};
use requests::Reader;
pub use requests::ServerRequests;
use session::Session;

/// Default deadline of a request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// First `argsz` of a region info request: room for 16 sparse areas.
const REGION_INFO_ARGSZ: u32 = REGION_INFO_SIZE as u32 + 16 + 16 * 16;

/// Why a client call failed.
///
/// Each message is whole: it includes the message of the error beneath it, which is
/// therefore not a `source()`, so that printing the chain (`{:#}` with anyhow, as the
/// vmm does) says each cause once.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected.
    #[error("cannot connect to the vfio-user server at {}: {error}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The error of `connect()`.
        error: io::Error,
    },
    /// The server's version reply is unacceptable.
    #[error("version negotiation failed: {0}")]
    Negotiation(String),
    /// The deadline passed: the server did not take the request in (its socket stayed
    /// full), or did not answer it completely.
    #[error("{command} timed out after {timeout:?} waiting for {waiting_for}")]
    Timeout {
        /// The command sent.
        command: Command,
        /// The deadline it had.
        timeout: Duration,
        /// What was still awaited: "the server to take the request" or "the reply".
        waiting_for: &'static str,
    },
    /// The server closed the connection (end of file, `EPIPE`, `ECONNRESET`).
    #[error("the server closed the connection during {command}")]
    Disconnected {
        /// The command sent.
        command: Command,
    },
    /// The server answered with an error reply.
    #[error("the server refused {command}: {} (errno {errno})", io::Error::from_raw_os_error(*errno))]
    Remote {
        /// The command sent.
        command: Command,
        /// The errno it reported (0 if it gave none).
        errno: i32,
    },
    /// The reply violates the protocol (malformed, wrong size, wrong ID or command).
    #[error("invalid reply to {command}, closing the connection: {reason}")]
    Protocol {
        /// The command sent.
        command: Command,
        /// What was wrong.
        reason: String,
    },
    /// An earlier failure closed the connection.
    #[error("the vfio-user connection was closed after an earlier failure: {reason}")]
    Broken {
        /// The earlier failure.
        reason: String,
    },
    /// The call's arguments cannot be sent (nothing was sent).
    #[error("invalid {command} request: {reason}")]
    InvalidArgument {
        /// The command that was to be sent.
        command: Command,
        /// What is wrong.
        reason: String,
    },
    /// The server closed the connection while no request was in flight (seen by the
    /// reader thread).
    #[error("the server closed the connection (it died or hung up)")]
    Hangup,
    /// The server sent something invalid while no request was in flight: a reply to
    /// nothing, a malformed message (seen by the reader thread).
    #[error("invalid message from the server while no request was in flight: {reason}")]
    Unsolicited {
        /// What was wrong.
        reason: String,
    },
    /// The reader thread could not be started.
    #[error("cannot start the vfio-user reader thread: {error}")]
    Reader {
        /// The error of the thread or eventfd creation.
        error: io::Error,
    },
    /// A local socket operation failed.
    #[error("{command} failed on the socket: {error}")]
    Socket {
        /// The command sent.
        command: Command,
        /// The socket error.
        error: SocketError,
    },
}

/// A connection to a vfio-user server. Methods take `&self` and may be called from
/// several threads; one request is in flight at a time.
#[derive(Debug)]
pub struct Client {
    /// Stopped and joined first on drop: it holds a reference to `shared`.
    reader: Mutex<Option<Reader>>,
    shared: Arc<Shared>,
}

/// What the client's callers and its reader thread share.
#[derive(Debug)]
struct Shared {
    session: Mutex<Session>,
    timeout: Duration,
    negotiated: Negotiated,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Session> {
        // A panic elsewhere while holding the lock cannot leave the state inconsistent
        // (every failure path marks it broken first), so poisoning is ignored.
        self.session.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Client {
    /// Connects to the server listening at `path` and negotiates the version. `timeout`
    /// is the deadline of every request, negotiation included.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|error| ClientError::Connect {
            path: path.to_path_buf(),
            error,
        })?;
        Self::negotiate(stream, timeout, path.display().to_string())
    }

    /// Negotiates the version over an already connected stream (e.g. one end of a
    /// socket pair).
    pub fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Self, ClientError> {
        let name = format!("vfio-user server on socket {}", stream.as_raw_fd());
        Self::negotiate(stream, timeout, name)
    }

    /// Negotiates the version; `name` names the server in logs.
    fn negotiate(stream: UnixStream, timeout: Duration, name: String) -> Result<Self, ClientError> {
        let mut session = Session {
            channel: Channel::new(stream),
            next_id: 0,
            broken: None,
            scratch: Vec::new(),
            handler: None,
            name,
        };
        let limits = RecvLimits::for_version(CLIENT_MAX_MSG_FDS);
        let proposal = negotiate::proposal().to_bytes();
        let reply = session.transact(Command::Version, &proposal, &[], timeout, limits)?;
        let negotiated = negotiate::negotiate(&reply)
            .map_err(|reason| session.break_with(ClientError::Negotiation(reason)))?;
        tracing::debug!(?negotiated, "vfio-user version negotiated");
        Ok(Client {
            reader: Mutex::new(None),
            shared: Arc::new(Shared {
                session: Mutex::new(session),
                timeout,
                negotiated,
            }),
        })
    }

    /// What version negotiation settled.
    pub fn negotiated(&self) -> &Negotiated {
        &self.shared.negotiated
    }

    /// Sets what serves the server's `DMA_READ` and `DMA_WRITE` commands from now on
    /// (replacing any earlier handler). Without one they get an `ENOTSUP` error reply.
    pub fn set_server_requests(&self, handler: Arc<dyn ServerRequests>) {
        self.lock().handler = Some(handler);
    }

    /// Starts the reader thread, which serves the server's commands while no request is
    /// in flight and breaks the connection at once when the server hangs up or sends a
    /// reply to nothing. Calling it again does nothing; the thread stops when the client
    /// is dropped. Without it, commands from the server are served only while a call
    /// waits for its reply.
    pub fn spawn_reader(&self) -> Result<(), ClientError> {
        let mut reader = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        if reader.is_some() {
            return Ok(());
        }
        let fd = self.lock().channel.as_fd().as_raw_fd();
        let started = Reader::spawn(self.shared.clone(), fd)
            .map_err(|error| ClientError::Reader { error })?;
        *reader = Some(started);
        Ok(())
    }

    /// Whether an earlier failure made the connection unusable.
    pub fn is_broken(&self) -> bool {
        self.lock().broken.is_some()
    }

    /// `VFIO_USER_DEVICE_GET_INFO`.
    pub fn device_info(&self) -> Result<DeviceInfo, ClientError> {
        let request = DeviceInfoMsg {
            argsz: DeviceInfoMsg::SIZE as u32,
            flags: 0,
            num_regions: 0,
            num_irqs: 0,
        };
        self.call(Command::DeviceGetInfo, &request.to_bytes(), &[], |msg| {
            let info = DeviceInfoMsg::parse(&msg.payload).map_err(|e| e.to_string())?;
            Ok(DeviceInfo {
                flags: info.flags,
                num_regions: info.num_regions,
                num_irqs: info.num_irqs,
            })
        })
    }

    /// `VFIO_USER_DEVICE_GET_REGION_INFO`, with the sparse areas and the region's file
    /// descriptor if the server sent one (up to one per sparse area is accepted, all
    /// for the same file; the first is kept). A reply truncated for lack of room is asked for
    /// again once, with the size the server said it needs.
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, ClientError> {
        self.region_info_with_type(index).map(|(info, _)| info)
    }

    /// [`Self::region_info`] with the region's type capability (`VFIO_REGION_INFO_CAP_TYPE`),
    /// if it has one: how a device's v1 migration region is found (type 3
    /// `VFIO_REGION_TYPE_MIGRATION_DEPRECATED`, subtype 1).
    pub fn region_info_with_type(
        &self,
        index: u32,
    ) -> Result<(RegionInfo, Option<RegionType>), ClientError> {
        let command = Command::DeviceGetRegionInfo;
        let mut argsz = REGION_INFO_ARGSZ;
        let mut retried = false;
        loop {
            let request = RegionInfoRequest { argsz, index };
            let (reply, fd, received) = self.call(command, &request.to_bytes(), &[], |msg| {
                let reply = RegionInfoReply::parse(&msg.payload).map_err(|e| e.to_string())?;
                if reply.index != index {
                    return Err(format!("reply is for region {}, not {index}", reply.index));
                }
                // libvfio-user sends one copy of the region's descriptor per sparse
                // area; the first is kept.
                let fd = first_fd(msg.fds, reply.sparse_areas.len().max(1))?;
                Ok((reply, fd, msg.payload.len()))
            })?;
            if !reply.is_truncated(received) {
                let info = RegionInfo {
                    index,
                    flags: reply.flags,
                    size: reply.size,
                    offset: reply.offset,
                    sparse_areas: reply.sparse_areas,
                    fd,
                };
                return Ok((info, reply.region_type));
            }
            let limit = CLIENT_MAX_DATA_XFER_SIZE;
            if retried || reply.argsz <= argsz || reply.argsz > limit {
                return Err(self.violation(
                    command,
                    format!(
                        "reply needs argsz {} (asked with {argsz}, limit {limit})",
                        reply.argsz
                    ),
                ));
            }
            argsz = reply.argsz;
            retried = true;
        }
    }

    /// Reads `data.len()` bytes at `offset` of region `index` (`VFIO_USER_REGION_READ`,
    /// split into transfers of at most [`Negotiated::max_data_xfer_size`]).
    pub fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), ClientError> {
        let command = Command::RegionRead;
        let step = self.shared.negotiated.max_data_xfer_size as usize;
        check_span(command, offset, data.len())?;
        for (i, chunk) in data.chunks_mut(step).enumerate() {
            let at = offset + (i * step) as u64;
            let request = RegionAccess {
                offset: at,
                region: index,
                count: chunk.len() as u32,
            };
            self.call(command, &request.to_bytes(), &[], |msg| {
                let reply = RegionAccessData::parse(&msg.payload).map_err(|e| e.to_string())?;
                if reply.offset != at || reply.region != index || reply.data.len() != chunk.len()
                {
                    return Err(format!(
                        "reply covers {} bytes at {:#x} of region {}, asked {} at {at:#x} of {index}",
                        reply.data.len(),
                        reply.offset,
                        reply.region,
                        chunk.len()
                    ));
                }
                chunk.copy_from_slice(&reply.data);
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Writes `data` at `offset` of region `index` (`VFIO_USER_REGION_WRITE`, split into
    /// transfers of at most [`Negotiated::max_data_xfer_size`]).
    pub fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        let command = Command::RegionWrite;
        let step = self.shared.negotiated.max_data_xfer_size as usize;
        check_span(command, offset, data.len())?;
        for (i, chunk) in data.chunks(step).enumerate() {
            let at = offset + (i * step) as u64;
            let request = RegionAccessData {
                offset: at,
                region: index,
                data: chunk.to_vec(),
            };
            let bytes = request.to_bytes().map_err(|e| invalid(command, e))?;
            self.call(command, &bytes, &[], |msg| {
                let reply = RegionAccess::parse(&msg.payload).map_err(|e| e.to_string())?;
                if reply.offset != at || reply.region != index || reply.count as usize != chunk.len()
                {
                    return Err(format!(
                        "reply acknowledges {} bytes at {:#x} of region {}, sent {} at {at:#x} of {index}",
                        reply.count,
                        reply.offset,
                        reply.region,
                        chunk.len()
                    ));
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Posts `data` at `offset` of region `index`: `VFIO_USER_REGION_WRITE` with the
    /// *No_reply* flag, split like [`Self::region_write`], returning once the messages are
    /// on the socket, without waiting for the server. For PCI memory writes, which are
    /// posted on a real bus too.
    ///
    /// Ordering: the socket is a stream and the server serves commands in the order they
    /// arrive (the specification's "Command Concurrency" section), so any later request
    /// of this client, a read of the same register included, is served after this write.
    ///
    /// Errors: the server sends nothing back, so a write it refuses is known only to the
    /// server (which logs it). What fails here is the socket: a dead peer or a full socket
    /// past the deadline breaks the connection like any other call, and later calls fail
    /// with [`ClientError::Broken`]. A server that dies just after taking the message in
    /// is noticed by the next call.
    pub fn region_write_posted(
        &self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let command = Command::RegionWrite;
        let step = self.shared.negotiated.max_data_xfer_size as usize;
        check_span(command, offset, data.len())?;
        let mut session = self.lock();
        for (i, chunk) in data.chunks(step).enumerate() {
            // Encoded into the session's buffer: no allocation per guest access.
            let mut payload = std::mem::take(&mut session.scratch);
            let r = RegionAccessData::encode_write(
                offset + (i * step) as u64,
                index,
                chunk,
                &mut payload,
            )
            .map_err(|e| invalid(command, e))
            .and_then(|()| session.post(command, &payload, self.shared.timeout));
            session.scratch = payload;
            r?;
        }
        Ok(())
    }

    /// Makes `size` bytes of `fd` from `file_offset` on available for DMA at `iova`
    /// (`VFIO_USER_DMA_MAP`). Address, size and offset must be multiples of the smallest
    /// page size the server supports.
    pub fn dma_map(
        &self,
        iova: u64,
        size: u64,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        readable: bool,
        writable: bool,
    ) -> Result<(), ClientError> {
        let command = Command::DmaMap;
        if self.shared.negotiated.max_msg_fds == 0 {
            return Err(invalid(command, "the server accepts no file descriptors"));
        }
        if size == 0 || iova.checked_add(size).is_none() {
            return Err(invalid(command, "empty or wrapping range"));
        }
        let page = 1u64 << self.shared.negotiated.pgsizes.trailing_zeros().min(63);
        if !iova.is_multiple_of(page)
            || !size.is_multiple_of(page)
            || !file_offset.is_multiple_of(page)
        {
            return Err(invalid(
                command,
                format!("address, size and offset must be multiples of {page:#x}"),
            ));
        }
        let request = DmaMap {
            readable,
            writable,
            offset: file_offset,
            iova,
            size,
        };
        self.call(command, &request.to_bytes(), &[fd], |msg| {
            NoPayload::parse(&msg.payload).map_err(|e| e.to_string())?;
            Ok(())
        })
    }

    /// Withdraws the DMA mapping at `iova` of `size` bytes (`VFIO_USER_DMA_UNMAP`); the
    /// server has released the memory when this returns.
    pub fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), ClientError> {
        let command = Command::DmaUnmap;
        if size == 0 || iova.checked_add(size).is_none() {
            return Err(invalid(command, "empty or wrapping range"));
        }
        let request = DmaUnmap {
            argsz: DmaUnmap::SIZE as u32,
            flags: 0,
            iova,
            size,
        };
        self.call(command, &request.to_bytes(), &[], |msg| {
            if msg.payload.is_empty() {
                return Ok(());
            }
            let echo = DmaUnmap::parse(&msg.payload).map_err(|e| e.to_string())?;
            if echo.iova != iova || echo.size != size {
                return Err(format!(
                    "reply names {:#x}+{:#x}, not {iova:#x}+{size:#x}",
                    echo.iova, echo.size
                ));
            }
            Ok(())
        })
    }

    /// `VFIO_USER_DEVICE_GET_IRQ_INFO` for IRQ type `index`.
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, ClientError> {
        let request = IrqInfoMsg {
            argsz: IrqInfoMsg::SIZE as u32,
            flags: 0,
            index,
            count: 0,
        };
        self.call(Command::DeviceGetIrqInfo, &request.to_bytes(), &[], |msg| {
            let info = IrqInfoMsg::parse(&msg.payload).map_err(|e| e.to_string())?;
            if info.index != index {
                return Err(format!("reply is for IRQ type {}, not {index}", info.index));
            }
            Ok(IrqInfo {
                index,
                flags: info.flags,
                count: info.count,
            })
        })
    }

    /// `VFIO_USER_DEVICE_SET_IRQS`: applies the action in `flags` to sub-indexes
    /// `start..start + count` of IRQ type `index`.
    ///
    /// `flags` is one `VFIO_IRQ_SET_ACTION_*` or'ed with `VFIO_IRQ_SET_DATA_NONE` (no
    /// descriptors) or `VFIO_IRQ_SET_DATA_EVENTFD` (`count` descriptors, which are split
    /// over several messages if the server accepts fewer per message, or none to
    /// de-assign). `VFIO_IRQ_SET_DATA_BOOL` is not offered: use one `DATA_NONE` call per
    /// sub-index instead. `start = count = 0` with `DATA_NONE | ACTION_TRIGGER` disables
    /// the whole type.
    pub fn set_irqs(
        &self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        eventfds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        let command = Command::DeviceSetIrqs;
        IrqSet::check_flags(flags).map_err(|e| invalid(command, e))?;
        if start.checked_add(count).is_none() {
            return Err(invalid(command, "start + count overflows"));
        }
        match flags & VFIO_IRQ_SET_DATA_TYPE_MASK {
            VFIO_IRQ_SET_DATA_BOOL => {
                return Err(invalid(
                    command,
                    "boolean data is not supported; use VFIO_IRQ_SET_DATA_NONE per sub-index",
                ))
            }
            VFIO_IRQ_SET_DATA_NONE if !eventfds.is_empty() => {
                return Err(invalid(command, "descriptors given without DATA_EVENTFD"))
            }
            VFIO_IRQ_SET_DATA_EVENTFD if !eventfds.is_empty() => {
                if eventfds.len() != count as usize {
                    return Err(invalid(
                        command,
                        format!("{} descriptors for {count} sub-indexes", eventfds.len()),
                    ));
                }
                let per_message = self.shared.negotiated.max_msg_fds as usize;
                if per_message == 0 {
                    return Err(invalid(command, "the server accepts no file descriptors"));
                }
                let mut first = start;
                for chunk in eventfds.chunks(per_message) {
                    self.set_irqs_once(index, flags, first, chunk.len() as u32, chunk)?;
                    first += chunk.len() as u32;
                }
                return Ok(());
            }
            _ => {}
        }
        self.set_irqs_once(index, flags, start, count, &[])
    }

    fn set_irqs_once(
        &self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        let command = Command::DeviceSetIrqs;
        let request = IrqSet {
            flags,
            index,
            start,
            count,
            data: Vec::new(),
        };
        let bytes = request.to_bytes().map_err(|e| invalid(command, e))?;
        self.call(command, &bytes, fds, |msg| {
            NoPayload::parse(&msg.payload).map_err(|e| e.to_string())?;
            Ok(())
        })
    }

    /// `VFIO_USER_DEVICE_RESET`.
    pub fn reset(&self) -> Result<(), ClientError> {
        self.call(Command::DeviceReset, &[], &[], |msg| {
            NoPayload::parse(&msg.payload).map_err(|e| e.to_string())?;
            Ok(())
        })
    }

    /// Sends one request and decodes its reply with `decode`, under the lock. A decoding
    /// failure is a protocol violation and breaks the connection.
    fn call<T>(
        &self,
        command: Command,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        decode: impl FnOnce(Message) -> Result<T, String>,
    ) -> Result<T, ClientError> {
        let limits = RecvLimits::for_transfers(CLIENT_MAX_DATA_XFER_SIZE, CLIENT_MAX_MSG_FDS);
        let mut session = self.lock();
        let reply = session.transact(command, payload, fds, self.shared.timeout, limits)?;
        decode(reply)
            .map_err(|reason| session.break_with(ClientError::Protocol { command, reason }))
    }

    /// Breaks the connection for a protocol violation found outside [`Self::call`].
    fn violation(&self, command: Command, reason: String) -> ClientError {
        self.lock()
            .break_with(ClientError::Protocol { command, reason })
    }

    fn lock(&self) -> MutexGuard<'_, Session> {
        self.shared.lock()
    }
}

/// The first of at most `max` descriptors (the others are closed).
fn first_fd(fds: Vec<OwnedFd>, max: usize) -> Result<Option<OwnedFd>, String> {
    if fds.len() > max {
        return Err(format!(
            "{} file descriptors, at most {max} expected",
            fds.len()
        ));
    }
    Ok(fds.into_iter().next())
}

fn check_span(command: Command, offset: u64, len: usize) -> Result<(), ClientError> {
    if offset.checked_add(len as u64).is_none() {
        return Err(invalid(command, "offset + length overflows"));
    }
    Ok(())
}

/// An [`ClientError::InvalidArgument`] for `command`.
fn invalid(command: Command, reason: impl ToString) -> ClientError {
    ClientError::InvalidArgument {
        command,
        reason: reason.to_string(),
    }
}
