//! The command numbers of the header's `command` field.

use std::fmt;

/// A vfio-user command, as carried in [`Header::command`](super::Header::command).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// `VFIO_USER_VERSION`: version and capability negotiation (client -> server).
    Version = 1,
    /// `VFIO_USER_DMA_MAP`: make client memory available for DMA (client -> server).
    DmaMap = 2,
    /// `VFIO_USER_DMA_UNMAP`: withdraw a DMA mapping (client -> server).
    DmaUnmap = 3,
    /// `VFIO_USER_DEVICE_GET_INFO` (client -> server).
    DeviceGetInfo = 4,
    /// `VFIO_USER_DEVICE_GET_REGION_INFO` (client -> server).
    DeviceGetRegionInfo = 5,
    /// `VFIO_USER_DEVICE_GET_REGION_IO_FDS` (client -> server; optional).
    DeviceGetRegionIoFds = 6,
    /// `VFIO_USER_DEVICE_GET_IRQ_INFO` (client -> server).
    DeviceGetIrqInfo = 7,
    /// `VFIO_USER_DEVICE_SET_IRQS` (client -> server).
    DeviceSetIrqs = 8,
    /// `VFIO_USER_REGION_READ` (client -> server).
    RegionRead = 9,
    /// `VFIO_USER_REGION_WRITE` (client -> server).
    RegionWrite = 10,
    /// `VFIO_USER_DMA_READ` (server -> client).
    DmaRead = 11,
    /// `VFIO_USER_DMA_WRITE` (server -> client).
    DmaWrite = 12,
    /// `VFIO_USER_DEVICE_RESET` (client -> server).
    DeviceReset = 13,
    /// `VFIO_USER_DIRTY_PAGES`: protocol 0.1 dirty page tracking (libvfio-user 0.1), since
    /// dropped from the specification; the client sends it, this crate's server refuses it.
    DirtyPages = 14,
    /// `VFIO_USER_REGION_WRITE_MULTI`: not implemented, refused when received.
    RegionWriteMulti = 15,
    /// `VFIO_USER_DEVICE_FEATURE` (client -> server).
    DeviceFeature = 16,
    /// `VFIO_USER_MIG_DATA_READ` (client -> server).
    MigDataRead = 17,
    /// `VFIO_USER_MIG_DATA_WRITE` (client -> server).
    MigDataWrite = 18,
}

impl Command {
    /// Every command, in numeric order.
    pub const ALL: [Command; 18] = [
        Command::Version,
        Command::DmaMap,
        Command::DmaUnmap,
        Command::DeviceGetInfo,
        Command::DeviceGetRegionInfo,
        Command::DeviceGetRegionIoFds,
        Command::DeviceGetIrqInfo,
        Command::DeviceSetIrqs,
        Command::RegionRead,
        Command::RegionWrite,
        Command::DmaRead,
        Command::DmaWrite,
        Command::DeviceReset,
        Command::DirtyPages,
        Command::RegionWriteMulti,
        Command::DeviceFeature,
        Command::MigDataRead,
        Command::MigDataWrite,
    ];

    /// The command with wire number `value`, if there is one.
    pub fn from_u16(value: u16) -> Option<Command> {
        Command::ALL.iter().copied().find(|c| *c as u16 == value)
    }

    /// The specification's name, e.g. `VFIO_USER_DMA_MAP`.
    pub fn name(self) -> &'static str {
        match self {
            Command::Version => "VFIO_USER_VERSION",
            Command::DmaMap => "VFIO_USER_DMA_MAP",
            Command::DmaUnmap => "VFIO_USER_DMA_UNMAP",
            Command::DeviceGetInfo => "VFIO_USER_DEVICE_GET_INFO",
            Command::DeviceGetRegionInfo => "VFIO_USER_DEVICE_GET_REGION_INFO",
            Command::DeviceGetRegionIoFds => "VFIO_USER_DEVICE_GET_REGION_IO_FDS",
            Command::DeviceGetIrqInfo => "VFIO_USER_DEVICE_GET_IRQ_INFO",
            Command::DeviceSetIrqs => "VFIO_USER_DEVICE_SET_IRQS",
            Command::RegionRead => "VFIO_USER_REGION_READ",
            Command::RegionWrite => "VFIO_USER_REGION_WRITE",
            Command::DmaRead => "VFIO_USER_DMA_READ",
            Command::DmaWrite => "VFIO_USER_DMA_WRITE",
            Command::DeviceReset => "VFIO_USER_DEVICE_RESET",
            Command::DirtyPages => "VFIO_USER_DIRTY_PAGES",
            Command::RegionWriteMulti => "VFIO_USER_REGION_WRITE_MULTI",
            Command::DeviceFeature => "VFIO_USER_DEVICE_FEATURE",
            Command::MigDataRead => "VFIO_USER_MIG_DATA_READ",
            Command::MigDataWrite => "VFIO_USER_MIG_DATA_WRITE",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_specification() {
        for (i, c) in Command::ALL.iter().enumerate() {
            assert_eq!(*c as u16, i as u16 + 1);
            assert_eq!(Command::from_u16(i as u16 + 1), Some(*c));
        }
        assert_eq!(Command::from_u16(0), None);
        assert_eq!(Command::from_u16(19), None);
        assert_eq!(Command::MigDataWrite as u16, 18);
        assert_eq!(Command::DmaMap.to_string(), "VFIO_USER_DMA_MAP");
    }
}
