//! Decoding one command after negotiation, calling the [`Device`], and encoding its
//! reply. Every failure is an [`Errno`] for the error reply.

use std::os::fd::OwnedFd;

use vfio_bindings::bindings::vfio::{
    VFIO_DMA_UNMAP_FLAG_ALL, VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_TYPE_MASK,
};

use crate::device::{Device, DeviceResult, DmaMapping, Errno, IrqData};
use crate::proto::{
    Command, DeviceFeature, DeviceInfo, DmaMap, DmaUnmap, IrqInfo, IrqSet, MigData,
    MigDataReadRequest, NoPayload, ProtoError, RegionAccess, RegionAccessData, RegionInfoReply,
    RegionInfoRequest, RegionIoFdsRequest,
};
use crate::server::ServerConfig;

/// What the server knows of the client after negotiation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    /// Most descriptors the client accepts in one message.
    pub(crate) max_msg_fds: u32,
}

/// A reply payload and the descriptors to send with it.
type Reply = (Vec<u8>, Vec<OwnedFd>);

/// Handles `command` with `payload` and the descriptors `fds` that came with it.
/// Descriptors the command does not take are closed when dropped.
pub(crate) fn handle<D: Device + ?Sized>(
    device: &mut D,
    config: &ServerConfig,
    peer: &Peer,
    command: Command,
    payload: Vec<u8>,
    mut fds: Vec<OwnedFd>,
) -> DeviceResult<Reply> {
    let max_xfer = config.max_data_xfer_size;
    match command {
        Command::DmaMap => {
            let map = DmaMap::parse(&payload).map_err(einval)?;
            if fds.len() > 1 {
                return Err(Errno(libc::EINVAL));
            }
            device.dma_map(DmaMapping {
                iova: map.iova,
                size: map.size,
                file_offset: map.offset,
                readable: map.readable,
                writable: map.writable,
                fd: fds.pop(),
            })?;
            empty()
        }
        Command::DmaUnmap => {
            let unmap = DmaUnmap::parse(&payload).map_err(einval)?;
            if unmap.flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
                return Err(Errno(libc::ENOTSUP));
            }
            device.dma_unmap(unmap.iova, unmap.size)?;
            Ok((payload, Vec::new()))
        }
        Command::DeviceGetInfo => {
            DeviceInfo::parse(&payload).map_err(einval)?;
            let info = device.device_info();
            let reply = DeviceInfo {
                argsz: DeviceInfo::SIZE as u32,
                flags: info.flags,
                num_regions: info.num_regions,
                num_irqs: info.num_irqs,
            };
            Ok((reply.to_bytes(), Vec::new()))
        }
        Command::DeviceGetRegionInfo => {
            let request = RegionInfoRequest::parse(&payload).map_err(einval)?;
            let info = device.region_info(request.index)?;
            let reply = RegionInfoReply {
                argsz: 0,
                flags: info.flags,
                index: request.index,
                size: info.size,
                offset: info.offset,
                sparse_areas: info.sparse_areas,
            };
            let bytes = reply.to_bytes_within(request.argsz).map_err(einval)?;
            let fds = match info.fd {
                Some(fd) if peer.max_msg_fds > 0 => vec![fd],
                _ => Vec::new(),
            };
            Ok((bytes, fds))
        }
        Command::DeviceGetRegionIoFds => {
            RegionIoFdsRequest::parse(&payload).map_err(einval)?;
            Err(Errno(libc::ENOTSUP))
        }
        Command::DeviceGetIrqInfo => {
            let request = IrqInfo::parse(&payload).map_err(einval)?;
            let info = device.irq_info(request.index)?;
            let reply = IrqInfo {
                argsz: IrqInfo::SIZE as u32,
                flags: info.flags,
                index: request.index,
                count: info.count,
            };
            Ok((reply.to_bytes(), Vec::new()))
        }
        Command::DeviceSetIrqs => {
            let set = IrqSet::parse(&payload).map_err(einval)?;
            let data = match set.flags & VFIO_IRQ_SET_DATA_TYPE_MASK {
                VFIO_IRQ_SET_DATA_EVENTFD => {
                    if !fds.is_empty() && fds.len() != set.count as usize {
                        return Err(Errno(libc::EINVAL));
                    }
                    IrqData::Eventfds(fds)
                }
                other => {
                    if !fds.is_empty() {
                        return Err(Errno(libc::EINVAL));
                    }
                    if other == VFIO_IRQ_SET_DATA_BOOL {
                        IrqData::Bool(set.data.iter().map(|b| *b != 0).collect())
                    } else {
                        IrqData::None
                    }
                }
            };
            device.set_irqs(set.index, set.flags, set.start, set.count, data)?;
            empty()
        }
        Command::RegionRead => {
            let request = RegionAccess::parse(&payload).map_err(einval)?;
            if request.count > max_xfer {
                return Err(Errno(libc::E2BIG));
            }
            let mut data = vec![0u8; request.count as usize];
            device.region_read(request.region, request.offset, &mut data)?;
            let reply = RegionAccessData {
                offset: request.offset,
                region: request.region,
                data,
            };
            Ok((reply.to_bytes().map_err(einval)?, Vec::new()))
        }
        Command::RegionWrite => {
            let request = RegionAccessData::parse(&payload).map_err(einval)?;
            if request.data.len() > max_xfer as usize {
                return Err(Errno(libc::E2BIG));
            }
            device.region_write(request.region, request.offset, &request.data)?;
            let reply = RegionAccess {
                offset: request.offset,
                region: request.region,
                count: request.data.len() as u32,
            };
            Ok((reply.to_bytes(), Vec::new()))
        }
        Command::DeviceReset => {
            NoPayload::parse(&payload).map_err(einval)?;
            device.reset()?;
            empty()
        }
        Command::DeviceFeature => {
            let request = DeviceFeature::parse(&payload).map_err(einval)?;
            let data = device.device_feature(&request)?;
            let size = DeviceFeature::HEADER_SIZE.saturating_add(data.len());
            if size > request.argsz as usize {
                return Err(Errno(libc::E2BIG));
            }
            let reply = DeviceFeature {
                argsz: size as u32,
                flags: request.flags,
                data,
            };
            Ok((reply.to_bytes().map_err(einval)?, Vec::new()))
        }
        Command::MigDataRead => {
            let request = MigDataReadRequest::parse(&payload).map_err(einval)?;
            if request.size > max_xfer {
                return Err(Errno(libc::E2BIG));
            }
            let data = device.mig_data_read(request.size)?;
            if data.len() > request.size as usize {
                tracing::warn!(
                    asked = request.size,
                    got = data.len(),
                    "device returned more migration data than asked"
                );
                return Err(Errno(libc::EIO));
            }
            Ok((MigData { data }.to_bytes().map_err(einval)?, Vec::new()))
        }
        Command::MigDataWrite => {
            let request = MigData::parse(&payload).map_err(einval)?;
            if request.data.len() > max_xfer as usize {
                return Err(Errno(libc::E2BIG));
            }
            device.mig_data_write(&request.data)?;
            empty()
        }
        // Server-to-client commands have no meaning here.
        Command::DmaRead | Command::DmaWrite => Err(Errno(libc::EINVAL)),
        // Handled by the session.
        Command::Version => Err(Errno(libc::EINVAL)),
        // Deprecated or not implemented (and not advertised).
        Command::DirtyPages | Command::RegionWriteMulti => Err(Errno(libc::ENOTSUP)),
    }
}

fn empty() -> DeviceResult<Reply> {
    Ok((NoPayload.to_bytes(), Vec::new()))
}

fn einval(e: ProtoError) -> Errno {
    tracing::debug!(error = %e, "malformed vfio-user command");
    Errno(libc::EINVAL)
}
