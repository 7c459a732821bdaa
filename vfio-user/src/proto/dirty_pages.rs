//! `VFIO_USER_DIRTY_PAGES` (command 14), the dirty page tracking of protocol 0.1 as
//! libvfio-user 0.1 implements it (deprecated by DMA logging, which later replaced it):
//! `struct vfio_user_dirty_pages { argsz; flags }`, for `GET_BITMAP` followed by
//! `struct vfio_user_bitmap_range { iova; size; struct vfio_user_bitmap { pgsize; size } }`.
//! The `GET_BITMAP` reply echoes both, with `argsz` the size it needs, and the bitmap
//! follows: bit `n % 8` of byte `n / 8` marks page `n`, in whole 64-bit words (host order
//! makes that bit `n % 64` of word `n / 64` on little-endian hosts, this crate's).
//! `START` and `STOP` replies carry nothing.

use super::error::{invalid, ProtoError};
use super::wire::{Reader, Writer};

/// `VFIO_IOMMU_DIRTY_PAGES_FLAG_START`: start logging.
pub const DIRTY_PAGES_FLAG_START: u32 = 1;
/// `VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP`: stop logging.
pub const DIRTY_PAGES_FLAG_STOP: u32 = 2;
/// `VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP`: report (and clear) the pages of a range.
pub const DIRTY_PAGES_FLAG_GET_BITMAP: u32 = 4;

/// `struct vfio_user_dirty_pages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyPages {
    /// The largest reply accepted (command), or the size the reply needs (reply).
    pub argsz: u32,
    /// One `DIRTY_PAGES_FLAG_*`.
    pub flags: u32,
}

impl DirtyPages {
    /// Encoded size.
    pub const SIZE: usize = 8;
    const WHAT: &'static str = "dirty pages";

    /// Serialises the structure.
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(Self::SIZE)
            .u32(self.argsz)
            .u32(self.flags)
            .finish()
    }

    /// Parses the 8 bytes at the start of `bytes` (more may follow).
    pub fn parse_prefix(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::SIZE)?;
        Ok(DirtyPages {
            argsz: r.u32()?,
            flags: r.u32()?,
        })
    }
}

/// `struct vfio_user_bitmap_range`: the range asked for and its bitmap's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapRange {
    /// Start of the range (DMA address).
    pub iova: u64,
    /// Length of the range in bytes.
    pub size: u64,
    /// Page size of the bitmap (a power of two).
    pub pgsize: u64,
    /// Size of the bitmap in bytes.
    pub bitmap_size: u64,
}

impl BitmapRange {
    /// Encoded size.
    pub const SIZE: usize = 32;
    const WHAT: &'static str = "dirty bitmap range";

    /// The range `iova..iova + size` at `pgsize` with the bitmap size libvfio-user
    /// expects: one bit per page, rounded up to whole 64-bit words. `None` if the range
    /// is empty or wraps, or `pgsize` is not a power of two.
    pub fn new(iova: u64, size: u64, pgsize: u64) -> Option<Self> {
        if size == 0 || iova.checked_add(size).is_none() || !pgsize.is_power_of_two() {
            return None;
        }
        let words = size.div_ceil(pgsize).div_ceil(64);
        Some(BitmapRange {
            iova,
            size,
            pgsize,
            bitmap_size: words * 8,
        })
    }

    /// Serialises the structure.
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(Self::SIZE)
            .u64(self.iova)
            .u64(self.size)
            .u64(self.pgsize)
            .u64(self.bitmap_size)
            .finish()
    }

    /// Parses exactly 32 bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::SIZE)?;
        let v = BitmapRange {
            iova: r.u64()?,
            size: r.u64()?,
            pgsize: r.u64()?,
            bitmap_size: r.u64()?,
        };
        r.finish()?;
        Ok(v)
    }
}

/// The `START` or `STOP` command.
pub fn control_command(flags: u32) -> Vec<u8> {
    DirtyPages {
        argsz: DirtyPages::SIZE as u32,
        flags,
    }
    .to_bytes()
}

/// The `GET_BITMAP` command for `range`: `argsz` leaves room for the whole reply. `None` if
/// that does not fit 32 bits.
pub fn get_bitmap_command(range: &BitmapRange) -> Option<Vec<u8>> {
    let argsz = range
        .bitmap_size
        .checked_add((DirtyPages::SIZE + BitmapRange::SIZE) as u64)
        .and_then(|n| u32::try_from(n).ok())?;
    let mut out = DirtyPages {
        argsz,
        flags: DIRTY_PAGES_FLAG_GET_BITMAP,
    }
    .to_bytes();
    out.extend_from_slice(&range.to_bytes());
    Some(out)
}

