//! [`PfClient`]: a blocking client of a PF agent's socket. One request is in flight at a
//! time (a mutex around the connection) and every call has a deadline. After a timeout, a
//! dead peer or a malformed response the connection can no longer be trusted to pair
//! responses with requests, so the client marks itself broken and later calls fail
//! at once with [`PfError::Broken`].

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::proto::{
    ErrorKind, QuiesceReport, Request, Response, Stats, VfState, MAX_RESPONSE_LINE,
};

/// The timeout [`PfClient::connect`] callers usually want.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// What failed in a call.
#[derive(Debug, thiserror::Error)]
pub enum PfError {
    /// The socket could not be connected.
    #[error("connecting to the PF socket {path} failed: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
    /// No (complete) response within the timeout.
    #[error("PF request {op} got no response within {timeout:?}")]
    Timeout {
        /// The request.
        op: &'static str,
        /// The timeout.
        timeout: Duration,
    },
    /// The server closed the connection.
    #[error("PF request {op}: the server closed the connection")]
    PeerClosed {
        /// The request.
        op: &'static str,
    },
    /// Sending or receiving failed.
    #[error("PF request {op}: {source}")]
    Io {
        /// The request.
        op: &'static str,
        /// The system error.
        source: io::Error,
    },
    /// The response is not JSON, not a response, or not the one the request calls for.
    #[error("PF request {op}: malformed response: {reason}")]
    Malformed {
        /// The request.
        op: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The server answered with an error.
    #[error("PF request {op} failed ({kind:?}): {message}")]
    Device {
        /// The request.
        op: &'static str,
        /// The kind of error.
        kind: ErrorKind,
        /// The server's message.
        message: String,
    },
    /// An earlier failure left the connection unusable.
    #[error("PF request {op} not sent: the connection broke earlier ({why})")]
    Broken {
        /// The request.
        op: &'static str,
        /// The earlier failure.
        why: String,
    },
}

#[derive(Debug)]
struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    broken: Option<String>,
}

/// A connection to a PF agent's socket.
#[derive(Debug)]
pub struct PfClient {
    conn: Mutex<Conn>,
    timeout: Duration,
}

