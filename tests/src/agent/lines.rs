//! A newline-delimited reader with a line-length bound.
//!
//! Lines longer than the bound are reported as [`Line::TooLong`] once their newline arrives and
//! their bytes are discarded as they come, so a runaway sender cannot exhaust memory and the
//! reader resynchronises on the next newline.

use std::io::{self, ErrorKind, Read};

/// One item read by [`LineReader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A line, without its `\n` (a trailing `\r` is removed too).
    Data(Vec<u8>),
    /// A line longer than the bound; its bytes were discarded.
    TooLong,
}

/// Splits a byte stream into lines of at most `limit` bytes.
pub struct LineReader<R> {
    inner: R,
    limit: usize,
    chunk: Box<[u8]>,
    pos: usize,
    end: usize,
    line: Vec<u8>,
    discarding: bool,
}

impl<R: Read> LineReader<R> {
    /// Reads lines of at most `limit` bytes from `inner`.
    pub fn new(inner: R, limit: usize) -> Self {
        LineReader {
            inner,
            limit,
            chunk: vec![0u8; 16 * 1024].into_boxed_slice(),
            pos: 0,
            end: 0,
            line: Vec::new(),
            discarding: false,
        }
    }

    /// The next line; `Ok(None)` at end of stream. A last line without a newline is returned
    /// as a line.
    pub fn next_line(&mut self) -> io::Result<Option<Line>> {
        loop {
            if self.pos < self.end {
                let avail = &self.chunk[self.pos..self.end];
                match avail.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        self.take(i);
                        self.pos += i + 1;
                        return Ok(Some(self.finish()));
                    }
                    None => {
                        let n = avail.len();
                        self.take(n);
                        self.pos = self.end;
                    }
                }
            }
            match self.inner.read(&mut self.chunk) {
                Ok(0) => {
                    if self.line.is_empty() && !self.discarding {
                        return Ok(None);
                    }
                    return Ok(Some(self.finish()));
                }
                Ok(n) => {
                    self.pos = 0;
                    self.end = n;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Appends the next `n` available bytes to the current line, or drops them when over the
    /// limit.
    fn take(&mut self, n: usize) {
        if self.discarding {
            return;
        }
        if self.line.len() + n > self.limit {
            self.discarding = true;
            self.line = Vec::new();
            return;
        }
        self.line
            .extend_from_slice(&self.chunk[self.pos..self.pos + n]);
    }

    fn finish(&mut self) -> Line {
        if std::mem::take(&mut self.discarding) {
            return Line::TooLong;
        }
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Line::Data(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out its data a few bytes at a time.
    struct Dribble<'a>(&'a [u8], usize);

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(self.1).min(buf.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn all(data: &[u8], limit: usize, step: usize) -> Vec<Line> {
        let mut r = LineReader::new(Dribble(data, step), limit);
        let mut out = Vec::new();
        while let Some(line) = r.next_line().unwrap() {
            out.push(line);
        }
        out
    }

    fn d(s: &str) -> Line {
        Line::Data(s.as_bytes().to_vec())
    }

    #[test]
    fn splits_lines() {
        for step in [1, 3, 100] {
            assert_eq!(
                all(b"ab\ncd\r\n\nlast", 10, step),
                vec![d("ab"), d("cd"), d(""), d("last")]
            );
        }
    }

    #[test]
    fn long_lines_are_dropped_and_reader_resyncs() {
        for step in [1, 4, 64] {
            assert_eq!(
                all(b"12345\n123456789012\nok\n", 10, step),
                vec![d("12345"), Line::TooLong, d("ok")]
            );
        }
        assert_eq!(all(b"1234567890\n", 10, 3), vec![d("1234567890")]);
        assert_eq!(all(b"12345678901", 10, 3), vec![Line::TooLong]);
    }

    #[test]
    fn empty_stream() {
        assert!(all(b"", 10, 1).is_empty());
    }
}
