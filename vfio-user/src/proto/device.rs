//! Device-level payloads: `DEVICE_GET_INFO`, `DEVICE_GET_IRQ_INFO`, `DEVICE_SET_IRQS`, and
//! the empty payload of `DEVICE_RESET` and of the replies that carry nothing.

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK,
};

use super::error::{invalid, ProtoError};
use super::wire::{len_u32, Reader, Writer};

/// A payload that must be empty (`DEVICE_RESET` both ways; replies to `DMA_MAP`,
/// `DEVICE_SET_IRQS` and `MIG_DATA_WRITE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoPayload;

impl NoPayload {
    /// The empty byte string.
    pub fn to_bytes(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Accepts only an empty payload.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        Reader::new("empty payload", bytes).finish()?;
        Ok(NoPayload)
    }
}

/// `struct vfio_user_device_info`: the `DEVICE_GET_INFO` command and reply (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// In a command: the largest reply payload accepted; in a reply: the full size (16).
    pub argsz: u32,
    /// `VFIO_DEVICE_FLAGS_*` (zero in a command).
    pub flags: u32,
    /// Number of regions (zero in a command).
    pub num_regions: u32,
    /// Number of IRQ types (zero in a command).
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// Encoded size.
    pub const SIZE: usize = 16;
    const WHAT: &'static str = "device info";

    /// Serialises the structure.
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(Self::SIZE)
            .u32(self.argsz)
            .u32(self.flags)
            .u32(self.num_regions)
            .u32(self.num_irqs)
            .finish()
    }

    /// Parses exactly 16 bytes; `argsz` must be at least 16.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::SIZE)?;
        let v = DeviceInfo {
            argsz: r.u32()?,
            flags: r.u32()?,
            num_regions: r.u32()?,
            num_irqs: r.u32()?,
        };
        r.finish()?;
        if (v.argsz as usize) < Self::SIZE {
            return Err(invalid(Self::WHAT, "argsz", v.argsz, "smaller than 16"));
        }
        Ok(v)
    }
}

/// `struct vfio_irq_info`: the `DEVICE_GET_IRQ_INFO` command and reply (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// In a command: the largest reply payload accepted; in a reply: the full size (16).
    pub argsz: u32,
    /// `VFIO_IRQ_INFO_*` (zero in a command).
    pub flags: u32,
    /// The IRQ type (e.g. `VFIO_PCI_MSIX_IRQ_INDEX`).
    pub index: u32,
    /// Number of interrupts of this type (zero in a command).
    pub count: u32,
}

impl IrqInfo {
    /// Encoded size.
    pub const SIZE: usize = 16;
    const WHAT: &'static str = "IRQ info";

    /// Serialises the structure.
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(Self::SIZE)
            .u32(self.argsz)
            .u32(self.flags)
            .u32(self.index)
            .u32(self.count)
            .finish()
    }

    /// Parses exactly 16 bytes; `argsz` must be at least 16.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::SIZE)?;
        let v = IrqInfo {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            count: r.u32()?,
        };
        r.finish()?;
        if (v.argsz as usize) < Self::SIZE {
            return Err(invalid(Self::WHAT, "argsz", v.argsz, "smaller than 16"));
        }
        Ok(v)
    }
}

/// `struct vfio_irq_set`: the `DEVICE_SET_IRQS` command (20 bytes plus data). Event
/// file descriptors travel as `SCM_RIGHTS`, not in `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrqSet {
    /// One `VFIO_IRQ_SET_DATA_*` flag or'ed with one `VFIO_IRQ_SET_ACTION_*` flag.
    pub flags: u32,
    /// The IRQ type.
    pub index: u32,
    /// First sub-index affected.
    pub start: u32,
    /// Number of sub-indexes affected.
    pub count: u32,
    /// With `VFIO_IRQ_SET_DATA_BOOL`: one byte (0 or 1) per sub-index; otherwise empty.
    pub data: Vec<u8>,
}

impl IrqSet {
    /// Size without data.
    pub const HEADER_SIZE: usize = 20;
    const WHAT: &'static str = "IRQ set";

