//! Migration payloads: `DEVICE_FEATURE` (with the migration, device-state and DMA-logging
//! feature data), `MIG_DATA_READ` and `MIG_DATA_WRITE`. Only the wire format lives here;
//! the server refuses these commands unless its device implements them.

use vfio_bindings::bindings::vfio::{
    vfio_device_mig_state_VFIO_DEVICE_STATE_NR, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET, VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
};

use super::error::{invalid, ProtoError};
use super::wire::{len_u32, Reader, Writer};

/// The `DEVICE_FEATURE` command and reply: `struct vfio_device_feature`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFeature {
    /// In a command: the largest reply payload accepted; in a reply: the full size.
    pub argsz: u32,
    /// Feature index (low 16 bits) or'ed with `VFIO_DEVICE_FEATURE_GET/SET/PROBE`.
    pub flags: u32,
    /// Feature-specific data (see the other types of this module).
    pub data: Vec<u8>,
}

impl DeviceFeature {
    /// Size without data.
    pub const HEADER_SIZE: usize = 8;
    const WHAT: &'static str = "device feature";

    /// The feature index (`VFIO_DEVICE_FEATURE_*`).
    pub fn feature(&self) -> u32 {
        self.flags & VFIO_DEVICE_FEATURE_MASK
    }

    /// Serialises the structure.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtoError> {
        len_u32(
            Self::WHAT,
            Self::HEADER_SIZE.saturating_add(self.data.len()),
        )?;
        Ok(Writer::with_capacity(Self::HEADER_SIZE + self.data.len())
            .u32(self.argsz)
            .u32(self.flags)
            .bytes(&self.data)
            .finish())
    }

    /// Parses the structure: `argsz` at least 8, only known flag bits, at least one of
    /// GET/SET/PROBE, and GET with SET only together with PROBE.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::HEADER_SIZE)?;
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let data = r.rest().to_vec();
        if (argsz as usize) < Self::HEADER_SIZE {
            return Err(invalid(Self::WHAT, "argsz", argsz, "smaller than 8"));
        }
        let ops = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_PROBE;
        if flags & !(VFIO_DEVICE_FEATURE_MASK | ops) != 0 {
            return Err(invalid(Self::WHAT, "flags", flags, "unknown bits are set"));
        }
        if flags & ops == 0 {
            return Err(invalid(Self::WHAT, "flags", flags, "no GET, SET or PROBE"));
        }
        let get_and_set = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET;
        if flags & get_and_set == get_and_set && flags & VFIO_DEVICE_FEATURE_PROBE == 0 {
            return Err(invalid(
                Self::WHAT,
                "flags",
                flags,
                "GET and SET without PROBE",
            ));
        }
        Ok(DeviceFeature { argsz, flags, data })
    }
}

/// Data of `VFIO_DEVICE_FEATURE_MIGRATION` (GET reply): supported migration flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureMigration {
    /// `VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY`.
    pub flags: u64,
}

impl FeatureMigration {
    /// Encoded size.
    pub const SIZE: usize = 8;
    const WHAT: &'static str = "migration feature";

    /// Serialises the structure.
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(Self::SIZE).u64(self.flags).finish()
    }

    /// Parses exactly 8 bytes: only known flags, `VFIO_MIGRATION_STOP_COPY` included.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::SIZE)?;
        let flags = r.u64()?;
        r.finish()?;
        let known =
            u64::from(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY);
        if flags & !known != 0 {
            return Err(invalid(Self::WHAT, "flags", flags, "unknown bits are set"));
        }
        if flags & u64::from(VFIO_MIGRATION_STOP_COPY) == 0 {
            return Err(invalid(
                Self::WHAT,
                "flags",
                flags,
                "STOP_COPY is mandatory",
            ));
        }
        Ok(FeatureMigration { flags })
    }
}

