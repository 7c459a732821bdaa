//! A bandwidth cap on the migration stream (QEMU's `max-bandwidth`): pre-copy must not take
//! the whole link from the guests' own traffic. The writer sleeps whenever the bytes it has
//! passed on since the cap was set run ahead of `cap × elapsed`. The cap is shared so the
//! source can lift it for stop-and-copy, where every millisecond is guest downtime.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most passed on in one `write`, so a cap paces a large buffer smoothly.
const MAX_WRITE: usize = 64 << 10;

/// A cap in bytes per second; 0 means none. Cloned handles share it.
#[derive(Clone, Debug, Default)]
pub struct Cap(Arc<AtomicU64>);

impl Cap {
    /// A cap of `bytes_per_s` (None: unlimited).
    pub fn new(bytes_per_s: Option<u64>) -> Self {
        Cap(Arc::new(AtomicU64::new(bytes_per_s.unwrap_or(0))))
    }

    /// Removes the cap.
    pub fn lift(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A writer that keeps to a [`Cap`].
pub struct Throttled<W> {
    inner: W,
    cap: Cap,
    /// The cap the current window was measured against, its start and its bytes.
    window_cap: u64,
    window_start: Instant,
    window_bytes: u64,
}

impl<W: Write> Throttled<W> {
    /// Wraps `inner`.
    pub fn new(inner: W, cap: Cap) -> Self {
        Throttled {
            inner,
            window_cap: cap.get(),
            cap,
            window_start: Instant::now(),
            window_bytes: 0,
        }
    }

    /// Sleeps until `window_bytes` is within the cap.
    fn pace(&mut self) {
        let cap = self.cap.get();
        if cap != self.window_cap {
            self.window_cap = cap;
            self.window_start = Instant::now();
            self.window_bytes = 0;
        }
        if cap == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.window_bytes as f64 / cap as f64);
        if let Some(ahead) = due.checked_sub(self.window_start.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
}

impl<W: Write> Write for Throttled<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pace();
        let n = self.inner.write(&buf[..buf.len().min(MAX_WRITE)])?;
        self.window_bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_paces_the_writes() {
        let cap = Cap::new(Some(4 << 20));
        let mut w = Throttled::new(Vec::new(), cap.clone());
        let t = Instant::now();
        // 1 MiB at 4 MiB/s: the last 64 KiB write waits until 0.25 s - 1/64 s.
        w.write_all(&vec![7u8; 1 << 20]).unwrap();
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(230), "{took:?}");
        assert_eq!(w.inner.len(), 1 << 20);
    }

    #[test]
    fn lifting_the_cap_stops_the_pacing() {
        let cap = Cap::new(Some(1 << 20));
        let mut w = Throttled::new(Vec::new(), cap.clone());
        w.write_all(&vec![0u8; 128 << 10]).unwrap();
        cap.lift();
        let t = Instant::now();
        w.write_all(&vec![0u8; 8 << 20]).unwrap();
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    #[test]
    fn no_cap_no_sleep() {
        let mut w = Throttled::new(Vec::new(), Cap::new(None));
        let t = Instant::now();
        w.write_all(&vec![0u8; 16 << 20]).unwrap();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
}
