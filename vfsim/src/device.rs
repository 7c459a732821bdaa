//! [`VfSim`]: the function (virtio-blk or virtio-net, see [`crate::personality`]) as a
//! [`vfio_user::Device`]. Region 0 is BAR 0 (see [`crate::layout`]), region 7 the
//! configuration space; MSI-X is IRQ index 2.
//!
//! MSI-X is as strict as hardware (see [`crate::irq`]): the client must enable it in
//! configuration space and unmask each vector, through the MSI-X table in BAR 0 or with
//! `SET_IRQS` `ACTION_MASK`/`ACTION_UNMASK` (the IRQ info says MSI-X is maskable), or the
//! device's interrupts stay pending in its PBA. Both ways of masking set the same bit:
//! the vector-control word of the table, as `msix_set_mask` does in QEMU.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE, VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{
    Device, DeviceInfo, DeviceResult, DmaLoggingRange, DmaMapping, Errno, IrqData, IrqInfo,
    MigState, RegionInfo, SparseArea,
};

use crate::blk::{BlkError, BlkFunction, Disk};
use crate::common_cfg::CfgEvent;
use crate::engine::Engine;
use crate::guest_mem::GuestMemError;
use crate::layout::*;
use crate::mmap::{memfd, Mapping, MmapError};
use crate::native_mig::NativeMigration;
use crate::net::tap::{Tap, TapError};
use crate::net::{Mac, NetFunction};
use crate::pci_config::{PciRegs, MSIX_CONTROL, MSIX_ENTRY_SIZE, MSIX_VECTOR_CONTROL};
use crate::personality::Personality;
use crate::pf::control::Controller;
use crate::poller::{Poller, PollerError};

/// Why the device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The queue size is not a power of two in 2..=32768.
    #[error("queue size {0} is invalid: it must be a power of two from 2 to 32768")]
    QueueSize(u16),
    /// The disk image could not be opened.
    #[error(transparent)]
    Disk(#[from] BlkError),
    /// The tap could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The BAR memory could not be created or mapped.
    #[error("setting up the BAR 0 memfd failed: {0}")]
    BarMemory(#[from] MmapError),
    /// The poller thread could not start.
    #[error(transparent)]
    Poller(#[from] PollerError),
}

/// Which function to be, and over what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PersonalityConfig {
    /// virtio-blk over a disk image (read and written in place).
    Blk {
        /// The disk image.
        disk: PathBuf,
    },
    /// virtio-net over a tap interface (created if missing).
    Net {
        /// The tap's name.
        tap: String,
        /// The MAC address.
        mac: Mac,
    },
}

impl PersonalityConfig {
    /// Opens what the personality runs over.
    pub fn open(&self) -> Result<Box<dyn Personality>, DeviceError> {
        Ok(match self {
            PersonalityConfig::Blk { disk } => {
                let d = Disk::open(disk)?;
                tracing::info!(path = %disk.display(), sectors = d.sectors(), "disk image opened");
                Box::new(BlkFunction::new(d))
            }
            PersonalityConfig::Net { tap, mac } => {
                let t = Tap::open(tap)?;
                tracing::info!(tap, %mac, "tap opened");
                Box::new(NetFunction::new(t, *mac))
            }
        })
    }
}

/// How to build the device.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The personality and its backing.
    pub personality: PersonalityConfig,
    /// Largest queue size offered.
    pub queue_size: u16,
    /// Offer vfio-user's own migration (device features, migration data, DMA
    /// logging; see [`crate::native_mig`]).
    pub native_migration: bool,
}

/// The simulated function.
#[derive(Debug)]
pub struct VfSim {
    identity: &'static Identity,
    engine: Arc<Mutex<Engine>>,
    pci: Arc<Mutex<PciRegs>>,
    bar_fd: OwnedFd,
    bar: Arc<Mapping>,
    poller: Poller,
    /// vfio-user migration, with `--native-migration`.
    native: Option<NativeMigration>,
}

/// What part of BAR 0 an access falls in.
enum Block {
    Common,
    Isr,
    DeviceCfg,
    Notify,
    MsixTable,
    MsixPba,
    Reserved,
}

