//! Bounds-checked field readers and writers in host byte order (the protocol's order).

use super::error::ProtoError;

/// Reads fields from a byte slice; every read is bounds-checked and never panics.
pub(crate) struct Reader<'a> {
    what: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`, which holds a `what` (named in errors).
    pub(crate) fn new(what: &'static str, buf: &'a [u8]) -> Self {
        Reader { what, buf, pos: 0 }
    }

    /// Fails unless at least `need` bytes are present in total.
    pub(crate) fn require(&self, need: usize) -> Result<(), ProtoError> {
        if self.buf.len() < need {
            return Err(ProtoError::Truncated {
                what: self.what,
                need,
                have: self.buf.len(),
            });
        }
        Ok(())
    }

    /// Takes the next `n` bytes.
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let end = self.pos.checked_add(n).ok_or(ProtoError::Truncated {
            what: self.what,
            need: usize::MAX,
            have: self.buf.len(),
        })?;
        let out = self.buf.get(self.pos..end).ok_or(ProtoError::Truncated {
            what: self.what,
            need: end,
            have: self.buf.len(),
        })?;
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let bytes = self.bytes(N)?;
        <[u8; N]>::try_from(bytes).map_err(|_| ProtoError::Truncated {
            what: self.what,
            need: N,
            have: bytes.len(),
        })
    }

    /// Reads a `u16`.
    pub(crate) fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_ne_bytes(self.array()?))
    }

    /// Reads a `u32`.
    pub(crate) fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_ne_bytes(self.array()?))
    }

    /// Reads a `u64`.
    pub(crate) fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_ne_bytes(self.array()?))
    }

    /// Takes every byte not read yet.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let out = self.buf.get(self.pos..).unwrap_or_default();
        self.pos = self.buf.len();
        out
    }

    /// How many bytes are left.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Fails if bytes are left over.
    pub(crate) fn finish(self) -> Result<(), ProtoError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(ProtoError::TrailingBytes {
                what: self.what,
                extra,
            }),
        }
    }
}

/// Appends fields to a byte vector.
#[derive(Default)]
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// A writer with room for `capacity` bytes.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Writer {
            buf: Vec::with_capacity(capacity),
        }
    }

    /// Appends a `u16`.
    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_ne_bytes());
        self
    }

    /// Appends a `u32`.
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_ne_bytes());
        self
    }

    /// Appends a `u64`.
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_ne_bytes());
        self
    }

    /// Appends raw bytes.
    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// The bytes written.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// Converts a length to a `u32` wire field.
pub(crate) fn len_u32(what: &'static str, len: usize) -> Result<u32, ProtoError> {
    u32::try_from(len).map_err(|_| ProtoError::TooLarge { what, len })
}
