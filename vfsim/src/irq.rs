//! The MSI-X vectors: one eventfd per vector, given by `SET_IRQS` on
//! `VFIO_PCI_MSIX_IRQ_INDEX`. The VMM emulates the MSI-X table and masking; the device
//! only signals.

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

/// The eventfd of each vector, if assigned.
#[derive(Debug)]
pub struct MsixVectors {
    fds: Vec<Option<File>>,
}

impl MsixVectors {
    /// `count` vectors, none assigned.
    pub fn new(count: u16) -> Self {
        MsixVectors {
            fds: (0..count).map(|_| None).collect(),
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

    /// Checks `start..start + count` and signals each assigned vector in it.
    pub fn trigger_range(&self, start: u32, count: u32) -> Result<(), IrqError> {
        for v in self.range(start, count)? {
            self.trigger(v as u16)?;
        }
        Ok(())
    }

    /// Signals `vector`; returns whether an eventfd was assigned to it.
    pub fn trigger(&self, vector: u16) -> Result<bool, IrqError> {
        match self.fds.get(vector as usize) {
            Some(Some(file)) => {
                let mut f: &File = file;
                f.write_all(&1u64.to_ne_bytes())
                    .map_err(|source| IrqError::Signal { vector, source })?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