impl VfSim {
    /// Opens the disk or tap, creates the BAR memory and starts the poller.
    pub fn new(cfg: &SimConfig) -> Result<Self, DeviceError> {
        if !cfg.queue_size.is_power_of_two() || !(2..=32768).contains(&cfg.queue_size) {
            return Err(DeviceError::QueueSize(cfg.queue_size));
        }
        let personality = cfg.personality.open()?;
        let identity = personality.identity();
        let engine = Arc::new(Mutex::new(Engine::new(personality, cfg.queue_size)));
        let bar_fd = memfd(c"vfsim-bar0", BAR0_SIZE)?;
        let bar = Arc::new(Mapping::new(bar_fd.as_fd(), 0, BAR0_SIZE, true)?);
        let doorbells = (0..u64::from(identity.num_queues))
            .map(|q| NOTIFY_OFFSET + q * u64::from(NOTIFY_OFF_MULTIPLIER))
            .collect();
        let poller = Poller::spawn(engine.clone(), bar.clone(), doorbells)?;
        let mut sim = VfSim {
            identity,
            engine,
            pci: Arc::new(Mutex::new(PciRegs::new(identity))),
            bar_fd,
            bar,
            poller,
            native: None,
        };
        if cfg.native_migration {
            sim.native = Some(NativeMigration::new(
                sim.pf_controller(),
                sim.engine.clone(),
            ));
        }
        Ok(sim)
    }

    /// The PF side's handle on this function (for [`crate::pf::server`]).
    pub fn pf_controller(&self) -> Controller {
        Controller::new(self.engine.clone(), self.pci.clone(), self.poller.handle())
    }

    /// A second handle on the backing file to flush on exit (the disk image), if the
    /// personality has one.
    pub fn backing_file(&self) -> Option<io::Result<File>> {
        self.engine().personality.backing_file()
    }

    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pci(&self) -> MutexGuard<'_, PciRegs> {
        self.pci.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The native migration, or `ENOTSUP` without `--native-migration`.
    fn native(&mut self) -> DeviceResult<&mut NativeMigration> {
        self.native.as_mut().ok_or(Errno(libc::ENOTSUP))
    }

    /// The block holding `offset..offset + len` of BAR 0 and the offset in it.
    fn block(&self, offset: u64, len: usize) -> DeviceResult<(Block, u64)> {
        let end = offset.checked_add(len as u64).ok_or(Errno(libc::EINVAL))?;
        if end > BAR0_SIZE || len == 0 {
            return Err(Errno(libc::EINVAL));
        }
        let blocks = [
            (Block::Common, COMMON_OFFSET, COMMON_SIZE),
            (Block::Isr, ISR_OFFSET, ISR_SIZE),
            (Block::DeviceCfg, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE),
            (Block::Notify, NOTIFY_OFFSET, NOTIFY_SIZE),
            (
                Block::MsixTable,
                MSIX_TABLE_OFFSET,
                self.identity.msix_table_size(),
            ),
            (Block::MsixPba, MSIX_PBA_OFFSET, MSIX_PBA_SIZE),
        ];
        for (block, start, size) in blocks {
            if offset >= start && offset < start + size {
                if end > start + size {
                    return Err(Errno(libc::EINVAL));
                }
                return Ok((block, offset - start));
            }
        }
        Ok((Block::Reserved, offset))
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) -> DeviceResult<()> {
        let (block, off) = self.block(offset, data.len())?;
        let o = off as usize;
        match block {
            Block::Common => self
                .engine()
                .common
                .read(off, data)
                .map_err(|_| Errno(libc::EINVAL)),
            Block::Isr => {
                data.fill(0);
                if o == 0 {
                    let mut e = self.engine();
                    data[0] = e.isr;
                    e.isr = 0;
                }
                Ok(())
            }
            Block::DeviceCfg => {
                data.copy_from_slice(&self.engine().device_config()[o..o + data.len()]);
                Ok(())
            }
            Block::Notify => self.bar.read(offset, data).map_err(|_| Errno(libc::EINVAL)),
            Block::MsixTable => {
                data.copy_from_slice(&self.pci().msix_table[o..o + data.len()]);
                Ok(())
            }
            Block::MsixPba => {
                let pba = self.engine().irqs.pending_bits().to_le_bytes();
                data.copy_from_slice(&pba[o..o + data.len()]);
                Ok(())
            }
            Block::Reserved => {
                data.fill(0);
                Ok(())
            }
        }
    }

