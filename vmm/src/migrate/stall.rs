//! Stall detection under the migration stream. The socket's send timeout (`SO_SNDTIMEO`)
//! bounds each `write`, but Linux returns a partial count rather than an error when the
//! write copied some bytes before it blocked: with the link cut, a write that found a
//! little room in the send buffer returns only at the timeout, and the next one waits a
//! full timeout again before failing. A write that comes back short only after the
//! timeout moved its bytes at the start of the wait and nothing since: that is a stall,
//! whatever the count.

use std::io::{self, Write};
use std::time::{Duration, Instant};

/// A writer whose short writes after `timeout` are errors (`TimedOut`).
pub struct StallGuard<W> {
    inner: W,
    timeout: Duration,
}

impl<W: Write> StallGuard<W> {
    /// Wraps `inner`, whose own writes give up after `timeout` (e.g. a socket with that
    /// send timeout).
    pub fn new(inner: W, timeout: Duration) -> Self {
        StallGuard { inner, timeout }
    }
}

impl<W: Write> Write for StallGuard<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let start = Instant::now();
        let n = self.inner.write(buf)?;
        if n < buf.len() && start.elapsed() >= self.timeout {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "a write blocked for {:.1} s and moved {n} of {} bytes",
                    start.elapsed().as_secs_f64(),
                    buf.len()
                ),
            ));
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// Accepts `n` bytes per write after waiting `wait`.
    struct Slow {
        wait: Duration,
        n: usize,
    }

    impl Write for Slow {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            std::thread::sleep(self.wait);
            Ok(self.n.min(buf.len()))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_short_write_after_the_timeout_is_a_stall() {
        let slow = Slow {
            wait: Duration::from_millis(60),
            n: 10,
        };
        let mut w = StallGuard::new(slow, Duration::from_millis(50));
        let e = w.write(&[0; 100]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("moved 10 of 100 bytes"), "{e}");
    }

    #[test]
    fn short_writes_in_time_and_slow_full_writes_pass() {
        let quick = Slow {
            wait: Duration::ZERO,
            n: 10,
        };
        let mut w = StallGuard::new(quick, Duration::from_millis(50));
        assert_eq!(w.write(&[0; 100]).unwrap(), 10);
        let slow_but_whole = Slow {
            wait: Duration::from_millis(60),
            n: 1000,
        };
        let mut w = StallGuard::new(slow_but_whole, Duration::from_millis(50));
        assert_eq!(w.write(&[0; 100]).unwrap(), 100);
    }

    /// A real TCP peer that never reads: the writer fails after about one timeout, not
    /// one per write that found a little room.
    #[test]
    fn a_peer_that_stops_reading_fails_the_stream_within_about_one_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_peer, _) = listener.accept().unwrap();
        let timeout = Duration::from_millis(300);
        socket.set_write_timeout(Some(timeout)).unwrap();
        let mut w = StallGuard::new(socket, timeout);
        let chunk = vec![0u8; 64 << 10];
        let mut stalled_at = None;
        let start = Instant::now();
        for _ in 0..100_000 {
            let t = Instant::now();
            if let Err(e) = w.write_all(&chunk) {
                assert!(
                    matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    ),
                    "{e}"
                );
                stalled_at = Some(t);
                break;
            }
        }
        let stalled_at = stalled_at.expect("the writes never failed");
        // From the last write that went through: one timeout (and scheduling slack).
        let waited = stalled_at.elapsed();
        assert!(
            waited < timeout * 2,
            "failed {waited:?} after the last good write ({:?} in all)",
            start.elapsed()
        );
    }
}
