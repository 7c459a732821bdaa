//! The MSI-X vectors, as strict as hardware: one eventfd per vector, given by `SET_IRQS`
//! on `VFIO_PCI_MSIX_IRQ_INDEX`, signalled only while the function may send the message.
//!
//! A vector is signalled when the device raises it only if MSI-X is enabled (the enable
//! bit of the MSI-X control word in configuration space), the function is not masked
//! (the function-mask bit of the same word) and the vector is not masked (the mask bit of
//! its vector-control word, which the client sets through the MSI-X table in BAR 0 or
//! with `SET_IRQS` `ACTION_MASK`/`ACTION_UNMASK`). Otherwise the vector's pending bit is
//! set (the PBA in BAR 0 reads it) and the vector is signalled as soon as all three allow
//! it: on enable, on clearing the function mask, on unmasking the vector. Sending clears
//! the pending bit. After reset MSI-X is disabled and every vector masked, as the PCI
//! specification has it, so a client that never enables MSI-X or never unmasks a vector
//! never gets an interrupt, as with a real function.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;

/// Why an MSI-X operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// The sub-index range does not fit the vectors.
    #[error("MSI-X vectors {start}..{start}+{count} are outside the {max} vectors of the device")]
    OutOfRange {
        /// First vector.
        start: u32,
        /// Number of vectors.
        count: u32,
        /// Number of vectors the device has.
        max: u32,
    },
    /// The eventfd could not be written.
    #[error("signalling MSI-X vector {vector} failed: {source}")]
    Signal {
        /// The vector.
        vector: u16,
        /// The system error.
        source: io::Error,
    },
}

/// What became of an interrupt the device raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raised {
    /// Its eventfd was signalled.
    Signalled,
    /// MSI-X is off, or the function or the vector is masked: it is pending.
    Pending,
    /// It could be sent but no eventfd is assigned: it is lost (as a message to nowhere).
    NoEventfd,
}

/// The MSI-X state of the function and the eventfd of each vector.
#[derive(Debug)]
pub struct MsixVectors {
    fds: Vec<Option<File>>,
    enabled: bool,
    function_masked: bool,
    masked: Vec<bool>,
    pending: Vec<bool>,
}

impl MsixVectors {
    /// `count` vectors, none assigned; MSI-X disabled, every vector masked.
    pub fn new(count: u16) -> Self {
        MsixVectors {
            fds: (0..count).map(|_| None).collect(),
            enabled: false,
            function_masked: false,
            masked: vec![true; usize::from(count)],
            pending: vec![false; usize::from(count)],
        }
    }

    /// Number of vectors.
    pub fn count(&self) -> u32 {
        self.fds.len() as u32
    }

    fn range(&self, start: u32, count: u32) -> Result<std::ops::Range<usize>, IrqError> {
        let err = IrqError::OutOfRange {
            start,
            count,
            max: self.count(),
        };
        match start.checked_add(count) {
            Some(end) if end <= self.count() => Ok(start as usize..end as usize),
            _ => Err(err),
        }
    }

    /// Assigns `fds` to vectors `start..`.
    pub fn assign(&mut self, start: u32, fds: Vec<OwnedFd>) -> Result<(), IrqError> {
        let range = self.range(start, fds.len() as u32)?;
        for (slot, fd) in self.fds[range].iter_mut().zip(fds) {
            *slot = Some(File::from(fd));
        }
        Ok(())
    }

    /// De-assigns vectors `start..start + count`.
    pub fn clear(&mut self, start: u32, count: u32) -> Result<(), IrqError> {
        let range = self.range(start, count)?;
        self.fds[range].iter_mut().for_each(|s| *s = None);
        Ok(())
    }

    /// De-assigns every vector.
    pub fn clear_all(&mut self) {
        self.fds.iter_mut().for_each(|s| *s = None);
    }

    /// The MSI-X state after a function reset: disabled, function unmasked, every vector
    /// masked, nothing pending. The eventfds stay (they are the client's, not the
    /// function's).
    pub fn reset(&mut self) {
        self.enabled = false;
        self.function_masked = false;
        self.masked.iter_mut().for_each(|m| *m = true);
        self.pending.iter_mut().for_each(|p| *p = false);
    }

    /// Whether MSI-X is enabled and the function not masked.
    pub fn function_live(&self) -> bool {
        self.enabled && !self.function_masked
    }

    /// Whether vector `v` is masked by its own bit (vectors past the last read masked).
    pub fn is_masked(&self, v: usize) -> bool {
        self.masked.get(v).copied().unwrap_or(true)
    }

    /// The pending bits, vector `v` at bit `v` (the PBA's first qword).
    pub fn pending_bits(&self) -> u64 {
        self.pending
            .iter()
            .take(64)
            .enumerate()
            .filter(|(_, p)| **p)
            .fold(0, |acc, (v, _)| acc | 1 << v)
    }

    /// Sets the pending bits from `bits` (vector `v` at bit `v`; bits past the last vector
    /// are ignored) and signals those that may be sent now. For loading a saved state.
    pub fn set_pending_bits(&mut self, bits: u64) -> Result<(), IrqError> {
        for (v, p) in self.pending.iter_mut().enumerate().take(64) {
            *p = bits & 1 << v != 0;
        }
        self.flush_pending()
    }

    /// The enable and function-mask bits of the MSI-X control word changed (or were
    /// written): signals every pending vector that may now be sent.
    pub fn set_control(&mut self, enabled: bool, function_masked: bool) -> Result<(), IrqError> {
        self.enabled = enabled;
        self.function_masked = function_masked;
        self.flush_pending()
    }

