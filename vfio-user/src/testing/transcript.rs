//! [`Received`]: what the fake server got from the client, in order, for tests that
//! check what the client sent (and its replies to the commands sent to it).

use crate::proto::{Command, Header};
use crate::socket::Message;

/// One message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Its header.
    pub header: Header,
    /// Its payload.
    pub payload: Vec<u8>,
    /// How many descriptors came with it.
    pub fds: usize,
}

impl Received {
    pub(crate) fn of(msg: &Message) -> Self {
        Received {
            header: msg.header,
            payload: msg.payload.clone(),
            fds: msg.fds.len(),
        }
    }

    /// The command, if it is one this crate knows and not a reply.
    pub fn command(&self) -> Option<Command> {
        (!self.header.is_reply())
            .then(|| self.header.known_command())
            .flatten()
    }

    /// A reply's outcome: its payload, or the errno of an error reply.
    pub fn result(&self) -> Result<&[u8], u32> {
        if self.header.is_error() {
            Err(self.header.error)
        } else {
            Ok(&self.payload)
        }
    }

    /// A short description: the command's name, `reply N` for a reply to message `N`.
    pub fn describe(&self) -> String {
        if self.header.is_reply() {
            return format!("reply {}", self.header.msg_id);
        }
        match self.header.known_command() {
            Some(c) => format!("{c:?}"),
            None => format!("command {}", self.header.command),
        }
    }
}
