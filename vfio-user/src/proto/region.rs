//! Region payloads: `DEVICE_GET_REGION_INFO` (with the sparse-mmap capability chain),
//! `REGION_READ`, `REGION_WRITE` and the `DEVICE_GET_REGION_IO_FDS` command.

use vfio_bindings::bindings::vfio::{
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_CAP_TYPE, VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

use super::error::{invalid, ProtoError};
use super::wire::{len_u32, Reader, Writer};

/// Size of `struct vfio_region_info` without capabilities.
pub const REGION_INFO_SIZE: usize = 32;
/// Version of the sparse-mmap capability.
pub const SPARSE_MMAP_CAP_VERSION: u16 = 1;
/// Version of the region type capability.
pub const TYPE_CAP_VERSION: u16 = 1;
const TYPE_CAP_SIZE: usize = CAP_HEADER_SIZE + 8;
/// Most capabilities walked in one chain (guards against loops).
pub const MAX_REGION_CAPS: usize = 16;
const CAP_HEADER_SIZE: usize = 8;
const SPARSE_HEADER_SIZE: usize = CAP_HEADER_SIZE + 8;
const SPARSE_AREA_SIZE: usize = 16;
const REGION_FLAGS_KNOWN: u32 = VFIO_REGION_INFO_FLAG_READ
    | VFIO_REGION_INFO_FLAG_WRITE
    | VFIO_REGION_INFO_FLAG_MMAP
    | VFIO_REGION_INFO_FLAG_CAPS;

/// A part of a region that the client may `mmap()`, relative to the region's offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseArea {
    /// Offset within the region (added to the region's `offset` for `mmap()`).
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A region's type and subtype (`VFIO_REGION_INFO_CAP_TYPE`), e.g.
/// `VFIO_REGION_TYPE_MIGRATION_DEPRECATED` (3) / `VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED`
/// (1) for the v1 migration region libvfio-user 0.1 offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionType {
    /// `VFIO_REGION_TYPE_*`.
    pub type_: u32,
    /// `VFIO_REGION_SUBTYPE_*`, within the type.
    pub subtype: u32,
}

/// The `DEVICE_GET_REGION_INFO` command (32 bytes; only `argsz` and `index` are set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfoRequest {
    /// The largest reply payload accepted (at least 32).
    pub argsz: u32,
    /// The region queried.
    pub index: u32,
}

impl RegionInfoRequest {
    const WHAT: &'static str = "region info command";

    /// Serialises the command.
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(REGION_INFO_SIZE)
            .u32(self.argsz)
            .u32(0)
            .u32(self.index)
            .u32(0)
            .u64(0)
            .u64(0)
            .finish()
    }

    /// Parses exactly 32 bytes: `argsz` at least 32 and every field but `index` zero.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(REGION_INFO_SIZE)?;
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let index = r.u32()?;
        let cap_offset = r.u32()?;
        let size = r.u64()?;
        let offset = r.u64()?;
        r.finish()?;
        if (argsz as usize) < REGION_INFO_SIZE {
            return Err(invalid(Self::WHAT, "argsz", argsz, "smaller than 32"));
        }
        for (field, value) in [
            ("flags", u64::from(flags)),
            ("cap_offset", u64::from(cap_offset)),
            ("size", size),
            ("offset", offset),
        ] {
            if value != 0 {
                return Err(invalid(
                    Self::WHAT,
                    field,
                    value,
                    "must be zero in a command",
                ));
            }
        }
        Ok(RegionInfoRequest { argsz, index })
    }
}

/// The `DEVICE_GET_REGION_INFO` reply: `struct vfio_region_info` and its capability
/// chain, of which the sparse-mmap capability is decoded (others are skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfoReply {
    /// Size of the full reply payload. Larger than the payload received when the command's
    /// `argsz` was too small for the capabilities: then they are left out.
    pub argsz: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// The region.
    pub index: u32,
    /// Size of the region.
    pub size: u64,
    /// Offset to pass to `mmap()` for this region's file descriptor.
    pub offset: u64,
    /// The mappable parts (the sparse-mmap capability); empty when there is none.
    pub sparse_areas: Vec<SparseArea>,
    /// The type capability, if present (encoded before the sparse areas, as libvfio-user
    /// does).
    pub region_type: Option<RegionType>,
}

