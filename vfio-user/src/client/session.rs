//! One request/reply exchange on the socket, and the broken state that a failed one
//! leaves behind.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::requests::ServerRequests;
use super::{invalid, ClientError};
use crate::proto::{Command, Header, FLAGS_NO_REPLY};
use crate::socket::{Channel, Message, RecvLimits, SocketError, MAX_FDS_PER_MESSAGE};

/// What a request timed out waiting for while it was being sent.
const SENDING: &str = "the server to take the request";
/// What a request timed out waiting for once sent (a server command served meanwhile
/// included).
const REPLY: &str = "the reply";

/// The connection's state, kept under the client's lock.
pub(super) struct Session {
    pub(super) channel: Channel,
    pub(super) next_id: u16,
    pub(super) broken: Option<String>,
    /// Reused payload buffer of posted writes.
    pub(super) scratch: Vec<u8>,
    /// What serves the server's commands; without it they are refused (`ENOTSUP`).
    pub(super) handler: Option<Arc<dyn ServerRequests>>,
    /// The server, as named in logs (its socket path, when known).
    pub(super) name: String,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("channel", &self.channel)
            .field("next_id", &self.next_id)
            .field("broken", &self.broken)
            .field("handler", &self.handler.is_some())
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
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
            return Err(self.fail(command, timeout, SENDING, e));
        }
        loop {
            let reply = match self.recv_or_serve(limits, deadline) {
                Ok(Some(reply)) => reply,
                // A command from the server, served: the reply is still to come.
                Ok(None) => continue,
                Err(e) => return Err(self.fail(command, timeout, REPLY, e)),
            };
            let h = reply.header;
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
            .map_err(|e| self.fail(command, timeout, SENDING, e))
    }

    /// Receives the next message: a reply is returned, a command from the server is
    /// served (or refused, a too large one without reading it into memory) and `None`
    /// returned. Either way the stream stays in step.
    pub(super) fn recv_or_serve(
        &mut self,
        limits: RecvLimits,
        deadline: Instant,
    ) -> Result<Option<Message>, SocketError> {
        match self.channel.recv(limits, deadline) {
            Ok(m) if m.header.is_reply() => Ok(Some(m)),
            Ok(m) => self.serve(&m, deadline).map(|()| None),
            Err(SocketError::MessageTooLarge { header, .. }) if !header.is_reply() => {
                self.refuse_too_large(&header, deadline).map(|()| None)
            }
            Err(e) => Err(e),
        }
    }

    /// Breaks the connection for socket failure `e` of `command`, met while waiting for
    /// `waiting_for` ([`SENDING`] or [`REPLY`]).
    fn fail(
        &mut self,
        command: Command,
        timeout: Duration,
        waiting_for: &'static str,
        e: SocketError,
    ) -> ClientError {
        let err = match e {
            SocketError::Timeout => ClientError::Timeout {
                command,
                timeout,
                waiting_for,
            },
            SocketError::Disconnected => ClientError::Disconnected { command },
            SocketError::InvalidHeader(_)
            | SocketError::MessageTooLarge { .. }
            | SocketError::TooManyFds { .. } => ClientError::Protocol {
                command,
                reason: e.to_string(),
            },
            error => ClientError::Socket { command, error },
        };
        self.break_with(err)
    }

    /// Marks the connection broken (the first reason is kept), logs why and shuts the
    /// socket down.
    pub(super) fn break_with(&mut self, err: ClientError) -> ClientError {
        if self.broken.is_none() {
            tracing::error!("{}: closing the connection: {err}", self.name);
            self.broken = Some(err.to_string());
            self.channel.shutdown();
        }
        err
    }
}