    /// A write of the MSI-X table: stored, and the mask bit of every vector-control word
    /// it touched applied to the interrupts (a pending vector unmasked is sent).
    fn msix_table_write(&mut self, o: usize, data: &[u8]) {
        // Lock order: engine, then PCI registers.
        let mut e = self.engine();
        let mut p = self.pci();
        p.msix_table[o..o + data.len()].copy_from_slice(data);
        let first = o / MSIX_ENTRY_SIZE;
        let last = (o + data.len() - 1) / MSIX_ENTRY_SIZE;
        for v in first..=last {
            let control = v * MSIX_ENTRY_SIZE + MSIX_VECTOR_CONTROL;
            if control < o + data.len() && o < control + 4 {
                let masked = p.vector_masked(v);
                if let Err(err) = e.irqs.set_masked(v as u32, 1, masked) {
                    tracing::warn!("MSI-X table write: {err}");
                }
            }
        }
    }

    /// `SET_IRQS` `ACTION_MASK`/`ACTION_UNMASK` on MSI-X: vectors `start..start + count`
    /// (`DATA_NONE`) or those of them whose boolean is set (`DATA_BOOL`), in the table's
    /// vector-control words and the interrupts (an unmasked pending vector is sent).
    fn mask_vectors(
        &mut self,
        start: u32,
        count: u32,
        data: IrqData,
        masked: bool,
    ) -> DeviceResult<()> {
        let chosen: Vec<u32> = match data {
            IrqData::None => (0..count).collect(),
            IrqData::Bool(bits) if bits.len() == count as usize => {
                (0..count).filter(|&i| bits[i as usize]).collect()
            }
            IrqData::Bool(_) | IrqData::Eventfds(_) => return Err(Errno(libc::EINVAL)),
        };
        // Lock order: engine, then PCI registers.
        let mut e = self.engine();
        let mut p = self.pci();
        if start
            .checked_add(count)
            .is_none_or(|end| end > e.irqs.count())
        {
            tracing::warn!(
                "SET_IRQS {} of MSI-X vectors {start}..{start}+{count} refused: the device has {}",
                if masked { "mask" } else { "unmask" },
                e.irqs.count()
            );
            return Err(Errno(libc::EINVAL));
        }
        for v in chosen.into_iter().map(|i| start + i) {
            p.set_vector_masked(v as usize, masked);
            if let Err(err) = e.irqs.set_masked(v, 1, masked) {
                tracing::warn!("SET_IRQS mask on MSI-X: {err}");
                return Err(Errno(libc::EINVAL));
            }
        }
        Ok(())
    }

    /// A configuration-space write; one that touches the MSI-X control word is applied to
    /// the interrupts (enabling or unmasking sends what is pending).
    fn config_write(&mut self, offset: u64, data: &[u8]) -> DeviceResult<()> {
        let control = MSIX_CONTROL as u64..MSIX_CONTROL as u64 + 2;
        let end = offset.saturating_add(data.len() as u64);
        let touches_msix = offset < control.end && control.start < end;
        // Lock order: engine, then PCI registers (the engine only for MSI-X writes).
        let mut engine = touches_msix.then(|| self.engine());
        let mut p = self.pci();
        p.config.write(offset, data).map_err(|e| {
            tracing::debug!("{e}");
            Errno(libc::EINVAL)
        })?;
        if let Some(e) = engine.as_mut() {
            let (enabled, function_masked) = p.config.msix_control();
            if let Err(err) = e.irqs.set_control(enabled, function_masked) {
                tracing::warn!("MSI-X control write: {err}");
            }
        }
        let flr = p.config.take_flr();
        drop(p);
        drop(engine);
        if flr {
            tracing::info!("function level reset through Device Control");
            self.reset()?;
        }
        Ok(())
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) -> DeviceResult<()> {
        let (block, off) = self.block(offset, data.len())?;
        let o = off as usize;
        match block {
            Block::Common => {
                let event = self
                    .engine()
                    .common
                    .write(off, data)
                    .map_err(|_| Errno(libc::EINVAL))?;
                if event == Some(CfgEvent::Reset) {
                    self.engine().isr = 0;
                    tracing::debug!("virtio reset by the driver");
                }
                self.poller.kick();
            }
            Block::Notify => {
                self.bar
                    .write(offset, data)
                    .map_err(|_| Errno(libc::EINVAL))?;
                self.poller.kick();
            }
            Block::MsixTable => self.msix_table_write(o, data),
            Block::Isr | Block::DeviceCfg | Block::MsixPba | Block::Reserved => {}
        }
        Ok(())
    }
}

