//! The host side of the agent protocol: [`Agent`], a client over any byte stream pair.
//!
//! A thread reads reply lines into a channel, so every call can wait with a timeout whatever
//! the transport (Unix socket to the VMM, pipes to a local `guest-agent --stdio`, ...).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;
use thiserror::Error;

use crate::agent::lines::{Line, LineReader};
use crate::agent::protocol::{
    self, BarTimeReply, BarTimeRequest, BlkRequest, BlkVerifyReply, BlkWriteReply, ChecksumReply,
    ChecksumRequest, MemCheckReply, MemFillReply, MemFillRequest, Op, PingReply, PokeReply,
    PokeRequest, ProtocolError, RefreshReply, RefreshRequest, Reply, RunOutput, RunRequest,
};

/// Timeout of a call unless changed with [`Agent::set_timeout`]: generous, the test guest is
/// slow (a 64 KiB reply alone takes ~13 s on its serial port).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest reply line accepted.
const MAX_REPLY_LINE: usize = 64 << 20;
/// Ignored lines remembered for error messages.
const STRAY_KEPT: usize = 5;

/// Why a call to the agent failed.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The Unix socket could not be connected or set up.
    #[error("cannot connect to the agent socket {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The request is not a JSON object with an `op`.
    #[error("invalid request: {0}")]
    Request(#[from] ProtocolError),
    /// Writing the request failed.
    #[error("sending `{op}` to the agent failed: {source}{context}")]
    Send {
        /// The op.
        op: String,
        /// The OS error.
        #[source]
        source: io::Error,
        /// Diagnostics (VM logs).
        context: String,
    },
    /// No reply in time.
    #[error("no reply to `{op}` (id {id}) within {timeout:?}{context}")]
    Timeout {
        /// The op.
        op: String,
        /// The request id.
        id: u64,
        /// The timeout.
        timeout: Duration,
        /// Ignored lines and diagnostics (VM logs).
        context: String,
    },
    /// The agent's stream ended.
    #[error("the agent connection closed{reason} while waiting for `{op}`{context}")]
    Closed {
        /// The op.
        op: String,
        /// Why, when known (e.g. ": connection reset").
        reason: String,
        /// Diagnostics (VM logs).
        context: String,
    },
    /// The agent replied with an error.
    #[error("the agent failed `{op}`: {message}")]
    Remote {
        /// The op.
        op: String,
        /// The agent's error message.
        message: String,
    },
    /// The agent replied ok with unexpected fields.
    #[error("unexpected reply to `{op}`: {reason}; reply: {reply}")]
    BadReply {
        /// The op.
        op: String,
        /// What does not fit.
        reason: String,
        /// The reply's fields.
        reply: String,
    },
    /// The host's random bytes for `refresh` could not be read.
    #[error("cannot read the host's /dev/urandom for `refresh`: {0}")]
    HostEntropy(#[source] io::Error),
}

impl AgentError {
    /// Whether this is a timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, AgentError::Timeout { .. })
    }

    /// The agent's message when it replied with an error.
    pub fn remote_message(&self) -> Option<&str> {
        match self {
            AgentError::Remote { message, .. } => Some(message),
            _ => None,
        }
    }
}

/// What the reader thread reports.
enum Event {
    Line(Vec<u8>),
    TooLong,
    Closed(Option<io::Error>),
}

/// A diagnostics source, called when an error may be explained by the VM's state.
type Context = Box<dyn Fn() -> String + Send>;

/// A request id no other request of this process had. Ids are unique across connections, not
/// per connection: a guest answers requests of an earlier connection to the same serial port
/// (e.g. pings sent while it booted) on the next one, and such a late reply must not match a
/// new request that reused its id (it did: a `run` got a ping's reply).
fn next_request_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A connection to a guest agent.
pub struct Agent {
    writer: Box<dyn Write + Send>,
    events: Receiver<Event>,
    closed: Option<String>,
    timeout: Duration,
    context: Option<Context>,
    socket: Option<UnixStream>,
    stray: VecDeque<String>,
}

