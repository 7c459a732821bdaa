//! The vfio-pci device: a function on the guest's PCI bus whose configuration space is
//! virtualized by the VMM and whose BARs are the device's, over any [`VfioBackend`].
//!
//! - Configuration space: identity read from the device at open; BARs, command register,
//!   capability list, MSI and MSI-X emulated (see `config.rs`, `bars.rs`,
//!   `irq.rs`); bytes after the header that belong to no emulated capability are read
//!   live from the device and are read only. The MSI/MSI-X enable, function-mask and
//!   mask bits are also passed on to the device, which must know them to hold back and
//!   pend its interrupts (`irq.rs`). Guest writes are validated and never panic.
//! - BARs: each memory BAR is registered whole on the MMIO bus while memory decoding is on
//!   and its address is valid; its mappable pieces go into KVM memory slots (see
//!   `placement.rs`). Each I/O BAR (at most 256 bytes) is registered on the port-I/O bus
//!   while I/O decoding is on, and never mapped. Trapped accesses reach
//!   [`VfioPciDevice::bar_read`] / [`bar_write`](VfioPciDevice::bar_write): the MSI-X table
//!   and PBA are emulated (mask changes written to the device's table too, the device's
//!   PBA bits read into the emulated ones), the rest is forwarded to the backend, and every
//!   access is counted per BAR. The expansion ROM is not offered.
//! - INTx is offered once the VMM routes it ([`VfioPciDevice::wire_intx`]), for a function
//!   whose configuration space has an interrupt pin and whose backend has an INTx vector;
//!   see `intx.rs`.
//!
//! Lock order: `state` before `irqs` before `intx`; the MMIO path takes only `irqs`, so a
//! vCPU inside the
//! bus (holding its read lock) never waits for a configuration write that holds `state` and
//! re-registers a BAR (taking the bus's write lock). A configuration write that itself
//! arrives through the bus (ports 0xCF8/0xCFC) re-registers BARs on that same bus, so the
//! bus must not hold its lock while it calls a device (test `bar_programming_through_the_bus`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use resources::memslots::MemSlots;
use vfio_bindings::bindings::vfio::VFIO_IRQ_INFO_AUTOMASKED;
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{DeviceMmio, DevicePio};

use super::backend::{BackendError, VfioBackend, CONFIG_REGION, IRQ_INTX, IRQ_MSI, IRQ_MSIX};
use super::bars::{self, BarDesc, BarError, BarKind, BarRegs, NUM_BARS};
use super::config::{
    self, dword, lanes, merge, CapList, Header, CAP_MSI, CAP_MSIX, CAP_PCIE, CAP_PM, CAP_VENDOR,
    COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_IO, COMMAND_MEMORY, COMMAND_WRITABLE,
    CONFIG_SIZE, HEADER_END, STATUS_W1C,
};
use super::errlog::ErrorLog;
use super::intx::{self, Intx, IntxRoutes, IntxRouting};
use super::irq::{DeviceIrqRegs, Irqs};
use super::mmap::{align_inwards, DeviceMmap};
use super::placement::{BarHandler, BarSetup, Placement, PlacementError, TrapOwner};
use crate::bus::Bus;
use crate::pci::msi::MsiCap;
use crate::pci::msix::{InterruptRoutes, MsiVectors, Msix, RouteError, MSIX_CAP_LEN};
use crate::pci::PciDevice;

mod persist;
pub use persist::{
    BarLayout, BarTraps, CapLayout, MsiCapLayout, MsixCapLayout, VfioPciLayout, VfioPciState,
    VfioPersistError,
};

/// Everything a [`VfioPciDevice`] is built from.
pub struct VfioPciParams {
    /// Name for logs, statistics and memory-slot ownership.
    pub name: String,
    /// The device.
    pub backend: Arc<dyn VfioBackend>,
    /// The MMIO bus the BARs are registered on.
    pub bus: Arc<Bus>,
    /// The VM's memory slots, for the BARs' mappable areas.
    pub memslots: Arc<MemSlots>,
    /// KVM interrupt routing, for MSI and MSI-X.
    pub routes: Arc<dyn InterruptRoutes>,
}