impl RegionInfoReply {
    const WHAT: &'static str = "region info reply";

    /// Serialises the full reply: `argsz` is the encoded size and, when there are
    /// capabilities (a type, sparse areas), `VFIO_REGION_INFO_FLAG_CAPS` is set and they
    /// follow from offset 32, the type first.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtoError> {
        let type_len = if self.region_type.is_some() {
            TYPE_CAP_SIZE
        } else {
            0
        };
        let sparse_len = if self.sparse_areas.is_empty() {
            0
        } else {
            self.sparse_areas
                .len()
                .checked_mul(SPARSE_AREA_SIZE)
                .and_then(|n| n.checked_add(SPARSE_HEADER_SIZE))
                .ok_or(ProtoError::TooLarge {
                    what: Self::WHAT,
                    len: usize::MAX,
                })?
        };
        let caps_len = type_len.saturating_add(sparse_len);
        let total = REGION_INFO_SIZE.saturating_add(caps_len);
        let argsz = len_u32(Self::WHAT, total)?;
        let nr_areas = len_u32(Self::WHAT, self.sparse_areas.len())?;
        let (flags, cap_offset) = if caps_len == 0 {
            (self.flags, 0)
        } else {
            (
                self.flags | VFIO_REGION_INFO_FLAG_CAPS,
                REGION_INFO_SIZE as u32,
            )
        };
        let mut w = Writer::with_capacity(total);
        w.u32(argsz)
            .u32(flags)
            .u32(self.index)
            .u32(cap_offset)
            .u64(self.size)
            .u64(self.offset);
        if let Some(t) = self.region_type {
            let next = if sparse_len == 0 {
                0
            } else {
                (REGION_INFO_SIZE + TYPE_CAP_SIZE) as u32
            };
            w.u16(VFIO_REGION_INFO_CAP_TYPE as u16)
                .u16(TYPE_CAP_VERSION)
                .u32(next)
                .u32(t.type_)
                .u32(t.subtype);
        }
        if sparse_len != 0 {
            w.u16(VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16)
                .u16(SPARSE_MMAP_CAP_VERSION)
                .u32(0)
                .u32(nr_areas)
                .u32(0);
            for a in &self.sparse_areas {
                w.u64(a.offset).u64(a.size);
            }
        }
        Ok(w.finish())
    }

    /// Serialises the reply for a command whose `argsz` was `max`: the full reply if it
    /// fits, else only the 32-byte structure with `argsz` set to the full size, no
    /// capability offset, and `VFIO_REGION_INFO_FLAG_CAPS` kept, as the kernel does.
    pub fn to_bytes_within(&self, max: u32) -> Result<Vec<u8>, ProtoError> {
        let full = self.to_bytes()?;
        if full.len() <= max as usize {
            return Ok(full);
        }
        let flags = self.flags | VFIO_REGION_INFO_FLAG_CAPS;
        Ok(Writer::with_capacity(REGION_INFO_SIZE)
            .u32(len_u32(Self::WHAT, full.len())?)
            .u32(flags)
            .u32(self.index)
            .u32(0)
            .u64(self.size)
            .u64(self.offset)
            .finish())
    }

    /// Whether the reply left the capabilities out for lack of room (`argsz` larger than
    /// what was received).
    pub fn is_truncated(&self, received_len: usize) -> bool {
        self.argsz as usize > received_len
    }

    /// Parses the reply. Either the payload is `argsz` bytes long, or it is shorter: a
    /// truncated reply, whose `cap_offset` must be 0 (padding is ignored). The chain is
    /// walked within the payload (at most [`MAX_REGION_CAPS`] entries); the sparse-mmap
    /// capability may appear once and its areas must lie inside the region.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(REGION_INFO_SIZE)?;
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let index = r.u32()?;
        let cap_offset = r.u32()?;
        let size = r.u64()?;
        let offset = r.u64()?;
        if (argsz as usize) < REGION_INFO_SIZE {
            return Err(invalid(Self::WHAT, "argsz", argsz, "smaller than 32"));
        }
        if flags & !REGION_FLAGS_KNOWN != 0 {
            return Err(invalid(Self::WHAT, "flags", flags, "unknown bits are set"));
        }
        // A truncated reply (`argsz` larger than the payload) carries no capabilities;
        // bytes after the structure, if any, are padding (libvfio-user sends as many as
        // the command's `argsz`, zeroed).
        let truncated = argsz as usize > bytes.len();
        if (argsz as usize) < bytes.len() {
            return Err(ProtoError::TrailingBytes {
                what: Self::WHAT,
                extra: bytes.len() - argsz as usize,
            });
        }
        if cap_offset != 0 && (truncated || flags & VFIO_REGION_INFO_FLAG_CAPS == 0) {
            return Err(invalid(
                Self::WHAT,
                "cap_offset",
                cap_offset,
                "set without capabilities present",
            ));
        }
        let (sparse_areas, region_type) = parse_caps(bytes, cap_offset as usize)?;
        for a in &sparse_areas {
            if a.offset.checked_add(a.size).is_none_or(|end| end > size) {
                return Err(invalid(
                    Self::WHAT,
                    "sparse area",
                    a.offset,
                    "extends beyond the region",
                ));
            }
        }
        Ok(RegionInfoReply {
            argsz,
            flags,
            index,
            size,
            offset,
            sparse_areas,
            region_type,
        })
    }
}

