//! A region of the fake device: what its builder says ([`Region`]) and what it holds
//! while served (`RegionStore`).
//!
//! A region's bytes live in memory, or, for a [`Region::memory`] region, in a memfd that
//! is passed to the client with the region's information (so the client may map it, and
//! sees what the device writes). Register regions go back to their initial contents on a
//! device reset; memory keeps its contents, as a device's RAM would.

use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};

use vfio_bindings::bindings::vfio::{
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

use super::memfd::{memfd, Mapping};
use super::FakeError;
use crate::device::{DeviceResult, Errno};
use crate::proto::SparseArea;
use crate::types::RegionInfo;

/// What a write at a given offset of a region makes the device do, after the bytes are
/// stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Signal vector `n` of IRQ type `index`, `n` being the first byte written (`ENXIO`
    /// when that vector has no eventfd).
    Irq {
        /// The IRQ type (e.g. 2, MSI-X).
        index: u32,
    },
    /// Fill guest memory with the first byte written, through the client's DMA mapping
    /// (`EFAULT` when it is not mapped): the address is the 8-byte register at `addr` and
    /// the length the 4-byte register at `len`, both in this region.
    DmaFill {
        /// Offset of the DMA address register.
        addr: u64,
        /// Offset of the DMA length register.
        len: u64,
    },
}

/// One region as the test describes it.
#[derive(Debug, Clone)]
pub struct Region {
    size: u64,
    flags: u32,
    offset: u64,
    sparse_areas: Vec<SparseArea>,
    memory: bool,
    accessible: Option<u64>,
    fill: u8,
    contents: Vec<(u64, Vec<u8>)>,
    read_only: Vec<Range<u64>>,
    triggers: Vec<(u64, Trigger)>,
    record_writes: bool,
}

impl Region {
    /// A register region of `size` bytes, readable and writable, reached by region
    /// reads and writes only.
    pub fn new(size: u64) -> Self {
        Region {
            size,
            flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
            offset: 0,
            sparse_areas: Vec::new(),
            memory: false,
            accessible: None,
            fill: 0,
            contents: Vec::new(),
            read_only: Vec::new(),
            triggers: Vec::new(),
            record_writes: false,
        }
    }

    /// A memory region of `size` bytes backed by a memfd that the client gets with the
    /// region's information (flags read, write and mmap).
    pub fn memory(size: u64) -> Self {
        Region {
            memory: true,
            flags: VFIO_REGION_INFO_FLAG_READ
                | VFIO_REGION_INFO_FLAG_WRITE
                | VFIO_REGION_INFO_FLAG_MMAP,
            ..Region::new(size)
        }
    }

    /// Replaces the `VFIO_REGION_INFO_FLAG_*` the region reports.
    pub fn flags(mut self, flags: u32) -> Self {
        self.flags = flags;
        self
    }

    /// The offset reported for `mmap()` (a memory region's bytes start there in its
    /// memfd; a multiple of the page size).
    pub fn offset(mut self, offset: u64) -> Self {
        self.offset = offset;
        self
    }

    /// Adds a sparse-mmap area (relative to the region).
    pub fn sparse(mut self, area: SparseArea) -> Self {
        self.sparse_areas.push(area);
        self
    }

    /// Makes only the first `len` bytes reachable by region reads and writes (the rest,
    /// though within the reported size, is refused with `EINVAL`).
    pub fn accessible(mut self, len: u64) -> Self {
        self.accessible = Some(len);
        self
    }

    /// Fills the initial contents with `byte`.
    pub fn fill(mut self, byte: u8) -> Self {
        self.fill = byte;
        self
    }

    /// Puts `bytes` at `at` in the initial contents.
    pub fn contents(mut self, at: u64, bytes: &[u8]) -> Self {
        self.contents.push((at, bytes.to_vec()));
        self
    }

    /// Refuses (`EINVAL`) writes that touch `range`.
    pub fn read_only(mut self, range: Range<u64>) -> Self {
        self.read_only.push(range);
        self
    }

    /// Makes a write starting at `offset` do `trigger`.
    pub fn on_write(mut self, offset: u64, trigger: Trigger) -> Self {
        self.triggers.push((offset, trigger));
        self
    }

    /// Records every write in the device's [`FakeState`](super::FakeState), for tests
    /// that check what reached the region.
    pub fn record_writes(mut self) -> Self {
        self.record_writes = true;
        self
    }

    /// Bytes the device holds: the reachable part of the region.
    fn backing_len(&self) -> u64 {
        self.accessible.map_or(self.size, |a| a.min(self.size))
    }