impl Agent {
    /// A client reading replies from `reader` and writing requests to `writer` (e.g. the
    /// stdout and stdin of a `guest-agent --stdio` child).
    pub fn new<R, W>(reader: R, writer: W) -> Self
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let (tx, events) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = LineReader::new(reader, MAX_REPLY_LINE);
            loop {
                let event = match lines.next_line() {
                    Ok(Some(Line::Data(line))) => Event::Line(line),
                    Ok(Some(Line::TooLong)) => Event::TooLong,
                    Ok(None) => Event::Closed(None),
                    Err(e) => Event::Closed(Some(e)),
                };
                let last = matches!(event, Event::Closed(_));
                if tx.send(event).is_err() || last {
                    break;
                }
            }
        });
        Agent {
            writer: Box::new(writer),
            events,
            closed: None,
            timeout: DEFAULT_TIMEOUT,
            context: None,
            socket: None,
            stray: VecDeque::new(),
        }
    }

    /// A client over a connected Unix socket (shut down when the client is dropped).
    pub fn from_unix_stream(stream: UnixStream) -> Result<Self, AgentError> {
        let clone = |s: &UnixStream| {
            s.try_clone().map_err(|source| AgentError::Connect {
                path: peer_name(s),
                source,
            })
        };
        let reader = clone(&stream)?;
        let shutdown = clone(&stream)?;
        let mut agent = Agent::new(reader, stream);
        agent.socket = Some(shutdown);
        Ok(agent)
    }

    /// Connects to the agent behind the Unix socket at `path` (one attempt).
    pub fn connect(path: &Path) -> Result<Self, AgentError> {
        let stream = UnixStream::connect(path).map_err(|source| AgentError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Agent::from_unix_stream(stream)
    }

    /// Adds diagnostics to timeout and connection errors: `context` is called when such an
    /// error happens and its text appended to the message (e.g. the tail of the VM's logs).
    pub fn with_context<F: Fn() -> String + Send + 'static>(mut self, context: F) -> Self {
        self.context = Some(Box::new(context));
        self
    }

    /// Sets the timeout of calls that take none (default [`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The timeout of calls that take none.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `request` (a JSON object with `op` and its fields; the id is added) and returns
    /// the fields of the ok reply, with the default timeout.
    pub fn request(&mut self, request: Value) -> Result<Value, AgentError> {
        self.request_timeout(request, self.timeout)
    }

    /// [`Agent::request`] with an explicit timeout. Replies to other requests, replies with a
    /// null id (to lines the agent could not parse) and non-reply lines are skipped.
    pub fn request_timeout(
        &mut self,
        request: Value,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let op = request
            .get("op")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        let id = next_request_id();
        let line = protocol::encode_request(id, &request)?;
        if let Err(source) = self.send_raw(line.as_bytes()) {
            return Err(AgentError::Send {
                op,
                source,
                context: self.context_text(),
            });
        }
        self.wait_reply(&op, id, timeout)
    }

    /// Sends a typed op and decodes the reply as `T`.
    pub fn call<T: DeserializeOwned>(
        &mut self,
        op: &Op,
        timeout: Duration,
    ) -> Result<T, AgentError> {
        let name = op.name();
        let request = serde_json::to_value(op).map_err(|e| AgentError::BadReply {
            op: name.to_owned(),
            reason: format!("cannot encode the request: {e}"),
            reply: String::new(),
        })?;
        let reply = self.request_timeout(request, timeout)?;
        serde_json::from_value(reply.clone()).map_err(|e| AgentError::BadReply {
            op: name.to_owned(),
            reason: e.to_string(),
            reply: reply.to_string(),
        })
    }

    /// `ping`: kernel release, uptime and CPU count.
    pub fn ping(&mut self) -> Result<PingReply, AgentError> {
        self.ping_timeout(self.timeout)
    }

    /// `ping` with an explicit timeout.
    pub fn ping_timeout(&mut self, timeout: Duration) -> Result<PingReply, AgentError> {
        self.call(&Op::Ping, timeout)
    }

    /// Runs `argv` in the guest (no shell) with the agent's default 60 s timeout.
    pub fn run<S: AsRef<str>>(&mut self, argv: &[S]) -> Result<RunOutput, AgentError> {
        self.run_request(&RunRequest::new(argv))
    }

    /// Runs a program as described by `req`; the call waits for the request's timeout plus
    /// the client's.
    pub fn run_request(&mut self, req: &RunRequest) -> Result<RunOutput, AgentError> {
        let timeout = Duration::from_millis(req.timeout_ms()).saturating_add(self.timeout);
        self.call(&Op::Run(req.clone()), timeout)
    }

    /// Asks the guest to reboot; returns once the agent acknowledged (the VM then resets or,
    /// with `reboot=k` and no reboot support in the VMM, exits).
    pub fn reboot(&mut self) -> Result<(), AgentError> {
        self.call::<Value>(&Op::Reboot, self.timeout).map(drop)
    }

    /// Reads, writes (0xA5 / 0xA5A5A5A5) and reads back the given I/O ports and physical
    /// addresses in the guest.
    pub fn poke(&mut self, ports: &[u16], mmio: &[u64]) -> Result<PokeReply, AgentError> {
        let req = PokeRequest {
            ports: ports.to_vec(),
            mmio: mmio.to_vec(),
        };
        self.call(&Op::Poke(req), self.timeout)
    }

    /// Writes pattern blocks in the guest.
    pub fn blk_write(&mut self, req: &BlkRequest) -> Result<BlkWriteReply, AgentError> {
        self.call(&Op::BlkWrite(req.clone()), self.timeout)
    }

    /// Reads pattern blocks back in the guest and counts mismatches.
    pub fn blk_verify(&mut self, req: &BlkRequest) -> Result<BlkVerifyReply, AgentError> {
        self.call(&Op::BlkVerify(req.clone()), self.timeout)
    }

    /// Fills a `mib` MiB buffer kept by the agent (replacing any previous one).
    pub fn mem_fill(&mut self, mib: u64, seed: u64) -> Result<MemFillReply, AgentError> {
        self.call(&Op::MemFill(MemFillRequest { mib, seed }), self.timeout)
    }

    /// Sets the guest's wall clock to the host's and reseeds its kernel random generator
    /// with 32 bytes from the host's: the first request after a restore from a snapshot that
    /// other guests start from too.
    pub fn refresh(&mut self) -> Result<RefreshReply, AgentError> {
        let unix_time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut entropy = vec![0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut entropy))
            .map_err(AgentError::HostEntropy)?;
        let req = RefreshRequest {
            unix_time_ns,
            entropy,
        };
        self.call(&Op::Refresh(req), self.timeout)
    }

    /// Re-checksums the buffer of the last `mem_fill`.
    pub fn mem_check(&mut self) -> Result<MemCheckReply, AgentError> {
        self.call(&Op::MemCheck, self.timeout)
    }

    /// FNV-1a 64 of `len` bytes at `offset` of a guest file.
    pub fn checksum(
        &mut self,
        path: &str,
        offset: u64,
        len: u64,
    ) -> Result<ChecksumReply, AgentError> {
        let req = ChecksumRequest {
            path: path.to_owned(),
            offset,
            len,
        };
        self.call(&Op::Checksum(req), self.timeout)
    }

    /// Times 32-bit writes at `offsets` of the mapped file `path` and to RAM (see
    /// [`crate::agent::bar_time`]).
    pub fn bar_time(
        &mut self,
        path: &str,
        offsets: &[u64],
        count: u64,
    ) -> Result<BarTimeReply, AgentError> {
        let req = BarTimeRequest {
            path: path.to_owned(),
            offsets: offsets.to_vec(),
            count,
        };
        self.call(&Op::BarTime(req), self.timeout)
    }

    /// Writes raw bytes to the agent, for robustness tests (garbage, partial lines).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)?;
        self.writer.flush()
    }

    /// The next reply line whatever its id (non-reply lines are skipped), for robustness tests.
    pub fn next_reply(&mut self, timeout: Duration) -> Result<Reply, AgentError> {
        let deadline = deadline_after(timeout);
        loop {
            let line = self.next_line("(any reply)", 0, timeout, deadline)?;
            if let Some(reply) = protocol::parse_reply(&line) {
                return Ok(reply);
            }
            self.note_stray(&line);
        }
    }

    fn wait_reply(&mut self, op: &str, id: u64, timeout: Duration) -> Result<Value, AgentError> {
        let deadline = deadline_after(timeout);
        loop {
            let line = self.next_line(op, id, timeout, deadline)?;
            match protocol::parse_reply(&line) {
                Some(Reply {
                    id: Some(got),
                    result,
                }) if got == id => {
                    return result.map_err(|message| AgentError::Remote {
                        op: op.to_owned(),
                        message,
                    })
                }
                _ => self.note_stray(&line),
            }
        }
    }

    /// The next line from the reader thread before `deadline`.
    fn next_line(
        &mut self,
        op: &str,
        id: u64,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<Vec<u8>, AgentError> {
        loop {
            if let Some(reason) = &self.closed {
                return Err(AgentError::Closed {
                    op: op.to_owned(),
                    reason: reason.clone(),
                    context: self.context_text(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::Line(line)) => return Ok(line),
                Ok(Event::TooLong) => self.note_stray(b"(a line longer than 64 MiB)"),
                Ok(Event::Closed(error)) => {
                    self.closed = Some(error.map(|e| format!(": {e}")).unwrap_or_default());
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.closed = Some(": the reader thread ended".to_owned());
                }
                Err(RecvTimeoutError::Timeout) => {
                    let mut context = String::new();
                    if !self.stray.is_empty() {
                        context.push_str("\nlines ignored meanwhile:");
                        for s in &self.stray {
                            let _ = write!(context, "\n  {s}");
                        }
                    }
                    context.push_str(&self.context_text());
                    return Err(AgentError::Timeout {
                        op: op.to_owned(),
                        id,
                        timeout,
                        context,
                    });
                }
            }
        }
    }

    fn note_stray(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let mut text: String = text.chars().take(200).collect();
        if line.len() > text.len() {
            text.push_str("...");
        }
        if self.stray.len() == STRAY_KEPT {
            self.stray.pop_front();
        }
        self.stray.push_back(text);
    }

    fn context_text(&self) -> String {
        self.context.as_ref().map(|f| f()).unwrap_or_default()
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("timeout", &self.timeout)
            .field("closed", &self.closed)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(socket) = &self.socket {
            // Ends the reader thread.
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

/// `timeout` from now, capped so that absurd timeouts cannot overflow the clock.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    Instant::now() + timeout.min(FOREVER)
}

fn peer_name(stream: &UnixStream) -> String {
    stream
        .peer_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
        .unwrap_or_else(|| "(unnamed socket)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::server::Server;
    use serde_json::json;
    use std::os::unix::net::UnixStream;

    /// An agent served in-process over a socket pair.
    fn local_agent() -> Agent {
        let (host, guest) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let reader = guest.try_clone().unwrap();
            let _ = Server::new(false).serve(reader, guest);
        });
        Agent::from_unix_stream(host).unwrap()
    }

    #[test]
    fn typed_calls() {
        let mut agent = local_agent();
        assert!(agent.ping().unwrap().cpus >= 1);
        assert!(agent.ping_timeout(Duration::MAX).is_ok());
        let out = agent.run(&["sh", "-c", "echo hi; exit 3"]).unwrap();
        assert_eq!((out.status, out.stdout.as_str()), (Some(3), "hi\n"));
        let v = agent.request(json!({"op": "ping"})).unwrap();
        assert!(v["kernel"].is_string());
        let e = agent.request(json!({"op": "fly"})).unwrap_err();
        assert!(e.remote_message().unwrap().contains("unknown op"), "{e}");
        assert!(matches!(
            agent.request(json!({"nop": 1})),
            Err(AgentError::Request(_))
        ));
    }

    #[test]
    fn skips_stray_lines_and_times_out_with_them() {
        let (host, guest) = UnixStream::pair().unwrap();
        let mut agent = Agent::from_unix_stream(host)
            .unwrap()
            .with_context(|| "\n[ctx]".to_owned());
        let mut g = guest.try_clone().unwrap();
        // The fake guest reads the request, then answers with stray lines first: an earlier
        // connection's reply (an id no request of this process has now), an error without
        // an id, a request echoed back, and then the reply.
        let mut r = guest.try_clone().unwrap();
        let answer = thread::spawn(move || {
            let mut line = Vec::new();
            let mut byte = [0u8];
            while r.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            let id = serde_json::from_slice::<Value>(&line).unwrap()["id"].clone();
            let stray = format!(
                "noise\n{{\"id\":{late},\"ok\":true}}\n{{\"id\":null,\"ok\":false,\"error\":\"x\"}}\n{{\"id\":{id},\"op\":\"ping\"}}\n{{\"id\":{id},\"ok\":true,\"kernel\":\"k\",\"uptime_ms\":1,\"cpus\":1}}\n",
                late = id.as_u64().unwrap() + 1_000_000,
            );
            g.write_all(stray.as_bytes()).unwrap();
            g
        });
        let ping = agent.ping_timeout(Duration::from_secs(5)).unwrap();
        let g = answer.join().unwrap();
        assert_eq!(ping.kernel, "k");
        let e = agent.ping_timeout(Duration::from_millis(100)).unwrap_err();
        assert!(e.is_timeout());
        let msg = e.to_string();
        assert!(msg.contains("noise") && msg.ends_with("[ctx]"), "{msg}");
        drop(g);
        drop(guest);
        let e = agent.ping_timeout(Duration::from_secs(5)).unwrap_err();
        // Either the write or the wait notices that the peer is gone.
        assert!(
            matches!(e, AgentError::Closed { .. } | AgentError::Send { .. }),
            "{e}"
        );
    }

    #[test]
    fn request_ids_are_unique_across_connections() {
        // A late reply from an earlier connection carries that connection's id: a new
        // connection's requests must never reuse it.
        let a = next_request_id();
        let b = next_request_id();
        assert!(b > a);
    }

    #[test]
    fn bad_reply_shape_is_reported() {
        let (host, guest) = UnixStream::pair().unwrap();
        let mut agent = Agent::from_unix_stream(host).unwrap();
        let mut g = guest;
        g.write_all(b"{\"id\":1,\"ok\":true,\"kernel\":5}\n")
            .unwrap();
        let e = agent.ping_timeout(Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, AgentError::BadReply { .. }), "{e}");
    }
}
