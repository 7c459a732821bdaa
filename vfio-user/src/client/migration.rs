//! The client's migration calls: `DEVICE_FEATURE` with the migration, device-state and
//! DMA-logging features, `MIG_DATA_READ` and `MIG_DATA_WRITE`. Each is one or more
//! ordinary requests (deadline, lock, broken-connection rules of [`Client`]); a reply
//! that does not match its request breaks the connection like any other violation.

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
};

use super::{invalid, Client, ClientError};
use crate::proto::dirty_bitmap;
use crate::proto::dirty_pages::{self, BitmapRange, DIRTY_PAGES_FLAG_START, DIRTY_PAGES_FLAG_STOP};
use crate::proto::{
    Command, DeviceFeature, DmaLoggingRange, DmaLoggingReport, DmaLoggingStart,
    FeatureMigDeviceState, FeatureMigration, MigData, MigDataReadRequest, MigState, NoPayload,
};

/// Which operation of a feature a [`Client::probe_feature`] asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureOp {
    /// `VFIO_DEVICE_FEATURE_GET`.
    Get,
    /// `VFIO_DEVICE_FEATURE_SET`.
    Set,
}

impl Client {
    /// `DEVICE_FEATURE` with `flags` and `data`; returns the reply's data, checked to
    /// echo the request's flags and to fit `reply_room` bytes (`argsz` is 8 + that).
    fn feature(
        &self,
        flags: u32,
        data: Vec<u8>,
        reply_room: usize,
    ) -> Result<Vec<u8>, ClientError> {
        let command = Command::DeviceFeature;
        let argsz = DeviceFeature::HEADER_SIZE.saturating_add(reply_room);
        let argsz = u32::try_from(argsz).map_err(|_| invalid(command, "reply size overflows"))?;
        let request = DeviceFeature { argsz, flags, data };
        let bytes = request.to_bytes().map_err(|e| invalid(command, e))?;
        self.call(command, &bytes, &[], |msg| {
            let reply = DeviceFeature::parse(&msg.payload).map_err(|e| e.to_string())?;
            if reply.flags != flags {
                return Err(format!(
                    "reply has flags {:#x}, the request {flags:#x}",
                    reply.flags
                ));
            }
            if reply.data.len() > reply_room {
                return Err(format!(
                    "reply has {} bytes of feature data, at most {reply_room} were allowed",
                    reply.data.len()
                ));
            }
            Ok(reply.data)
        })
    }

