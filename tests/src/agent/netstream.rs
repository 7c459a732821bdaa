//! A checked byte stream for network tests, written and verified by both ends: the guest
//! agent (`net_stream_*` ops) and the host-side traffic peer (`net-peer`).
//!
//! The stream is a sequence of records:
//!
//! ```text
//! [seq: u64 LE][len: u32 LE][payload: len bytes][crc32c of header and payload: u32 LE]
//! ```
//!
//! `seq` counts from 0; the payload of record `seq` is [`record_len`]`(seed, seq)` bytes of
//! [`crate::agent::pattern::fill_block`]`(seed, seq, ..)`, so a receiver that knows the
//! seed checks every byte. A receiver stops at the first record that fails a check (after a
//! bad length or checksum the framing cannot be trusted) and reports it in a
//! [`ReceiveReport`]; a length above [`MAX_PAYLOAD`] is an error, never an allocation.
//!
//! [`run_duplex`] runs one connection carrying a stream each way: a sender thread and the
//! receiver on the calling thread; the sender shuts its half of the connection down when it
//! is done, so each receiver sees a clean end of stream at a record boundary.

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::pattern::{fill_block, splitmix64};

/// Bytes of a record's header: seq and len.
pub const HEADER_LEN: usize = 12;
/// Bytes of a record's trailer: the checksum.
pub const TRAILER_LEN: usize = 4;
/// Smallest payload a sender writes.
pub const MIN_PAYLOAD: u32 = 64;
/// Largest payload a sender writes and a receiver accepts.
pub const MAX_PAYLOAD: u32 = 4096;
/// Default I/O timeout of [`run_duplex`]: long enough for the pause of a live migration.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest error text a report keeps (the agent's replies are single lines).
pub const MAX_ERROR_TEXT: usize = 200;

/// The seed of the peer→guest stream when the guest→peer stream uses `seed`: both ends
/// derive it, so one seed names a whole duplex run.
pub fn reverse_seed(seed: u64) -> u64 {
    seed ^ 0x7065_6572_2d3e_6775 // "peer->gu"
}

/// The payload length of record `seq` of the stream for `seed`, in
/// [`MIN_PAYLOAD`]..=[`MAX_PAYLOAD`].
pub fn record_len(seed: u64, seq: u64) -> u32 {
    let span = u64::from(MAX_PAYLOAD - MIN_PAYLOAD + 1);
    MIN_PAYLOAD + (splitmix64(seed ^ splitmix64(seq ^ 0x6e65_7473)) % span) as u32
}

/// Appends record `seq` of the stream for `seed` to `out`.
pub fn encode_record(seed: u64, seq: u64, out: &mut Vec<u8>) {
    let len = record_len(seed, seq);
    let start = out.len();
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    let body = out.len();
    out.resize(body + len as usize, 0);
    fill_block(seed, seq, &mut out[body..]);
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// What a sender does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendConfig {
    /// Seed of the records.
    pub seed: u64,
    /// Stop once this many bytes are written (the last record is complete, so up to one
    /// record more); `None`: no byte limit.
    pub bytes: Option<u64>,
    /// Stop after this long; `None`: no time limit. With neither limit nothing is sent.
    pub duration_ms: Option<u64>,
    /// Rate cap in bytes per second; `None` or 0: as fast as the connection takes them.
    pub pace_bytes_per_s: Option<u64>,
}

/// Live counters of one direction, readable while the stream runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Complete records.
    pub records: AtomicU64,
    /// Bytes, records' headers and trailers included.
    pub bytes: AtomicU64,
    /// A receiver reads nothing before this instant (see [`Progress::hold`]).
    hold_until: std::sync::Mutex<Option<Instant>>,
}

