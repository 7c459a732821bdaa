//! Fakes for testing the vfio-pci device without VFIO hardware: a [`FakeBackend`] with a
//! configuration space, memfd-backed BARs and an interrupt recorder, and [`FakeSlots`], a
//! [`SlotBackend`] that records memory slots instead of calling KVM. Public so that the vmm
//! can use them in its own tests.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::kvm_userspace_memory_region;
use resources::memslots::SlotBackend;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE, VFIO_IRQ_INFO_NORESIZE,
};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{
    BackendError, DeviceInfo, DmaMapping, IrqInfo, RegionFlags, RegionInfo, RegionMmap, Result,
    VfioBackend, CONFIG_REGION,
};

/// Creates an anonymous memory file (`memfd_create`).
pub fn memfd(name: &str) -> io::Result<File> {
    let name = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `name` is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// One region of the fake device, backed by a memfd.
pub struct FakeRegion {
    /// Size in bytes (0: absent).
    pub size: u64,
    /// Access flags.
    pub flags: RegionFlags,
    /// Sparse mmap areas.
    pub sparse: Vec<(u64, u64)>,
    /// Contents.
    pub file: File,
    fd: Arc<OwnedFd>,
}

impl FakeRegion {
    fn new(size: u64, mmap: bool, sparse: Vec<(u64, u64)>) -> io::Result<Self> {
        let file = memfd("fake-region")?;
        file.set_len(size)?;
        let fd = Arc::new(OwnedFd::from(file.try_clone()?));
        Ok(FakeRegion {
            size,
            flags: RegionFlags {
                read: size > 0,
                write: size > 0,
                mmap,
            },
            sparse,
            file,
            fd,
        })
    }
}

/// A call the fake recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// A region read `(index, offset, len)` (not the configuration space).
    Read(u32, u64, usize),
    /// A region write `(index, offset, data)` (configuration-space writes too).
    Write(u32, u64, Vec<u8>),
    /// `set_irq_eventfds(index, start, raw fds)`.
    SetIrqs(u32, u32, Vec<Option<i32>>),
    /// `disable_irqs(index)`.
    DisableIrqs(u32),
    /// `mask_irqs(index, start, count, masked)`.
    MaskIrqs(u32, u32, u32, bool),
    /// `set_intx_unmask_eventfd(raw fd)`, answered with whether the fake takes it.
    IntxUnmaskFd(i32, bool),
    /// `reset()`.
    Reset,
}

/// A fake VFIO PCI device.
///
/// [`FakeBackend::standard`] is a virtio-like function: BAR0/1 a 64-bit prefetchable
/// 64 KiB BAR whose pages 0x4000-0xc000 are a sparse mmap area; BAR2 a 32-bit 16 KiB BAR,
/// all mmap-able, holding the MSI-X table (8 vectors) at 0x2000 and the PBA at 0x3000;
/// BAR4 a 32-byte I/O BAR. Capabilities: PM at 0x40, MSI-X at 0x50, vendor-specific at 0x60,
/// VPD at 0x70 (to be hidden), MSI (64-bit, per-vector masking, 4 vectors) at 0x80, PCI
/// Express (FLR capable) at 0xa0. MSI
/// and MSI-X are maskable (`VFIO_IRQ_INFO_MASKABLE`); [`FakeBackend::not_maskable`] is the
/// same device without.
///
/// Configuration-space writes land in `config` as they come (no write masks), so a test
/// sees there what the function wrote through to the device.
/// Interrupt pin INTA, with one INTx vector.
///
/// The eventfds the device is given are kept, so a test can signal them as the device
/// would ([`FakeBackend::fire`]).
pub struct FakeBackend {
    /// Configuration space (writes are applied as they come).
    pub config: Mutex<[u8; 256]>,
    /// Regions 0-6 (7 is `config`).
    pub regions: Vec<FakeRegion>,
    /// Vector counts of INTx, MSI, MSI-X, ERR, REQ.
    pub irq_counts: [u32; 5],
    /// `VFIO_IRQ_INFO_*` flags of the same indices; INTx masks itself (as kernel VFIO's
    /// does).
    pub irq_flags: [u32; 5],
    /// Calls seen, in order.
    pub calls: Mutex<Vec<Call>>,
    /// When set, every call fails as if the device were gone.
    pub dead: AtomicBool,
    /// When set, the fake takes an INTx unmask eventfd (as kernel VFIO does); otherwise it
    /// answers that it cannot (as vfio-user), and the caller relays.
    pub takes_unmask_fd: AtomicBool,
    /// The eventfds set per `(index, vector)`.
    eventfds: Mutex<BTreeMap<(u32, u32), EventFd>>,
}