    /// Masks or unmasks vectors `start..start + count`; a pending vector that may now be
    /// sent is signalled.
    pub fn set_masked(&mut self, start: u32, count: u32, masked: bool) -> Result<(), IrqError> {
        let range = self.range(start, count)?;
        self.masked[range].iter_mut().for_each(|m| *m = masked);
        self.flush_pending()
    }

    /// Checks `start..start + count` and raises each vector in it.
    pub fn raise_range(&mut self, start: u32, count: u32) -> Result<(), IrqError> {
        for v in self.range(start, count)? {
            self.raise(v as u16)?;
        }
        Ok(())
    }

    /// The device raises `vector`: signalled if it may be sent, pending if not. A vector
    /// the device does not have is ignored ([`Raised::NoEventfd`]).
    pub fn raise(&mut self, vector: u16) -> Result<Raised, IrqError> {
        let v = usize::from(vector);
        if v >= self.fds.len() {
            return Ok(Raised::NoEventfd);
        }
        if !self.function_live() || self.masked[v] {
            self.pending[v] = true;
            return Ok(Raised::Pending);
        }
        self.send(v)
    }

    /// Sends vector `v` (which may be sent): signals its eventfd, clears its pending bit.
    fn send(&mut self, v: usize) -> Result<Raised, IrqError> {
        self.pending[v] = false;
        match &self.fds[v] {
            Some(file) => {
                let mut f: &File = file;
                f.write_all(&1u64.to_ne_bytes())
                    .map_err(|source| IrqError::Signal {
                        vector: v as u16,
                        source,
                    })?;
                Ok(Raised::Signalled)
            }
            None => Ok(Raised::NoEventfd),
        }
    }

    /// Sends every pending vector that may be sent now.
    fn flush_pending(&mut self) -> Result<(), IrqError> {
        if !self.function_live() {
            return Ok(());
        }
        let ready: Vec<usize> = (0..self.fds.len())
            .filter(|&v| self.pending[v] && !self.masked[v])
            .collect();
        for v in ready {
            if self.send(v)? == Raised::NoEventfd {
                tracing::debug!(vector = v, "no eventfd for pending MSI-X vector; dropped");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};

    fn eventfd() -> OwnedFd {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// The count of `fd`, read (so reset to 0).
    fn take(fd: &OwnedFd) -> u64 {
        let mut v = 0u64;
        // SAFETY: reads at most 8 bytes into `v`.
        let r = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if r == 8 {
            v
        } else {
            0
        }
    }

    fn dup(fd: &OwnedFd) -> OwnedFd {
        fd.try_clone().unwrap()
    }

    #[test]
    fn each_gate_holds_the_vector_pending_until_it_opens() {
        let (a, b) = (eventfd(), eventfd());
        let mut m = MsixVectors::new(2);
        m.assign(0, vec![dup(&a), dup(&b)]).unwrap();
        // After reset: disabled and masked.
        assert_eq!(m.raise(1).unwrap(), Raised::Pending);
        m.set_control(true, false).unwrap();
        assert_eq!(m.raise(1).unwrap(), Raised::Pending, "vector masked");
        assert_eq!((take(&b), m.pending_bits()), (0, 0b10));
        m.set_masked(1, 1, false).unwrap();
        assert_eq!((take(&b), m.pending_bits()), (1, 0), "sent on unmask");
        assert_eq!(m.raise(1).unwrap(), Raised::Signalled);
        assert_eq!(take(&b), 1);
        // Function mask.
        m.set_control(true, true).unwrap();
        assert_eq!(m.raise(1).unwrap(), Raised::Pending);
        assert_eq!(take(&b), 0);
        m.set_control(true, false).unwrap();
        assert_eq!(
            (take(&b), m.pending_bits()),
            (1, 0),
            "sent on function unmask"
        );
        // Disabled, then enabled.
        m.set_control(false, false).unwrap();
        assert_eq!(m.raise(1).unwrap(), Raised::Pending);
        m.set_control(true, false).unwrap();
        assert_eq!(take(&b), 1, "sent on enable");
        // Vector 0 stayed masked and untouched.
        assert_eq!((take(&a), m.is_masked(0)), (0, true));
        // Reset: masked and disabled again, pending dropped, eventfds kept.
        m.set_masked(0, 2, false).unwrap();
        m.reset();
        assert_eq!(m.raise(0).unwrap(), Raised::Pending);
        m.reset();
        assert_eq!(m.pending_bits(), 0);
        m.set_control(true, false).unwrap();
        m.set_masked(0, 1, false).unwrap();
        assert_eq!(take(&a), 0, "nothing was pending after reset");
        assert_eq!(m.raise(0).unwrap(), Raised::Signalled);
        assert!(m.set_masked(1, 2, false).is_err());
        assert_eq!(m.raise(7).unwrap(), Raised::NoEventfd);
    }

    #[test]
    fn a_sendable_vector_without_eventfd_is_lost_not_pending() {
        let mut m = MsixVectors::new(1);
        m.set_control(true, false).unwrap();
        m.set_masked(0, 1, false).unwrap();
        assert_eq!(m.raise(0).unwrap(), Raised::NoEventfd);
        assert_eq!(m.pending_bits(), 0);
        m.set_pending_bits(0b11).unwrap();
        assert_eq!(m.pending_bits(), 0, "sent (to nowhere) at once");
        m.set_masked(0, 1, true).unwrap();
        m.set_pending_bits(0b11).unwrap();
        assert_eq!(m.pending_bits(), 0b1, "only the vectors the device has");
    }
}