fn errno_of(e: &GuestMemError) -> Errno {
    Errno(match e {
        GuestMemError::NoFd { .. } => libc::ENOTSUP,
        GuestMemError::Overlap { .. } => libc::EEXIST,
        GuestMemError::TooMany { .. } => libc::ENOSPC,
        GuestMemError::NotMapped { .. } => libc::ENOENT,
        GuestMemError::Map { .. } => libc::ENOMEM,
        GuestMemError::BadRange { .. } | GuestMemError::Access { .. } => libc::EINVAL,
    })
}

impl Device for VfSim {
    fn device_info(&mut self) -> DeviceInfo {
        DeviceInfo {
            flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
            num_regions: VFIO_PCI_NUM_REGIONS,
            num_irqs: VFIO_PCI_NUM_IRQS,
        }
    }

    fn region_info(&mut self, index: u32) -> DeviceResult<RegionInfo> {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let (flags, size, sparse_areas, fd) = match index {
            VFIO_PCI_BAR0_REGION_INDEX => {
                let fd = self.bar_fd.try_clone().map_err(|e| {
                    tracing::warn!("duplicating the BAR 0 memfd failed: {e}");
                    Errno(e.raw_os_error().unwrap_or(libc::EIO))
                })?;
                let notify = SparseArea {
                    offset: NOTIFY_OFFSET,
                    size: NOTIFY_SIZE,
                };
                (
                    rw | VFIO_REGION_INFO_FLAG_MMAP,
                    BAR0_SIZE,
                    vec![notify],
                    Some(fd),
                )
            }
            VFIO_PCI_CONFIG_REGION_INDEX => (rw, CONFIG_SPACE_SIZE as u64, vec![], None),
            i if i < VFIO_PCI_NUM_REGIONS => (0, 0, vec![], None),
            _ => return Err(Errno(libc::EINVAL)),
        };
        Ok(RegionInfo {
            index,
            flags,
            size,
            offset: 0,
            sparse_areas,
            fd,
        })
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> DeviceResult<()> {
        match index {
            VFIO_PCI_BAR0_REGION_INDEX => self.bar_read(offset, data),
            VFIO_PCI_CONFIG_REGION_INDEX => self.pci().config.read(offset, data).map_err(|e| {
                tracing::debug!("{e}");
                Errno(libc::EINVAL)
            }),
            _ => Err(Errno(libc::EINVAL)),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> DeviceResult<()> {
        match index {
            VFIO_PCI_BAR0_REGION_INDEX => self.bar_write(offset, data),
            VFIO_PCI_CONFIG_REGION_INDEX => self.config_write(offset, data),
            _ => Err(Errno(libc::EINVAL)),
        }
    }

    fn dma_map(&mut self, m: DmaMapping) -> DeviceResult<()> {
        let result = self
            .engine()
            .mem
            .add(m.iova, m.size, m.fd, m.file_offset, m.writable);
        result.map_err(|e| {
            tracing::warn!("DMA_MAP refused: {e}");
            errno_of(&e)
        })?;
        self.poller.kick();
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> DeviceResult<()> {
        // The poller holds the lock while it touches guest memory, so once this returns
        // nothing refers to the mapping any more.
        self.engine().mem.remove(iova, size).map_err(|e| {
            tracing::warn!("DMA_UNMAP refused: {e}");
            errno_of(&e)
        })
    }

    fn irq_info(&mut self, index: u32) -> DeviceResult<IrqInfo> {
        if index >= VFIO_PCI_NUM_IRQS {
            return Err(Errno(libc::EINVAL));
        }
        let count = if index == VFIO_PCI_MSIX_IRQ_INDEX {
            u32::from(self.identity.msix_vectors)
        } else {
            0
        };
        let maskable = if index == VFIO_PCI_MSIX_IRQ_INDEX {
            VFIO_IRQ_INFO_MASKABLE
        } else {
            0
        };
        Ok(IrqInfo {
            index,
            flags: VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE | maskable,
            count,
        })
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> DeviceResult<()> {
        if index != VFIO_PCI_MSIX_IRQ_INDEX {
            // Nothing to disable on the types with no interrupts.
            return if count == 0 {
                Ok(())
            } else {
                Err(Errno(libc::EINVAL))
            };
        }
        match flags & VFIO_IRQ_SET_ACTION_TYPE_MASK {
            VFIO_IRQ_SET_ACTION_TRIGGER => {}
            action @ (VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK) => {
                return self.mask_vectors(start, count, data, action == VFIO_IRQ_SET_ACTION_MASK)
            }
            _ => return Err(Errno(libc::EINVAL)),
        }
        let mut e = self.engine();
        let result = match data {
            IrqData::Eventfds(fds) if fds.is_empty() && count == 0 => {
                e.irqs.clear_all();
                Ok(())
            }
            IrqData::Eventfds(fds) if fds.is_empty() => e.irqs.clear(start, count),
            IrqData::Eventfds(fds) => e.irqs.assign(start, fds),
            IrqData::None if count == 0 => {
                e.irqs.clear_all();
                Ok(())
            }
            IrqData::None => e.irqs.raise_range(start, count),
            IrqData::Bool(bits) => bits
                .iter()
                .enumerate()
                .filter(|(_, b)| **b)
                .try_for_each(|(i, _)| e.irqs.raise_range(start.saturating_add(i as u32), 1)),
        };
        result.map_err(|err| {
            tracing::warn!("SET_IRQS on MSI-X refused: {err}");
            Errno(libc::EINVAL)
        })
    }

    fn reset(&mut self) -> DeviceResult<()> {
        {
            let mut e = self.engine();
            e.reset();
            e.irqs.reset();
            *self.pci() = PciRegs::new(self.identity);
        }
        if let Some(n) = &mut self.native {
            n.reset();
        }
        tracing::debug!("device reset by the client");
        Ok(())
    }

    fn client_disconnected(&mut self) {
        {
            let mut e = self.engine();
            e.mem.clear();
            e.irqs.clear_all();
        }
        if let Some(n) = &mut self.native {
            n.client_disconnected();
        }
        tracing::info!("client disconnected: DMA mappings and eventfds dropped");
    }

    fn migration_flags(&mut self) -> DeviceResult<u64> {
        Ok(self.native()?.flags())
    }

    fn mig_state(&mut self) -> DeviceResult<MigState> {
        Ok(self.native()?.state())
    }

    fn set_mig_state(&mut self, state: MigState) -> DeviceResult<()> {
        self.native()?.set_state(state)
    }

    fn mig_data_read(&mut self, size: u32) -> DeviceResult<Vec<u8>> {
        self.native()?.read(size)
    }

    fn mig_data_write(&mut self, data: &[u8]) -> DeviceResult<()> {
        self.native()?.write(data)
    }

    fn dma_logging_supported(&mut self) -> bool {
        self.native.is_some()
    }

    fn dma_logging_start(
        &mut self,
        page_size: u64,
        ranges: &[DmaLoggingRange],
    ) -> DeviceResult<u64> {
        self.native()?.log_start(page_size, ranges)
    }

    fn dma_logging_stop(&mut self) -> DeviceResult<()> {
        self.native()?.log_stop()
    }

    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> DeviceResult<Vec<u64>> {
        self.native()?.log_report(iova, length, page_size)
    }
}