impl FakeBackend {
    /// The standard fake device (see the type's docs). Fails only if a memfd cannot be
    /// created.
    pub fn standard() -> io::Result<Arc<Self>> {
        Self::build().map(Arc::new)
    }

    fn build() -> io::Result<Self> {
        let mut cfg = [0u8; 256];
        let put = |cfg: &mut [u8; 256], off: usize, bytes: &[u8]| {
            cfg[off..off + bytes.len()].copy_from_slice(bytes)
        };
        put(&mut cfg, 0x00, &0x1042_1af4u32.to_le_bytes());
        put(&mut cfg, 0x04, &0x0010_0000u32.to_le_bytes()); // status: capability list
        put(&mut cfg, 0x08, &0x0100_0001u32.to_le_bytes()); // storage, revision 1
        cfg[0x0e] = 0x80; // multi-function bit: must not reach the guest
        put(&mut cfg, 0x10, &0x0000_000cu32.to_le_bytes()); // 64-bit prefetchable
        put(&mut cfg, 0x18, &0u32.to_le_bytes()); // 32-bit
        put(&mut cfg, 0x20, &1u32.to_le_bytes()); // I/O
        put(&mut cfg, 0x2c, &0x0002_1af4u32.to_le_bytes());
        cfg[0x34] = 0x40;
        cfg[0x3d] = 1; // INTA: must not reach the guest
        put(
            &mut cfg,
            0x40,
            &[0x01, 0x50, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00],
        );
        put(&mut cfg, 0x50, &[0x11, 0x60, 0x07, 0x00]);
        put(&mut cfg, 0x54, &0x2002u32.to_le_bytes());
        put(&mut cfg, 0x58, &0x3002u32.to_le_bytes());
        put(
            &mut cfg,
            0x60,
            &[0x09, 0x70, 0x10, 0x01, 0xaa, 0xbb, 0xcc, 0xdd],
        );
        put(&mut cfg, 0x70, &[0x03, 0x80, 0x00, 0x00]);
        put(&mut cfg, 0x80, &[0x05, 0xa0, 0x84, 0x01]);
        // PCI Express (v2, endpoint) whose Device Capabilities offer FLR.
        put(&mut cfg, 0xa0, &[0x10, 0x00, 0x02, 0x00]);
        put(&mut cfg, 0xa4, &(1u32 << 28).to_le_bytes());
        for (i, b) in cfg[0xc0..].iter_mut().enumerate() {
            *b = 0xc0 + i as u8;
        }
        let regions = vec![
            FakeRegion::new(0x10000, true, vec![(0x4000, 0x8000)])?,
            FakeRegion::new(0, false, vec![])?,
            FakeRegion::new(0x4000, true, vec![])?,
            FakeRegion::new(0, false, vec![])?,
            FakeRegion::new(0x20, false, vec![])?,
            FakeRegion::new(0, false, vec![])?,
            FakeRegion::new(0, false, vec![])?,
        ];
        Ok(FakeBackend {
            config: Mutex::new(cfg),
            regions,
            irq_counts: [1, 4, 8, 0, 0],
            irq_flags: [
                VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED,
                VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_NORESIZE,
                VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_NORESIZE,
                0,
                0,
            ],
            calls: Mutex::new(Vec::new()),
            dead: AtomicBool::new(false),
            takes_unmask_fd: AtomicBool::new(false),
            eventfds: Mutex::new(BTreeMap::new()),
        })
    }