/// Why a vfio-pci device could not be created or changed.
#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    /// The backend failed a request made while opening the device.
    #[error("{name}: cannot {what}: {source}")]
    Backend {
        /// Device name.
        name: String,
        /// What was attempted.
        what: String,
        /// The backend's error.
        source: BackendError,
    },
    /// The device has no configuration-space region.
    #[error("{name}: the device reports {num_regions} regions, so it has no PCI configuration space (region 7)")]
    NoConfigRegion {
        /// Device name.
        name: String,
        /// Regions the device reports.
        num_regions: u32,
    },
    /// The function is a bridge or another non-endpoint.
    #[error("{name}: header type {header_type:#x} is not an endpoint (type 0); only endpoints can be passed through")]
    NotEndpoint {
        /// Device name.
        name: String,
        /// The header type read from the device.
        header_type: u8,
    },
    /// Interrupt vectors could not be set up.
    #[error("{name}: cannot set up the MSI/MSI-X vectors: {source}")]
    Vectors {
        /// Device name.
        name: String,
        /// The routing error.
        source: RouteError,
    },
    /// A BAR index that is not an implemented BAR.
    #[error("{name}: BAR {index} is not an implemented BAR")]
    NoBar {
        /// Device name.
        name: String,
        /// The index asked for.
        index: usize,
    },
    /// An address a BAR cannot take.
    #[error("{name}: BAR {index} of {size:#x} bytes cannot be at {addr:#x}: it must be aligned to its size and fit its type")]
    BadAddress {
        /// Device name.
        name: String,
        /// The BAR.
        index: usize,
        /// Its size.
        size: u64,
        /// The address refused.
        addr: u64,
    },
    /// A run-time trap or untrap could not be applied.
    #[error("{name}: cannot {what} {offset:#x}+{size:#x} of BAR {index}: {source}")]
    Trap {
        /// Device name.
        name: String,
        /// "trap" or "untrap".
        what: &'static str,
        /// The BAR.
        index: usize,
        /// Offset of the range in the BAR.
        offset: u64,
        /// Size of the range.
        size: u64,
        /// What failed.
        source: Box<PlacementError>,
    },
    /// The INTx eventfds could not be created.
    #[error("{name}: cannot set up INTx on GSI {gsi}: {source}")]
    Intx {
        /// Device name.
        name: String,
        /// The GSI it was to be routed to.
        gsi: u32,
        /// The error of `eventfd(2)`.
        source: std::io::Error,
    },
    /// Re-applying a BAR's memory slots failed.
    #[error("{name}: cannot remap BAR {index}: {source}")]
    Remap {
        /// Device name.
        name: String,
        /// The BAR.
        index: usize,
        /// What failed.
        source: PlacementError,
    },
}

/// Access counters and placement of one BAR (memory or I/O), for the exit statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarStats {
    /// BAR number.
    pub index: usize,
    /// Size the guest sees.
    pub size: u64,
    /// Where it is registered (a guest physical address, or a port for an I/O BAR), if it
    /// is.
    pub base: Option<u64>,
    /// Trapped guest reads (MMIO exits) that reached it.
    pub reads: u64,
    /// Trapped guest writes that reached it.
    pub writes: u64,
}

/// Where the MSI-X table and PBA are.
#[derive(Clone, Copy, Debug)]
struct MsixLayout {
    table_bar: usize,
    table_offset: u64,
    table_len: u64,
    pba_bar: usize,
    pba_offset: u64,
    pba_len: u64,
}

/// Where a BAR access goes.
enum Target {
    Table(u64),
    Pba(u64),
    Device,
    /// Overlaps the table or PBA without starting inside it: reads all ones.
    Nowhere,
}

#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
}

/// Configuration state, under one lock.
struct State {
    header: Header,
    bars: BarRegs,
    caps: CapList,
    /// Offset of the emulated MSI-X capability.
    msix_cap: Option<usize>,
    /// Offset and length of the emulated MSI capability.
    msi_cap: Option<(usize, usize)>,
    placement: Placement,
}

const NOT_PLACED: u64 = u64::MAX;
/// Offset of Device Control in the PCI Express capability.
const PCIE_DEVCTL: usize = 8;
/// Offset of the Message Control word in the MSI and MSI-X capabilities.
const MSIX_CONTROL_OFFSET: usize = 2;
const MSI_CONTROL_OFFSET: usize = 2;

/// A PCI function passed through from a [`VfioBackend`]. Shared: the PCI root, the MMIO bus
/// and the vmm hold it in an `Arc`.
pub struct VfioPciDevice {
    name: String,
    backend: Arc<dyn VfioBackend>,
    me: Weak<VfioPciDevice>,
    /// Guest-visible size of each BAR (0: not an implemented BAR).
    bar_sizes: [u64; NUM_BARS],
    /// The interrupt pin (1-4) of a function that can use INTx: one in its configuration
    /// space and an INTx vector in the backend.
    intx_pin: Option<u8>,
    /// The backend's INTx masks itself when it fires (`VFIO_IRQ_INFO_AUTOMASKED`).
    intx_automasked: bool,
    msix: Option<MsixLayout>,
    bases: [AtomicU64; NUM_BARS],
    counters: [Counters; NUM_BARS],
    state: Mutex<State>,
    irqs: Mutex<Irqs>,
    /// INTx, once wired ([`wire_intx`](Self::wire_intx)).
    intx: Mutex<Option<Intx>>,
    errors: ErrorLog,
}