/// A state of the v2 device migration state machine (`enum vfio_device_mig_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MigState {
    /// `VFIO_DEVICE_STATE_ERROR`: the device failed; only a reset leaves this state.
    Error = 0,
    /// `VFIO_DEVICE_STATE_STOP`: no DMA, no interrupts, no internal state change.
    Stop = 1,
    /// `VFIO_DEVICE_STATE_RUNNING`: normal operation.
    Running = 2,
    /// `VFIO_DEVICE_STATE_STOP_COPY`: stopped, its final state readable.
    StopCopy = 3,
    /// `VFIO_DEVICE_STATE_RESUMING`: stopped, loading a new state.
    Resuming = 4,
    /// `VFIO_DEVICE_STATE_RUNNING_P2P`: not used by vfio-user.
    RunningP2p = 5,
    /// `VFIO_DEVICE_STATE_PRE_COPY`: running, its state readable (live pre-copy).
    PreCopy = 6,
    /// `VFIO_DEVICE_STATE_PRE_COPY_P2P`: not used by vfio-user.
    PreCopyP2p = 7,
}

impl MigState {
    /// Every state, in numeric order.
    pub const ALL: [MigState; 8] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];

    /// The state with wire value `value`, if there is one.
    pub fn from_u32(value: u32) -> Option<MigState> {
        MigState::ALL.get(value as usize).copied()
    }

    /// The specification's name, e.g. `STOP_COPY`.
    pub fn name(self) -> &'static str {
        match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::RunningP2p => "RUNNING_P2P",
            MigState::PreCopy => "PRE_COPY",
            MigState::PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    /// Whether the device's state can be read in this state (`PRE_COPY`, `STOP_COPY`).
    pub fn is_saving(self) -> bool {
        matches!(self, MigState::PreCopy | MigState::StopCopy)
    }
}

impl std::fmt::Display for MigState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Data of `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` (SET command, GET reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureMigDeviceState {
    /// A `vfio_device_mig_state` value (`VFIO_DEVICE_STATE_*`).
    pub device_state: u32,
    /// Unused by vfio-user (migration data travels in `MIG_DATA_*` messages).
    pub data_fd: u32,
}

impl FeatureMigDeviceState {
    /// Encoded size.
    pub const SIZE: usize = 8;
    const WHAT: &'static str = "migration device state";

    /// Serialises the structure.
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(Self::SIZE)
            .u32(self.device_state)
            .u32(self.data_fd)
            .finish()
    }

    /// Parses exactly 8 bytes; the state must be a defined one.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::SIZE)?;
        let v = FeatureMigDeviceState {
            device_state: r.u32()?,
            data_fd: r.u32()?,
        };
        r.finish()?;
        if v.device_state >= vfio_device_mig_state_VFIO_DEVICE_STATE_NR {
            return Err(invalid(
                Self::WHAT,
                "device_state",
                v.device_state,
                "undefined state",
            ));
        }
        Ok(v)
    }
}

/// An IOVA range of DMA logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaLoggingRange {
    /// Start address.
    pub iova: u64,
    /// Length in bytes.
    pub length: u64,
}

/// Data of `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` (SET command and reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaLoggingStart {
    /// Tracking granularity (a power of two).
    pub page_size: u64,
    /// Ranges to track; empty means every write.
    pub ranges: Vec<DmaLoggingRange>,
}

impl DmaLoggingStart {
    /// Size without ranges.
    pub const HEADER_SIZE: usize = 16;
    const WHAT: &'static str = "DMA logging start";