    /// The standard fake whose MSI and MSI-X are not maskable (as libvfio-user and
    /// kernel VFIO report them).
    pub fn not_maskable() -> io::Result<Arc<Self>> {
        let mut fake = Self::build()?;
        fake.irq_flags[1] &= !VFIO_IRQ_INFO_MASKABLE;
        fake.irq_flags[2] &= !VFIO_IRQ_INFO_MASKABLE;
        Ok(Arc::new(fake))
    }

    /// Signals vector `vector` of interrupt `index` as the device would: writes its
    /// eventfd. Fails if the device has no eventfd for it.
    pub fn fire(&self, index: u32, vector: u32) -> io::Result<()> {
        let fds = self.eventfds.lock().unwrap_or_else(|e| e.into_inner());
        match fds.get(&(index, vector)) {
            Some(fd) => fd.write(1),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no eventfd for vector {vector} of interrupt {index}"),
            )),
        }
    }

    /// Whether the device has an eventfd for vector `vector` of interrupt `index`.
    pub fn has_eventfd(&self, index: u32, vector: u32) -> bool {
        let fds = self.eventfds.lock().unwrap_or_else(|e| e.into_inner());
        fds.contains_key(&(index, vector))
    }

    /// Locks the configuration space.
    pub fn config(&self) -> MutexGuard<'_, [u8; 256]> {
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the calls recorded so far.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn record(&self, call: Call) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
    }

    fn alive(&self, op: &str) -> Result<()> {
        if self.dead.load(Ordering::Relaxed) {
            return Err(BackendError::Disconnected {
                op: op.to_string(),
                reason: "the fake was told to die".into(),
            });
        }
        Ok(())
    }

    fn region(&self, index: u32, offset: u64, len: usize) -> Result<&FakeRegion> {
        let r = self
            .regions
            .get(index as usize)
            .filter(|r| r.size > 0)
            .ok_or(BackendError::NoRegion { index })?;
        if offset.checked_add(len as u64).is_none_or(|e| e > r.size) {
            return Err(BackendError::OutOfRange {
                index,
                offset,
                len,
                size: r.size,
            });
        }
        Ok(r)
    }

    fn config_range(offset: u64, len: usize) -> Result<std::ops::Range<usize>> {
        let end = offset.checked_add(len as u64).filter(|&e| e <= 256);
        match end {
            Some(end) => Ok(offset as usize..end as usize),
            None => Err(BackendError::OutOfRange {
                index: CONFIG_REGION,
                offset,
                len,
                size: 256,
            }),
        }
    }
}

impl VfioBackend for FakeBackend {
    fn device_info(&self) -> Result<DeviceInfo> {
        self.alive("device info")?;
        Ok(DeviceInfo {
            num_regions: 9,
            num_irqs: 5,
            flags: 0,
        })
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.alive("region info")?;
        if index == CONFIG_REGION {
            return Ok(RegionInfo {
                size: 256,
                flags: RegionFlags {
                    read: true,
                    write: true,
                    mmap: false,
                },
                ..Default::default()
            });
        }
        let r = self
            .regions
            .get(index as usize)
            .ok_or(BackendError::NoRegion { index })?;
        Ok(RegionInfo {
            size: r.size,
            flags: r.flags,
            sparse_areas: r.sparse.clone(),
            mmap: r.flags.mmap.then(|| RegionMmap {
                fd: r.fd.clone(),
                file_offset: 0,
            }),
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        self.alive("region read")?;
        if index == CONFIG_REGION {
            let range = Self::config_range(offset, data.len())?;
            data.copy_from_slice(&self.config()[range]);
            return Ok(());
        }
        self.record(Call::Read(index, offset, data.len()));
        let r = self.region(index, offset, data.len())?;
        r.file
            .read_exact_at(data, offset)
            .map_err(|source| BackendError::Io {
                op: "fake region read".into(),
                source,
            })
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.alive("region write")?;
        self.record(Call::Write(index, offset, data.to_vec()));
        if index == CONFIG_REGION {
            let range = Self::config_range(offset, data.len())?;
            self.config()[range].copy_from_slice(data);
            return Ok(());
        }
        let r = self.region(index, offset, data.len())?;
        r.file
            .write_all_at(data, offset)
            .map_err(|source| BackendError::Io {
                op: "fake region write".into(),
                source,
            })
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.alive("irq info")?;
        Ok(IrqInfo {
            count: self.irq_counts.get(index as usize).copied().unwrap_or(0),
            flags: self.irq_flags.get(index as usize).copied().unwrap_or(0),
        })
    }

    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<&EventFd>]) -> Result<()> {
        self.alive("set irqs")?;
        let raw = fds.iter().map(|f| f.map(|f| f.as_raw_fd())).collect();
        self.record(Call::SetIrqs(index, start, raw));
        let mut kept = self.eventfds.lock().unwrap_or_else(|e| e.into_inner());
        for (k, fd) in fds.iter().enumerate() {
            let vector = start + k as u32;
            match fd.map(EventFd::try_clone).transpose() {
                Ok(Some(fd)) => kept.insert((index, vector), fd),
                Ok(None) => kept.remove(&(index, vector)),
                Err(source) => {
                    return Err(BackendError::Io {
                        op: "fake keeping an eventfd".into(),
                        source,
                    })
                }
            };
        }
        Ok(())
    }

