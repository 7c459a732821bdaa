//! A minimal modern virtio-pci driver over a [`VfioBackend`]: finds the capabilities in
//! configuration space (as a driver does, nothing assumed about the device's layout), sets up
//! one split queue in locked pages and sends one virtio-blk write request.

use std::os::fd::AsRawFd;

use devices::vfio::backend::CONFIG_REGION;
use devices::vfio::{BackendError, VfioBackend};

use crate::phys::LockedPage;

/// Where a virtio structure lives: BAR (region index) and offset in it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Place {
    /// BAR number.
    pub bar: u32,
    /// Offset in the BAR.
    pub offset: u64,
}

/// The capabilities a driver needs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Layout {
    /// `VIRTIO_PCI_CAP_COMMON_CFG`.
    pub common: Place,
    /// `VIRTIO_PCI_CAP_NOTIFY_CFG` and its multiplier.
    pub notify: Place,
    /// Notify offset multiplier.
    pub notify_multiplier: u32,
    /// MSI-X table size (vectors), 0 without MSI-X.
    pub msix_vectors: u16,
}

fn read_cfg(b: &dyn VfioBackend, at: u64, len: usize) -> Result<Vec<u8>, BackendError> {
    let mut v = vec![0; len];
    b.region_read(CONFIG_REGION, at, &mut v)?;
    Ok(v)
}

fn u32_of(v: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(v[at..at + 4].try_into().unwrap())
}

/// Walks the capability list of configuration space (at most 48 entries: a loop in a
/// lying list ends the walk).
pub fn find_layout(b: &dyn VfioBackend) -> Result<(Layout, Vec<u8>), BackendError> {
    let mut layout = Layout::default();
    let mut ids = Vec::new();
    let mut at = u64::from(read_cfg(b, 0x34, 1)?[0] & 0xfc);
    while at != 0 && ids.len() < 48 {
        let cap = read_cfg(b, at, 20)?;
        ids.push(cap[0]);
        match cap[0] {
            0x09 => {
                let place = Place {
                    bar: u32::from(cap[4]),
                    offset: u64::from(u32_of(&cap, 8)),
                };
                match cap[3] {
                    1 => layout.common = place,
                    2 => {
                        layout.notify = place;
                        layout.notify_multiplier = u32_of(&cap, 16);
                    }
                    _ => {}
                }
            }
            0x11 => {
                layout.msix_vectors = (u16::from_le_bytes([cap[2], cap[3]]) & 0x7ff) + 1;
            }
            _ => {}
        }
        at = u64::from(cap[1] & 0xfc);
    }
    Ok((layout, ids))
}

/// Common configuration offsets (virtio 1.x, 4.1.4.3).
pub mod common {
    /// `device_feature_select` (u32).
    pub const DFSELECT: u64 = 0x00;
    /// `device_feature` (u32).
    pub const DF: u64 = 0x04;
    /// `driver_feature_select` (u32).
    pub const GFSELECT: u64 = 0x08;
    /// `driver_feature` (u32).
    pub const GF: u64 = 0x0c;
    /// `msix_config` (u16).
    pub const MSIX_CONFIG: u64 = 0x10;
    /// `device_status` (u8).
    pub const STATUS: u64 = 0x14;
    /// `queue_select` (u16).
    pub const Q_SELECT: u64 = 0x16;
    /// `queue_size` (u16).
    pub const Q_SIZE: u64 = 0x18;
    /// `queue_msix_vector` (u16).
    pub const Q_MSIX: u64 = 0x1a;
    /// `queue_enable` (u16).
    pub const Q_ENABLE: u64 = 0x1c;
    /// `queue_notify_off` (u16).
    pub const Q_NOTIFY_OFF: u64 = 0x1e;
    /// `queue_desc` (u64).
    pub const Q_DESC: u64 = 0x20;
    /// `queue_driver` (u64).
    pub const Q_AVAIL: u64 = 0x28;
    /// `queue_device` (u64).
    pub const Q_USED: u64 = 0x30;
}