    /// Serialises the structure.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtoError> {
        let num = len_u32(Self::WHAT, self.ranges.len())?;
        let mut w = Writer::with_capacity(Self::HEADER_SIZE + 16 * self.ranges.len());
        w.u64(self.page_size).u32(num).u32(0);
        for range in &self.ranges {
            w.u64(range.iova).u64(range.length);
        }
        Ok(w.finish())
    }

    /// Parses the structure: a power-of-two page size, and exactly `num_ranges` ranges
    /// that do not wrap around.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::HEADER_SIZE)?;
        let page_size = r.u64()?;
        let num = r.u32()? as usize;
        let _reserved = r.u32()?;
        check_page_size(Self::WHAT, page_size)?;
        if num.checked_mul(16) != Some(r.remaining()) {
            return Err(invalid(
                Self::WHAT,
                "num_ranges",
                num as u64,
                "differs from the ranges present",
            ));
        }
        let mut ranges = Vec::with_capacity(num);
        for _ in 0..num {
            let range = DmaLoggingRange {
                iova: r.u64()?,
                length: r.u64()?,
            };
            if range.iova.checked_add(range.length).is_none() {
                return Err(invalid(
                    Self::WHAT,
                    "length",
                    range.length,
                    "range wraps around",
                ));
            }
            ranges.push(range);
        }
        r.finish()?;
        Ok(DmaLoggingStart { page_size, ranges })
    }
}

/// Data of `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`: the GET command (no bitmap) and its
/// reply (with the bitmap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaLoggingReport {
    /// Start address.
    pub iova: u64,
    /// Length in bytes.
    pub length: u64,
    /// Bitmap granularity (a power of two).
    pub page_size: u64,
    /// One bit per page, empty in the command.
    pub bitmap: Vec<u64>,
}

impl DmaLoggingReport {
    /// Size without bitmap.
    pub const HEADER_SIZE: usize = 24;
    const WHAT: &'static str = "DMA logging report";

    /// Number of bitmap words that cover `length` at `page_size` (`None` if invalid).
    pub fn bitmap_words(length: u64, page_size: u64) -> Option<u64> {
        if page_size == 0 {
            return None;
        }
        Some(length.div_ceil(page_size).div_ceil(64))
    }

    /// Serialises the structure.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::HEADER_SIZE + 8 * self.bitmap.len());
        w.u64(self.iova).u64(self.length).u64(self.page_size);
        for word in &self.bitmap {
            w.u64(*word);
        }
        w.finish()
    }

    /// Parses the structure: a power-of-two page size, a range that does not wrap, and
    /// either no bitmap or exactly the words that cover the range.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::HEADER_SIZE)?;
        let iova = r.u64()?;
        let length = r.u64()?;
        let page_size = r.u64()?;
        check_page_size(Self::WHAT, page_size)?;
        if iova.checked_add(length).is_none() {
            return Err(invalid(Self::WHAT, "length", length, "range wraps around"));
        }
        let words = r.remaining() / 8;
        if !r.remaining().is_multiple_of(8)
            || (words != 0 && Self::bitmap_words(length, page_size) != Some(words as u64))
        {
            return Err(invalid(
                Self::WHAT,
                "bitmap",
                r.remaining() as u64,
                "size does not match the range",
            ));
        }
        let mut bitmap = Vec::with_capacity(words);
        for _ in 0..words {
            bitmap.push(r.u64()?);
        }
        r.finish()?;
        Ok(DmaLoggingReport {
            iova,
            length,
            page_size,
            bitmap,
        })
    }
}

/// The `MIG_DATA_READ` command: how many bytes of migration data to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigDataReadRequest {
    /// Bytes requested.
    pub size: u32,
}

impl MigDataReadRequest {
    /// Encoded size.
    pub const SIZE: usize = 8;
    const WHAT: &'static str = "migration data read command";

    /// Serialises the command; `argsz` is 8 + `size` (room for the reply).
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(Self::SIZE)
            .u32(self.size.saturating_add(Self::SIZE as u32))
            .u32(self.size)
            .finish()
    }

    /// Parses exactly 8 bytes; `argsz` must leave room for 8 + `size` bytes of reply.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::SIZE)?;
        let argsz = r.u32()?;
        let size = r.u32()?;
        r.finish()?;
        if u64::from(argsz) < u64::from(size) + Self::SIZE as u64 {
            return Err(invalid(Self::WHAT, "argsz", argsz, "smaller than 8 + size"));
        }
        Ok(MigDataReadRequest { size })
    }
}

