//! Decoding one command after negotiation, calling the [`Device`], and encoding its
//! reply. Every failure is an [`Errno`] for the error reply.

use std::os::fd::OwnedFd;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
    VFIO_DMA_UNMAP_FLAG_ALL, VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_TYPE_MASK,
};

use crate::device::{Device, DeviceResult, DmaMapping, Errno, IrqData};
use crate::proto::{
    Command, DeviceFeature, DeviceInfo, DmaLoggingReport, DmaLoggingStart, DmaMap, DmaUnmap,
    FeatureMigDeviceState, FeatureMigration, IrqInfo, IrqSet, MigData, MigDataReadRequest,
    MigState, NoPayload, ProtoError, RegionAccess, RegionAccessData, RegionInfoReply,
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
                region_type: None,
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
            let data = feature(device, &request, max_xfer)?;
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

/// The reply data of a `DEVICE_FEATURE` request (already parsed: known flag bits, one
/// of GET/SET/PROBE, GET with SET only when probing). Follows the kernel's
/// `vfio_check_feature()`: an operation the feature does not have is `EINVAL`, a PROBE
/// of a supported operation succeeds with no data and no action, an unknown feature
/// is `ENOTSUP`.
fn feature<D: Device + ?Sized>(
    device: &mut D,
    request: &DeviceFeature,
    max_xfer: u32,
) -> DeviceResult<Vec<u8>> {
    let get = request.flags & VFIO_DEVICE_FEATURE_GET != 0;
    let set = request.flags & VFIO_DEVICE_FEATURE_SET != 0;
    let probe = request.flags & VFIO_DEVICE_FEATURE_PROBE != 0;
    // Which of GET and SET the feature has, and whether the device implements it.
    let (ops_get, ops_set) = match request.feature() {
        VFIO_DEVICE_FEATURE_MIGRATION => (true, false),
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => (true, true),
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => {
            (false, true)
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => (true, false),
        _ => return Err(Errno(libc::ENOTSUP)),
    };
    let supported = match request.feature() {
        VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => {
            device.migration_flags().is_ok()
        }
        _ => device.dma_logging_supported(),
    };
    if !supported {
        return Err(Errno(libc::ENOTSUP));
    }
    if (get && !ops_get) || (set && !ops_set) {
        return Err(Errno(libc::EINVAL));
    }
    if probe {
        return if request.data.is_empty() {
            Ok(Vec::new())
        } else {
            Err(Errno(libc::EINVAL))
        };
    }
    match request.feature() {
        VFIO_DEVICE_FEATURE_MIGRATION => {
            no_data(request)?;
            let flags = device.migration_flags()?;
            Ok(FeatureMigration { flags }.to_bytes())
        }
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE if get => {
            no_data(request)?;
            let state = device.mig_state()?;
            Ok(mig_state_data(state))
        }
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => {
            let wanted = FeatureMigDeviceState::parse(&request.data).map_err(einval)?;
            let state = MigState::from_u32(wanted.device_state).ok_or(Errno(libc::EINVAL))?;
            device.set_mig_state(state)?;
            Ok(mig_state_data(state))
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START => {
            let start = DmaLoggingStart::parse(&request.data).map_err(einval)?;
            let page_size = device.dma_logging_start(start.page_size, &start.ranges)?;
            if !page_size.is_power_of_two() {
                tracing::warn!(
                    page_size,
                    "device chose a DMA logging page size that is not a power of two"
                );
                return Err(Errno(libc::EIO));
            }
            let reply = DmaLoggingStart {
                page_size,
                ranges: start.ranges,
            };
            reply.to_bytes().map_err(einval)
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => {
            no_data(request)?;
            device.dma_logging_stop()?;
            Ok(Vec::new())
        }
        _ => {
            // VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT (GET).
            let report = DmaLoggingReport::parse(&request.data).map_err(einval)?;
            if !report.bitmap.is_empty() {
                return Err(Errno(libc::EINVAL));
            }
            let words = DmaLoggingReport::bitmap_words(report.length, report.page_size)
                .ok_or(Errno(libc::EINVAL))?;
            // The reply must fit one transfer; checked before the device allocates it.
            let bytes = words.saturating_mul(8);
            if bytes.saturating_add(DmaLoggingReport::HEADER_SIZE as u64) > u64::from(max_xfer) {
                return Err(Errno(libc::E2BIG));
            }
            let bitmap = device.dma_logging_report(report.iova, report.length, report.page_size)?;
            if bitmap.len() as u64 != words {
                tracing::warn!(
                    words,
                    got = bitmap.len(),
                    "device returned a DMA logging bitmap of the wrong size"
                );
                return Err(Errno(libc::EIO));
            }
            Ok(DmaLoggingReport { bitmap, ..report }.to_bytes())
        }
    }
}

/// Refuses feature data where the feature takes none.
fn no_data(request: &DeviceFeature) -> DeviceResult<()> {
    if request.data.is_empty() {
        Ok(())
    } else {
        Err(Errno(libc::EINVAL))
    }
}

/// `struct vfio_device_feature_mig_state` for `state` (vfio-user has no data fd: -1).
fn mig_state_data(state: MigState) -> Vec<u8> {
    FeatureMigDeviceState {
        device_state: state as u32,
        data_fd: u32::MAX,
    }
    .to_bytes()
}

fn empty() -> DeviceResult<Reply> {
    Ok((NoPayload.to_bytes(), Vec::new()))
}

fn einval(e: ProtoError) -> Errno {
    tracing::debug!(error = %e, "malformed vfio-user command");
    Errno(libc::EINVAL)
}
