//! Guest memory as the device sees it: the client's DMA mappings, each an `mmap()` of
//! the file descriptor that came with `DMA_MAP`, looked up by IOVA. Every access is
//! bounds-checked and may span adjacent mappings.
//!
//! [`GuestMemory::write`] is the device's only way to write guest memory (the mappings are
//! private to this module), so the DMA write log it keeps while logging is on is the
//! ground truth of what the device dirtied.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use crate::mmap::{Mapping, MmapError};

/// Why a DMA mapping or a guest memory access failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestMemError {
    /// `DMA_MAP` came without a file descriptor.
    #[error("DMA mapping {iova:#x}+{size:#x} came without a file descriptor; only fd-backed mappings are supported")]
    NoFd {
        /// DMA address.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// The range is empty or wraps around.
    #[error("DMA range {iova:#x}+{size:#x} is empty or wraps around")]
    BadRange {
        /// DMA address.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// The new mapping overlaps an existing one.
    #[error("DMA mapping {iova:#x}+{size:#x} overlaps the existing mapping {other_iova:#x}+{other_size:#x}")]
    Overlap {
        /// DMA address.
        iova: u64,
        /// Size.
        size: u64,
        /// The existing mapping's address.
        other_iova: u64,
        /// The existing mapping's size.
        other_size: u64,
    },
    /// Too many mappings.
    #[error("DMA mapping {iova:#x}+{size:#x} refused: already {max} mappings")]
    TooMany {
        /// DMA address.
        iova: u64,
        /// Size.
        size: u64,
        /// The limit.
        max: usize,
    },
    /// `DMA_UNMAP` named no mapping.
    #[error("no DMA mapping lies within {iova:#x}+{size:#x}")]
    NotMapped {
        /// DMA address.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// Mapping the descriptor failed.
    #[error("mapping the memory of DMA range {iova:#x}+{size:#x} failed: {source}")]
    Map {
        /// DMA address.
        iova: u64,
        /// Size.
        size: u64,
        /// The mapping error.
        source: MmapError,
    },
    /// An access touched an address outside every mapping (or a read-only one for
    /// writes).
    #[error("guest memory access of {len:#x} bytes at {addr:#x} failed: {reason}")]
    Access {
        /// Guest address of the access.
        addr: u64,
        /// Length of the access.
        len: usize,
        /// What was wrong.
        reason: &'static str,
    },
}

/// Most mappings kept at once.
pub const MAX_DMA_MAPS: usize = 256;
/// Granularity of the DMA write logs: the unit the vfio-user reports' bitmaps are built
/// from, and the pages the PF socket's log lists.
pub use vfio_user::proto::dirty_bitmap::LOG_PAGE_SIZE;
// One granularity for both logs: the PF socket sends its pages as logged, so it must be
// the PF protocol's too.
const _: () = assert!(LOG_PAGE_SIZE == pf_protocol::proto::DMA_LOG_PAGE_SIZE);

#[derive(Debug)]
struct DmaRegion {
    iova: u64,
    size: u64,
    map: Mapping,
}

impl DmaRegion {
    fn end(&self) -> u64 {
        self.iova + self.size
    }
}

/// The client's DMA mappings, sorted by address, never overlapping, and the logs of the
/// pages written while logging is on.
#[derive(Debug, Default)]
pub struct GuestMemory {
    regions: Vec<DmaRegion>,
    logs: Mutex<Logs>,
}

/// The two independent DMA write logs: the PF socket's (ground truth, every write) and
/// the one the vfio-user client asked for (`--native-migration`), limited to its
/// ranges. Each holds pages (IOVA rounded down to [`LOG_PAGE_SIZE`]) written since it
/// was started or last taken; `None` while off.
#[derive(Debug, Default)]
struct Logs {
    pf: Option<BTreeSet<u64>>,
    native: Option<RangedLog>,
}

#[derive(Debug, Default)]
struct RangedLog {
    /// `(iova, length)` of the ranges logged, sorted; empty for every write.
    ranges: Vec<(u64, u64)>,
    pages: BTreeSet<u64>,
}

impl RangedLog {
    /// Whether page `page` overlaps a logged range.
    fn covers(&self, page: u64) -> bool {
        let end = page.saturating_add(LOG_PAGE_SIZE);
        self.ranges.is_empty()
            || self
                .ranges
                .iter()
                .any(|&(iova, len)| page < iova.saturating_add(len) && iova < end)
    }
}

impl GuestMemory {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Maps `size` bytes of `fd` from `file_offset` at `iova`.
    pub fn add(
        &mut self,
        iova: u64,
        size: u64,
        fd: Option<OwnedFd>,
        file_offset: u64,
        writable: bool,
    ) -> Result<(), GuestMemError> {
        let end = iova
            .checked_add(size)
            .filter(|_| size > 0)
            .ok_or(GuestMemError::BadRange { iova, size })?;
        let fd = fd.ok_or(GuestMemError::NoFd { iova, size })?;
        if let Some(o) = self.regions.iter().find(|r| r.iova < end && iova < r.end()) {
            return Err(GuestMemError::Overlap {
                iova,
                size,
                other_iova: o.iova,
                other_size: o.size,
            });
        }
        if self.regions.len() >= MAX_DMA_MAPS {
            return Err(GuestMemError::TooMany {
                iova,
                size,
                max: MAX_DMA_MAPS,
            });
        }
        let map = Mapping::new(fd.as_fd(), file_offset, size, writable)
            .map_err(|source| GuestMemError::Map { iova, size, source })?;
        let at = self.regions.partition_point(|r| r.iova < iova);
        self.regions.insert(at, DmaRegion { iova, size, map });
        Ok(())
    }

    /// Removes (and unmaps) every mapping lying within `iova..iova + size`.
    pub fn remove(&mut self, iova: u64, size: u64) -> Result<(), GuestMemError> {
        let end = iova
            .checked_add(size)
            .filter(|_| size > 0)
            .ok_or(GuestMemError::BadRange { iova, size })?;
        let before = self.regions.len();
        self.regions.retain(|r| !(r.iova >= iova && r.end() <= end));
        if self.regions.len() == before {
            return Err(GuestMemError::NotMapped { iova, size });
        }
        Ok(())
    }

    /// Removes every mapping (the DMA write log stays as it is).
    pub fn clear(&mut self) {
        self.regions.clear();
    }

    fn logs(&self) -> MutexGuard<'_, Logs> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the PF side's log of DMA writes, empty; false if it was already on.
    pub fn log_start(&self) -> bool {
        let mut logs = self.logs();
        if logs.pf.is_some() {
            return false;
        }
        logs.pf = Some(BTreeSet::new());
        true
    }

    /// Stops the PF side's log and drops it; false if it was off.
    pub fn log_stop(&self) -> bool {
        self.logs().pf.take().is_some()
    }

    /// Whether the PF side's log is on.
    pub fn logging(&self) -> bool {
        self.logs().pf.is_some()
    }

    /// The pages written since the PF side's log started or was last taken, sorted,
    /// each once, and an empty log to go on with; `None` while it is off.
    pub fn log_take(&self) -> Option<Vec<u64>> {
        self.logs()
            .pf
            .as_mut()
            .map(|set| std::mem::take(set).into_iter().collect())
    }

    /// Starts the vfio-user client's log of DMA writes into `ranges` (`(iova,
    /// length)`; all writes if empty), empty; false if it was already on.
    pub fn native_log_start(&self, mut ranges: Vec<(u64, u64)>) -> bool {
        let mut logs = self.logs();
        if logs.native.is_some() {
            return false;
        }
        ranges.sort_unstable();
        logs.native = Some(RangedLog {
            ranges,
            pages: BTreeSet::new(),
        });
        true
    }

    /// Stops the client's log and drops it; false if it was off.
    pub fn native_log_stop(&self) -> bool {
        self.logs().native.take().is_some()
    }

    /// Whether the client's log is on.
    pub fn native_logging(&self) -> bool {
        self.logs().native.is_some()
    }

    /// Takes the logged pages that overlap `iova..iova + length` out of the client's
    /// log (sorted, each once); `None` while it is off.
    pub fn native_log_take(&self, iova: u64, length: u64) -> Option<Vec<u64>> {
        let mut logs = self.logs();
        let log = logs.native.as_mut()?;
        let first = iova - iova % LOG_PAGE_SIZE;
        let end = iova.saturating_add(length);
        let taken: Vec<u64> = log.pages.range(first..end).copied().collect();
        for p in &taken {
            log.pages.remove(p);
        }
        Some(taken)
    }

    /// Records that `len` bytes at `addr` were written (len > 0).
    fn record(&self, addr: u64, len: usize) {
        let mut logs = self.logs();
        if logs.pf.is_none() && logs.native.is_none() {
            return;
        }
        let first = addr / LOG_PAGE_SIZE;
        let last = addr.saturating_add(len as u64 - 1) / LOG_PAGE_SIZE;
        let pages = (first..=last).map(|p| p * LOG_PAGE_SIZE);
        let Logs { pf, native } = &mut *logs;
        if let Some(set) = pf {
            set.extend(pages.clone());
        }
        if let Some(log) = native {
            for p in pages {
                if log.covers(p) {
                    log.pages.insert(p);
                }
            }
        }
    }

    /// Reads `out.len()` bytes at guest address `addr`.
    pub fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), GuestMemError> {
        let len = out.len();
        let mut done = 0;
        while done < len {
            let a = Self::advance(addr, done, len)?;
            let (r, off, n) = self.locate(a, len - done, addr, len)?;
            r.map
                .read(off, &mut out[done..done + n])
                .map_err(|_| access(addr, len, "the mapping refused the read"))?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at guest address `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), GuestMemError> {
        let len = data.len();
        let mut done = 0;
        while done < len {
            let a = Self::advance(addr, done, len)?;
            let (r, off, n) = self.locate(a, len - done, addr, len)?;
            r.map
                .write(off, &data[done..done + n])
                .map_err(|_| access(addr, len, "the mapping is not writable by the device"))?;
            self.record(a, n);
            done += n;
        }
        Ok(())
    }

    /// Reads a little-endian `u16`.
    pub fn read_u16(&self, addr: u64) -> Result<u16, GuestMemError> {
        let mut b = [0; 2];
        self.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Writes a little-endian `u16`.
    pub fn write_u16(&self, addr: u64, v: u16) -> Result<(), GuestMemError> {
        self.write(addr, &v.to_le_bytes())
    }

    fn advance(addr: u64, done: usize, len: usize) -> Result<u64, GuestMemError> {
        addr.checked_add(done as u64)
            .ok_or_else(|| access(addr, len, "the range wraps around the address space"))
    }

    /// The region holding `a`, the offset of `a` in it and how many of `want` bytes it
    /// holds.
    fn locate(
        &self,
        a: u64,
        want: usize,
        addr: u64,
        len: usize,
    ) -> Result<(&DmaRegion, u64, usize), GuestMemError> {
        let i = self.regions.partition_point(|r| r.iova <= a);
        let r = i
            .checked_sub(1)
            .map(|i| &self.regions[i])
            .filter(|r| a < r.end())
            .ok_or_else(|| access(addr, len, "the address is not DMA-mapped"))?;
        let n = (r.end() - a).min(want as u64) as usize;
        Ok((r, a - r.iova, n))
    }
}

fn access(addr: u64, len: usize, reason: &'static str) -> GuestMemError {
    GuestMemError::Access { addr, len, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmap::memfd;

    #[test]
    fn accesses_span_adjacent_mappings_and_stop_at_holes() {
        let fd = memfd(c"g", 0x3000).unwrap();
        let mut m = GuestMemory::new();
        m.add(0x10000, 0x1000, Some(fd.try_clone().unwrap()), 0, true)
            .unwrap();
        m.add(0x11000, 0x1000, Some(fd.try_clone().unwrap()), 0x1000, true)
            .unwrap();
        assert!(m
            .add(0x10800, 0x1000, Some(fd.try_clone().unwrap()), 0, true)
            .is_err());
        assert!(m.add(0x20000, 0x1000, None, 0, true).is_err());
        m.write(0x10ffe, &[1, 2, 3, 4]).unwrap();
        let mut b = [0; 4];
        m.read(0x10ffe, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(m.read(0x11ffe, &mut b).is_err());
        assert!(m.read(u64::MAX - 1, &mut b).is_err());
        assert!(m.read(0, &mut b).is_err());
        m.remove(0x11000, 0x1000).unwrap();
        assert!(m.read(0x10ffe, &mut b).is_err());
        assert!(m.remove(0x11000, 0x1000).is_err());
    }

    #[test]
    fn the_log_holds_exactly_the_pages_written() {
        let fd = memfd(c"g", 0x4000).unwrap();
        let mut m = GuestMemory::new();
        m.add(0x10000, 0x3000, Some(fd.try_clone().unwrap()), 0, true)
            .unwrap();
        m.add(0x20000, 0x1000, Some(fd.try_clone().unwrap()), 0, false)
            .unwrap();
        assert_eq!(m.log_take(), None);
        m.write(0x10000, &[1]).unwrap(); // before the start: not logged
        assert!(m.log_start() && !m.log_start() && m.logging());
        m.write(0x10ffe, &[1, 2, 3, 4]).unwrap(); // spans two pages
        m.write(0x10001, &[1]).unwrap();
        let mut b = [0; 8];
        m.read(0x12000, &mut b).unwrap(); // reads are not logged
        assert!(m.write(0x20000, &[1]).is_err()); // refused writes are not logged
                                                  // A write that fails half-way logs the part that was written.
        assert!(m.write(0x12ffc, &[0; 8]).is_err());
        assert_eq!(m.log_take(), Some(vec![0x10000, 0x11000, 0x12000]));
        assert_eq!(m.log_take(), Some(vec![]));
        m.clear();
        assert!(m.logging());
        assert!(m.log_stop() && !m.log_stop() && !m.logging());
    }

    #[test]
    fn the_native_log_keeps_its_ranges_and_is_independent_of_the_pf_log() {
        let fd = memfd(c"g", 0x4000).unwrap();
        let mut m = GuestMemory::new();
        m.add(0x10000, 0x4000, Some(fd), 0, true).unwrap();
        assert_eq!(m.native_log_take(0, u64::MAX), None);
        assert!(m.native_log_start(vec![(0x12000, 0x1000), (0x10000, 0x800)]));
        assert!(!m.native_log_start(vec![]) && m.native_logging());
        assert!(m.log_start());
        m.write(0x10ffe, &[1, 2, 3, 4]).unwrap(); // pages 0x10000 (in range), 0x11000 (not)
        m.write(0x12345, &[1]).unwrap();
        m.write(0x13000, &[1]).unwrap(); // outside every range
        assert_eq!(m.native_log_take(0x12000, 0x1000), Some(vec![0x12000]));
        assert_eq!(m.native_log_take(0x12000, 0x1000), Some(vec![]));
        assert_eq!(m.native_log_take(0, u64::MAX), Some(vec![0x10000]));
        assert_eq!(
            m.log_take(),
            Some(vec![0x10000, 0x11000, 0x12000, 0x13000]),
            "the PF log saw everything"
        );
        assert!(m.native_log_stop() && !m.native_log_stop() && m.logging());
        assert!(m.native_log_start(vec![]));
        m.write(0x13000, &[1]).unwrap();
        assert_eq!(m.native_log_take(0x13000, 1), Some(vec![0x13000]));
    }
}
