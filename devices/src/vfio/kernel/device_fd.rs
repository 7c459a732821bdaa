//! The ioctls of a VFIO device fd that the backend issues itself: device, region and IRQ
//! info, `SET_IRQS`, reset.
//!
//! vfio-ioctls 0.10 issues them too, but only on a `VfioDevice` it opened through its own
//! type1 container, which cannot open a no-IOMMU group (`/dev/vfio/noiommu-N`, IOMMU type
//! `VFIO_NOIOMMU_IOMMU`), keeps the region table positional (shifted after a missing VGA
//! region) and parses only some capabilities. So these few calls are our own and serve
//! both ways of opening a device (see `group.rs`).

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_info, vfio_irq_set, vfio_region_info, VFIO_BASE,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_TYPE,
};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ptr};
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE.into(), VFIO_BASE + 7);
ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE.into(), VFIO_BASE + 8);
ioctl_io_nr!(VFIO_DEVICE_GET_IRQ_INFO, VFIO_TYPE.into(), VFIO_BASE + 9);
ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE.into(), VFIO_BASE + 10);
ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE.into(), VFIO_BASE + 11);

/// Most bytes of capabilities a region may report (the kernel's own chains are a few
/// dozen bytes; this bounds the buffer a confused driver could ask for).
const MAX_REGION_INFO: u32 = 64 * 1024;

/// Region info as the kernel reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawRegion {
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes (0: no such region).
    pub size: u64,
    /// Offset of the region in the device fd (for `pread`, `pwrite` and `mmap`).
    pub offset: u64,
    /// The sparse-mmap capability's areas `(offset, size)`, if the region has one.
    pub sparse_areas: Option<Vec<(u64, u64)>>,
    /// Ids of every capability in the chain, in order (for diagnostics and tests).
    pub cap_ids: Vec<u16>,
}

/// A failed ioctl on the device fd: which one, and the system's error (its errno kept, so
/// callers can tell an absent region's EINVAL from a failure).
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct IoctlError {
    /// The ioctl and its arguments.
    pub op: String,
    /// The system's error.
    #[source]
    pub source: io::Error,
}

impl IoctlError {
    /// The errno, if the system gave one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

impl From<IoctlError> for io::Error {
    fn from(e: IoctlError) -> io::Error {
        io::Error::new(e.source.kind(), e)
    }
}

type Result<T> = std::result::Result<T, IoctlError>;

/// A VFIO device fd.
pub struct DeviceFd {
    file: File,
}

fn last_err(op: String) -> impl FnOnce() -> IoctlError {
    move || IoctlError {
        op,
        source: io::Error::last_os_error(),
    }
}

impl DeviceFd {
    /// Wraps `file`, a VFIO device fd (or a duplicate of one).
    pub fn new(file: File) -> Self {
        DeviceFd { file }
    }

