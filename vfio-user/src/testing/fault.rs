//! Scripted faults: how the fake server departs from the device's well-behaved answers.
//!
//! A [`Fault`] picks client commands (a command, optionally only the `n`-th of them)
//! and says what happens around them: commands sent to the client before the reply
//! ([`Inject`], e.g. a `DMA_READ`), what the client gets instead of the device's reply
//! (an error, another payload, a rewritten reply, raw bytes, nothing), commands after
//! the reply, and whether the server then closes the connection or stops reading. The
//! device itself still receives every command; only what reaches the client changes.

use std::fmt;
use std::os::fd::OwnedFd;

use crate::proto::{
    Command, DmaAccess, DmaAccessData, Header, RegionInfoReply, RegionInfoRequest, RegionType,
    HEADER_SIZE,
};
use crate::socket::Message;

/// A reply on its way to the client, as a [`Fault::rewrite`] may change it. Its header's
/// `msg_size` is set from the payload when it is sent (a lying size needs
/// [`Fault::raw`]).
#[derive(Debug)]
pub struct Outgoing {
    /// The header (message ID, command, flags, errno).
    pub header: Header,
    /// The payload.
    pub payload: Vec<u8>,
    /// Descriptors sent with it.
    pub fds: Vec<OwnedFd>,
}

impl Outgoing {
    /// A successful reply to `request` with `payload` and no descriptors.
    pub fn success(request: &Header, payload: Vec<u8>) -> Self {
        Outgoing {
            header: Header {
                msg_id: request.msg_id,
                command: request.command,
                msg_size: 0,
                flags: crate::proto::FLAGS_TYPE_REPLY,
                error: 0,
            },
            payload,
            fds: Vec::new(),
        }
    }
}

/// A message the fake server sends to the client on its own: a command (the client's
/// reply to it is awaited and recorded, unless it is sent with *No_reply*), or anything
/// else a test needs the client to receive (e.g. a reply nobody asked for).
#[derive(Debug, Clone)]
pub struct Inject {
    pub(crate) header: Header,
    pub(crate) payload: Vec<u8>,
}

impl Inject {
    /// `command` with message ID `id` and `payload`.
    pub fn command(id: u16, command: Command, payload: Vec<u8>) -> Self {
        let header = Header {
            msg_id: id,
            command: command as u16,
            msg_size: 0,
            flags: crate::proto::FLAGS_TYPE_COMMAND,
            error: 0,
        };
        Inject::message(header, payload)
    }

    /// `DMA_READ` of `count` bytes at `address`.
    pub fn dma_read(id: u16, address: u64, count: u64) -> Self {
        Inject::command(
            id,
            Command::DmaRead,
            DmaAccess { address, count }.to_bytes(),
        )
    }

    /// `DMA_WRITE` of `data` at `address`.
    pub fn dma_write(id: u16, address: u64, data: &[u8]) -> Self {
        let payload = DmaAccessData {
            address,
            data: data.to_vec(),
        }
        .to_bytes();
        Inject::command(id, Command::DmaWrite, payload)
    }

    /// Any message: `header` (its `msg_size` is set from `payload`) and `payload`.
    pub fn message(header: Header, payload: Vec<u8>) -> Self {
        let msg_size = u32::try_from(HEADER_SIZE + payload.len()).unwrap_or(u32::MAX);
        Inject {
            header: Header { msg_size, ..header },
            payload,
        }
    }

    /// Whether the client is expected to answer it.
    pub(crate) fn wants_reply(&self) -> bool {
        !self.header.is_reply() && !self.header.no_reply()
    }
}

/// Changes a reply, given the request.
type RewriteFn = Box<dyn FnMut(&Message, &mut Outgoing) + Send>;
/// The raw bytes to send for a request with this header.
type RawFn = Box<dyn FnMut(&Header) -> Vec<u8> + Send>;

/// What the client gets in place of the device's reply.
pub(crate) enum Reply {
    /// The device's reply.
    Forward,
    /// An error reply with this errno.
    Error(i32),
    /// The device's reply (or, for a command sent without wanting one, an empty success),
    /// changed.
    Rewrite(RewriteFn),
    /// These bytes, written as they are.
    Raw(RawFn),
    /// Nothing.
    Nothing,
}

/// What the server does once the command is dealt with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Then {
    /// Goes on.
    Continue,
    /// Shuts the connection down.
    Close,
    /// Stops reading until [`FakeServer::release`](super::FakeServer::release) (or its
    /// drop), then closes.
    Stall,
}