/// The `MIG_DATA_READ` reply and the `MIG_DATA_WRITE` command: `argsz`, `size` and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigData {
    /// The migration data (the size field is its length).
    pub data: Vec<u8>,
}

impl MigData {
    /// Size without data.
    pub const HEADER_SIZE: usize = 8;
    const WHAT: &'static str = "migration data";

    /// Serialises the structure; `argsz` is 8 + the data size.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtoError> {
        let size = len_u32(Self::WHAT, self.data.len())?;
        let argsz = len_u32(
            Self::WHAT,
            Self::HEADER_SIZE.saturating_add(self.data.len()),
        )?;
        Ok(Writer::with_capacity(argsz as usize)
            .u32(argsz)
            .u32(size)
            .bytes(&self.data)
            .finish())
    }

    /// Parses the structure: `size` equals the data present and `argsz` is at least
    /// 8 + `size`.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::HEADER_SIZE)?;
        let argsz = r.u32()?;
        let size = r.u32()?;
        let data = r.rest();
        if size as usize != data.len() {
            return Err(invalid(
                Self::WHAT,
                "size",
                size,
                "differs from the data size",
            ));
        }
        if u64::from(argsz) < u64::from(size) + Self::HEADER_SIZE as u64 {
            return Err(invalid(Self::WHAT, "argsz", argsz, "smaller than 8 + size"));
        }
        Ok(MigData {
            data: data.to_vec(),
        })
    }

    /// Parses a `MIG_DATA_READ` reply to a request for `requested` bytes. `size` says how
    /// much was read and `argsz` must be at least 8 + `size`; the data may be followed by
    /// padding up to the requested size, which is dropped (libvfio-user always sends
    /// 8 + `requested` bytes, zero-filled past `size`, with `argsz` = 8 + `size`). A
    /// `size` above the request or beyond the payload, or a payload longer than the
    /// request allowed, is refused.
    pub fn parse_read_reply(bytes: &[u8], requested: u32) -> Result<Self, ProtoError> {
        const WHAT: &str = "migration data read reply";
        let mut r = Reader::new(WHAT, bytes);
        r.require(Self::HEADER_SIZE)?;
        let argsz = r.u32()?;
        let size = r.u32()?;
        let data = r.rest();
        if data.len() > requested as usize {
            return Err(ProtoError::TrailingBytes {
                what: WHAT,
                extra: data.len() - requested as usize,
            });
        }
        if size > requested {
            return Err(invalid(
                WHAT,
                "size",
                size,
                "larger than the size requested",
            ));
        }
        let Some(data) = data.get(..size as usize) else {
            return Err(invalid(WHAT, "size", size, "larger than the data present"));
        };
        if u64::from(argsz) < u64::from(size) + Self::HEADER_SIZE as u64 {
            return Err(invalid(WHAT, "argsz", argsz, "smaller than 8 + size"));
        }
        Ok(MigData {
            data: data.to_vec(),
        })
    }
}

