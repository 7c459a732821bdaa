//! The PF socket's server: a thread accepting connections, each served on its own
//! thread, one JSON request per line and one JSON response per line.
//!
//! Nothing a client sends can stop the server: a line that is not a request gets an
//! error response and the connection goes on; a line longer than
//! [`MAX_REQUEST_LINE`] is skipped up to its newline and answered with an error; a
//! client that stops reading its responses is dropped after [`WRITE_TIMEOUT`].

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use pf_protocol::proto::{ErrorKind, Request, Response, MAX_REQUEST_LINE};

use super::control::Controller;

/// Most connections served at once; more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a response may take to be written before the connection is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the thread that accepts connections on `listener` (see
/// [`crate::serve::bind`]) for as long as the process lives.
pub fn spawn(listener: UnixListener, controller: Controller) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("vfsim-pf".into())
        .spawn(move || accept_loop(&listener, &controller))
}

fn accept_loop(listener: &UnixListener, controller: &Controller) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut next_id = 0u64;
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::error!("accepting on the PF socket failed: {e}; retrying");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        next_id += 1;
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("PF connection refused: already {MAX_CONNECTIONS} connections");
            let mut s = stream;
            let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
            let _ = send(
                &mut s,
                &error(
                    ErrorKind::Refused,
                    format!("too many PF connections (at most {MAX_CONNECTIONS})"),
                ),
            );
            continue;
        }
        let (c, a, id) = (controller.clone(), active.clone(), next_id);
        let spawned = thread::Builder::new()
            .name(format!("vfsim-pf-{id}"))
            .spawn(move || {
                tracing::info!(id, "PF client connected");
                match serve_connection(stream, &c) {
                    Ok(()) => tracing::info!(id, "PF client disconnected"),
                    Err(e) => tracing::warn!(id, "PF connection dropped: {e}"),
                }
                a.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::AcqRel);
            tracing::error!("spawning a PF connection thread failed: {e}");
        }
    }
}

/// Serves one connection until the client closes it (`Ok`) or it breaks.
pub fn serve_connection(stream: UnixStream, controller: &Controller) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let response = match read_line(&mut reader, MAX_REQUEST_LINE)? {
            Line::Eof => return Ok(()),
            Line::TooLong(len) => error(
                ErrorKind::LineTooLong,
                format!(
                    "request line of {len} bytes or more is longer than the limit of {MAX_REQUEST_LINE}; skipped"
                ),
            ),
            Line::Text(line) => answer(&line, controller),
        };
        send(&mut writer, &response)?;
    }
}

/// The response to one request line.
pub fn answer(line: &[u8], controller: &Controller) -> Response {
    match serde_json::from_slice::<Request>(line) {
        Ok(request) => {
            tracing::debug!(op = request.op(), "PF request");
            controller.handle(&request)
        }
        Err(e) => error(
            ErrorKind::BadRequest,
            format!("the line is not a valid request: {e}"),
        ),
    }
}

fn error(kind: ErrorKind, message: String) -> Response {
    Response::Error { kind, message }
}

fn send(w: &mut UnixStream, response: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

/// One line read from the client.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// The line without its newline (or up to the end of the stream).
    Text(Vec<u8>),
    /// A line longer than the limit (this many bytes at least), consumed and dropped.
    TooLong(usize),
    /// The client closed the connection.
    Eof,
}

/// Reads up to the next newline, keeping at most `max` bytes.
fn read_line(r: &mut impl BufRead, max: usize) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut dropped = 0usize;
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            // End of stream: a last line without newline still counts.
            return Ok(match (dropped, line.is_empty()) {
                (0, true) => Line::Eof,
                (0, false) => Line::Text(line),
                (n, _) => Line::TooLong(n),
            });
        }
        let (chunk, end) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if dropped == 0 && line.len() + chunk.len() <= max {
            line.extend_from_slice(chunk);
        } else {
            dropped = dropped.max(line.len()) + chunk.len();
            line = Vec::new();
        }
        let used = end.unwrap_or(chunk.len());
        r.consume(used);
        if end.is_some() {
            return Ok(if dropped > 0 {
                Line::TooLong(dropped)
            } else {
                Line::Text(line)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_long_ones_skipped() {
        let input = b"abc\n\n0123456789\nxy\nlast".to_vec();
        let mut r = BufReader::with_capacity(4, &input[..]);
        assert_eq!(read_line(&mut r, 5).unwrap(), Line::Text(b"abc".to_vec()));
        assert_eq!(read_line(&mut r, 5).unwrap(), Line::Text(vec![]));
        assert!(matches!(read_line(&mut r, 5).unwrap(), Line::TooLong(n) if n >= 6));
        assert_eq!(read_line(&mut r, 5).unwrap(), Line::Text(b"xy".to_vec()));
        assert_eq!(read_line(&mut r, 5).unwrap(), Line::Text(b"last".to_vec()));
        assert_eq!(read_line(&mut r, 5).unwrap(), Line::Eof);
        let mut r = BufReader::with_capacity(4, &b"12345\n"[..]);
        assert_eq!(read_line(&mut r, 5).unwrap(), Line::Text(b"12345".to_vec()));
    }
}