impl Progress {
    /// `(records, bytes)` now.
    pub fn get(&self) -> (u64, u64) {
        (
            self.records.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// A receiver reads nothing for `for_`: an application busy elsewhere, whose data
    /// waits in the kernel's receive queue meanwhile.
    pub fn hold(&self, for_: Duration) {
        *self.hold_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + for_);
    }

    /// Sleeps while a hold lasts (or until `stop`).
    fn wait_hold(&self, stop: &AtomicBool) {
        loop {
            let until = *self.hold_until.lock().unwrap_or_else(|e| e.into_inner());
            let Some(left) = until.and_then(|u| u.checked_duration_since(Instant::now())) else {
                return;
            };
            if stop.load(Ordering::Relaxed) {
                return;
            }
            thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

/// What a sender did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReport {
    /// Records written completely.
    pub records: u64,
    /// Bytes written (of complete records).
    pub bytes: u64,
    /// Time from the start to the end of sending.
    pub elapsed_ms: u64,
    /// The write error that stopped the sender, if any.
    pub error: Option<String>,
}

/// The first record that failed a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordError {
    /// The sequence number the record should have had (the count of good records before it).
    pub seq: u64,
    /// What was wrong.
    pub what: String,
}

/// How a received stream ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamEnd {
    /// End of stream at a record boundary: the sender finished.
    Eof,
    /// End of stream inside a record, after `bytes` of it.
    Truncated {
        /// Bytes of the partial record received.
        bytes: u64,
    },
    /// A read failed (timeout, reset, ...).
    Error {
        /// The error.
        error: String,
    },
    /// The receiver stopped reading after a record failed a check.
    CheckFailed,
    /// The receiver was asked to stop.
    Stopped,
}

/// What a receiver found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveReport {
    /// Records that passed every check.
    pub records: u64,
    /// Bytes of them.
    pub bytes: u64,
    /// The first (and only: the receiver stops there) record that failed a check.
    pub first_error: Option<RecordError>,
    /// How the stream ended.
    pub end: StreamEnd,
    /// Time from the start to the end of the stream.
    pub elapsed_ms: u64,
    /// When the first data arrived, from the start; `None` if none did.
    pub first_data_ms: Option<u64>,
    /// The longest time between two consecutive reads that returned data.
    pub max_gap_ms: u64,
    /// When that gap began (the earlier read), from the start.
    pub max_gap_at_ms: u64,
}

impl ReceiveReport {
    /// Every record passed and the stream ended cleanly.
    pub fn is_clean(&self) -> bool {
        self.first_error.is_none() && self.end == StreamEnd::Eof
    }

    /// One line saying what went wrong, or `None` when clean.
    pub fn problem(&self) -> Option<String> {
        if let Some(e) = &self.first_error {
            return Some(format!("record {}: {}", e.seq, e.what));
        }
        match &self.end {
            StreamEnd::Eof => None,
            StreamEnd::Truncated { bytes } => Some(format!(
                "stream truncated after {} records and {bytes} bytes of the next",
                self.records
            )),
            StreamEnd::Error { error } => Some(format!(
                "read failed after {} records: {error}",
                self.records
            )),
            StreamEnd::CheckFailed => Some("stopped after a check failure".into()),
            StreamEnd::Stopped => Some(format!("stopped after {} records", self.records)),
        }
    }
}

/// Both directions of one connection, as seen by one end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplexReport {
    /// Setting the connection up failed (connect, accept, socket options): nothing ran.
    pub setup_error: Option<String>,
    /// This end's sender.
    pub sent: SendReport,
    /// This end's receiver; `None` when it did not read.
    pub received: Option<ReceiveReport>,
}

impl DuplexReport {
    /// A report of a connection that never ran.
    pub fn failed(error: &str) -> Self {
        DuplexReport {
            setup_error: Some(clip(error)),
            sent: SendReport::default(),
            received: None,
        }
    }

    /// Everything worked: set up, sent without error, received cleanly (if receiving).
    pub fn is_ok(&self) -> bool {
        self.problem().is_none()
    }

    /// One line saying what went wrong, or `None`.
    pub fn problem(&self) -> Option<String> {
        if let Some(e) = &self.setup_error {
            return Some(format!("setup: {e}"));
        }
        if let Some(e) = &self.sent.error {
            return Some(format!("send: {e}"));
        }
        self.received
            .as_ref()
            .and_then(ReceiveReport::problem)
            .map(|p| format!("receive: {p}"))
    }
}