fn check_page_size(what: &'static str, page_size: u64) -> Result<(), ProtoError> {
    if !page_size.is_power_of_two() {
        return Err(invalid(what, "page_size", page_size, "not a power of two"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_bindings::bindings::vfio::{
        vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        VFIO_DEVICE_FEATURE_MIGRATION,
    };

    fn rejects_prefixes(bytes: &[u8], min: usize, parse: impl Fn(&[u8]) -> bool) {
        for len in 0..min {
            assert!(!parse(&bytes[..len]), "truncated to {len}");
        }
    }

    #[test]
    fn device_feature() {
        let f = DeviceFeature {
            argsz: 16,
            flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
            data: vec![],
        };
        let b = f.to_bytes().unwrap();
        assert_eq!(b.len(), 8);
        let p = DeviceFeature::parse(&b).unwrap();
        assert_eq!(p, f);
        assert_eq!(p.feature(), VFIO_DEVICE_FEATURE_MIGRATION);
        rejects_prefixes(&b, 8, |x| DeviceFeature::parse(x).is_ok());
        for flags in [
            VFIO_DEVICE_FEATURE_MIGRATION,
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET | 1,
            VFIO_DEVICE_FEATURE_GET | 1 << 20,
        ] {
            let bad = DeviceFeature { flags, ..f.clone() };
            assert!(
                DeviceFeature::parse(&bad.to_bytes().unwrap()).is_err(),
                "{flags:#x}"
            );
        }
        let probe = DeviceFeature {
            flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_PROBE,
            ..f.clone()
        };
        assert!(DeviceFeature::parse(&probe.to_bytes().unwrap()).is_ok());
        let small = DeviceFeature { argsz: 4, ..f };
        assert!(DeviceFeature::parse(&small.to_bytes().unwrap()).is_err());
    }

    #[test]
    fn feature_data() {
        let m = FeatureMigration {
            flags: u64::from(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY),
        };
        let b = m.to_bytes();
        assert_eq!(FeatureMigration::parse(&b).unwrap(), m);
        rejects_prefixes(&b, 8, |x| FeatureMigration::parse(x).is_ok());
        assert!(FeatureMigration::parse(&[b.clone(), vec![0]].concat()).is_err());
        assert!(FeatureMigration::parse(&FeatureMigration { flags: 2 }.to_bytes()).is_err());
        assert!(FeatureMigration::parse(&FeatureMigration { flags: 9 }.to_bytes()).is_err());

        let s = FeatureMigDeviceState {
            device_state: vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY,
            data_fd: 0,
        };
        let b = s.to_bytes();
        assert_eq!(FeatureMigDeviceState::parse(&b).unwrap(), s);
        rejects_prefixes(&b, 8, |x| FeatureMigDeviceState::parse(x).is_ok());
        assert!(FeatureMigDeviceState::parse(&[b, vec![0]].concat()).is_err());
        let undefined = FeatureMigDeviceState {
            device_state: 8,
            data_fd: 0,
        };
        assert!(FeatureMigDeviceState::parse(&undefined.to_bytes()).is_err());
        let _ = VFIO_DEVICE_FEATURE_DMA_LOGGING_START;
    }

    #[test]
    fn dma_logging() {
        let start = DmaLoggingStart {
            page_size: 4096,
            ranges: vec![
                DmaLoggingRange {
                    iova: 0,
                    length: 0x10_0000,
                },
                DmaLoggingRange {
                    iova: 0x1_0000_0000,
                    length: 0x1000,
                },
            ],
        };
        let b = start.to_bytes().unwrap();
        assert_eq!(b.len(), 16 + 32);
        assert_eq!(DmaLoggingStart::parse(&b).unwrap(), start);
        rejects_prefixes(&b, b.len(), |x| DmaLoggingStart::parse(x).is_ok());
        assert!(DmaLoggingStart::parse(&[b, vec![0; 16]].concat()).is_err());
        let odd = DmaLoggingStart {
            page_size: 3000,
            ranges: vec![],
        };
        assert!(DmaLoggingStart::parse(&odd.to_bytes().unwrap()).is_err());

        let request = DmaLoggingReport {
            iova: 0,
            length: 130 * 4096,
            page_size: 4096,
            bitmap: vec![],
        };
        let b = request.to_bytes();
        assert_eq!(b.len(), 24);
        assert_eq!(DmaLoggingReport::parse(&b).unwrap(), request);
        rejects_prefixes(&b, 24, |x| DmaLoggingReport::parse(x).is_ok());
        let reply = DmaLoggingReport {
            bitmap: vec![1, 2, 3],
            ..request.clone()
        };
        let b = reply.to_bytes();
        assert_eq!(DmaLoggingReport::parse(&b).unwrap(), reply);
        assert!(DmaLoggingReport::parse(&b[..b.len() - 8]).is_err());
        assert!(DmaLoggingReport::parse(&b[..b.len() - 1]).is_err());
        assert!(DmaLoggingReport::parse(&[b, vec![0; 8]].concat()).is_err());
        assert_eq!(DmaLoggingReport::bitmap_words(130 * 4096, 4096), Some(3));
        assert_eq!(DmaLoggingReport::bitmap_words(1, 0), None);
    }

    #[test]
    fn mig_states_match_the_kernel_values() {
        for (i, st) in MigState::ALL.iter().enumerate() {
            assert_eq!(*st as u32, i as u32);
            assert_eq!(MigState::from_u32(i as u32), Some(*st));
        }
        assert_eq!(MigState::from_u32(8), None);
        assert_eq!(
            MigState::StopCopy as u32,
            vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY
        );
        assert_eq!(MigState::PreCopy.to_string(), "PRE_COPY");
        assert!(MigState::PreCopy.is_saving() && !MigState::Stop.is_saving());
    }

    #[test]
    fn mig_data() {
        let q = MigDataReadRequest { size: 4096 };
        let b = q.to_bytes();
        assert_eq!(&b[0..4], &4104u32.to_ne_bytes());
        assert_eq!(MigDataReadRequest::parse(&b).unwrap(), q);
        rejects_prefixes(&b, 8, |x| MigDataReadRequest::parse(x).is_ok());
        assert!(MigDataReadRequest::parse(&[b.clone(), vec![0]].concat()).is_err());
        let mut small = b;
        small[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(MigDataReadRequest::parse(&small).is_err());

        let d = MigData { data: vec![7; 100] };
        let b = d.to_bytes().unwrap();
        assert_eq!(b.len(), 108);
        assert_eq!(MigData::parse(&b).unwrap(), d);
        rejects_prefixes(&b, b.len(), |x| MigData::parse(x).is_ok());
        assert!(MigData::parse(&[b, vec![0]].concat()).is_err());
    }

    /// A reply as libvfio-user builds it: `argsz` and `size` say `got` bytes, the payload
    /// carries `sent` data bytes (zero padding past `got`).
    fn read_reply(argsz: u32, size: u32, sent: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&argsz.to_ne_bytes());
        b.extend_from_slice(&size.to_ne_bytes());
        b.extend((0..sent).map(|i| if i < size as usize { 0xa5 } else { 0 }));
        b
    }

    #[test]
    fn mig_data_read_reply_padded_to_the_request_is_accepted() {
        // 10 bytes read of 64 asked, padded to 64.
        let d = MigData::parse_read_reply(&read_reply(18, 10, 64), 64).unwrap();
        assert_eq!(d.data, vec![0xa5; 10]);
        // Unpadded, and the end of the data (size 0, padded).
        assert_eq!(
            MigData::parse_read_reply(&read_reply(18, 10, 10), 64)
                .unwrap()
                .data
                .len(),
            10
        );
        assert!(MigData::parse_read_reply(&read_reply(8, 0, 64), 64)
            .unwrap()
            .data
            .is_empty());
        // argsz may also cover the padding.
        assert_eq!(
            MigData::parse_read_reply(&read_reply(72, 10, 64), 64)
                .unwrap()
                .data
                .len(),
            10
        );
    }

    #[test]
    fn mig_data_read_reply_with_lying_sizes_is_refused() {
        // size above the request, size beyond the payload, payload above the request,
        // argsz too small for size, truncated header.
        assert!(MigData::parse_read_reply(&read_reply(80, 72, 72), 64).is_err());
        assert!(MigData::parse_read_reply(&read_reply(40, 32, 16), 64).is_err());
        assert!(MigData::parse_read_reply(&read_reply(18, 10, 65), 64).is_err());
        assert!(MigData::parse_read_reply(&read_reply(17, 10, 64), 64).is_err());
        let good = read_reply(18, 10, 64);
        rejects_prefixes(&good, 18, |x| MigData::parse_read_reply(x, 64).is_ok());
    }
}
