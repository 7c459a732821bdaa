//! The relay: a thread between the client and the crate's server (which serves the fake
//! device) that applies the [`Fault`]s. It handles one client message at a time: records
//! it, forwards a command to the server and waits for the server's reply, then does what
//! the fault picking the command says. The server only ever answers, so no message from
//! it is lost while the relay is busy with the client.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::fault::{Fault, Inject, Outgoing, Reply, Then};
use super::transcript::Received;
use super::FakeError;
use crate::proto::{Header, HEADER_SIZE};
use crate::socket::{Channel, Message, RecvLimits, SocketError, MAX_FDS_PER_MESSAGE};

/// How long the relay waits for the server's reply or the client's.
const PATIENCE: Duration = Duration::from_secs(10);

/// Generous limits for both peers (transfers of up to 4 MiB).
fn limits() -> RecvLimits {
    RecvLimits::for_transfers(4 << 20, MAX_FDS_PER_MESSAGE as u32)
}

fn soon() -> Instant {
    Instant::now() + PATIENCE
}

/// What to do after a message.
enum Flow {
    Continue,
    Close,
    Stall,
    /// The client went away.
    Gone,
}

/// The relay's state.
pub(crate) struct Relay {
    client: Channel,
    /// The client's socket again, for raw bytes.
    client_raw: UnixStream,
    server: Channel,
    faults: Vec<Fault>,
    /// How many commands each fault has picked so far.
    picked: Vec<usize>,
    transcript: Arc<Mutex<Vec<Received>>>,
    release: mpsc::Receiver<()>,
}

impl Relay {
    pub(crate) fn new(
        client: UnixStream,
        server: UnixStream,
        faults: Vec<Fault>,
        transcript: Arc<Mutex<Vec<Received>>>,
        release: mpsc::Receiver<()>,
    ) -> Result<Self, FakeError> {
        let client_raw = client.try_clone().map_err(FakeError::Socket)?;
        Ok(Relay {
            client: Channel::new(client),
            client_raw,
            server: Channel::new(server),
            picked: vec![0; faults.len()],
            faults,
            transcript,
            release,
        })
    }

    /// Relays until the client goes away (`Ok`), a fault closes the connection (`Ok`),
    /// or a socket fails.
    pub(crate) fn run(mut self) -> Result<(), FakeError> {
        loop {
            let Some(msg) = self.next()? else {
                return Ok(());
            };
            match self.handle(msg)? {
                Flow::Continue => {}
                Flow::Gone => return Ok(()),
                Flow::Close => break,
                Flow::Stall => {
                    // Returns when released or when the FakeServer is dropped.
                    let _ = self.release.recv();
                    break;
                }
            }
        }
        self.client.shutdown();
        Ok(())
    }

    /// The next message from the client (`None`: it went away), waiting as long as it
    /// takes for one to begin.
    fn next(&self) -> Result<Option<Message>, FakeError> {
        let waited = self
            .client
            .wait_readable(None)
            .and_then(|()| self.client.recv(limits(), soon()));
        match waited {
            Ok(msg) => Ok(Some(msg)),
            Err(SocketError::Disconnected) => Ok(None),
            Err(error) => Err(FakeError::Relay {
                what: "receiving from the client",
                error,
            }),
        }
    }

    fn handle(&mut self, msg: Message) -> Result<Flow, FakeError> {
        self.record(&msg);
        if msg.header.is_reply() {
            // A late reply to an injected command: recorded, nothing else to do.
            return Ok(Flow::Continue);
        }
        let fault = self.pick(&msg);
        let Some(reply) = self.forward(&msg)? else {
            return Ok(Flow::Close);
        };
        let Some(i) = fault else {
            return Ok(match reply {
                Some(out) => self.send(out)?,
                None => Flow::Continue,
            });
        };
        let before = self.faults[i].before.clone();
        match self.inject(&before)? {
            Flow::Continue => {}
            other => return Ok(other),
        }
        let sent = match &mut self.faults[i].reply {
            Reply::Forward => reply,
            Reply::Error(errno) => Some(Outgoing {
                header: Header::error_reply(&msg.header, *errno),
                payload: Vec::new(),
                fds: Vec::new(),
            }),
            Reply::Rewrite(f) => {
                let mut out = reply.unwrap_or_else(|| Outgoing::success(&msg.header, Vec::new()));
                f(&msg, &mut out);
                Some(out)
            }
            Reply::Raw(f) => {
                let bytes = f(&msg.header);
                if let Flow::Gone = self.write_raw(&bytes)? {
                    return Ok(Flow::Gone);
                }
                None
            }
            Reply::Nothing => None,
        };
        if let Some(out) = sent {
            if let Flow::Gone = self.send(out)? {
                return Ok(Flow::Gone);
            }
        }
        let after = self.faults[i].after.clone();
        match self.inject(&after)? {
            Flow::Continue => {}
            other => return Ok(other),
        }
        Ok(match self.faults[i].then {
            Then::Continue => Flow::Continue,
            Then::Close => Flow::Close,
            Then::Stall => Flow::Stall,
        })
    }