/// Parses the reply to a `GET_BITMAP` for `asked`: the echoed structures, with `argsz`
/// exactly the reply's size, then the bitmap of `asked.bitmap_size` bytes as 64-bit words.
pub fn parse_bitmap_reply(bytes: &[u8], asked: &BitmapRange) -> Result<Vec<u64>, ProtoError> {
    const WHAT: &str = "dirty pages bitmap reply";
    let head = DirtyPages::parse_prefix(bytes)?;
    if head.flags != DIRTY_PAGES_FLAG_GET_BITMAP {
        return Err(invalid(WHAT, "flags", head.flags, "not GET_BITMAP"));
    }
    let fixed = DirtyPages::SIZE + BitmapRange::SIZE;
    let Some(range) = bytes.get(DirtyPages::SIZE..fixed) else {
        // The server said how much it needs and sent only the header: the command's
        // argsz was too small, which this client never sends.
        return Err(invalid(
            WHAT,
            "argsz",
            head.argsz,
            "the server needs more room than the command gave",
        ));
    };
    let range = BitmapRange::parse(range)?;
    if range != *asked {
        return Err(invalid(
            WHAT,
            "range",
            range.iova,
            "differs from the request",
        ));
    }
    let bitmap = bytes.get(fixed..).unwrap_or_default();
    if bitmap.len() as u64 != asked.bitmap_size || !bitmap.len().is_multiple_of(8) {
        return Err(invalid(
            WHAT,
            "bitmap",
            bitmap.len() as u64,
            "size differs from the bitmap size asked",
        ));
    }
    if head.argsz as usize != bytes.len() {
        return Err(invalid(
            WHAT,
            "argsz",
            head.argsz,
            "differs from the reply size",
        ));
    }
    Ok(bitmap
        .chunks_exact(8)
        .map(|w| {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            u64::from_ne_bytes(b)
        })
        .collect())
}

/// Encodes a `GET_BITMAP` reply for `range` with `bitmap` (a server's side; tests use it).
pub fn bitmap_reply(range: &BitmapRange, bitmap: &[u64]) -> Vec<u8> {
    let len = DirtyPages::SIZE + BitmapRange::SIZE + 8 * bitmap.len();
    let mut w = Writer::with_capacity(len);
    w.u32(len as u32)
        .u32(DIRTY_PAGES_FLAG_GET_BITMAP)
        .bytes(&range.to_bytes());
    for word in bitmap {
        w.u64(*word);
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_have_libvfio_user_layout() {
        assert_eq!(
            control_command(DIRTY_PAGES_FLAG_START),
            [8, 0, 0, 0, 1, 0, 0, 0]
        );
        let range = BitmapRange::new(0x10_0000, 130 * 4096, 4096).unwrap();
        assert_eq!(range.bitmap_size, 24);
        let cmd = get_bitmap_command(&range).unwrap();
        assert_eq!(cmd.len(), 40);
        assert_eq!(&cmd[0..4], &(40u32 + 24).to_ne_bytes());
        assert_eq!(&cmd[4..8], &4u32.to_ne_bytes());
        assert_eq!(BitmapRange::parse(&cmd[8..]).unwrap(), range);
        assert_eq!(BitmapRange::new(0, 0, 4096), None);
        assert_eq!(BitmapRange::new(u64::MAX, 2, 4096), None);
        assert_eq!(BitmapRange::new(0, 4096, 3000), None);
        let huge = BitmapRange::new(0, u64::MAX, 1).unwrap();
        assert_eq!(get_bitmap_command(&huge), None);
    }

    #[test]
    fn bitmap_reply_round_trip_and_lies() {
        let range = BitmapRange::new(0, 130 * 4096, 4096).unwrap();
        let bitmap = [0b101, 1 << 63, 0b11];
        let reply = bitmap_reply(&range, &bitmap);
        assert_eq!(parse_bitmap_reply(&reply, &range).unwrap(), bitmap);
        for len in 0..reply.len() {
            assert!(parse_bitmap_reply(&reply[..len], &range).is_err(), "{len}");
        }
        let mut long = reply.clone();
        long.extend_from_slice(&[0; 8]);
        assert!(parse_bitmap_reply(&long, &range).is_err());
        let other = BitmapRange {
            iova: 0x1000,
            ..range
        };
        assert!(parse_bitmap_reply(&bitmap_reply(&other, &bitmap), &range).is_err());
        let mut flags = reply.clone();
        flags[4] = 1;
        assert!(parse_bitmap_reply(&flags, &range).is_err());
        let mut argsz = reply;
        argsz[0] = argsz[0].wrapping_add(8);
        assert!(parse_bitmap_reply(&argsz, &range).is_err());
    }
}
