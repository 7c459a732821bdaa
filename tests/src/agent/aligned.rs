//! A heap buffer whose start is aligned, as O_DIRECT I/O requires.

use std::collections::TryReserveError;

/// Alignment that satisfies O_DIRECT on every device the tests use.
pub const DIRECT_ALIGN: usize = 4096;

/// `len` bytes starting at an address aligned to `align`, carved out of an over-allocated `Vec`.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two); fails instead of
    /// aborting when memory is short.
    pub fn new(len: usize, align: usize) -> Result<Self, TryReserveError> {
        let align = align.max(1);
        let total = len.saturating_add(align);
        let mut storage = Vec::new();
        storage.try_reserve_exact(total)?;
        storage.resize(total, 0);
        let start = storage.as_ptr().align_offset(align).min(align);
        Ok(AlignedBuf {
            storage,
            start,
            len,
        })
    }

    /// The buffer.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The buffer, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_aligned_and_sized() {
        for len in [0, 1, 4096, 10_000] {
            let mut b = AlignedBuf::new(len, DIRECT_ALIGN).unwrap();
            assert_eq!(b.as_slice().len(), len);
            assert_eq!(b.as_mut_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
        }
    }
}