/// Cuts an error text to [`MAX_ERROR_TEXT`] bytes (at a character boundary).
pub fn clip(text: &str) -> String {
    if text.len() <= MAX_ERROR_TEXT {
        return text.to_owned();
    }
    let mut end = MAX_ERROR_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// When `bytes` are due at `rate` bytes/s from `start` (both ends' pacing).
fn due(start: Instant, bytes: u64, rate: u64) -> Instant {
    start + Duration::from_secs_f64(bytes as f64 / rate as f64)
}

fn ms(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// Writes records to `out` until a limit of `cfg` is reached, `stop` is set, or a write fails.
pub fn send<W: Write>(
    out: &mut W,
    cfg: &SendConfig,
    progress: &Progress,
    stop: &AtomicBool,
) -> SendReport {
    let start = Instant::now();
    let mut report = SendReport::default();
    let rate = cfg.pace_bytes_per_s.filter(|&r| r > 0);
    let deadline = cfg.duration_ms.map(|d| start + Duration::from_millis(d));
    let mut buf = Vec::with_capacity(HEADER_LEN + MAX_PAYLOAD as usize + TRAILER_LEN);
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if cfg.bytes.is_none() && deadline.is_none() {
            break;
        }
        if cfg.bytes.is_some_and(|b| report.bytes >= b) {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if let Some(rate) = rate {
            // Send when the bytes so far are due, in slices so that stop and the deadline are
            // seen.
            let due = due(start, report.bytes, rate);
            let now = Instant::now();
            if due > now {
                thread::sleep((due - now).min(Duration::from_millis(50)));
                continue;
            }
        }
        buf.clear();
        encode_record(cfg.seed, report.records, &mut buf);
        if let Err(e) = out.write_all(&buf).and_then(|()| out.flush()) {
            report.error = Some(clip(&format!(
                "writing record {} after {} bytes: {e}",
                report.records, report.bytes
            )));
            break;
        }
        report.records += 1;
        report.bytes += buf.len() as u64;
        progress.records.store(report.records, Ordering::Relaxed);
        progress.bytes.store(report.bytes, Ordering::Relaxed);
    }
    report.elapsed_ms = ms(start.elapsed());
    report
}

/// A reader that notes when reads return data.
struct Timed<R> {
    inner: R,
    start: Instant,
    last: Option<Instant>,
    first_data: Option<Duration>,
    max_gap: Duration,
    max_gap_at: Duration,
}

impl<R: Read> Read for Timed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            let now = Instant::now();
            match self.last {
                None => self.first_data = Some(now - self.start),
                Some(last) if now - last > self.max_gap => {
                    self.max_gap = now - last;
                    self.max_gap_at = last - self.start;
                }
                Some(_) => {}
            }
            self.last = Some(now);
        }
        Ok(n)
    }
}

enum Step {
    Record,
    End(StreamEnd),
    Bad(String),
}

/// Reads and checks records of the stream for `seed` from `input` until it ends, a read
/// fails, a record fails a check, or `stop` is set (seen between reads: give the input a
/// read timeout for that).
pub fn receive<R: Read>(
    input: R,
    seed: u64,
    progress: &Progress,
    stop: &AtomicBool,
) -> ReceiveReport {
    receive_paced(input, seed, None, progress, stop)
}

/// [`receive`], reading at most `pace` bytes/s on average (a record at a time, so the rest
/// stays queued in the kernel until it is read).
pub fn receive_paced<R: Read>(
    input: R,
    seed: u64,
    pace: Option<u64>,
    progress: &Progress,
    stop: &AtomicBool,
) -> ReceiveReport {
    let start = Instant::now();
    let timed = Timed {
        inner: input,
        start,
        last: None,
        first_data: None,
        max_gap: Duration::ZERO,
        max_gap_at: Duration::ZERO,
    };
    let capacity = match pace {
        Some(_) => HEADER_LEN + MAX_PAYLOAD as usize + TRAILER_LEN,
        None => 64 * 1024,
    };
    let mut reader = BufReader::with_capacity(capacity, timed);
    let mut records = 0u64;
    let mut bytes = 0u64;
    let mut first_error = None;
    let mut record = vec![0u8; HEADER_LEN + MAX_PAYLOAD as usize + TRAILER_LEN];
    let mut expected = vec![0u8; MAX_PAYLOAD as usize];
    let end = loop {
        progress.wait_hold(stop);
        match read_record(&mut reader, seed, records, &mut record, &mut expected, stop) {
            Step::Record => {
                let len = u32::from_le_bytes(record[8..12].try_into().unwrap()) as usize;
                records += 1;
                bytes += (HEADER_LEN + len + TRAILER_LEN) as u64;
                progress.records.store(records, Ordering::Relaxed);
                progress.bytes.store(bytes, Ordering::Relaxed);
                if let Some(pace) = pace.filter(|&p| p > 0) {
                    let wait = due(start, bytes, pace).saturating_duration_since(Instant::now());
                    thread::sleep(wait);
                }
            }
            Step::End(end) => break end,
            Step::Bad(what) => {
                first_error = Some(RecordError {
                    seq: records,
                    what: clip(&what),
                });
                break StreamEnd::CheckFailed;
            }
        }
    };
    let timed = reader.into_inner();
    ReceiveReport {
        records,
        bytes,
        first_error,
        end,
        elapsed_ms: ms(start.elapsed()),
        first_data_ms: timed.first_data.map(ms),
        max_gap_ms: ms(timed.max_gap),
        max_gap_at_ms: ms(timed.max_gap_at),
    }
}