/// Accesses to the common configuration structure.
pub struct Common<'a> {
    b: &'a dyn VfioBackend,
    at: Place,
}

impl<'a> Common<'a> {
    /// The structure at `at`.
    pub fn new(b: &'a dyn VfioBackend, at: Place) -> Self {
        Common { b, at }
    }

    /// Writes `data` at `reg`.
    pub fn write(&self, reg: u64, data: &[u8]) -> Result<(), BackendError> {
        self.b.region_write(self.at.bar, self.at.offset + reg, data)
    }

    /// Reads `len` (<= 8) bytes at `reg`, little-endian.
    pub fn read(&self, reg: u64, len: usize) -> Result<u64, BackendError> {
        let mut v = [0u8; 8];
        self.b
            .region_read(self.at.bar, self.at.offset + reg, &mut v[..len])?;
        Ok(u64::from_le_bytes(v))
    }
}

/// A split virtqueue of `QUEUE_SIZE` entries in three locked pages.
pub struct SplitQueue {
    /// Descriptor table.
    pub desc: LockedPage,
    /// Available (driver) ring.
    pub avail: LockedPage,
    /// Used (device) ring.
    pub used: LockedPage,
}

/// Entries of the queue this driver sets up.
pub const QUEUE_SIZE: u16 = 8;

impl SplitQueue {
    /// Three fresh locked pages.
    pub fn new() -> std::io::Result<Self> {
        Ok(SplitQueue {
            desc: LockedPage::new()?,
            avail: LockedPage::new()?,
            used: LockedPage::new()?,
        })
    }

    /// Writes descriptor `i`: physical address, length, flags, next.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.desc.write(usize::from(i) * 16, &d);
    }

    /// Puts chain `head` into the available ring and publishes index `idx`.
    pub fn publish(&self, slot: u16, head: u16, idx: u16) {
        self.avail
            .write(4 + usize::from(slot % QUEUE_SIZE) * 2, &head.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.avail.write(2, &idx.to_le_bytes());
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        let v = self.used.read(2, 2);
        u16::from_le_bytes([v[0], v[1]])
    }
}

/// A page of a region mapped into this process (the notify page).
pub struct MappedPage {
    ptr: *mut u8,
}

impl MappedPage {
    /// Maps the page of `region` holding `offset`, through the backend's mmap information;
    /// fails unless that page is in a mappable area.
    pub fn map(b: &dyn VfioBackend, region: u32, offset: u64) -> Result<Self, String> {
        let info = b.region_info(region).map_err(|e| e.to_string())?;
        let page = offset & !0xfff;
        let areas = info.mappable_areas();
        if !areas
            .iter()
            .any(|&(o, s)| o <= page && page + 0x1000 <= o + s)
        {
            return Err(format!(
                "page {page:#x} of region {region} is in no mappable area ({areas:x?})"
            ));
        }
        let m = info.mmap.ok_or("the region has no mmap file")?;
        // SAFETY: a new shared mapping of the device fd at the region's file offset; it
        // aliases no Rust memory and is unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                0x1000,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                m.fd.as_raw_fd(),
                (m.file_offset + page) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(MappedPage { ptr: p.cast() })
    }

    /// A 16-bit store at `offset` in the page (a doorbell).
    pub fn write_u16(&self, offset: u64, v: u16) {
        assert!(offset.is_multiple_of(2) && offset < 0x1000);
        // SAFETY: inside the mapped page, aligned; device memory takes volatile stores.
        unsafe {
            self.ptr
                .add(offset as usize)
                .cast::<u16>()
                .write_volatile(v.to_le())
        };
    }
}

impl Drop for MappedPage {
    fn drop(&mut self) {
        // SAFETY: unmapping the page mapped in `map`, not used afterwards.
        unsafe { libc::munmap(self.ptr.cast(), 0x1000) };
    }
}
