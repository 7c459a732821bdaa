//! DMA payloads: `DMA_MAP`, `DMA_UNMAP` (client -> server) and `DMA_READ`, `DMA_WRITE`
//! (server -> client).

use vfio_bindings::bindings::vfio::{
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_DMA_UNMAP_FLAG_ALL,
};

use super::error::{invalid, ProtoError};
use super::wire::{Reader, Writer};

/// The `DMA_MAP` command (32 bytes). The memory's file descriptor, if any, travels as
/// `SCM_RIGHTS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMap {
    /// The server may read the memory.
    pub readable: bool,
    /// The server may write the memory.
    pub writable: bool,
    /// Offset of the memory in the file descriptor.
    pub offset: u64,
    /// DMA (I/O virtual) address of the memory.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
}

impl DmaMap {
    /// Encoded size.
    pub const SIZE: usize = 32;
    const WHAT: &'static str = "DMA map";

    /// Serialises the command; `argsz` is 32.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut flags = 0;
        if self.readable {
            flags |= VFIO_DMA_MAP_FLAG_READ;
        }
        if self.writable {
            flags |= VFIO_DMA_MAP_FLAG_WRITE;
        }
        Writer::with_capacity(Self::SIZE)
            .u32(Self::SIZE as u32)
            .u32(flags)
            .u64(self.offset)
            .u64(self.iova)
            .u64(self.size)
            .finish()
    }

    /// Parses exactly 32 bytes: `argsz` 32, only the read/write flags, a non-empty range
    /// that does not wrap around.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::SIZE)?;
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let v = DmaMap {
            readable: flags & VFIO_DMA_MAP_FLAG_READ != 0,
            writable: flags & VFIO_DMA_MAP_FLAG_WRITE != 0,
            offset: r.u64()?,
            iova: r.u64()?,
            size: r.u64()?,
        };
        r.finish()?;
        if argsz as usize != Self::SIZE {
            return Err(invalid(Self::WHAT, "argsz", argsz, "must be 32"));
        }
        if flags & !(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) != 0 {
            return Err(invalid(Self::WHAT, "flags", flags, "unknown bits are set"));
        }
        check_range(Self::WHAT, v.iova, v.size)?;
        Ok(v)
    }
}

/// The `DMA_UNMAP` command and reply (24 bytes; the reply echoes the command).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaUnmap {
    /// The largest reply payload accepted (at least 24).
    pub argsz: u32,
    /// 0, or `VFIO_DMA_UNMAP_FLAG_ALL` to remove every mapping (address and size 0).
    pub flags: u32,
    /// DMA address of the mapping.
    pub iova: u64,
    /// Size of the mapping.
    pub size: u64,
}

impl DmaUnmap {
    /// Encoded size.
    pub const SIZE: usize = 24;
    const WHAT: &'static str = "DMA unmap";

    /// Serialises the structure.
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(Self::SIZE)
            .u32(self.argsz)
            .u32(self.flags)
            .u64(self.iova)
            .u64(self.size)
            .finish()
    }

    /// Parses exactly 24 bytes: `argsz` at least 24; flags 0 with a valid range, or
    /// `VFIO_DMA_UNMAP_FLAG_ALL` with address and size 0. (The deprecated dirty-bitmap
    /// flag is refused.)
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::SIZE)?;
        let v = DmaUnmap {
            argsz: r.u32()?,
            flags: r.u32()?,
            iova: r.u64()?,
            size: r.u64()?,
        };
        r.finish()?;
        if (v.argsz as usize) < Self::SIZE {
            return Err(invalid(Self::WHAT, "argsz", v.argsz, "smaller than 24"));
        }
        match v.flags {
            0 => check_range(Self::WHAT, v.iova, v.size)?,
            VFIO_DMA_UNMAP_FLAG_ALL if v.iova == 0 && v.size == 0 => {}
            VFIO_DMA_UNMAP_FLAG_ALL => {
                return Err(invalid(
                    Self::WHAT,
                    "size",
                    v.size,
                    "unmap-all needs address and size 0",
                ))
            }
            f => return Err(invalid(Self::WHAT, "flags", f, "unsupported flags")),
        }
        Ok(v)
    }
}

/// `DMA_READ` command / `DMA_WRITE` reply: an address and a count, no data (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaAccess {
    /// Client DMA address.
    pub address: u64,
    /// Number of bytes.
    pub count: u64,
}

impl DmaAccess {
    /// Encoded size.
    pub const SIZE: usize = 16;
    const WHAT: &'static str = "DMA access";

    /// Serialises the structure.
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(Self::SIZE)
            .u64(self.address)
            .u64(self.count)
            .finish()
    }

    /// Parses exactly 16 bytes; the range must not wrap around.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::SIZE)?;
        let v = DmaAccess {
            address: r.u64()?,
            count: r.u64()?,
        };
        r.finish()?;
        if v.address.checked_add(v.count).is_none() {
            return Err(invalid(
                Self::WHAT,
                "count",
                v.count,
                "address + count overflows",
            ));
        }
        Ok(v)
    }
}