/// Fills `buf` completely; `Err((bytes read, end))` when the stream ends or fails first.
fn fill<R: Read>(
    reader: &mut BufReader<R>,
    buf: &mut [u8],
    stop: &AtomicBool,
) -> Result<(), (usize, StreamEnd)> {
    let mut done = 0;
    while done < buf.len() {
        match reader.read(&mut buf[done..]) {
            Ok(0) => return Err((done, StreamEnd::Eof)),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err((done, io_end(&e, stop))),
        }
    }
    Ok(())
}

/// How a failed read ends the stream.
fn io_end(e: &io::Error, stop: &AtomicBool) -> StreamEnd {
    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
        if stop.load(Ordering::Relaxed) {
            return StreamEnd::Stopped;
        }
        return StreamEnd::Error {
            error: clip(&format!("read timed out ({e})")),
        };
    }
    StreamEnd::Error {
        error: clip(&e.to_string()),
    }
}

fn read_record<R: Read>(
    reader: &mut BufReader<R>,
    seed: u64,
    seq: u64,
    record: &mut [u8],
    expected: &mut [u8],
    stop: &AtomicBool,
) -> Step {
    if stop.load(Ordering::Relaxed) {
        return Step::End(StreamEnd::Stopped);
    }
    // A clean end is an end before the first byte of a record.
    loop {
        match reader.fill_buf() {
            Ok([]) => return Step::End(StreamEnd::Eof),
            Ok(_) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Step::End(io_end(&e, stop)),
        }
    }
    let partial = |done: usize, end: StreamEnd, before: usize| match end {
        StreamEnd::Eof => Step::End(StreamEnd::Truncated {
            bytes: (before + done) as u64,
        }),
        other => Step::End(other),
    };
    if let Err((done, end)) = fill(reader, &mut record[..HEADER_LEN], stop) {
        if done == 0 && end == StreamEnd::Eof {
            return Step::End(StreamEnd::Eof);
        }
        return partial(done, end, 0);
    }
    let got_seq = u64::from_le_bytes(record[..8].try_into().unwrap());
    let len = u32::from_le_bytes(record[8..12].try_into().unwrap());
    if !(MIN_PAYLOAD..=MAX_PAYLOAD).contains(&len) {
        return Step::Bad(format!(
            "length {len} outside {MIN_PAYLOAD}..={MAX_PAYLOAD} (header seq {got_seq})"
        ));
    }
    let total = HEADER_LEN + len as usize + TRAILER_LEN;
    if let Err((done, end)) = fill(reader, &mut record[HEADER_LEN..total], stop) {
        return partial(done, end, HEADER_LEN);
    }
    let body = &record[HEADER_LEN..HEADER_LEN + len as usize];
    let crc = u32::from_le_bytes(record[total - TRAILER_LEN..total].try_into().unwrap());
    let computed = crc32c::crc32c(&record[..total - TRAILER_LEN]);
    if crc != computed {
        return Step::Bad(format!(
            "checksum {crc:#010x} != computed {computed:#010x} (header seq {got_seq}, length {len})"
        ));
    }
    if got_seq != seq {
        return Step::Bad(format!("sequence number {got_seq}, expected {seq}"));
    }
    let want_len = record_len(seed, seq);
    if len != want_len {
        return Step::Bad(format!("length {len}, expected {want_len}"));
    }
    let expected = &mut expected[..len as usize];
    fill_block(seed, seq, expected);
    if body != &expected[..] {
        let at = body.iter().zip(expected.iter()).position(|(a, b)| a != b);
        return Step::Bad(format!(
            "payload differs from the pattern at byte {} (checksum matched: wrong seed?)",
            at.unwrap_or(0)
        ));
    }
    Step::Record
}