/// One scripted fault.
pub struct Fault {
    pub(crate) command: Option<Command>,
    pub(crate) region: Option<u32>,
    pub(crate) nth: Option<usize>,
    pub(crate) before: Vec<Inject>,
    pub(crate) reply: Reply,
    pub(crate) after: Vec<Inject>,
    pub(crate) then: Then,
}

impl fmt::Debug for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fault")
            .field("command", &self.command)
            .field("region", &self.region)
            .field("nth", &self.nth)
            .field("then", &self.then)
            .finish_non_exhaustive()
    }
}

impl Fault {
    /// Every `command` from the client (answered as usual until told otherwise).
    pub fn on(command: Command) -> Self {
        Fault {
            command: Some(command),
            region: None,
            nth: None,
            before: Vec::new(),
            reply: Reply::Forward,
            after: Vec::new(),
            then: Then::Continue,
        }
    }

    /// Every command from the client, whatever it is (with [`Fault::nth`]: "after `n`
    /// messages").
    pub fn any() -> Self {
        Fault {
            command: None,
            ..Fault::on(Command::Version)
        }
    }

    /// Every `DEVICE_GET_REGION_INFO` of region `index`.
    pub fn on_region_info(index: u32) -> Self {
        Fault {
            region: Some(index),
            ..Fault::on(Command::DeviceGetRegionInfo)
        }
    }

    /// Only the `n`-th (from 0) of the commands picked.
    pub fn nth(mut self, n: usize) -> Self {
        self.nth = Some(n);
        self
    }

    /// Answers with an error reply with `errno` (0 included).
    pub fn error(mut self, errno: i32) -> Self {
        self.reply = Reply::Error(errno);
        self
    }

    /// Answers with a successful reply carrying `payload`.
    pub fn reply(self, payload: Vec<u8>) -> Self {
        self.reply_with(move |_| payload.clone())
    }

    /// Answers with a successful reply carrying what `make` returns for the request.
    pub fn reply_with(self, mut make: impl FnMut(&Message) -> Vec<u8> + Send + 'static) -> Self {
        self.rewrite(move |request, out| {
            *out = Outgoing::success(&request.header, make(request));
        })
    }

    /// Changes the device's reply before it is sent (the request is given too).
    pub fn rewrite(mut self, f: impl FnMut(&Message, &mut Outgoing) + Send + 'static) -> Self {
        self.reply = Reply::Rewrite(Box::new(f));
        self
    }

    /// Writes what `bytes` returns for the request's header instead of a reply: for
    /// messages no server would send (garbage, a lying size, half a message).
    pub fn raw(mut self, bytes: impl FnMut(&Header) -> Vec<u8> + Send + 'static) -> Self {
        self.reply = Reply::Raw(Box::new(bytes));
        self
    }

    /// Does not answer.
    pub fn silent(mut self) -> Self {
        self.reply = Reply::Nothing;
        self
    }

    /// Adds the region type capability (`VFIO_REGION_INFO_CAP_TYPE`) to a region
    /// information reply, which the crate's server never sends (e.g. type 3, subtype 1:
    /// libvfio-user 0.1's v1 migration region).
    pub fn region_type(self, type_: u32, subtype: u32) -> Self {
        self.rewrite(move |request, out| {
            let (Ok(query), Ok(mut info)) = (
                RegionInfoRequest::parse(&request.payload),
                RegionInfoReply::parse(&out.payload),
            ) else {
                return;
            };
            info.region_type = Some(RegionType { type_, subtype });
            if let Ok(bytes) = info.to_bytes_within(query.argsz) {
                out.payload = bytes;
            }
        })
    }

    /// Sends `injects` to the client before the reply, each answered before the next.
    pub fn before(mut self, injects: impl IntoIterator<Item = Inject>) -> Self {
        self.before.extend(injects);
        self
    }

    /// Sends `injects` to the client after the reply, each answered before the next.
    pub fn after(mut self, injects: impl IntoIterator<Item = Inject>) -> Self {
        self.after.extend(injects);
        self
    }

    /// Then shuts the connection down (with [`Fault::silent`]: dies mid-request).
    pub fn then_close(mut self) -> Self {
        self.then = Then::Close;
        self
    }

    /// Then stops reading, the connection open, until
    /// [`FakeServer::release`](super::FakeServer::release); then closes.
    pub fn then_stall(mut self) -> Self {
        self.then = Then::Stall;
        self
    }

    /// Whether the fault is about `msg` at all (before counting).
    pub(crate) fn picks(&self, msg: &Message) -> bool {
        if self
            .command
            .is_some_and(|c| msg.header.known_command() != Some(c))
        {
            return false;
        }
        match self.region {
            None => true,
            Some(index) => RegionInfoRequest::parse(&msg.payload).is_ok_and(|q| q.index == index),
        }
    }
}
