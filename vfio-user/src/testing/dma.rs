//! The client memory the fake device was given with `DMA_MAP`: a table of mappings,
//! each mapped into this process the first time the device writes to it (so a mapping
//! of a file that cannot be mapped is still accepted and recorded).

use std::os::fd::{AsFd, OwnedFd};

use super::memfd::Mapping;
use crate::device::{DeviceResult, DmaMapping, Errno};

/// One `DMA_MAP`.
struct Area {
    iova: u64,
    size: u64,
    file_offset: u64,
    fd: Option<OwnedFd>,
    map: Option<Mapping>,
}

impl Area {
    fn end(&self) -> u64 {
        self.iova.saturating_add(self.size)
    }
}

/// The device's DMA mappings.
#[derive(Default)]
pub(crate) struct DmaTable {
    areas: Vec<Area>,
}

impl DmaTable {
    /// `DMA_MAP`: refused (`EEXIST`) when it overlaps a mapping.
    pub(crate) fn map(&mut self, m: DmaMapping) -> DeviceResult<()> {
        let end = m.iova.checked_add(m.size).ok_or(Errno(libc::EINVAL))?;
        if self.areas.iter().any(|a| m.iova < a.end() && a.iova < end) {
            return Err(Errno(libc::EEXIST));
        }
        self.areas.push(Area {
            iova: m.iova,
            size: m.size,
            file_offset: m.file_offset,
            fd: m.fd,
            map: None,
        });
        Ok(())
    }

    /// `DMA_UNMAP` of exactly one mapping (`ENOENT` otherwise).
    pub(crate) fn unmap(&mut self, iova: u64, size: u64) -> DeviceResult<()> {
        let i = self
            .areas
            .iter()
            .position(|a| a.iova == iova && a.size == size)
            .ok_or(Errno(libc::ENOENT))?;
        self.areas.remove(i);
        Ok(())
    }

    /// The device writes `data` at DMA address `addr` (`EFAULT` unless one mapping with
    /// a file covers it all).
    pub(crate) fn write(&mut self, addr: u64, data: &[u8]) -> DeviceResult<()> {
        let end = addr
            .checked_add(data.len() as u64)
            .ok_or(Errno(libc::EFAULT))?;
        let area = self
            .areas
            .iter_mut()
            .find(|a| addr >= a.iova && end <= a.end())
            .ok_or(Errno(libc::EFAULT))?;
        if area.map.is_none() {
            let fd = area.fd.as_ref().ok_or(Errno(libc::EFAULT))?;
            let len = usize::try_from(area.size).map_err(|_| Errno(libc::EFAULT))?;
            let map = Mapping::new(fd.as_fd(), area.file_offset, len)
                .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EFAULT)))?;
            area.map = Some(map);
        }
        let map = area.map.as_ref().ok_or(Errno(libc::EFAULT))?;
        // Within the area (checked above), whose length fitted a usize.
        if map.write((addr - area.iova) as usize, data) {
            Ok(())
        } else {
            Err(Errno(libc::EFAULT))
        }
    }

    /// Drops every mapping (the client went away).
    pub(crate) fn clear(&mut self) {
        self.areas.clear();
    }
}