/// What one end of a duplex connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DuplexConfig {
    /// This end's sender.
    pub send: SendConfig,
    /// The seed of the other end's records, or `None` to not read them (the connection's
    /// read side is then left alone until the end).
    pub receive_seed: Option<u64>,
    /// Rate cap of the reading, bytes/s: an application slower than the network, whose
    /// data waits in the socket's receive queue (in the receive buffers the NIC wrote)
    /// until it is read.
    pub receive_pace_bytes_per_s: Option<u64>,
    /// Read and write timeout: a stall this long is an error.
    pub io_timeout: Duration,
}

/// Live state of a duplex connection, shared with whoever watches it.
#[derive(Debug, Default)]
pub struct DuplexProgress {
    /// The sender's counters.
    pub sent: Progress,
    /// The receiver's counters.
    pub received: Progress,
    /// Set to stop both directions early (seen within the poll interval of reads).
    pub stop: AtomicBool,
}

/// How often a blocked read looks at [`DuplexProgress::stop`].
const STOP_POLL: Duration = Duration::from_millis(500);

/// A reader that retries timed-out reads of a socket with a short timeout until the real
/// timeout has passed without data or `stop` is set, so that a stop is seen quickly.
struct Patient<'a> {
    stream: &'a TcpStream,
    timeout: Duration,
    stop: &'a AtomicBool,
}

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let start = Instant::now();
        loop {
            match (&mut &*self.stream).read(buf) {
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if self.stop.load(Ordering::Relaxed) || start.elapsed() >= self.timeout {
                        return Err(io::Error::new(
                            ErrorKind::TimedOut,
                            format!("no data for {} ms", ms(start.elapsed())),
                        ));
                    }
                }
                other => return other,
            }
        }
    }
}