/// Walks the capability chain starting at `first` (0: none) and returns the sparse areas
/// and the type; other capabilities are skipped.
fn parse_caps(
    bytes: &[u8],
    first: usize,
) -> Result<(Vec<SparseArea>, Option<RegionType>), ProtoError> {
    const WHAT: &str = "region capability";
    let mut areas: Option<Vec<SparseArea>> = None;
    let mut region_type = None;
    let mut at = first;
    let mut seen = 0;
    while at != 0 {
        seen += 1;
        if seen > MAX_REGION_CAPS {
            return Err(invalid(
                WHAT,
                "next",
                at as u64,
                "chain too long or looping",
            ));
        }
        if at < REGION_INFO_SIZE {
            return Err(invalid(
                WHAT,
                "offset",
                at as u64,
                "points into the base structure",
            ));
        }
        let cap = bytes.get(at..).ok_or(ProtoError::Truncated {
            what: WHAT,
            need: at,
            have: bytes.len(),
        })?;
        let mut r = Reader::new(WHAT, cap);
        let id = r.u16()?;
        let version = r.u16()?;
        let next = r.u32()?;
        if u32::from(id) == VFIO_REGION_INFO_CAP_SPARSE_MMAP {
            if areas.is_some() {
                return Err(invalid(WHAT, "id", id, "sparse mmap capability repeated"));
            }
            if version != SPARSE_MMAP_CAP_VERSION {
                return Err(invalid(
                    WHAT,
                    "version",
                    version,
                    "unsupported sparse mmap version",
                ));
            }
            let nr = r.u32()? as usize;
            let _reserved = r.u32()?;
            let need = nr.saturating_mul(SPARSE_AREA_SIZE);
            if need > r.remaining() {
                return Err(ProtoError::Truncated {
                    what: "sparse mmap capability",
                    need: SPARSE_HEADER_SIZE.saturating_add(need),
                    have: cap.len(),
                });
            }
            let mut list = Vec::with_capacity(nr);
            for _ in 0..nr {
                list.push(SparseArea {
                    offset: r.u64()?,
                    size: r.u64()?,
                });
            }
            areas = Some(list);
        } else if u32::from(id) == VFIO_REGION_INFO_CAP_TYPE {
            if region_type.is_some() {
                return Err(invalid(WHAT, "id", id, "type capability repeated"));
            }
            if version != TYPE_CAP_VERSION {
                return Err(invalid(
                    WHAT,
                    "version",
                    version,
                    "unsupported type capability version",
                ));
            }
            region_type = Some(RegionType {
                type_: r.u32()?,
                subtype: r.u32()?,
            });
        }
        at = next as usize;
    }
    Ok((areas.unwrap_or_default(), region_type))
}

/// `REGION_READ` command / `REGION_WRITE` reply: offset, region and count (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionAccess {
    /// Offset within the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Number of bytes.
    pub count: u32,
}

impl RegionAccess {
    /// Encoded size.
    pub const SIZE: usize = 16;
    const WHAT: &'static str = "region access";