    fn record(&self, msg: &Message) {
        self.transcript
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Received::of(msg));
    }

    /// The first fault whose count says this command is its turn; every fault that
    /// picks the command counts it.
    fn pick(&mut self, msg: &Message) -> Option<usize> {
        let mut chosen = None;
        for (i, fault) in self.faults.iter().enumerate() {
            if !fault.picks(msg) {
                continue;
            }
            let n = self.picked[i];
            self.picked[i] += 1;
            if chosen.is_none() && fault.nth.is_none_or(|want| want == n) {
                chosen = Some(i);
            }
        }
        chosen
    }

    /// Hands the command to the server; returns its reply (`Some(None)` for a command
    /// sent without wanting one), or `None` when the server has gone (it closes after
    /// refusing a version, or a message too large).
    fn forward(&self, msg: &Message) -> Result<Option<Option<Outgoing>>, FakeError> {
        let fds: Vec<BorrowedFd<'_>> = msg.fds.iter().map(|fd| fd.as_fd()).collect();
        match self.server.send(&msg.header, &msg.payload, &fds, soon()) {
            Ok(()) => {}
            Err(SocketError::Disconnected) => return Ok(None),
            Err(error) => {
                return Err(FakeError::Relay {
                    what: "forwarding to the server",
                    error,
                })
            }
        }
        if msg.header.no_reply() {
            return Ok(Some(None));
        }
        match self.server.recv(limits(), soon()) {
            Ok(reply) => Ok(Some(Some(Outgoing {
                header: reply.header,
                payload: reply.payload,
                fds: reply.fds,
            }))),
            Err(SocketError::Disconnected) => Ok(None),
            Err(error) => Err(FakeError::Relay {
                what: "receiving the server's reply",
                error,
            }),
        }
    }

    /// Sends `out` to the client.
    fn send(&self, out: Outgoing) -> Result<Flow, FakeError> {
        let msg_size = u32::try_from(HEADER_SIZE + out.payload.len()).unwrap_or(u32::MAX);
        let header = Header {
            msg_size,
            ..out.header
        };
        let fds: Vec<BorrowedFd<'_>> = out.fds.iter().map(|fd| fd.as_fd()).collect();
        match self.client.send(&header, &out.payload, &fds, soon()) {
            Ok(()) => Ok(Flow::Continue),
            Err(SocketError::Disconnected) => Ok(Flow::Gone),
            Err(error) => Err(FakeError::Relay {
                what: "sending to the client",
                error,
            }),
        }
    }

    fn write_raw(&self, bytes: &[u8]) -> Result<Flow, FakeError> {
        match (&self.client_raw).write_all(bytes) {
            Ok(()) => Ok(Flow::Continue),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(Flow::Gone)
            }
            Err(e) => Err(FakeError::Socket(e)),
        }
    }

    /// Sends each of `injects` and, for a command, waits for the client's reply before
    /// the next. Client commands that come meanwhile are handled as usual (the
    /// transcript shows the order).
    fn inject(&mut self, injects: &[Inject]) -> Result<Flow, FakeError> {
        for inject in injects {
            let out = Outgoing {
                header: inject.header,
                payload: inject.payload.clone(),
                fds: Vec::new(),
            };
            if let Flow::Gone = self.send(out)? {
                return Ok(Flow::Gone);
            }
            if !inject.wants_reply() {
                continue;
            }
            let id = inject.header.msg_id;
            let deadline = Instant::now() + PATIENCE;
            loop {
                let ready = self.client.wait_readable(Some(deadline));
                if let Err(SocketError::Timeout) = ready {
                    tracing::warn!(id, "the client did not answer an injected command");
                    break;
                }
                let Some(msg) = self.next()? else {
                    return Ok(Flow::Gone);
                };
                if msg.header.is_reply() && msg.header.msg_id == id {
                    self.record(&msg);
                    break;
                }
                match self.handle(msg)? {
                    Flow::Continue => {}
                    other => return Ok(other),
                }
            }
        }
        Ok(Flow::Continue)
    }
}