    /// The initial contents, `backing_len()` bytes.
    fn initial(&self) -> Result<Vec<u8>, FakeError> {
        let len = usize::try_from(self.backing_len()).map_err(|_| FakeError::RegionTooLarge)?;
        let mut bytes = vec![self.fill; len];
        for (at, data) in &self.contents {
            let start = usize::try_from(*at).map_err(|_| FakeError::RegionTooLarge)?;
            let dst = start
                .checked_add(data.len())
                .and_then(|end| bytes.get_mut(start..end))
                .ok_or(FakeError::ContentsOutside { at: *at })?;
            dst.copy_from_slice(data);
        }
        Ok(bytes)
    }
}

/// Where a served region's bytes are.
enum Backing {
    /// In memory; `initial` is restored on reset.
    Bytes { bytes: Vec<u8>, initial: Vec<u8> },
    /// In a memfd, from the region's offset.
    File { fd: OwnedFd, map: Mapping },
}

/// A region while it is served.
pub(crate) struct RegionStore {
    spec: Region,
    backing: Backing,
}

impl RegionStore {
    /// Creates the region's contents (and memfd).
    pub(crate) fn new(spec: Region) -> Result<Self, FakeError> {
        let initial = spec.initial()?;
        let backing = if spec.memory && !initial.is_empty() {
            let file_len = spec
                .offset
                .checked_add(spec.size)
                .ok_or(FakeError::RegionTooLarge)?;
            let fd = memfd(file_len).map_err(FakeError::Memory)?;
            let map_len = usize::try_from(spec.offset.saturating_add(spec.backing_len()))
                .map_err(|_| FakeError::RegionTooLarge)?;
            let map = Mapping::new(fd.as_fd(), 0, map_len).map_err(FakeError::Memory)?;
            // usize::try_from(offset) cannot fail: offset + backing length fitted.
            map.write(spec.offset as usize, &initial);
            Backing::File { fd, map }
        } else {
            Backing::Bytes {
                bytes: initial.clone(),
                initial,
            }
        };
        Ok(RegionStore { spec, backing })
    }

    /// The region's information for `index`, with a duplicate of its memfd if it has one.
    pub(crate) fn info(&self, index: u32) -> DeviceResult<RegionInfo> {
        let fd = match &self.backing {
            Backing::File { fd, .. } => Some(fd.try_clone().map_err(|_| Errno(libc::EIO))?),
            Backing::Bytes { .. } => None,
        };
        Ok(RegionInfo {
            index,
            flags: self.spec.flags,
            size: self.spec.size,
            offset: self.spec.offset,
            sparse_areas: self.spec.sparse_areas.clone(),
            fd,
        })
    }

    /// Whether writes are to be recorded.
    pub(crate) fn records_writes(&self) -> bool {
        self.spec.record_writes
    }

    /// Reads `data.len()` bytes at `offset`.
    pub(crate) fn read(&self, offset: u64, data: &mut [u8]) -> DeviceResult<()> {
        let at = self.check(offset, data.len())?;
        match &self.backing {
            Backing::Bytes { bytes, .. } => data.copy_from_slice(&bytes[at..at + data.len()]),
            Backing::File { map, .. } => {
                map.read(self.spec.offset as usize + at, data);
            }
        }
        Ok(())
    }

    /// Stores `data` at `offset`; returns the trigger of that offset, if any.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) -> DeviceResult<Option<Trigger>> {
        let at = self.check(offset, data.len())?;
        let end = offset + data.len() as u64;
        if self
            .spec
            .read_only
            .iter()
            .any(|r| offset < r.end && r.start < end)
        {
            return Err(Errno(libc::EINVAL));
        }
        match &mut self.backing {
            Backing::Bytes { bytes, .. } => bytes[at..at + data.len()].copy_from_slice(data),
            Backing::File { map, .. } => {
                map.write(self.spec.offset as usize + at, data);
            }
        }
        let trigger = self.spec.triggers.iter().find(|(o, _)| *o == offset);
        Ok(trigger.map(|(_, t)| *t))
    }

    /// Reads a little-endian-in-host-order register of `len` (at most 8) bytes.
    pub(crate) fn register(&self, offset: u64, len: usize) -> DeviceResult<u64> {
        let mut b = [0u8; 8];
        self.read(offset, b.get_mut(..len).ok_or(Errno(libc::EINVAL))?)?;
        Ok(u64::from_ne_bytes(b))
    }

    /// A device reset: register contents go back to their initial values.
    pub(crate) fn reset(&mut self) {
        if let Backing::Bytes { bytes, initial } = &mut self.backing {
            bytes.copy_from_slice(initial);
        }
    }

    /// `offset` as an index, if `offset..offset + len` is reachable.
    fn check(&self, offset: u64, len: usize) -> DeviceResult<usize> {
        let end = offset.checked_add(len as u64).ok_or(Errno(libc::EINVAL))?;
        if end > self.spec.backing_len() {
            return Err(Errno(libc::EINVAL));
        }
        // Within the backing, which fitted a usize when it was made.
        Ok(offset as usize)
    }
}