    /// Serialises the structure.
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(Self::SIZE)
            .u64(self.offset)
            .u32(self.region)
            .u32(self.count)
            .finish()
    }

    /// Parses exactly 16 bytes; `offset + count` must not overflow.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::SIZE)?;
        let v = RegionAccess {
            offset: r.u64()?,
            region: r.u32()?,
            count: r.u32()?,
        };
        r.finish()?;
        if v.offset.checked_add(u64::from(v.count)).is_none() {
            return Err(invalid(
                Self::WHAT,
                "count",
                v.count,
                "offset + count overflows",
            ));
        }
        Ok(v)
    }
}

/// `REGION_READ` reply / `REGION_WRITE` command: offset, region, count and the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionAccessData {
    /// Offset within the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// The bytes (the count field is their number).
    pub data: Vec<u8>,
}

impl RegionAccessData {
    /// Size without data.
    pub const HEADER_SIZE: usize = 16;
    const WHAT: &'static str = "region access with data";

    /// Serialises the structure.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtoError> {
        let count = len_u32(Self::WHAT, self.data.len())?;
        Ok(Writer::with_capacity(Self::HEADER_SIZE + self.data.len())
            .u64(self.offset)
            .u32(self.region)
            .u32(count)
            .bytes(&self.data)
            .finish())
    }

    /// Serialises a write of `data` at `offset` of `region` into `out` (cleared first)
    /// without building the structure: the posted-write path reuses one buffer.
    pub fn encode_write(
        offset: u64,
        region: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ProtoError> {
        let count = len_u32(Self::WHAT, data.len())?;
        out.clear();
        out.extend_from_slice(&offset.to_ne_bytes());
        out.extend_from_slice(&region.to_ne_bytes());
        out.extend_from_slice(&count.to_ne_bytes());
        out.extend_from_slice(data);
        Ok(())
    }

    /// Parses the structure; `count` must equal the number of data bytes present.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::HEADER_SIZE)?;
        let offset = r.u64()?;
        let region = r.u32()?;
        let count = r.u32()?;
        let data = r.rest();
        if count as usize != data.len() {
            return Err(invalid(
                Self::WHAT,
                "count",
                count,
                "differs from the data size",
            ));
        }
        if offset.checked_add(u64::from(count)).is_none() {
            return Err(invalid(
                Self::WHAT,
                "count",
                count,
                "offset + count overflows",
            ));
        }
        Ok(RegionAccessData {
            offset,
            region,
            data: data.to_vec(),
        })
    }
}

/// The `DEVICE_GET_REGION_IO_FDS` command (16 bytes). Its reply is not implemented: the
/// server refuses the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionIoFdsRequest {
    /// The largest reply payload accepted (at least 16).
    pub argsz: u32,
    /// The region queried.
    pub index: u32,
}

impl RegionIoFdsRequest {
    /// Encoded size.
    pub const SIZE: usize = 16;
    const WHAT: &'static str = "region I/O fds command";