    /// Serialises the structure; `argsz` is the payload size.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtoError> {
        let argsz = len_u32(
            Self::WHAT,
            Self::HEADER_SIZE.saturating_add(self.data.len()),
        )?;
        Ok(Writer::with_capacity(argsz as usize)
            .u32(argsz)
            .u32(self.flags)
            .u32(self.index)
            .u32(self.start)
            .u32(self.count)
            .bytes(&self.data)
            .finish())
    }

    /// Parses the command: `argsz` must equal the payload size, exactly one data and one
    /// action flag must be set, `start + count` must not overflow, and boolean data must
    /// hold `count` bytes of 0 or 1.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::HEADER_SIZE)?;
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let index = r.u32()?;
        let start = r.u32()?;
        let count = r.u32()?;
        let data = r.rest().to_vec();
        if argsz as usize != bytes.len() {
            return Err(invalid(
                Self::WHAT,
                "argsz",
                argsz,
                "differs from the payload size",
            ));
        }
        Self::check_flags(flags)?;
        if start.checked_add(count).is_none() {
            return Err(invalid(
                Self::WHAT,
                "count",
                count,
                "start + count overflows",
            ));
        }
        if flags & VFIO_IRQ_SET_DATA_BOOL != 0 {
            if data.len() != count as usize {
                return Err(invalid(
                    Self::WHAT,
                    "argsz",
                    argsz,
                    "boolean data is not one byte per sub-index",
                ));
            }
            if let Some(b) = data.iter().find(|b| **b > 1) {
                return Err(invalid(
                    Self::WHAT,
                    "data",
                    *b,
                    "boolean is neither 0 nor 1",
                ));
            }
        } else if !data.is_empty() {
            return Err(ProtoError::TrailingBytes {
                what: Self::WHAT,
                extra: data.len(),
            });
        }
        Ok(IrqSet {
            flags,
            index,
            start,
            count,
            data,
        })
    }

    /// Checks that `flags` holds exactly one data type and one action and nothing else.
    pub fn check_flags(flags: u32) -> Result<(), ProtoError> {
        let known = VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK;
        if flags & !known != 0 {
            return Err(invalid(Self::WHAT, "flags", flags, "unknown bits are set"));
        }
        let data = flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        if ![
            VFIO_IRQ_SET_DATA_NONE,
            VFIO_IRQ_SET_DATA_BOOL,
            VFIO_IRQ_SET_DATA_EVENTFD,
        ]
        .contains(&data)
        {
            return Err(invalid(
                Self::WHAT,
                "flags",
                flags,
                "not exactly one data type",
            ));
        }
        let action = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        if ![
            VFIO_IRQ_SET_ACTION_MASK,
            VFIO_IRQ_SET_ACTION_UNMASK,
            VFIO_IRQ_SET_ACTION_TRIGGER,
        ]
        .contains(&action)
        {
            return Err(invalid(
                Self::WHAT,
                "flags",
                flags,
                "not exactly one action",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_size_round_trips_and_rejects_bad_sizes() {
        let d = DeviceInfo {
            argsz: 16,
            flags: 3,
            num_regions: 9,
            num_irqs: 5,
        };
        let b = d.to_bytes();
        assert_eq!(b.len(), 16);
        assert_eq!(DeviceInfo::parse(&b).unwrap(), d);
        for len in 0..16 {
            assert!(DeviceInfo::parse(&b[..len]).is_err());
        }
        assert!(DeviceInfo::parse(&[b.clone(), vec![0]].concat()).is_err());
        let small = DeviceInfo { argsz: 8, ..d };
        assert!(DeviceInfo::parse(&small.to_bytes()).is_err());

        let i = IrqInfo {
            argsz: 16,
            flags: 1,
            index: 2,
            count: 64,
        };
        let b = i.to_bytes();
        assert_eq!(IrqInfo::parse(&b).unwrap(), i);
        for len in 0..16 {
            assert!(IrqInfo::parse(&b[..len]).is_err());
        }
        assert!(IrqInfo::parse(&[b, vec![0]].concat()).is_err());
        assert!(IrqInfo::parse(&IrqInfo { argsz: 0, ..i }.to_bytes()).is_err());

        assert_eq!(NoPayload::parse(&[]).unwrap(), NoPayload);
        assert!(NoPayload::parse(&[0]).is_err());
        assert!(NoPayload.to_bytes().is_empty());
    }

    #[test]
    fn irq_set_round_trips_and_validates() {
        let eventfd = IrqSet {
            flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index: 2,
            start: 0,
            count: 4,
            data: vec![],
        };
        let b = eventfd.to_bytes().unwrap();
        assert_eq!(b.len(), 20);
        assert_eq!(&b[0..4], &20u32.to_ne_bytes());
        assert_eq!(IrqSet::parse(&b).unwrap(), eventfd);
        for len in 0..20 {
            assert!(IrqSet::parse(&b[..len]).is_err());
        }
        let mut long = b.clone();
        long.push(0);
        assert!(IrqSet::parse(&long).is_err(), "argsz mismatch");

        let bools = IrqSet {
            flags: VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_MASK,
            index: 2,
            start: 1,
            count: 3,
            data: vec![1, 0, 1],
        };
        let b = bools.to_bytes().unwrap();
        assert_eq!(IrqSet::parse(&b).unwrap(), bools);
        let short = IrqSet {
            data: vec![1, 0],
            ..bools.clone()
        };
        assert!(IrqSet::parse(&short.to_bytes().unwrap()).is_err());
        let not_bool = IrqSet {
            data: vec![1, 2, 1],
            ..bools.clone()
        };
        assert!(IrqSet::parse(&not_bool.to_bytes().unwrap()).is_err());
        let trailing = IrqSet {
            data: vec![1],
            ..eventfd.clone()
        };
        assert!(IrqSet::parse(&trailing.to_bytes().unwrap()).is_err());

        for flags in [
            0,
            VFIO_IRQ_SET_DATA_NONE,
            VFIO_IRQ_SET_ACTION_TRIGGER,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER | 0x100,
        ] {
            let s = IrqSet {
                flags,
                ..eventfd.clone()
            };
            assert!(IrqSet::parse(&s.to_bytes().unwrap()).is_err(), "{flags:#x}");
        }
        let overflow = IrqSet {
            start: u32::MAX,
            count: 2,
            ..eventfd
        };
        assert!(IrqSet::parse(&overflow.to_bytes().unwrap()).is_err());
    }
}