/// Runs both directions over `stream`: the sender on a thread (shutting the write side down
/// when it is done, so the other end sees a clean end), the receiver on this one. Returns
/// when both are done.
pub fn run_duplex(
    stream: TcpStream,
    cfg: &DuplexConfig,
    progress: &Arc<DuplexProgress>,
) -> DuplexReport {
    let setup = stream
        .set_read_timeout(Some(STOP_POLL.min(cfg.io_timeout)))
        .and_then(|()| stream.set_write_timeout(Some(cfg.io_timeout)))
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.try_clone());
    let writer = match setup {
        Ok(w) => w,
        Err(e) => return DuplexReport::failed(&format!("socket setup: {e}")),
    };
    let send_cfg = cfg.send;
    let p = Arc::clone(progress);
    let sender = thread::Builder::new()
        .name("net-send".into())
        .spawn(move || {
            let mut w = &writer;
            let report = send(&mut w, &send_cfg, &p.sent, &p.stop);
            let _ = writer.shutdown(Shutdown::Write);
            report
        });
    let sender = match sender {
        Ok(s) => s,
        Err(e) => return DuplexReport::failed(&format!("spawning the sender: {e}")),
    };
    let received = cfg.receive_seed.map(|seed| {
        let reader = Patient {
            stream: &stream,
            timeout: cfg.io_timeout,
            stop: &progress.stop,
        };
        receive_paced(
            reader,
            seed,
            cfg.receive_pace_bytes_per_s,
            &progress.received,
            &progress.stop,
        )
    });
    if received.as_ref().is_some_and(|r| !r.is_clean()) {
        // The receive side failed: no point in sending on.
        progress.stop.store(true, Ordering::Relaxed);
    }
    let sent = sender.join().unwrap_or_else(|_| SendReport {
        error: Some("the sender panicked".into()),
        ..Default::default()
    });
    DuplexReport {
        setup_error: None,
        sent,
        received,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn stream(seed: u64, records: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in 0..records {
            encode_record(seed, seq, &mut out);
        }
        out
    }

    #[test]
    fn a_paced_receiver_reads_no_faster_than_its_pace() {
        let data = stream(9, 20);
        let pace = 400_000;
        let t = Instant::now();
        let r = receive_paced(
            &data[..],
            9,
            Some(pace),
            &Progress::default(),
            &AtomicBool::new(false),
        );
        assert!(r.is_clean(), "{r:?}");
        assert_eq!(r.bytes, data.len() as u64);
        let floor = Duration::from_secs_f64(data.len() as f64 / pace as f64);
        assert!(t.elapsed() >= floor, "{:?} < {floor:?}", t.elapsed());
    }

    fn check(data: &[u8], seed: u64) -> ReceiveReport {
        receive(data, seed, &Progress::default(), &AtomicBool::new(false))
    }

    /// Byte offset of record `seq` in `stream(seed, _)`.
    fn offset(seed: u64, seq: u64) -> usize {
        (0..seq)
            .map(|s| HEADER_LEN + record_len(seed, s) as usize + TRAILER_LEN)
            .sum()
    }

    #[test]
    fn record_lengths_vary_within_bounds() {
        let lens: Vec<u32> = (0..1000).map(|s| record_len(7, s)).collect();
        assert!(lens.iter().all(|l| (MIN_PAYLOAD..=MAX_PAYLOAD).contains(l)));
        assert!(lens.iter().any(|&l| l < 1000) && lens.iter().any(|&l| l > 3000));
        assert_ne!(record_len(7, 1), record_len(8, 1));
    }

    #[test]
    fn clean_stream_passes() {
        let data = stream(3, 50);
        let r = check(&data, 3);
        assert!(r.is_clean(), "{r:?}");
        assert_eq!((r.records, r.bytes), (50, data.len() as u64));
        assert_eq!(r.problem(), None);
        let empty = check(&[], 3);
        assert!(empty.is_clean() && empty.records == 0 && empty.first_data_ms.is_none());
    }

    #[test]
    fn corrupted_byte_is_found() {
        let data = stream(3, 20);
        for (seq, at) in [(0, 0), (5, 3), (5, 8), (9, 20), (12, 11)] {
            let mut bad = data.clone();
            let pos = offset(3, seq) + at;
            bad[pos] ^= 0x10;
            let r = check(&bad, 3);
            let e = r.first_error.clone().expect("corruption not found");
            assert_eq!(e.seq, seq, "{r:?}");
            assert_eq!(r.records, seq);
            assert_eq!(r.end, StreamEnd::CheckFailed);
            assert!(!r.is_clean());
        }
        // A byte of the checksum itself.
        let mut bad = data.clone();
        bad[offset(3, 3) - 1] ^= 1;
        assert_eq!(check(&bad, 3).first_error.unwrap().seq, 2);
    }

    #[test]
    fn dropped_record_is_found() {
        let data = stream(3, 10);
        let mut bad = data[..offset(3, 4)].to_vec();
        bad.extend_from_slice(&data[offset(3, 5)..]);
        let r = check(&bad, 3);
        let e = r.first_error.unwrap();
        assert_eq!(e.seq, 4);
        assert!(
            e.what.contains("sequence number 5, expected 4"),
            "{}",
            e.what
        );
    }

    #[test]
    fn wrong_seed_is_found() {
        let data = stream(3, 2);
        let e = check(&data, 4).first_error.unwrap();
        assert_eq!(e.seq, 0);
        assert!(
            e.what.contains("length") || e.what.contains("pattern"),
            "{}",
            e.what
        );
    }

    #[test]
    fn truncated_stream_is_found() {
        let data = stream(3, 10);
        for cut in [
            offset(3, 6) + 5,
            offset(3, 6) + HEADER_LEN + 1,
            data.len() - 1,
        ] {
            let r = check(&data[..cut], 3);
            assert!(r.first_error.is_none(), "{r:?}");
            let StreamEnd::Truncated { bytes } = r.end else {
                panic!("{r:?}")
            };
            assert_eq!(bytes as usize, cut - offset(3, r.records));
            assert!(r.problem().unwrap().contains("truncated"));
        }
    }

    #[test]
    fn hostile_length_is_an_error_not_an_allocation() {
        let mut bad = stream(3, 3);
        let at = offset(3, 1) + 8;
        bad[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let r = check(&bad, 3);
        let e = r.first_error.unwrap();
        assert_eq!(e.seq, 1);
        assert!(e.what.contains("length 4294967295 outside"), "{}", e.what);
    }

    #[test]
    fn sender_respects_byte_limit_and_pace() {
        let progress = Progress::default();
        let stop = AtomicBool::new(false);
        let mut out = Vec::new();
        let cfg = SendConfig {
            seed: 9,
            bytes: Some(100_000),
            duration_ms: None,
            pace_bytes_per_s: None,
        };
        let r = send(&mut out, &cfg, &progress, &stop);
        assert!(r.bytes >= 100_000 && r.bytes < 100_000 + 5000, "{r:?}");
        assert_eq!(progress.get(), (r.records, r.bytes));
        assert!(check(&out, 9).is_clean());

        let mut out = Vec::new();
        let cfg = SendConfig {
            seed: 9,
            bytes: None,
            duration_ms: Some(300),
            pace_bytes_per_s: Some(100_000),
        };
        let r = send(&mut out, &cfg, &progress, &stop);
        // 0.3 s at 100 kB/s: about 30 kB (plus the record in flight at each step).
        assert!(r.bytes > 15_000 && r.bytes < 45_000, "{r:?}");
        assert!(r.elapsed_ms >= 290, "{r:?}");
    }

    #[test]
    fn duplex_over_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = |seed, rseed| DuplexConfig {
            send: SendConfig {
                seed,
                bytes: Some(2 << 20),
                duration_ms: None,
                pace_bytes_per_s: None,
            },
            receive_seed: Some(rseed),
            receive_pace_bytes_per_s: None,
            io_timeout: Duration::from_secs(10),
        };
        let server = thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            run_duplex(s, &cfg(reverse_seed(5), 5), &Arc::default())
        });
        let client = TcpStream::connect(addr).unwrap();
        let progress = Arc::new(DuplexProgress::default());
        let mine = run_duplex(client, &cfg(5, reverse_seed(5)), &progress);
        let theirs = server.join().unwrap();
        assert!(mine.is_ok(), "{mine:?}");
        assert!(theirs.is_ok(), "{theirs:?}");
        assert_eq!(mine.sent.bytes, theirs.received.as_ref().unwrap().bytes);
        assert_eq!(theirs.sent.bytes, mine.received.as_ref().unwrap().bytes);
        assert_eq!(progress.sent.get().1, mine.sent.bytes);
        // Serializes to one short line.
        let line = serde_json::to_string(&mine).unwrap();
        assert!(line.len() < 1000, "{line}");
    }

    #[test]
    fn stalled_peer_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        // The server sends 3 records and then goes quiet without closing.
        let mut data = stream(5, 3);
        data.extend_from_slice(&stream(5, 4)[offset(5, 3)..offset(5, 3) + 7]);
        (&server).write_all(&data).unwrap();
        let cfg = DuplexConfig {
            send: SendConfig {
                seed: 1,
                bytes: Some(0),
                duration_ms: None,
                pace_bytes_per_s: None,
            },
            receive_seed: Some(5),
            receive_pace_bytes_per_s: None,
            io_timeout: Duration::from_millis(700),
        };
        let t = Instant::now();
        let r = run_duplex(client, &cfg, &Arc::default());
        assert!(t.elapsed() < Duration::from_secs(5));
        let rx = r.received.unwrap();
        assert_eq!(rx.records, 3);
        let StreamEnd::Error { error } = &rx.end else {
            panic!("{rx:?}")
        };
        assert!(error.contains("timed out"), "{error}");
        drop(server);
    }

    #[test]
    fn gap_is_measured() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let data = stream(2, 6);
            let mid = offset(2, 3);
            (&s).write_all(&data[..mid]).unwrap();
            thread::sleep(Duration::from_millis(400));
            (&s).write_all(&data[mid..]).unwrap();
        });
        let client = TcpStream::connect(addr).unwrap();
        let r = receive(&client, 2, &Progress::default(), &AtomicBool::new(false));
        writer.join().unwrap();
        assert!(r.is_clean(), "{r:?}");
        assert!(r.max_gap_ms >= 380 && r.max_gap_ms < 2000, "{r:?}");
        assert!(r.max_gap_at_ms < 200, "{r:?}");
    }

    #[test]
    fn reset_is_an_error() {
        use std::os::fd::AsRawFd;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (&server).write_all(&stream(5, 2)).unwrap();
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a linger struct of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                server.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        drop(server); // closing with linger 0 sends a reset
        let r = receive(&client, 5, &Progress::default(), &AtomicBool::new(false));
        let StreamEnd::Error { error } = &r.end else {
            panic!("{r:?}")
        };
        assert!(error.contains("reset"), "{error}");
    }
}