    /// Whether the server implements `op` of device feature `feature`
    /// (`VFIO_DEVICE_FEATURE_PROBE`). A refusal is `false`; only transport failures
    /// and protocol violations are errors.
    pub fn probe_feature(&self, feature: u32, op: FeatureOp) -> Result<bool, ClientError> {
        let op = match op {
            FeatureOp::Get => VFIO_DEVICE_FEATURE_GET,
            FeatureOp::Set => VFIO_DEVICE_FEATURE_SET,
        };
        match self.feature(VFIO_DEVICE_FEATURE_PROBE | op | feature, Vec::new(), 0) {
            Ok(_) => Ok(true),
            Err(ClientError::Remote { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The device's migration flags (`VFIO_DEVICE_FEATURE_MIGRATION` GET):
    /// `VFIO_MIGRATION_STOP_COPY`, possibly with `VFIO_MIGRATION_PRE_COPY`. A server
    /// without migration refuses it ([`ClientError::Remote`], usually `ENOTSUP`).
    pub fn migration_flags(&self) -> Result<u64, ClientError> {
        let flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION;
        let data = self.feature(flags, Vec::new(), FeatureMigration::SIZE)?;
        FeatureMigration::parse(&data)
            .map(|m| m.flags)
            .map_err(|e| self.violation(Command::DeviceFeature, e.to_string()))
    }

    /// The device's migration state (`VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` GET).
    pub fn mig_state(&self) -> Result<MigState, ClientError> {
        let flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
        let data = self.feature(flags, Vec::new(), FeatureMigDeviceState::SIZE)?;
        let state = FeatureMigDeviceState::parse(&data)
            .map_err(|e| self.violation(Command::DeviceFeature, e.to_string()))?;
        MigState::from_u32(state.device_state).ok_or_else(|| {
            self.violation(
                Command::DeviceFeature,
                format!("undefined migration state {}", state.device_state),
            )
        })
    }

    /// Moves the device to `state` (`VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` SET); the
    /// server walks the specification's arcs and answers once it is there. A refused
    /// transition is [`ClientError::Remote`]: ask [`Self::mig_state`] where the device is.
    pub fn set_mig_state(&self, state: MigState) -> Result<(), ClientError> {
        let command = Command::DeviceFeature;
        let flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
        let data = FeatureMigDeviceState {
            device_state: state as u32,
            data_fd: u32::MAX,
        }
        .to_bytes();
        let reply = self.feature(flags, data, FeatureMigDeviceState::SIZE)?;
        let now = FeatureMigDeviceState::parse(&reply)
            .map_err(|e| self.violation(command, e.to_string()))?;
        if now.device_state != state as u32 {
            return Err(self.violation(
                command,
                format!(
                    "reply reports state {} after a successful move to {state}",
                    now.device_state
                ),
            ));
        }
        Ok(())
    }

    /// Up to `size` bytes of migration data (`MIG_DATA_READ`, `size` at most
    /// [`Negotiated::max_data_xfer_size`](super::Negotiated::max_data_xfer_size)); fewer
    /// means the server has no more for now (in `STOP_COPY`: the end). The reply's `size`
    /// field says how much was read; padding after it (libvfio-user pads every reply to
    /// the size asked) is dropped.
    pub fn mig_data_read(&self, size: u32) -> Result<Vec<u8>, ClientError> {
        let command = Command::MigDataRead;
        let max = self.negotiated().max_data_xfer_size;
        if size == 0 || size > max {
            return Err(invalid(
                command,
                format!("{size} bytes asked; 1 to {max} can be read at once"),
            ));
        }
        let request = MigDataReadRequest { size };
        self.call(command, &request.to_bytes(), &[], |msg| {
            MigData::parse_read_reply(&msg.payload, size)
                .map(|reply| reply.data)
                .map_err(|e| e.to_string())
        })
    }

    /// Gives the device (in `RESUMING`) the next `data` of its migration stream
    /// (`MIG_DATA_WRITE`, split into transfers of at most
    /// [`Negotiated::max_data_xfer_size`](super::Negotiated::max_data_xfer_size)).
    pub fn mig_data_write(&self, data: &[u8]) -> Result<(), ClientError> {
        let command = Command::MigDataWrite;
        let step = self.negotiated().max_data_xfer_size as usize;
        for chunk in data.chunks(step) {
            let request = MigData {
                data: chunk.to_vec(),
            };
            let bytes = request.to_bytes().map_err(|e| invalid(command, e))?;
            self.call(command, &bytes, &[], |msg| {
                NoPayload::parse(&msg.payload).map_err(|e| e.to_string())?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Starts DMA logging (`VFIO_DEVICE_FEATURE_DMA_LOGGING_START` SET) of `ranges`
    /// (all DMA writes if empty) at `page_size` (a power of two, a hint); returns the
    /// page size the device chose.
    pub fn dma_logging_start(
        &self,
        page_size: u64,
        ranges: &[DmaLoggingRange],
    ) -> Result<u64, ClientError> {
        let command = Command::DeviceFeature;
        if !page_size.is_power_of_two() {
            return Err(invalid(
                command,
                format!("page size {page_size:#x} is not a power of two"),
            ));
        }
        if let Some(r) = ranges
            .iter()
            .find(|r| r.length == 0 || r.iova.checked_add(r.length).is_none())
        {
            return Err(invalid(
                command,
                format!(
                    "range {:#x}+{:#x} is empty or wraps around",
                    r.iova, r.length
                ),
            ));
        }
        let request = DmaLoggingStart {
            page_size,
            ranges: ranges.to_vec(),
        };
        let data = request.to_bytes().map_err(|e| invalid(command, e))?;
        let room = data.len();
        let flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START;
        let reply = self.feature(flags, data, room)?;
        let reply =
            DmaLoggingStart::parse(&reply).map_err(|e| self.violation(command, e.to_string()))?;
        if reply.ranges != ranges {
            return Err(self.violation(
                command,
                "reply lists other ranges than the request".to_string(),
            ));
        }
        Ok(reply.page_size)
    }

    /// Stops DMA logging (`VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP` SET).
    pub fn dma_logging_stop(&self) -> Result<(), ClientError> {
        let flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP;
        // No room for reply data: any is a violation.
        self.feature(flags, Vec::new(), 0).map(drop)
    }

    /// The pages of `iova..iova + length` the device wrote since logging started or
    /// since they were last reported, which the device then forgets
    /// (`VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` GET): one bit per `page_size` (a power
    /// of two), bit `n % 64` of word `n / 64` for the page at `iova + n * page_size`.
    /// Ranges whose bitmap does not fit one transfer are asked for in pieces of whole
    /// bitmap words, and the pieces put together.
    pub fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Vec<u64>, ClientError> {
        let command = Command::DeviceFeature;
        if !page_size.is_power_of_two() {
            return Err(invalid(
                command,
                format!("page size {page_size:#x} is not a power of two"),
            ));
        }
        let end = iova
            .checked_add(length)
            .filter(|_| length > 0)
            .ok_or_else(|| {
                invalid(
                    command,
                    format!("range {iova:#x}+{length:#x} is empty or wraps around"),
                )
            })?;
        // Whole words per request, within one transfer with the structure's header.
        let room = (self.negotiated().max_data_xfer_size as usize)
            .saturating_sub(DmaLoggingReport::HEADER_SIZE)
            / 8;
        if room == 0 {
            return Err(invalid(
                command,
                "the transfer size leaves no room for a bitmap",
            ));
        }
        let span = (room as u64).saturating_mul(64).saturating_mul(page_size);
        let mut bitmap = Vec::new();
        let mut at = iova;
        while at < end {
            let len = (end - at).min(span);
            bitmap.extend(self.dma_logging_report_once(at, len, page_size)?);
            at += len;
        }
        Ok(bitmap)
    }

    fn dma_logging_report_once(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Vec<u64>, ClientError> {
        let command = Command::DeviceFeature;
        let words = DmaLoggingReport::bitmap_words(length, page_size)
            .ok_or_else(|| invalid(command, "invalid page size"))?;
        let request = DmaLoggingReport {
            iova,
            length,
            page_size,
            bitmap: Vec::new(),
        };
        let room = DmaLoggingReport::HEADER_SIZE + 8 * words as usize;
        let flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT;
        let reply = self.feature(flags, request.to_bytes(), room)?;
        let reply =
            DmaLoggingReport::parse(&reply).map_err(|e| self.violation(command, e.to_string()))?;
        if (reply.iova, reply.length, reply.page_size) != (iova, length, page_size)
            || reply.bitmap.len() as u64 != words
        {
            return Err(self.violation(
                command,
                format!(
                    "reply covers {:#x}+{:#x} at page size {:#x} with {} bitmap words; asked \
                     {iova:#x}+{length:#x} at {page_size:#x}, which takes {words}",
                    reply.iova,
                    reply.length,
                    reply.page_size,
                    reply.bitmap.len()
                ),
            ));
        }
        let pages = length.div_ceil(page_size);
        let tail = pages % 64;
        if let (Some(last), true) = (reply.bitmap.last(), tail != 0) {
            if last >> tail != 0 {
                return Err(self.violation(
                    command,
                    format!("reply marks pages beyond the {pages} of the range"),
                ));
            }
        }
        Ok(reply.bitmap)
    }
    /// Starts dirty page logging (`VFIO_USER_DIRTY_PAGES` with `START`, protocol 0.1's
    /// tracking, which libvfio-user 0.1 servers implement instead of DMA logging).
    pub fn dirty_pages_start(&self) -> Result<(), ClientError> {
        self.dirty_pages_control(DIRTY_PAGES_FLAG_START)
    }

    /// Stops dirty page logging (`VFIO_USER_DIRTY_PAGES` with `STOP`).
    pub fn dirty_pages_stop(&self) -> Result<(), ClientError> {
        self.dirty_pages_control(DIRTY_PAGES_FLAG_STOP)
    }

    fn dirty_pages_control(&self, flags: u32) -> Result<(), ClientError> {
        let command = Command::DirtyPages;
        self.call(command, &dirty_pages::control_command(flags), &[], |msg| {
            // libvfio-user answers with nothing; an echo of the request is tolerated.
            if msg.payload.is_empty() || msg.payload == dirty_pages::control_command(flags) {
                return Ok(());
            }
            Err(format!(
                "reply has {} bytes, none or an echo of the request were expected",
                msg.payload.len()
            ))
        })
    }

    /// The 4 KiB pages of `iova..iova + size` written since logging started or since they
    /// were last reported, in order (`VFIO_USER_DIRTY_PAGES` with `GET_BITMAP`, one bit
    /// per `pgsize`, a power of two). libvfio-user 0.1 answers only for a range that is
    /// exactly one DMA mapping, at the migration page size (4 KiB), so the range is never
    /// split: its bitmap must fit one transfer.
    pub fn dirty_pages_get(
        &self,
        iova: u64,
        size: u64,
        pgsize: u64,
    ) -> Result<Vec<u64>, ClientError> {
        let command = Command::DirtyPages;
        let range = BitmapRange::new(iova, size, pgsize).ok_or_else(|| {
            invalid(
                command,
                format!(
                    "range {iova:#x}+{size:#x} at page size {pgsize:#x}: empty, wrapping, or \
                     not a power-of-two page size"
                ),
            )
        })?;
        let room = u64::from(self.negotiated().max_data_xfer_size);
        if range.bitmap_size > room {
            return Err(invalid(
                command,
                format!(
                    "the bitmap of {size:#x} bytes at page size {pgsize:#x} takes {} bytes, \
                     over the transfer size of {room}",
                    range.bitmap_size
                ),
            ));
        }
        let request = dirty_pages::get_bitmap_command(&range)
            .ok_or_else(|| invalid(command, "the reply size overflows"))?;
        self.call(command, &request, &[], |msg| {
            let bitmap =
                dirty_pages::parse_bitmap_reply(&msg.payload, &range).map_err(|e| e.to_string())?;
            let pages = size.div_ceil(pgsize);
            let tail = pages % 64;
            if let (Some(last), true) = (bitmap.last(), tail != 0) {
                if last >> tail != 0 {
                    return Err(format!("reply marks pages beyond the {pages} of the range"));
                }
            }
            Ok(dirty_bitmap::decode(&bitmap, iova, size, pgsize))
        })
    }
}
