//! One request/reply exchange on the socket, and the broken state that a failed one
//! leaves behind.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use super::{invalid, ClientError};
use crate::proto::{Command, Header, FLAGS_NO_REPLY};
use crate::socket::{Channel, Message, RecvLimits, SocketError, MAX_FDS_PER_MESSAGE};

/// The connection's state, kept under the client's lock.
#[derive(Debug)]
pub(super) struct Session {
    pub(super) channel: Channel,
    pub(super) next_id: u16,
    pub(super) broken: Option<String>,
    /// Reused payload buffer of posted writes.
    pub(super) scratch: Vec<u8>,
}

impl Session {
    /// Sends a command and waits for its reply, answering server commands in between.
    pub(super) fn transact(
        &mut self,
        command: Command,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
        limits: RecvLimits,
    ) -> Result<Message, ClientError> {
        if let Some(reason) = &self.broken {
            return Err(ClientError::Broken {
                reason: reason.clone(),
            });
        }
        if fds.len() > MAX_FDS_PER_MESSAGE {
            return Err(invalid(command, "too many file descriptors"));
        }
        let id = self.next_id;
        self.next_id = id.wrapping_add(1);
        let header =
            Header::command(id, command, payload.len()).map_err(|e| invalid(command, e))?;
        let deadline = Instant::now() + timeout;
        tracing::trace!(%command, id, len = payload.len(), fds = fds.len(), "vfio-user request");
        if let Err(e) = self.channel.send(&header, payload, fds, deadline) {
            return Err(self.fail(command, timeout, e));
        }
        loop {
            let reply = match self.channel.recv(limits, deadline) {
                Ok(reply) => reply,
                Err(e) => return Err(self.fail(command, timeout, e)),
            };
            let h = reply.header;
            if !h.is_reply() {
                if let Err(e) = self.refuse(&h, deadline) {
                    return Err(self.fail(command, timeout, e));
                }
                continue;
            }
            if h.msg_id != id || h.command != command as u16 {
                return Err(self.break_with(ClientError::Protocol {
                    command,
                    reason: format!(
                        "reply has message ID {} and command {}, expected ID {id} and command {}",
                        h.msg_id, h.command, command as u16
                    ),
                }));
            }
            if h.is_error() {
                return Err(ClientError::Remote {
                    command,
                    errno: i32::try_from(h.error).unwrap_or(libc::EIO),
                });
            }
            return Ok(reply);
        }
    }

    /// Sends a command with the *No_reply* flag and returns once it is on the socket.
    /// A failure to send breaks the connection, as in [`Self::transact`].
    pub(super) fn post(
        &mut self,
        command: Command,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(), ClientError> {
        if let Some(reason) = &self.broken {
            return Err(ClientError::Broken {
                reason: reason.clone(),
            });
        }
        let id = self.next_id;
        self.next_id = id.wrapping_add(1);
        let mut header =
            Header::command(id, command, payload.len()).map_err(|e| invalid(command, e))?;
        header.flags |= FLAGS_NO_REPLY;
        tracing::trace!(%command, id, len = payload.len(), "vfio-user posted request");
        let deadline = Instant::now() + timeout;
        self.channel
            .send(&header, payload, &[], deadline)
            .map_err(|e| self.fail(command, timeout, e))
    }

    /// Answers a command from the server with `ENOTSUP` (none is supported).
    fn refuse(&mut self, request: &Header, deadline: Instant) -> Result<(), SocketError> {
        tracing::warn!(
            command = request.command,
            id = request.msg_id,
            "refusing a command from the vfio-user server: not supported"
        );
        if request.no_reply() {
            return Ok(());
        }
        let reply = Header::error_reply(request, libc::ENOTSUP);
        self.channel.send(&reply, &[], &[], deadline)
    }

    fn fail(&mut self, command: Command, timeout: Duration, e: SocketError) -> ClientError {
        let err = match e {
            SocketError::Timeout => ClientError::Timeout { command, timeout },
            SocketError::Disconnected => ClientError::Disconnected { command },
            SocketError::InvalidHeader(_)
            | SocketError::MessageTooLarge { .. }
            | SocketError::TooManyFds { .. } => ClientError::Protocol {
                command,
                reason: e.to_string(),
            },
            source => ClientError::Socket { command, source },
        };
        self.break_with(err)
    }

    /// Marks the connection broken (the first reason is kept) and shuts the socket down.
    pub(super) fn break_with(&mut self, err: ClientError) -> ClientError {
        if self.broken.is_none() {
            tracing::warn!(error = %err, "vfio-user connection broken");
            self.broken = Some(err.to_string());
            self.channel.shutdown();
        }
        err
    }
}