/// `DMA_READ` reply / `DMA_WRITE` command: an address, a count and `count` data bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaAccessData {
    /// Client DMA address.
    pub address: u64,
    /// The bytes (the count field is their number).
    pub data: Vec<u8>,
}

impl DmaAccessData {
    /// Size without data.
    pub const HEADER_SIZE: usize = 16;
    const WHAT: &'static str = "DMA access with data";

    /// Serialises the structure.
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(Self::HEADER_SIZE + self.data.len())
            .u64(self.address)
            .u64(self.data.len() as u64)
            .bytes(&self.data)
            .finish()
    }

    /// Parses the structure; `count` must equal the number of data bytes present.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let (address, data) = Self::split(bytes)?;
        Ok(DmaAccessData {
            address,
            data: data.to_vec(),
        })
    }

    /// Parses the structure like [`Self::parse`] without copying the data: the address
    /// and the data bytes.
    pub fn split(bytes: &[u8]) -> Result<(u64, &[u8]), ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::HEADER_SIZE)?;
        let address = r.u64()?;
        let count = r.u64()?;
        let data = r.rest();
        if count != data.len() as u64 {
            return Err(invalid(
                Self::WHAT,
                "count",
                count,
                "differs from the data size",
            ));
        }
        if address.checked_add(count).is_none() {
            return Err(invalid(
                Self::WHAT,
                "count",
                count,
                "address + count overflows",
            ));
        }
        Ok((address, data))
    }
}

fn check_range(what: &'static str, iova: u64, size: u64) -> Result<(), ProtoError> {
    if size == 0 {
        return Err(invalid(what, "size", size, "empty range"));
    }
    if iova.checked_add(size).is_none() {
        return Err(invalid(what, "size", size, "address + size overflows"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejects_prefixes_and_extension(bytes: &[u8], parse: impl Fn(&[u8]) -> bool) {
        for len in 0..bytes.len() {
            assert!(!parse(&bytes[..len]), "truncated to {len}");
        }
        let mut long = bytes.to_vec();
        long.push(0);
        assert!(!parse(&long), "extended");
    }

    #[test]
    fn dma_map() {
        let m = DmaMap {
            readable: true,
            writable: false,
            offset: 0x1000,
            iova: 0x8000_0000,
            size: 0x20_0000,
        };
        let b = m.to_bytes();
        assert_eq!(b.len(), 32);
        assert_eq!(&b[0..4], &32u32.to_ne_bytes());
        assert_eq!(&b[4..8], &1u32.to_ne_bytes());
        assert_eq!(DmaMap::parse(&b).unwrap(), m);
        rejects_prefixes_and_extension(&b, |x| DmaMap::parse(x).is_ok());
        let mut bad_argsz = b.clone();
        bad_argsz[0] = 33;
        assert!(DmaMap::parse(&bad_argsz).is_err());
        let mut bad_flags = b.clone();
        bad_flags[4] = 4;
        assert!(DmaMap::parse(&bad_flags).is_err());
        assert!(DmaMap::parse(&DmaMap { size: 0, ..m }.to_bytes()).is_err());
        let wrap = DmaMap {
            iova: u64::MAX,
            size: 2,
            ..m
        };
        assert!(DmaMap::parse(&wrap.to_bytes()).is_err());
    }

    #[test]
    fn dma_unmap() {
        let u = DmaUnmap {
            argsz: 24,
            flags: 0,
            iova: 0x1000,
            size: 0x1000,
        };
        let b = u.to_bytes();
        assert_eq!(DmaUnmap::parse(&b).unwrap(), u);
        rejects_prefixes_and_extension(&b, |x| DmaUnmap::parse(x).is_ok());
        assert!(DmaUnmap::parse(&DmaUnmap { argsz: 16, ..u }.to_bytes()).is_err());
        assert!(DmaUnmap::parse(&DmaUnmap { flags: 1, ..u }.to_bytes()).is_err());
        let all = DmaUnmap {
            argsz: 24,
            flags: VFIO_DMA_UNMAP_FLAG_ALL,
            iova: 0,
            size: 0,
        };
        assert_eq!(DmaUnmap::parse(&all.to_bytes()).unwrap(), all);
        assert!(DmaUnmap::parse(&DmaUnmap { size: 1, ..all }.to_bytes()).is_err());
    }

    #[test]
    fn dma_access() {
        let a = DmaAccess {
            address: 0x1000,
            count: 8,
        };
        let b = a.to_bytes();
        assert_eq!(DmaAccess::parse(&b).unwrap(), a);
        rejects_prefixes_and_extension(&b, |x| DmaAccess::parse(x).is_ok());
        let wrap = DmaAccess {
            address: u64::MAX,
            count: 1,
        };
        assert!(DmaAccess::parse(&wrap.to_bytes()).is_err());

        let d = DmaAccessData {
            address: 0x2000,
            data: vec![1, 2, 3],
        };
        let b = d.to_bytes();
        assert_eq!(b.len(), 19);
        assert_eq!(DmaAccessData::parse(&b).unwrap(), d);
        rejects_prefixes_and_extension(&b, |x| DmaAccessData::parse(x).is_ok());
    }
}