impl PfClient {
    /// Connects to `path`; every call on the client then waits at most `timeout`
    /// (connecting to a Unix socket itself does not wait).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, PfError> {
        let connect_err = |source| PfError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        let writer = stream.try_clone().map_err(connect_err)?;
        Ok(PfClient {
            conn: Mutex::new(Conn {
                reader: BufReader::new(stream),
                writer,
                broken: None,
            }),
            timeout,
        })
    }

    fn conn(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The timeout of every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `request` and returns the server's response, whatever it is (an error
    /// response is `Ok` here; the typed methods turn it into [`PfError::Device`], and a
    /// response of the wrong type into [`PfError::Malformed`], which breaks the client).
    pub fn call(&self, request: &Request) -> Result<Response, PfError> {
        let op = request.op();
        let mut line = serde_json::to_vec(request).map_err(|e| PfError::Malformed {
            op,
            reason: format!("the request could not be encoded: {e}"),
        })?;
        line.push(b'\n');
        let mut conn = self.conn();
        if let Some(why) = &conn.broken {
            return Err(PfError::Broken {
                op,
                why: why.clone(),
            });
        }
        let result = self.exchange(&mut conn, op, &line);
        if let Err(e) = &result {
            conn.broken = Some(e.to_string());
        }
        result
    }

    fn exchange(
        &self,
        conn: &mut MutexGuard<'_, Conn>,
        op: &'static str,
        line: &[u8],
    ) -> Result<Response, PfError> {
        let deadline = Instant::now() + self.timeout;
        let timeout = self.timeout;
        let io_err = |source: io::Error| match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => PfError::Timeout { op, timeout },
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                PfError::PeerClosed { op }
            }
            _ => PfError::Io { op, source },
        };
        let left = |deadline: Instant| {
            let d = deadline.saturating_duration_since(Instant::now());
            if d.is_zero() {
                Err(PfError::Timeout { op, timeout })
            } else {
                Ok(d)
            }
        };
        conn.writer
            .set_write_timeout(Some(left(deadline)?))
            .map_err(io_err)?;
        conn.writer.write_all(line).map_err(io_err)?;
        let mut reply = Vec::new();
        loop {
            conn.reader
                .get_ref()
                .set_read_timeout(Some(left(deadline)?))
                .map_err(io_err)?;
            let buf = match conn.reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(e)),
            };
            if buf.is_empty() {
                return Err(PfError::PeerClosed { op });
            }
            let (chunk, used, done) = match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (&buf[..i], i + 1, true),
                None => (buf, buf.len(), false),
            };
            reply.extend_from_slice(chunk);
            conn.reader.consume(used);
            if reply.len() > MAX_RESPONSE_LINE {
                return Err(PfError::Malformed {
                    op,
                    reason: format!("the response is longer than {MAX_RESPONSE_LINE} bytes"),
                });
            }
            if done {
                break;
            }
        }
        serde_json::from_slice(&reply).map_err(|e| PfError::Malformed {
            op,
            reason: format!(
                "{e} in {:?}",
                String::from_utf8_lossy(&reply[..reply.len().min(200)])
            ),
        })
    }

    /// Sends `request` and hands the response to `pick`, which takes the expected kind.
    fn expect<T>(
        &self,
        request: &Request,
        pick: impl FnOnce(Response) -> Result<T, Box<Response>>,
    ) -> Result<T, PfError> {
        let op = request.op();
        match pick(self.call(request)?).map_err(|r| *r) {
            Ok(v) => Ok(v),
            Err(Response::Error { kind, message }) => Err(PfError::Device { op, kind, message }),
            Err(other) => {
                // A server answering something else may be answering another request.
                let e = PfError::Malformed {
                    op,
                    reason: format!("unexpected response {other:?}"),
                };
                self.conn().broken = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn expect_ok(&self, request: &Request) -> Result<(), PfError> {
        self.expect(request, |r| match r {
            Response::Ok => Ok(()),
            other => Err(Box::new(other)),
        })
    }

    /// The function's full state.
    pub fn get_state(&self) -> Result<VfState, PfError> {
        self.expect(&Request::GetState, |r| match r {
            Response::State { state } => Ok(state),
            other => Err(Box::new(other)),
        })
    }

    /// Loads `state` (the device must be quiesced or not started); the device stays
    /// quiesced until [`PfClient::resume`].
    pub fn set_state(&self, state: &VfState) -> Result<(), PfError> {
        self.expect_ok(&Request::SetState {
            state: state.clone(),
        })
    }

    /// Stops taking requests; returns once none is in flight.
    pub fn quiesce(&self) -> Result<QuiesceReport, PfError> {
        self.expect(&Request::Quiesce, |r| match r {
            Response::Quiesced(q) => Ok(q),
            other => Err(Box::new(other)),
        })
    }

    /// Continues processing.
    pub fn resume(&self) -> Result<(), PfError> {
        self.expect_ok(&Request::Resume)
    }

    /// Starts the DMA write log.
    pub fn dma_log_start(&self) -> Result<(), PfError> {
        self.expect_ok(&Request::DmaLogStart)
    }

    /// The guest pages the device wrote since the start or the previous take.
    pub fn dma_log_take(&self) -> Result<Vec<u64>, PfError> {
        self.expect(&Request::DmaLogTake, |r| match r {
            Response::DmaLog { pages } => Ok(pages),
            other => Err(Box::new(other)),
        })
    }

    /// Stops the DMA write log.
    pub fn dma_log_stop(&self) -> Result<(), PfError> {
        self.expect_ok(&Request::DmaLogStop)
    }

    /// Counters and modes.
    pub fn stats(&self) -> Result<Stats, PfError> {
        self.expect(&Request::Stats, |r| match r {
            Response::Stats(s) => Ok(s),
            other => Err(Box::new(other)),
        })
    }
}