    /// The fd, for `pread`/`pwrite` and duplicates.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// `VFIO_DEVICE_GET_INFO`.
    pub fn info(&self) -> Result<vfio_device_info> {
        let mut raw = vfio_device_info {
            argsz: size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: the kernel writes at most `argsz` bytes into `raw`, a valid, exclusively
        // borrowed vfio_device_info; the fd is a VFIO device fd.
        if unsafe { ioctl_with_mut_ref(&self.file, VFIO_DEVICE_GET_INFO(), &mut raw) } < 0 {
            return Err(last_err("VFIO_DEVICE_GET_INFO".into())());
        }
        Ok(raw)
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` for `index`, with its capability chain.
    pub fn region(&self, index: u32) -> Result<RawRegion> {
        let head = size_of::<vfio_region_info>() as u32;
        let mut buf = self.region_info_buf(index, head)?;
        let argsz = read_u32(&buf, 0).unwrap_or(0);
        let flags = read_u32(&buf, 4).unwrap_or(0);
        if flags & VFIO_REGION_INFO_FLAG_CAPS != 0 && argsz > head {
            if argsz > MAX_REGION_INFO {
                return Err(IoctlError {
                    op: format!("VFIO_DEVICE_GET_REGION_INFO({index})"),
                    source: io::Error::other(format!(
                        "{argsz} bytes of info reported (more than {MAX_REGION_INFO})"
                    )),
                });
            }
            buf = self.region_info_buf(index, argsz)?;
        }
        parse_region(&buf).map_err(|why| IoctlError {
            op: format!("VFIO_DEVICE_GET_REGION_INFO({index})"),
            source: io::Error::other(format!("malformed answer: {why}")),
        })
    }

    fn region_info_buf(&self, index: u32, argsz: u32) -> Result<Vec<u8>> {
        // u64 words keep the buffer aligned for the kernel's struct.
        let mut words = vec![0u64; (argsz as usize).div_ceil(8)];
        // SAFETY: `words` has at least `argsz` bytes; plain bytes in, plain bytes out.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8)
        };
        bytes[0..4].copy_from_slice(&argsz.to_ne_bytes());
        bytes[8..12].copy_from_slice(&index.to_ne_bytes());
        // SAFETY: the buffer starts with a vfio_region_info whose `argsz` is no more than
        // the buffer's length, so the kernel writes inside it; the fd is a VFIO device fd.
        if unsafe {
            ioctl_with_mut_ptr(
                &self.file,
                VFIO_DEVICE_GET_REGION_INFO(),
                bytes.as_mut_ptr(),
            )
        } < 0
        {
            return Err(last_err(format!("VFIO_DEVICE_GET_REGION_INFO({index})"))());
        }
        let mut out = bytes.to_vec();
        out.truncate(argsz as usize);
        Ok(out)
    }

    /// `VFIO_DEVICE_GET_IRQ_INFO` for `index`: `(count, flags)`.
    pub fn irq(&self, index: u32) -> Result<(u32, u32)> {
        let mut raw = vfio_irq_info {
            argsz: size_of::<vfio_irq_info>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: the kernel writes at most `argsz` bytes into `raw`, a valid, exclusively
        // borrowed vfio_irq_info; the fd is a VFIO device fd.
        if unsafe { ioctl_with_mut_ref(&self.file, VFIO_DEVICE_GET_IRQ_INFO(), &mut raw) } < 0 {
            return Err(last_err(format!("VFIO_DEVICE_GET_IRQ_INFO({index})"))());
        }
        Ok((raw.count, raw.flags))
    }

    /// `SET_IRQS` with `DATA_EVENTFD`: vectors `start..start + fds.len()` of `index` signal
    /// `fds` (-1: stop signalling that vector); `ACTION_TRIGGER`, or `ACTION_UNMASK` for
    /// INTx's resample fd.
    pub fn set_irq_fds(&self, index: u32, start: u32, fds: &[i32], unmask: bool) -> Result<()> {
        let action = if unmask {
            VFIO_IRQ_SET_ACTION_UNMASK
        } else {
            VFIO_IRQ_SET_ACTION_TRIGGER
        };
        let head = size_of::<vfio_irq_set>();
        let argsz = head + fds.len() * 4;
        // u32 words: vfio_irq_set is 4-byte aligned and so is its data of s32 fds.
        let mut words = vec![0u32; argsz.div_ceil(4)];
        words[0] = argsz as u32;
        words[1] = VFIO_IRQ_SET_DATA_EVENTFD | action;
        words[2] = index;
        words[3] = start;
        words[4] = fds.len() as u32;
        for (w, fd) in words[head / 4..].iter_mut().zip(fds) {
            *w = *fd as u32;
        }
        // SAFETY: `words` is a vfio_irq_set followed by `count` s32 fds, `argsz` long; the
        // kernel only reads it; the fd is a VFIO device fd.
        if unsafe { ioctl_with_ptr(&self.file, VFIO_DEVICE_SET_IRQS(), words.as_ptr()) } < 0 {
            return Err(last_err(format!(
                "VFIO_DEVICE_SET_IRQS(index {index}, {} eventfds from vector {start})",
                fds.len()
            ))());
        }
        Ok(())
    }

    /// `SET_IRQS` with `DATA_NONE` and `action` (`ACTION_MASK`, `_UNMASK`, or `_TRIGGER`
    /// with `count` 0 to disable the index).
    pub fn set_irqs_none(&self, index: u32, action: u32, start: u32, count: u32) -> Result<()> {
        let set = vfio_irq_set {
            argsz: size_of::<vfio_irq_set>() as u32,
            flags: VFIO_IRQ_SET_DATA_NONE | action,
            index,
            start,
            count,
            ..Default::default()
        };
        // SAFETY: `set` is a valid vfio_irq_set with no data (DATA_NONE), `argsz` its own
        // size; the kernel only reads it; the fd is a VFIO device fd.
        if unsafe { ioctl_with_ptr(&self.file, VFIO_DEVICE_SET_IRQS(), &set) } < 0 {
            return Err(last_err(format!(
                "VFIO_DEVICE_SET_IRQS(index {index}, action {action:#x}, vectors {start}+{count})"
            ))());
        }
        Ok(())
    }

    /// `VFIO_DEVICE_RESET`.
    pub fn reset(&self) -> Result<()> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is a VFIO device fd.
        if unsafe { ioctl(&self.file, VFIO_DEVICE_RESET()) } < 0 {
            return Err(last_err("VFIO_DEVICE_RESET".into())());
        }
        Ok(())
    }
}

impl AsRawFd for DeviceFd {
    fn as_raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses a `vfio_region_info` with its capability chain. Every offset is checked against
/// the buffer and the chain must move forward (a loop is an error, not a hang).
pub fn parse_region(buf: &[u8]) -> std::result::Result<RawRegion, String> {
    let short = || format!("{} bytes are too few", buf.len());
    let flags = read_u32(buf, 4).ok_or_else(short)?;
    let cap_offset = read_u32(buf, 12).ok_or_else(short)?;
    let size = read_u64(buf, 16).ok_or_else(short)?;
    let offset = read_u64(buf, 24).ok_or_else(short)?;
    let mut region = RawRegion {
        flags,
        size,
        offset,
        ..Default::default()
    };
    if flags & VFIO_REGION_INFO_FLAG_CAPS == 0 {
        return Ok(region);
    }
    let head = size_of::<vfio_region_info>();
    let mut at = cap_offset as usize;
    while at != 0 {
        if at < head || !at.is_multiple_of(4) {
            return Err(format!(
                "capability at {at} is inside the header or misaligned"
            ));
        }
        let id = read_u16(buf, at).ok_or_else(|| format!("capability at {at} is cut off"))?;
        let next = read_u32(buf, at + 4).ok_or_else(|| format!("capability at {at} is cut off"))?;
        region.cap_ids.push(id);
        if u32::from(id) == VFIO_REGION_INFO_CAP_SPARSE_MMAP {
            let nr = read_u32(buf, at + 8)
                .ok_or_else(|| "sparse-mmap capability cut off".to_string())?;
            let mut areas = Vec::new();
            for i in 0..nr as usize {
                let a = at + 16 + i * 16;
                let (Some(o), Some(s)) = (read_u64(buf, a), read_u64(buf, a + 8)) else {
                    return Err(format!("sparse-mmap area {i} of {nr} is cut off"));
                };
                areas.push((o, s));
            }
            region.sparse_areas = Some(areas);
        }
        if next != 0 && (next as usize) <= at {
            return Err(format!("capability chain goes back from {at} to {next}"));
        }
        at = next as usize;
    }
    Ok(region)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32, cap_offset: u32, size: u64, offset: u64, argsz: usize) -> Vec<u8> {
        let mut b = vec![0u8; argsz];
        b[0..4].copy_from_slice(&(argsz as u32).to_ne_bytes());
        b[4..8].copy_from_slice(&flags.to_ne_bytes());
        b[12..16].copy_from_slice(&cap_offset.to_ne_bytes());
        b[16..24].copy_from_slice(&size.to_ne_bytes());
        b[24..32].copy_from_slice(&offset.to_ne_bytes());
        b
    }

    #[test]
    fn plain_region() {
        let r = parse_region(&header(7, 0, 0x1000, 0x2000, 32)).unwrap();
        assert_eq!((r.flags, r.size, r.offset), (7, 0x1000, 0x2000));
        assert_eq!(r.sparse_areas, None);
    }

    #[test]
    fn sparse_mmap_then_another_capability() {
        let mut b = header(VFIO_REGION_INFO_FLAG_CAPS | 7, 32, 0x4000, 0, 32 + 48 + 8);
        // sparse-mmap at 32: id 1, version 1, next 80; 2 areas.
        b[32..34].copy_from_slice(&1u16.to_ne_bytes());
        b[36..40].copy_from_slice(&80u32.to_ne_bytes());
        b[40..44].copy_from_slice(&2u32.to_ne_bytes());
        b[48..56].copy_from_slice(&0u64.to_ne_bytes());
        b[56..64].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[64..72].copy_from_slice(&0x3000u64.to_ne_bytes());
        b[72..80].copy_from_slice(&0x1000u64.to_ne_bytes());
        // MSIX_MAPPABLE (3) at 80, last.
        b[80..82].copy_from_slice(&3u16.to_ne_bytes());
        let r = parse_region(&b).unwrap();
        assert_eq!(r.sparse_areas, Some(vec![(0, 0x1000), (0x3000, 0x1000)]));
        assert_eq!(r.cap_ids, vec![1, 3]);
    }

    #[test]
    fn lying_chains_are_errors() {
        // A loop.
        let mut b = header(VFIO_REGION_INFO_FLAG_CAPS, 32, 0, 0, 48);
        b[32..34].copy_from_slice(&3u16.to_ne_bytes());
        b[36..40].copy_from_slice(&32u32.to_ne_bytes());
        assert!(parse_region(&b).unwrap_err().contains("goes back"));
        // More areas than bytes.
        let mut b = header(VFIO_REGION_INFO_FLAG_CAPS, 32, 0, 0, 48);
        b[32..34].copy_from_slice(&1u16.to_ne_bytes());
        b[40..44].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_region(&b).unwrap_err().contains("cut off"));
        // Outside the buffer, inside the header.
        assert!(parse_region(&header(VFIO_REGION_INFO_FLAG_CAPS, 4096, 0, 0, 32)).is_err());
        assert!(parse_region(&header(VFIO_REGION_INFO_FLAG_CAPS, 8, 0, 0, 32)).is_err());
    }
}