impl VfioPciDevice {
    /// Opens the function: reads its configuration space and region layout, maps its
    /// mmap-able BAR areas into this process and sets up its interrupt vectors. Nothing is
    /// visible to the guest until the device is added to the PCI root and the guest (or
    /// [`program_bar`](Self::program_bar)) places its BARs.
    pub fn new(p: VfioPciParams) -> Result<Arc<Self>, VfioPciError> {
        let name = p.name.clone();
        let backend_err = |what: &str| {
            let name = name.clone();
            let what = what.to_string();
            move |source| VfioPciError::Backend { name, what, source }
        };
        let info = p
            .backend
            .device_info()
            .map_err(backend_err("get the device info"))?;
        if info.num_regions <= CONFIG_REGION {
            return Err(VfioPciError::NoConfigRegion {
                name,
                num_regions: info.num_regions,
            });
        }
        let mut cfg = [0u8; CONFIG_SIZE];
        p.backend
            .region_read(CONFIG_REGION, 0, &mut cfg)
            .map_err(backend_err("read the configuration space"))?;
        let header = Header::new(&cfg);
        if header.header_type() != 0 {
            return Err(VfioPciError::NotEndpoint {
                name,
                header_type: header.header_type(),
            });
        }

        let mut regions = Vec::with_capacity(NUM_BARS);
        for i in 0..NUM_BARS as u32 {
            let r = p.backend.region_info(i).map_err(backend_err(&format!(
                "get the info of region {i} (BAR {i})"
            )))?;
            regions.push(r);
        }
        let raw: [u32; NUM_BARS] = std::array::from_fn(|i| dword(&cfg, 0x10 + 4 * i));
        let sizes: [u64; NUM_BARS] = std::array::from_fn(|i| regions[i].size);
        let (bar_list, complaints) = bars::probe(raw, sizes);
        for c in complaints {
            match c {
                BarError::IoTooLarge { .. } => {
                    tracing::error!("{name}: {c}; the guest does not see this BAR")
                }
                _ => tracing::warn!("{name}: {c}; the BAR is hidden from the guest"),
            }
        }

        let irq_info = |index| p.backend.irq_info(index).unwrap_or_default();
        let (msix_info, msi_info) = (irq_info(IRQ_MSIX), irq_info(IRQ_MSI));
        let (msix_count, msi_count) = (msix_info.count as usize, msi_info.count as usize);
        let intx_info = irq_info(IRQ_INTX);
        let intx_pin = Some(cfg[0x3d]).filter(|p| (1..=4).contains(p) && intx_info.count > 0);
        let intx_automasked = intx_info.flags & VFIO_IRQ_INFO_AUTOMASKED != 0;
        let msix = msix_from_cfg(&cfg, &bar_list, msix_count, &name);
        let (caps, hidden) = CapList::walk(&cfg, |id, offset| match id {
            CAP_MSIX => msix.as_ref().is_some_and(|(o, ..)| *o == offset),
            CAP_MSI => msi_count > 0,
            CAP_PM | CAP_VENDOR | CAP_PCIE => true,
            _ => false,
        });
        for (offset, id) in hidden {
            tracing::info!("{name}: capability {id:#04x} at {offset:#x} is hidden from the guest");
        }
        let msi_cap = caps.find(CAP_MSI).map(|offset| {
            let control = u16::from_le_bytes([cfg[offset + 2], cfg[offset + 3]]);
            (offset, MsiCap::new(control))
        });
        let msi_cap = msi_cap.filter(|(offset, m)| offset + m.len() <= CONFIG_SIZE);

        let n_vectors = msix
            .as_ref()
            .map_or(0, |(_, m, _)| m.size())
            .max(msi_cap.as_ref().map_or(0, |(_, m)| m.max_vectors()));
        let vectors = MsiVectors::new(&name, p.routes.clone(), n_vectors).map_err(|source| {
            VfioPciError::Vectors {
                name: name.clone(),
                source,
            }
        })?;

        let layout = msix.as_ref().map(|(_, _, l)| *l);
        let mut placed_bars = Vec::new();
        let mut bar_sizes = [0u64; NUM_BARS];
        for bar in &bar_list {
            bar_sizes[bar.index] = bar.size;
            if bar.kind == BarKind::Io {
                // Never mapped: every access to an I/O BAR exits and is forwarded.
                placed_bars.push(BarSetup {
                    desc: *bar,
                    mmaps: Vec::new(),
                    trapped: Vec::new(),
                });
                continue;
            }
            let mut trapped = Vec::new();
            if let Some(l) = layout {
                if l.table_bar == bar.index {
                    trapped.push((l.table_offset, l.table_len));
                }
                if l.pba_bar == bar.index {
                    trapped.push((l.pba_offset, l.pba_len));
                }
            }
            let mmaps = map_bar(&name, bar, &regions[bar.index]);
            placed_bars.push(BarSetup {
                desc: *bar,
                mmaps,
                trapped,
            });
        }
        let placement = Placement::new(&name, p.bus.clone(), p.memslots.clone(), placed_bars);

        let state = State {
            header,
            bars: BarRegs::new(bar_list),
            msix_cap: msix.as_ref().map(|(o, ..)| *o),
            msi_cap: msi_cap.as_ref().map(|(o, m)| (*o, m.len())),
            caps,
            placement,
        };
        // Where the device keeps its own MSI-X/MSI state (see `irq.rs`): the table is
        // written through only if the device takes writes to its BAR.
        let device_regs = DeviceIrqRegs {
            msix_cap: msix.as_ref().map(|(o, ..)| *o),
            msix_table: layout
                .filter(|l| regions.get(l.table_bar).is_some_and(|r| r.flags.write))
                .map(|l| (l.table_bar as u32, l.table_offset)),
            msix_pba: layout
                .filter(|l| regions.get(l.pba_bar).is_some_and(|r| r.flags.read))
                .map(|l| (l.pba_bar as u32, l.pba_offset)),
            msi_cap: msi_cap.as_ref().map(|(o, _)| *o),
            msix_maskable: msix_info.maskable(),
            msi_maskable: msi_info.maskable(),
        };
        let irqs = Irqs::new(
            &name,
            p.backend.clone(),
            vectors,
            (msix.map(|(_, m, _)| m), msi_cap.map(|(_, m)| m)),
            (msix_count, msi_count),
            device_regs,
        );
        Ok(Arc::new_cyclic(|me| VfioPciDevice {
            name: p.name,
            backend: p.backend,
            me: me.clone(),
            bar_sizes,
            intx_pin,
            intx_automasked,
            msix: layout,
            bases: std::array::from_fn(|_| AtomicU64::new(NOT_PLACED)),
            counters: Default::default(),
            state: Mutex::new(state),
            irqs: Mutex::new(irqs),
            intx: Mutex::new(None),
            errors: ErrorLog::default(),
        }))
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn VfioBackend> {
        &self.backend
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_irqs(&self) -> MutexGuard<'_, Irqs> {
        self.irqs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_intx(&self) -> MutexGuard<'_, Option<Intx>> {
        self.intx.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The BARs the guest sees (memory and I/O).
    pub fn bars(&self) -> Vec<BarDesc> {
        self.lock_state().bars.bars().to_vec()
    }

    /// Access counters and placement of each BAR.
    pub fn bar_stats(&self) -> Vec<BarStats> {
        (0..NUM_BARS)
            .filter(|&i| self.bar_sizes[i] != 0)
            .map(|index| BarStats {
                index,
                size: self.bar_sizes[index],
                base: self.base(index),
                reads: self.counters[index].reads.load(Ordering::Relaxed),
                writes: self.counters[index].writes.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Failures of the backend on the guest's access paths so far.
    pub fn backend_errors(&self) -> u64 {
        self.errors.count()
    }

    /// Test-only switch: with `false`, the guest's MSI-X and MSI settings (enable,
    /// function mask, vector masks) stay in the VMM's emulation and never reach the device,
    /// as before they were passed on; a device that honours its MSI-X state then never
    /// interrupts. On (`true`) from the start; see `irq.rs`.
    pub fn set_irq_forwarding(&self, on: bool) {
        self.lock_irqs().set_forwarding(on);
    }

    /// The GSIs of the device's MSI/MSI-X vectors, in vector order.
    pub fn gsis(&self) -> Vec<u32> {
        let irqs = self.lock_irqs();
        let v = irqs.vectors();
        (0..v.len()).filter_map(|i| v.gsi(i)).collect()
    }

    /// The interrupt pin (1-4: INTA-INTD) the function would use for INTx, if it can use
    /// INTx at all (a pin in its configuration space and an INTx vector in its backend).
    pub fn intx_pin(&self) -> Option<u8> {
        self.intx_pin
    }

    /// Where INTx is routed, once [`wire_intx`](Self::wire_intx) did it.
    pub fn intx_routing(&self) -> Option<IntxRouting> {
        self.lock_intx().as_ref().map(Intx::routing)
    }

    /// Whether INTx is enabled at the device, and whether it is delivering (its irqfd
    /// registered); `None` if it is not wired.
    pub fn intx_live(&self) -> Option<(bool, bool)> {
        self.lock_intx().as_ref().map(Intx::live)
    }

    /// Offers INTx to the guest on the function's interrupt pin, routed to `gsi` through
    /// `routes`, and sets it up at once unless the guest's configuration (MSI or MSI-X on)
    /// says otherwise. The interrupt line register reads `gsi`, as firmware leaves it.
    /// Returns the routing, or `None` for a function without INTx (its pin reads 0).
    /// Wiring again replaces the earlier routing.
    pub fn wire_intx(
        &self,
        gsi: u32,
        routes: Arc<dyn IntxRoutes>,
    ) -> Result<Option<IntxRouting>, VfioPciError> {
        let Some(pin) = self.intx_pin else {
            return Ok(None);
        };
        let routing = IntxRouting { pin, gsi };
        let intx = Intx::new(
            &self.name,
            self.backend.clone(),
            routes,
            routing,
            self.intx_automasked,
        )
        .map_err(|source| VfioPciError::Intx {
            name: self.name.clone(),
            gsi,
            source,
        })?;
        let mut st = self.lock_state();
        st.header.set_interrupt_pin(pin);
        st.header
            .set_interrupt_line(u8::try_from(gsi).unwrap_or(0xff));
        if let Some(mut old) = self.lock_intx().replace(intx) {
            old.shutdown();
        }
        self.sync_intx(st.header.command, false);
        Ok(Some(routing))
    }

    /// Brings INTx in line with the configuration: enabled at the device while neither
    /// MSI nor MSI-X is on (`msi_coming`: one is about to be), delivering unless `command`
    /// has INTx Disable set.
    fn sync_intx(&self, command: u16, msi_coming: bool) {
        let msi_on = msi_coming || {
            let irqs = self.lock_irqs();
            irqs.msi().is_some_and(|m| m.enabled()) || irqs.msix().is_some_and(|m| m.enabled())
        };
        if let Some(intx) = self.lock_intx().as_mut() {
            intx.update(msi_on, command & COMMAND_INTX_DISABLE != 0);
        }
    }

    /// Whether a guest write of `data` at `offset` sets the enable bit of the MSI or MSI-X
    /// capability.
    fn enables_msi(st: &State, offset: usize, data: &[u8]) -> bool {
        // Enable: bit 15 of MSI-X's message control, bit 0 of MSI's (both at +2).
        st.msix_cap
            .is_some_and(|c| intx::write_sets_bit(offset, data, c + 3, 0x80))
            || st
                .msi_cap
                .is_some_and(|(c, _)| intx::write_sets_bit(offset, data, c + 2, 0x01))
    }

    fn base(&self, index: usize) -> Option<u64> {
        let b = self.bases.get(index)?.load(Ordering::Acquire);
        (b != NOT_PLACED).then_some(b)
    }

    /// The memory slots currently mapped for BAR `index`, as `(gpa, size)`.
    pub fn mapped_areas(&self, index: usize) -> Vec<(u64, u64)> {
        self.lock_state().placement.slots(index)
    }

    /// Programs BAR `index` to `addr` (a port for an I/O BAR) as firmware would, and places
    /// it if its kind of decoding is on.
    pub fn program_bar(&self, index: usize, addr: u64) -> Result<(), VfioPciError> {
        let mut st = self.lock_state();
        let bar = st
            .bars
            .bar(index)
            .copied()
            .ok_or_else(|| VfioPciError::NoBar {
                name: self.name.clone(),
                index,
            })?;
        if !st.bars.set_address(index, addr) {
            return Err(VfioPciError::BadAddress {
                name: self.name.clone(),
                index,
                size: bar.size,
                addr,
            });
        }
        self.forward_bar_register(&st, index);
        if matches!(bar.kind, BarKind::Mem64 { .. }) {
            self.forward_bar_register(&st, index + 1);
        }
        self.place_bar(&mut st, index);
        Ok(())
    }

    /// Writes BAR register `r` as the guest sees it through to the device, as QEMU's own
    /// vfio client writes every config write through: a device model that routes BAR
    /// accesses through its own address map (QEMU's server does, for its MSI-X table and
    /// PBA) answers nothing at a BAR whose address it was never told. The VMM's emulated
    /// register stays what the guest reads and what places the BAR here.
    fn forward_bar_register(&self, st: &State, r: usize) {
        let value = st.bars.read(r);
        let at = 0x10 + 4 * r as u64;
        if let Err(e) = self
            .backend
            .region_write(CONFIG_REGION, at, &value.to_le_bytes())
        {
            self.errors.record(
                &self.name,
                format_args!("writing BAR register {r} ({value:#010x}) through"),
                &e,
            );
        }
    }

    /// Turns on memory decoding and bus mastering as firmware would before handing the
    /// device to the guest, and places the programmed BARs.
    pub fn enable_memory_and_bus_master(&self) {
        let mut st = self.lock_state();
        let command = st.header.command | COMMAND_MEMORY | COMMAND_BUS_MASTER;
        self.set_command(&mut st, command);
    }

    /// Turns on I/O decoding as firmware does for a function with I/O BARs, and places
    /// the programmed I/O BARs on the port-I/O bus.
    pub fn enable_io_decoding(&self) {
        let mut st = self.lock_state();
        let command = st.header.command | COMMAND_IO;
        self.set_command(&mut st, command);
    }

    /// Recomputes which pages of BAR `index` are mapped into memory slots (its mmap-able
    /// areas minus the trapped ranges) and re-applies them. The hook for a mediator that
    /// traps or untraps ranges at run time.
    pub fn remap_bar(&self, index: usize) -> Result<(), VfioPciError> {
        if self.bar_sizes.get(index).copied().unwrap_or(0) == 0 {
            return Err(VfioPciError::NoBar {
                name: self.name.clone(),
                index,
            });
        }
        self.lock_state()
            .placement
            .remap(index)
            .map_err(|source| VfioPciError::Remap {
                name: self.name.clone(),
                index,
                source,
            })
    }

    /// Makes guest accesses to the page-aligned range `[offset, offset + size)` of BAR
    /// `index` exit to the VMM (and so reach the backend, or a mediator in front of it),
    /// while the guest runs. Returns once no vCPU can reach the range through a memory
    /// slot any more. Trapping a range that is already trapped, or that is not mappable
    /// anyway, is not an error.
    ///
    /// Must not be called from within this device's own configuration-space access path
    /// (a backend's config-region hook), which holds the device's state lock.
    ///
    /// `owner` says whether the trap belongs to the device's set-up (saved with its state)
    /// or to this VMM only (not saved); each owner's traps are its own to lift.
    pub fn trap(
        &self,
        index: usize,
        offset: u64,
        size: u64,
        owner: TrapOwner,
    ) -> Result<(), VfioPciError> {
        let r = self.lock_state().placement.trap(index, offset, size, owner);
        r.map_err(|source| self.trap_error("trap", index, offset, size, source))
    }

    /// Undoes [`trap`](Self::trap) for `[offset, offset + size)` of BAR `index`: the
    /// mappable pages of the range go back into memory slots (the MSI-X table and PBA stay
    /// trapped, and so do pages the other owner traps). Returns once the guest reaches
    /// them directly.
    pub fn untrap(
        &self,
        index: usize,
        offset: u64,
        size: u64,
        owner: TrapOwner,
    ) -> Result<(), VfioPciError> {
        let r = self
            .lock_state()
            .placement
            .untrap(index, offset, size, owner);
        r.map_err(|source| self.trap_error("untrap", index, offset, size, source))
    }

    /// The ranges of BAR `index` trapped with [`trap`](Self::trap) by either owner, as
    /// `(offset, size)`.
    pub fn trapped(&self, index: usize) -> Vec<(u64, u64)> {
        self.lock_state().placement.trapped(index)
    }

    fn trap_error(
        &self,
        what: &'static str,
        index: usize,
        offset: u64,
        size: u64,
        source: PlacementError,
    ) -> VfioPciError {
        VfioPciError::Trap {
            name: self.name.clone(),
            what,
            index,
            offset,
            size,
            source: Box::new(source),
        }
    }

    fn handler(&self, bar: usize) -> BarHandler {
        Arc::new(BarHandle {
            dev: self.me.clone(),
            bar,
        })
    }

    /// Places BAR `index` where its register and the command register say.
    fn place_bar(&self, st: &mut State, index: usize) {
        let command = st.header.command;
        let (io, memory) = (command & COMMAND_IO != 0, command & COMMAND_MEMORY != 0);
        let to = st.bars.placement(index, io, memory);
        let now = st.placement.place(index, to, || self.handler(index));
        if let Some(b) = self.bases.get(index) {
            b.store(now.unwrap_or(NOT_PLACED), Ordering::Release);
        }
    }

    fn set_command(&self, st: &mut State, command: u16) {
        let old = st.header.command;
        st.header.command = command & COMMAND_WRITABLE;
        if old != st.header.command {
            self.forward_command(st.header.command);
        }
        let changed = old ^ st.header.command;
        if changed & (COMMAND_MEMORY | COMMAND_IO) != 0 {
            let indices: Vec<usize> = st.bars.bars().iter().map(|b| b.index).collect();
            for index in indices {
                self.place_bar(st, index);
            }
        }
        if changed & COMMAND_INTX_DISABLE != 0 {
            self.sync_intx(st.header.command, false);
        }
    }

    /// Writes the guest's command bits to the device (it needs memory decoding and bus
    /// mastering on to answer and to do DMA), keeping the device's other bits.
    fn forward_command(&self, command: u16) {
        let mut live = [0u8; 2];
        let r = self
            .backend
            .region_read(CONFIG_REGION, 0x04, &mut live)
            .and_then(|()| {
                let v = (u16::from_le_bytes(live) & !COMMAND_WRITABLE) | command;
                self.backend
                    .region_write(CONFIG_REGION, 0x04, &v.to_le_bytes())
            });
        if let Err(e) = r {
            self.errors.record(
                &self.name,
                format_args!("forwarding command {command:#06x}"),
                &e,
            );
        }
    }

    fn live_config(&self, offset: u64, data: &mut [u8]) {
        if let Err(e) = self.backend.region_read(CONFIG_REGION, offset, data) {
            self.errors.record(
                &self.name,
                format_args!("reading config at {offset:#x}"),
                &e,
            );
            data.fill(0xff);
        }
    }

    /// Reads configuration space (1, 2 or 4 bytes, naturally aligned; anything else reads
    /// all ones).
    pub fn read_config(&self, offset: usize, data: &mut [u8]) {
        if !config::valid_access(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        let reg = offset & !3;
        let value = self.read_config_dword(reg).to_le_bytes();
        data.copy_from_slice(&value[offset % 4..offset % 4 + data.len()]);
    }

    fn read_config_dword(&self, reg: usize) -> u32 {
        let st = self.lock_state();
        if reg < HEADER_END {
            let mut status = [0u8; 2];
            if reg == 0x04 {
                self.live_config(0x06, &mut status);
            }
            return st
                .header
                .read(reg, &st.bars, &st.caps, u16::from_le_bytes(status));
        }
        let mut out = [0u8; 4];
        let mut live: Option<[u8; 4]> = None;
        let in_cap = |o: usize, cap: Option<(usize, usize)>| {
            cap.and_then(|(c, len)| o.checked_sub(c).filter(|&k| k < len))
        };
        for (k, byte) in out.iter_mut().enumerate() {
            let o = reg + k;
            let mut b = [0u8; 1];
            if let Some(v) = st.caps.header_byte(o) {
                b[0] = v;
            } else if let Some(k) = in_cap(o, st.msix_cap.map(|c| (c, MSIX_CAP_LEN))) {
                self.lock_irqs().msix_cap_read(k, &mut b);
            } else if let Some(k) = in_cap(o, st.msi_cap) {
                self.lock_irqs().msi_read(k, &mut b);
            } else {
                let live = live.get_or_insert_with(|| {
                    let mut d = [0u8; 4];
                    self.live_config(reg as u64, &mut d);
                    d
                });
                b[0] = live[k];
            }
            *byte = b[0];
        }
        u32::from_le_bytes(out)
    }

    /// A guest write to configuration space; invalid accesses are dropped.
    pub fn write_config(&self, offset: usize, data: &[u8]) {
        if !config::valid_access(offset, data.len()) {
            return;
        }
        let reg = offset & !3;
        let mut st = self.lock_state();
        match reg {
            0x04 => {
                let mut header = st.header.clone();
                if header.write(reg, offset, data).is_some() {
                    self.set_command(&mut st, header.command);
                }
                let lanes = lanes(offset % 4, data.len());
                if lanes.end > 2 {
                    let status = (merge(0, offset % 4, data) >> 16) as u16 & STATUS_W1C;
                    if status != 0 {
                        let r =
                            self.backend
                                .region_write(CONFIG_REGION, 0x06, &status.to_le_bytes());
                        if let Err(e) = r {
                            self.errors.record(
                                &self.name,
                                format_args!("clearing status bits"),
                                &e,
                            );
                        }
                    }
                }
            }
            0x0c | 0x3c => {
                st.header.write(reg, offset, data);
            }
            0x10..=0x24 => {
                let r = (reg - 0x10) / 4;
                let value = merge(st.bars.read(r), offset % 4, data);
                let placed = st.bars.write(r, value);
                self.forward_bar_register(&st, r);
                if let Some(index) = placed {
                    self.place_bar(&mut st, index);
                }
            }
            _ if reg < HEADER_END => {}
            _ => {
                // INTx must be off at the device before it gets MSI or MSI-X vectors
                // (kernel VFIO refuses them otherwise; libvfio-user shares the descriptors).
                if Self::enables_msi(&st, offset, data) {
                    self.sync_intx(st.header.command, true);
                }
                if let Some(c) = st
                    .msix_cap
                    .filter(|&c| offset >= c && offset < c + MSIX_CAP_LEN)
                {
                    self.lock_irqs().msix_cap_write(offset - c, data);
                } else if let Some((c, _)) = st
                    .msi_cap
                    .filter(|&(c, len)| offset >= c && offset < c + len)
                {
                    self.lock_irqs().msi_write(offset - c, data);
                }
                if Self::initiates_flr(&st, offset, data) {
                    self.function_level_reset(&mut st);
                }
                // Everything else after the header is read only.
                self.sync_intx(st.header.command, false);
            }
        }
    }

    /// Whether a guest write sets "Initiate Function Level Reset" (bit 15 of Device
    /// Control, 8 bytes into the PCI Express capability).
    fn initiates_flr(st: &State, offset: usize, data: &[u8]) -> bool {
        let Some(flr_byte) = st.caps.find(CAP_PCIE).map(|c| c + PCIE_DEVCTL + 1) else {
            return false;
        };
        offset <= flr_byte && flr_byte < offset + data.len() && data[flr_byte - offset] & 0x80 != 0
    }

    /// The guest's FLR: what the function keeps in the VMM is put back as a reset leaves
    /// it (MSI and MSI-X off, command register clear: BARs no longer decode), then the
    /// device is reset through the backend (`VFIO_DEVICE_RESET`, vfio-user's
    /// `DEVICE_RESET`), as QEMU's vfio-pci does on a guest FLR. The guest restores its
    /// configuration afterwards (Linux's `pci_restore_state`). A backend that cannot reset
    /// is logged: the guest's FLR then resets the VMM's view only.
    fn function_level_reset(&self, st: &mut State) {
        if st.msix_cap.is_some() {
            self.lock_irqs()
                .msix_cap_write(MSIX_CONTROL_OFFSET, &[0, 0]);
        }
        if st.msi_cap.is_some() {
            self.lock_irqs().msi_write(MSI_CONTROL_OFFSET, &[0, 0]);
        }
        self.set_command(st, 0);
        match self.backend.reset() {
            Ok(()) => tracing::info!("{}: function level reset by the guest", self.name),
            Err(e) => tracing::warn!(
                "{}: the guest's function level reset did not reach the device: {e}",
                self.name
            ),
        }
    }

    fn target(&self, index: usize, offset: u64, len: usize) -> Target {
        let Some(l) = self.msix else {
            return Target::Device;
        };
        let end = offset.saturating_add(len as u64);
        let overlaps = |start: u64, size: u64| offset < start + size && start < end;
        if l.table_bar == index && overlaps(l.table_offset, l.table_len) {
            return match offset.checked_sub(l.table_offset) {
                Some(rel) => Target::Table(rel),
                None => Target::Nowhere,
            };
        }
        if l.pba_bar == index && overlaps(l.pba_offset, l.pba_len) {
            return match offset.checked_sub(l.pba_offset) {
                Some(rel) => Target::Pba(rel),
                None => Target::Nowhere,
            };
        }
        Target::Device
    }

    fn in_bar(&self, index: usize, offset: u64, len: usize) -> bool {
        let size = self.bar_sizes.get(index).copied().unwrap_or(0);
        len > 0 && len <= 8 && offset.checked_add(len as u64).is_some_and(|e| e <= size)
    }

    /// A trapped guest read of BAR `index` at `offset`: the MSI-X table or PBA, or the
    /// device. Anything invalid or failing reads all ones.
    pub fn bar_read(&self, index: usize, offset: u64, data: &mut [u8]) {
        if !self.in_bar(index, offset, data.len()) {
            data.fill(0xff);
            return;
        }
        self.counters[index].reads.fetch_add(1, Ordering::Relaxed);
        match self.target(index, offset, data.len()) {
            Target::Table(rel) => self.lock_irqs().table_read(rel, data),
            Target::Pba(rel) => self.lock_irqs().pba_read(rel, data),
            Target::Nowhere => data.fill(0xff),
            Target::Device => {
                if let Err(e) = self.backend.region_read(index as u32, offset, data) {
                    self.errors.record(
                        &self.name,
                        format_args!("reading {} bytes at BAR {index} + {offset:#x}", data.len()),
                        &e,
                    );
                    data.fill(0xff);
                }
            }
        }
    }

    /// A trapped guest write of BAR `index` at `offset`: the MSI-X table, or the device.
    /// Invalid writes and writes to the PBA are dropped.
    pub fn bar_write(&self, index: usize, offset: u64, data: &[u8]) {
        if !self.in_bar(index, offset, data.len()) {
            return;
        }
        self.counters[index].writes.fetch_add(1, Ordering::Relaxed);
        match self.target(index, offset, data.len()) {
            Target::Table(rel) => self.lock_irqs().table_write(rel, data),
            Target::Pba(_) | Target::Nowhere => {}
            Target::Device => {
                if let Err(e) = self.backend.region_write(index as u32, offset, data) {
                    self.errors.record(
                        &self.name,
                        format_args!("writing {} bytes at BAR {index} + {offset:#x}", data.len()),
                        &e,
                    );
                }
            }
        }
    }

    fn bar_at(&self, base: u64) -> Option<usize> {
        (0..NUM_BARS).find(|&i| self.base(i) == Some(base))
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        if let Some(intx) = self.lock_intx().as_mut() {
            intx.shutdown();
        }
        self.lock_irqs().shutdown();
        // The placement (bus registrations, memory slots, then host mappings) is released
        // when `state` drops.
    }
}

/// Dispatches by the base address the bus passes: whichever BAR is registered there.
impl DeviceMmio for VfioPciDevice {
    fn mmio_read(&self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        match self.bar_at(base.0) {
            Some(index) => self.bar_read(index, offset, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if let Some(index) = self.bar_at(base.0) {
            self.bar_write(index, offset, data)
        }
    }
}

/// The PCI root holds the shared device (`Arc<Mutex<Arc<VfioPciDevice>>>`); the device
/// does its own locking.
impl PciDevice for Arc<VfioPciDevice> {
    fn name(&self) -> &str {
        &self.name
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.read_config(offset, data)
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.write_config(offset, data)
    }
}

/// What the bus holds for a placed BAR: a weak reference, so that the bus and the device do
/// not keep each other alive.
struct BarHandle {
    dev: Weak<VfioPciDevice>,
    bar: usize,
}

impl DeviceMmio for BarHandle {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        match self.dev.upgrade() {
            Some(dev) => dev.bar_read(self.bar, offset, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if let Some(dev) = self.dev.upgrade() {
            dev.bar_write(self.bar, offset, data)
        }
    }
}

/// An I/O BAR on the port-I/O bus: the same accesses, by port offset.
impl DevicePio for BarHandle {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match self.dev.upgrade() {
            Some(dev) => dev.bar_read(self.bar, offset.into(), data),
            None => data.fill(0xff),
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let Some(dev) = self.dev.upgrade() {
            dev.bar_write(self.bar, offset.into(), data)
        }
    }
}

/// The MSI-X capability of `cfg`, if it is usable: its offset, emulation state and where
/// its table and PBA are. Unusable ones (no MSI-X vectors in the backend, table or PBA
/// outside an implemented memory BAR) are logged and hidden.
fn msix_from_cfg(
    cfg: &[u8; CONFIG_SIZE],
    bars: &[BarDesc],
    backend_vectors: usize,
    name: &str,
) -> Option<(usize, Msix, MsixLayout)> {
    let (caps, _) = CapList::walk(cfg, |id, _| id == CAP_MSIX);
    let offset = caps.find(CAP_MSIX)?;
    if offset + MSIX_CAP_LEN > CONFIG_SIZE || backend_vectors == 0 {
        return None;
    }
    let control = u16::from_le_bytes([cfg[offset + 2], cfg[offset + 3]]);
    let (table_reg, pba_reg) = (dword(cfg, offset + 4), dword(cfg, offset + 8));
    let msix = Msix::new(usize::from(control & 0x7ff) + 1, table_reg, pba_reg);
    let layout = MsixLayout {
        table_bar: (table_reg & 7) as usize,
        table_offset: u64::from(table_reg & !7),
        table_len: msix.table_len(),
        pba_bar: (pba_reg & 7) as usize,
        pba_offset: u64::from(pba_reg & !7),
        pba_len: msix.pba_len(),
    };
    let fits = |bar: usize, offset: u64, len: u64| {
        bars.iter()
            .any(|b| b.index == bar && b.kind.is_memory() && offset + len <= b.region_size)
    };
    if !fits(layout.table_bar, layout.table_offset, layout.table_len)
        || !fits(layout.pba_bar, layout.pba_offset, layout.pba_len)
    {
        tracing::warn!(
            "{name}: MSI-X table or PBA lies outside its BAR ({layout:?}); MSI-X is hidden"
        );
        return None;
    }
    Some((offset, msix, layout))
}

/// Maps the mmap-able areas of a memory BAR into this process. Areas that cannot be
/// mapped are logged and left trapped.
fn map_bar(name: &str, bar: &BarDesc, region: &super::backend::RegionInfo) -> Vec<DeviceMmap> {
    let Some(mmap) = &region.mmap else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (offset, size) in region.mappable_areas() {
        let Some((offset, size)) = align_inwards(offset, size) else {
            continue;
        };
        let Some(file_offset) = mmap.file_offset.checked_add(offset) else {
            continue;
        };
        use std::os::fd::AsFd;
        match DeviceMmap::new(
            mmap.fd.as_fd(),
            file_offset,
            offset,
            size,
            region.flags.write,
        ) {
            Ok(m) => out.push(m),
            Err(e) => tracing::warn!(
                "{name}: cannot mmap BAR {} area {offset:#x}+{size:#x} (it stays trapped): {e}",
                bar.index
            ),
        }
    }
    out
}