    /// Serialises the command (flags and count 0).
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(Self::SIZE)
            .u32(self.argsz)
            .u32(0)
            .u32(self.index)
            .u32(0)
            .finish()
    }

    /// Parses exactly 16 bytes: `argsz` at least 16, flags and count zero.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        r.require(Self::SIZE)?;
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let index = r.u32()?;
        let count = r.u32()?;
        r.finish()?;
        if (argsz as usize) < Self::SIZE {
            return Err(invalid(Self::WHAT, "argsz", argsz, "smaller than 16"));
        }
        if flags != 0 {
            return Err(invalid(Self::WHAT, "flags", flags, "must be zero"));
        }
        if count != 0 {
            return Err(invalid(
                Self::WHAT,
                "count",
                count,
                "must be zero in a command",
            ));
        }
        Ok(RegionIoFdsRequest { argsz, index })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply() -> RegionInfoReply {
        RegionInfoReply {
            argsz: 0,
            flags: VFIO_REGION_INFO_FLAG_READ
                | VFIO_REGION_INFO_FLAG_WRITE
                | VFIO_REGION_INFO_FLAG_MMAP,
            index: 2,
            size: 0x4000,
            offset: 0x10000,
            sparse_areas: vec![
                SparseArea {
                    offset: 0x1000,
                    size: 0x1000,
                },
                SparseArea {
                    offset: 0x3000,
                    size: 0x1000,
                },
            ],
            region_type: None,
        }
    }

    #[test]
    fn request_round_trip_and_validation() {
        let q = RegionInfoRequest {
            argsz: 304,
            index: 7,
        };
        let b = q.to_bytes();
        assert_eq!(b.len(), 32);
        assert_eq!(RegionInfoRequest::parse(&b).unwrap(), q);
        for len in 0..32 {
            assert!(RegionInfoRequest::parse(&b[..len]).is_err());
        }
        assert!(RegionInfoRequest::parse(&[b.clone(), vec![0]].concat()).is_err());
        let mut nonzero = b.clone();
        nonzero[20] = 1;
        assert!(RegionInfoRequest::parse(&nonzero).is_err());
        let small = RegionInfoRequest {
            argsz: 31,
            index: 0,
        };
        assert!(RegionInfoRequest::parse(&small.to_bytes()).is_err());
    }

    #[test]
    fn reply_with_sparse_cap_layout_and_round_trip() {
        let b = reply().to_bytes().unwrap();
        assert_eq!(b.len(), 32 + 16 + 32);
        assert_eq!(&b[0..4], &80u32.to_ne_bytes());
        assert_eq!(&b[12..16], &32u32.to_ne_bytes());
        assert_eq!(&b[32..34], &1u16.to_ne_bytes());
        assert_eq!(&b[34..36], &1u16.to_ne_bytes());
        assert_eq!(&b[36..40], &0u32.to_ne_bytes());
        assert_eq!(&b[40..44], &2u32.to_ne_bytes());
        let p = RegionInfoReply::parse(&b).unwrap();
        assert_eq!(p.argsz, 80);
        assert_ne!(p.flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
        assert_eq!(p.sparse_areas, reply().sparse_areas);
        assert!(!p.is_truncated(b.len()));
        assert_eq!(p.to_bytes().unwrap(), b);

        for len in 0..b.len() {
            assert!(RegionInfoReply::parse(&b[..len]).is_err(), "len {len}");
        }
        assert!(RegionInfoReply::parse(&[b.clone(), vec![0]].concat()).is_err());
    }

    #[test]
    fn type_capability_before_the_sparse_areas_as_libvfio_user_sends_it() {
        let migration = RegionInfoReply {
            region_type: Some(RegionType {
                type_: 3,
                subtype: 1,
            }),
            ..reply()
        };
        let b = migration.to_bytes().unwrap();
        assert_eq!(b.len(), 32 + 16 + 16 + 32);
        // The type capability at 32, pointing at the sparse one at 48.
        assert_eq!(
            &b[32..34],
            &(VFIO_REGION_INFO_CAP_TYPE as u16).to_ne_bytes()
        );
        assert_eq!(&b[36..40], &48u32.to_ne_bytes());
        assert_eq!(&b[40..48], &[3, 0, 0, 0, 1, 0, 0, 0]);
        let p = RegionInfoReply::parse(&b).unwrap();
        assert_eq!(p.region_type, migration.region_type);
        assert_eq!(p.sparse_areas, migration.sparse_areas);
        // Alone, and absent.
        let alone = RegionInfoReply {
            sparse_areas: vec![],
            ..migration.clone()
        };
        let p = RegionInfoReply::parse(&alone.to_bytes().unwrap()).unwrap();
        assert_eq!(
            (p.region_type, p.sparse_areas.len()),
            (alone.region_type, 0)
        );
        assert_eq!(
            RegionInfoReply::parse(&reply().to_bytes().unwrap())
                .unwrap()
                .region_type,
            None
        );
        // Repeated, or of another version: refused.
        let mut twice = alone.to_bytes().unwrap();
        twice[36..40].copy_from_slice(&32u32.to_ne_bytes());
        assert!(RegionInfoReply::parse(&twice).is_err());
        let mut version = b.clone();
        version[34] = 2;
        assert!(RegionInfoReply::parse(&version).is_err());
        for len in 0..b.len() {
            assert!(RegionInfoReply::parse(&b[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn truncated_reply() {
        let b = reply().to_bytes_within(32).unwrap();
        assert_eq!(b.len(), 32);
        let p = RegionInfoReply::parse(&b).unwrap();
        assert_eq!(p.argsz, 80);
        assert!(p.is_truncated(b.len()));
        assert!(p.sparse_areas.is_empty());
        assert_eq!(reply().to_bytes_within(80).unwrap().len(), 80);

        // libvfio-user's form: as many bytes as the command's argsz, no capabilities.
        let mut padded = b.clone();
        padded.resize(64, 0);
        let p = RegionInfoReply::parse(&padded).unwrap();
        assert!(p.is_truncated(padded.len()) && p.sparse_areas.is_empty());
    }

    #[test]
    fn reply_without_caps() {
        let plain = RegionInfoReply {
            sparse_areas: vec![],
            ..reply()
        };
        let b = plain.to_bytes().unwrap();
        assert_eq!(b.len(), 32);
        let p = RegionInfoReply::parse(&b).unwrap();
        assert_eq!(p, RegionInfoReply { argsz: 32, ..plain });
    }

    #[test]
    fn reply_rejects_bad_caps() {
        let good = reply().to_bytes().unwrap();
        let set_u32 = |b: &mut Vec<u8>, at: usize, v: u32| {
            b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        };
        // Chain pointing at itself.
        let mut looping = good.clone();
        set_u32(&mut looping, 36, 32);
        assert!(RegionInfoReply::parse(&looping).is_err());
        // Capability offset inside the base structure.
        let mut inside = good.clone();
        set_u32(&mut inside, 12, 8);
        assert!(RegionInfoReply::parse(&inside).is_err());
        // Capability offset beyond the payload.
        let mut beyond = good.clone();
        set_u32(&mut beyond, 12, 200);
        assert!(RegionInfoReply::parse(&beyond).is_err());
        // Too many areas for the payload.
        let mut many = good.clone();
        set_u32(&mut many, 40, u32::MAX);
        assert!(RegionInfoReply::parse(&many).is_err());
        // Area outside the region.
        let outside = RegionInfoReply {
            sparse_areas: vec![SparseArea {
                offset: 0x3000,
                size: 0x2000,
            }],
            ..reply()
        };
        assert!(RegionInfoReply::parse(&outside.to_bytes().unwrap()).is_err());
        // Unknown flag bits.
        let mut flags = good.clone();
        set_u32(&mut flags, 4, 0x100);
        assert!(RegionInfoReply::parse(&flags).is_err());
        // Wrong capability version.
        let mut version = good.clone();
        version[34] = 9;
        assert!(RegionInfoReply::parse(&version).is_err());
        // Unknown capabilities are skipped.
        let mut unknown = good;
        unknown[32] = 0x77;
        assert!(RegionInfoReply::parse(&unknown)
            .unwrap()
            .sparse_areas
            .is_empty());
    }

    #[test]
    fn region_access() {
        let a = RegionAccess {
            offset: 0x40,
            region: 0,
            count: 4,
        };
        let b = a.to_bytes();
        assert_eq!(RegionAccess::parse(&b).unwrap(), a);
        for len in 0..16 {
            assert!(RegionAccess::parse(&b[..len]).is_err());
        }
        assert!(RegionAccess::parse(&[b, vec![0]].concat()).is_err());
        let wrap = RegionAccess {
            offset: u64::MAX,
            ..a
        };
        assert!(RegionAccess::parse(&wrap.to_bytes()).is_err());

        let d = RegionAccessData {
            offset: 0x40,
            region: 1,
            data: vec![9; 8],
        };
        let b = d.to_bytes().unwrap();
        assert_eq!(b.len(), 24);
        assert_eq!(RegionAccessData::parse(&b).unwrap(), d);
        for len in 0..b.len() {
            assert!(RegionAccessData::parse(&b[..len]).is_err());
        }
        assert!(RegionAccessData::parse(&[b, vec![0]].concat()).is_err());
    }

    #[test]
    fn io_fds_request() {
        let q = RegionIoFdsRequest {
            argsz: 16,
            index: 0,
        };
        let b = q.to_bytes();
        assert_eq!(RegionIoFdsRequest::parse(&b).unwrap(), q);
        for len in 0..16 {
            assert!(RegionIoFdsRequest::parse(&b[..len]).is_err());
        }
        assert!(RegionIoFdsRequest::parse(&[b.clone(), vec![0]].concat()).is_err());
        let mut flags = b;
        flags[4] = 1;
        assert!(RegionIoFdsRequest::parse(&flags).is_err());
    }
}