    fn disable_irqs(&self, index: u32) -> Result<()> {
        self.alive("disable irqs")?;
        self.record(Call::DisableIrqs(index));
        let mut kept = self.eventfds.lock().unwrap_or_else(|e| e.into_inner());
        kept.retain(|&(i, _), _| i != index);
        Ok(())
    }

    fn mask_irqs(&self, index: u32, start: u32, count: u32, masked: bool) -> Result<()> {
        self.alive("mask irqs")?;
        self.record(Call::MaskIrqs(index, start, count, masked));
        Ok(())
    }

    fn set_intx_unmask_eventfd(&self, fd: &EventFd) -> Result<bool> {
        self.alive("set the INTx unmask eventfd")?;
        let takes = self.takes_unmask_fd.load(Ordering::Relaxed);
        self.record(Call::IntxUnmaskFd(fd.as_raw_fd(), takes));
        Ok(takes)
    }

    unsafe fn dma_map(&self, _mapping: &DmaMapping<'_>) -> Result<()> {
        self.alive("DMA map")
    }

    fn dma_unmap(&self, _iova: u64, _size: u64) -> Result<()> {
        self.alive("DMA unmap")
    }

    fn reset(&self) -> Result<()> {
        self.alive("reset")?;
        self.record(Call::Reset);
        Ok(())
    }
}

/// A [`SlotBackend`] that records slots and refuses, with KVM's errors, what KVM would
/// refuse (overlap, bad slot numbers, unaligned ranges).
#[derive(Debug, Default)]
pub struct FakeSlots {
    live: Mutex<BTreeMap<u32, kvm_userspace_memory_region>>,
}

impl FakeSlots {
    /// Live slots as `(gpa, size, host address, flags)`, sorted by gpa.
    pub fn live(&self) -> Vec<(u64, u64, u64, u32)> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = live
            .values()
            .map(|r| (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.flags))
            .collect();
        v.sort_unstable();
        v
    }
}

impl SlotBackend for FakeSlots {
    unsafe fn set_user_memory_region(&self, r: kvm_userspace_memory_region) -> io::Result<()> {
        let einval = || Err(io::Error::from_raw_os_error(libc::EINVAL));
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if r.slot >= self.max_slots() {
            return einval();
        }
        if r.memory_size == 0 {
            return match live.remove(&r.slot) {
                Some(_) => Ok(()),
                None => einval(),
            };
        }
        if [r.guest_phys_addr, r.memory_size, r.userspace_addr]
            .iter()
            .any(|v| v % 0x1000 != 0)
        {
            return einval();
        }
        let end = r.guest_phys_addr + r.memory_size;
        let overlaps = live.values().any(|o| {
            o.slot != r.slot
                && r.guest_phys_addr < o.guest_phys_addr + o.memory_size
                && o.guest_phys_addr < end
        });
        if overlaps {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        live.insert(r.slot, r);
        Ok(())
    }

    fn max_slots(&self) -> u32 {
        32
    }
}
