//! The interrupts of a passed-through function: MSI-X and MSI emulated in the VMM, wired
//! to the backend, and their state passed on to the device.
//!
//! The capabilities and the MSI-X table are emulated by [`Msix`] and [`MsiCap`], which
//! program KVM through the shared [`MsiVectors`]: the address and data of every vector
//! are the VMM's alone, and the guest reads the emulated registers back. When MSI-X or MSI
//! is switched on the backend gets every vector's eventfd at once, so the device signals
//! them directly; when it is switched off the backend's vectors are disabled. A guest
//! enabling one while the other is on gets the one it enabled last.
//!
//! The device must also know what a device on a real bus would know, or it cannot behave
//! like one: a device that honours its MSI-X state (QEMU's device models behind its
//! vfio-user server, vfsim) sends nothing while MSI-X is off, the function is masked or
//! the vector is masked, and sets the vector's pending bit instead, to send it on unmask.
//! Keeping that state in the VMM only leaves such a device disabled and masked forever:
//! no interrupt ever arrives. So, as QEMU's vfio client does:
//! - the MSI-X control word (enable, function mask) is written to the device's
//!   configuration space after each guest write to it, and the guest's writes to the MSI
//!   capability (enable, vector count, mask bits) are written through as they come;
//! - each change of a vector's MSI-X mask bit is written to the vector-control word of
//!   the device's own MSI-X table (through the BAR: QEMU's server and hardware keep the
//!   mask there, and QEMU's server fires a pending vector on that write), and, where the
//!   backend's interrupt info says the index is maskable (`VFIO_IRQ_INFO_MASKABLE`), sent
//!   as `SET_IRQS` `ACTION_MASK`/`ACTION_UNMASK` for that one vector. MSI mask bits go
//!   the same two ways (the capability write, and `SET_IRQS` on the MSI index).
//!   libvfio-user (QEMU's server) does not report MSI-X as maskable, so only the table
//!   write reaches it: its `SET_IRQS` mask handler unmasks only vector 0 for a
//!   single-vector request (its loop runs `start..count`), and the table write does not
//!   depend on it. Kernel VFIO drops writes to the MSI-X table and virtualizes the
//!   capability bits, so both writes are harmless there;
//! - reads of the PBA and of the MSI pending bits report a vector pending if either side
//!   has it: the VMM's eventfd (a device that does not mask by itself signalled while the
//!   irqfd was off) or the device's own pending bit (a device that masks by itself holds
//!   the interrupt back, and signals it on unmask; as QEMU's vfio-user client, which reads
//!   the PBA from the server).
//!
//! Order: enabling and unmasking reach the device after the VMM's side is ready (eventfds
//! handed over, irqfds registered), so what the device sends at once on enable or unmask
//! (its pending vectors) is delivered; disabling reaches the device before its eventfds
//! are taken away, so what it raises meanwhile stays pending in the device.

use std::ops::Range;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::backend::{BackendError, VfioBackend, CONFIG_REGION, IRQ_MSI, IRQ_MSIX};
use super::errlog::ErrorLog;
use crate::pci::msi::{MsiCap, MsiChange};
use crate::pci::msix::{MaskChange, MsiVectors, Msix, MsixChange, MSIX_ENTRY_SIZE};

/// Offset of the message control word in the MSI and MSI-X capabilities.
const CONTROL: usize = 2;
/// Offset of the vector-control word in an MSI-X table entry.
const VECTOR_CONTROL: usize = 12;

/// Where the device keeps its MSI-X and MSI state, and what it accepts, for passing the
/// guest's settings on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceIrqRegs {
    /// Offset of the MSI-X capability in configuration space.
    pub msix_cap: Option<usize>,
    /// Region (BAR) and offset of the device's MSI-X table, if writes to that BAR reach
    /// the device.
    pub msix_table: Option<(u32, u64)>,
    /// Region (BAR) and offset of the device's PBA, if the device can be read there.
    pub msix_pba: Option<(u32, u64)>,
    /// Offset of the MSI capability in configuration space.
    pub msi_cap: Option<usize>,
    /// The backend masks MSI-X vectors on request (`VFIO_IRQ_INFO_MASKABLE`).
    pub msix_maskable: bool,
    /// The backend masks MSI vectors on request.
    pub msi_maskable: bool,
}

/// MSI-X and MSI state of one function.
pub struct Irqs {
    owner: String,
    backend: Arc<dyn VfioBackend>,
    vectors: MsiVectors,
    msix: Option<Msix>,
    msi: Option<MsiCap>,
    /// Vectors the backend has for MSI-X and MSI.
    msix_count: usize,
    msi_count: usize,
    regs: DeviceIrqRegs,
    /// Whether the guest's MSI/MSI-X settings are passed on to the device (see the module
    /// docs); off only in tests that show what happens without it.
    forward: bool,
    errors: ErrorLog,
}

impl Irqs {
    /// Interrupt state over `vectors`, with the capabilities the function exposes, the
    /// backend's vector counts and where the device keeps its own state.
    pub fn new(
        owner: &str,
        backend: Arc<dyn VfioBackend>,
        vectors: MsiVectors,
        (msix, msi): (Option<Msix>, Option<MsiCap>),
        (msix_count, msi_count): (usize, usize),
        regs: DeviceIrqRegs,
    ) -> Self {
        Irqs {
            owner: owner.to_string(),
            backend,
            vectors,
            msix,
            msi,
            msix_count,
            msi_count,
            regs,
            forward: true,
            errors: ErrorLog::default(),
        }
    }

    /// The shared vectors (GSIs and eventfds).
    pub fn vectors(&self) -> &MsiVectors {
        &self.vectors
    }

    /// The emulated MSI-X capability, if the function exposes one.
    pub fn msix(&self) -> Option<&Msix> {
        self.msix.as_ref()
    }

    /// The emulated MSI capability, if the function exposes one.
    pub fn msi(&self) -> Option<&MsiCap> {
        self.msi.as_ref()
    }

    /// Vectors the backend has for MSI-X and MSI.
    pub fn backend_counts(&self) -> (usize, usize) {
        (self.msix_count, self.msi_count)
    }

    /// Switches passing the guest's MSI/MSI-X settings on to the device on or off (on
    /// from the start). Off is for tests only: it shows that a device honouring its
    /// MSI-X state never interrupts without it.
    pub fn set_forwarding(&mut self, on: bool) {
        self.forward = on;
    }

    /// Failures so far: backend requests and KVM routing changes.
    pub fn errors(&self) -> u64 {
        self.errors.count() + self.vectors.errors()
    }

    fn check(&self, what: impl std::fmt::Display, r: Result<(), BackendError>) {
        if let Err(e) = r {
            self.errors.record(&self.owner, format_args!("{what}"), &e);
        }
    }

    fn hand_over(&self, index: u32, n: usize) {
        let fds: Vec<Option<&EventFd>> = self.vectors.eventfds(n).into_iter().map(Some).collect();
        let what = if index == IRQ_MSIX {
            "enabling MSI-X"
        } else {
            "enabling MSI"
        };
        self.check(what, self.backend.set_irq_eventfds(index, 0, &fds));
    }

    /// Writes `data` at `offset` of the device's configuration space (if forwarding).
    fn write_device_config(&self, what: &str, offset: usize, data: &[u8]) {
        if !self.forward || data.is_empty() {
            return;
        }
        let r = self
            .backend
            .region_write(CONFIG_REGION, offset as u64, data);
        self.check(
            format_args!(
                "writing {what} ({} bytes at {offset:#x}) to the device",
                data.len()
            ),
            r,
        );
    }

    /// Writes the emulated MSI-X control word (enable, function mask) to the device.
    fn forward_msix_control(&self) {
        if let (Some(cap), Some(m)) = (self.regs.msix_cap, &self.msix) {
            let control = m.control().to_le_bytes();
            self.write_device_config("the MSI-X control word", cap + CONTROL, &control);
        }
    }

    /// Writes the emulated MSI control word (enable, vector count) to the device.
    fn forward_msi_control(&self) {
        if let (Some(cap), Some(m)) = (self.regs.msi_cap, &self.msi) {
            let control = m.control().to_le_bytes();
            self.write_device_config("the MSI control word", cap + CONTROL, &control);
        }
    }

    /// Passes MSI-X mask changes on: the vector-control word of the device's table, and
    /// `SET_IRQS` mask/unmask where the backend says MSI-X is maskable.
    fn forward_msix_masks(&self, changes: &[MaskChange]) {
        if !self.forward {
            return;
        }
        for c in changes {
            let verb = if c.masked { "masking" } else { "unmasking" };
            if let Some((bar, table)) = self.regs.msix_table {
                let at = table + (c.vector * MSIX_ENTRY_SIZE + VECTOR_CONTROL) as u64;
                let control = u32::from(c.masked).to_le_bytes();
                let r = self.backend.region_write(bar, at, &control);
                self.check(
                    format_args!(
                        "{verb} MSI-X vector {} in the device's table (BAR {bar} + {at:#x})",
                        c.vector
                    ),
                    r,
                );
            }
            if self.regs.msix_maskable && c.vector < self.msix_count {
                let r = self
                    .backend
                    .mask_irqs(IRQ_MSIX, c.vector as u32, 1, c.masked);
                self.check(format_args!("{verb} MSI-X vector {}", c.vector), r);
            }
        }
    }

    /// Passes MSI mask-bit changes on as `SET_IRQS` mask/unmask, where the backend says
    /// MSI is maskable (the capability write itself carries them to the device too).
    fn forward_msi_masks(&self, before: u32, after: u32) {
        if !self.forward || !self.regs.msi_maskable {
            return;
        }
        let changed = before ^ after;
        for v in (0..self.msi_count.min(32)).filter(|&v| changed & 1 << v != 0) {
            let masked = after & 1 << v != 0;
            let verb = if masked { "masking" } else { "unmasking" };
            let r = self.backend.mask_irqs(IRQ_MSI, v as u32, 1, masked);
            self.check(format_args!("{verb} MSI vector {v}"), r);
        }
    }

    /// Reads MSI-X capability bytes (offset from the capability's start).
    pub fn msix_cap_read(&self, offset: usize, data: &mut [u8]) {
        match &self.msix {
            Some(m) => m.cap_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write to the MSI-X capability: emulated, then the control word is written
    /// to the device (see the module docs for the order).
    pub fn msix_cap_write(&mut self, offset: usize, data: &[u8]) {
        let Some(msix) = self.msix.as_mut() else {
            return;
        };
        let control_written = overlaps(offset, data.len(), CONTROL..CONTROL + 2);
        match msix.cap_write(offset, data, &mut self.vectors) {
            MsixChange::Enabled => {
                if let Some(msi) = self.msi.as_mut().filter(|m| m.enabled()) {
                    msi.force_disable(&mut self.vectors);
                    msix.resync(&mut self.vectors);
                    self.forward_msi_control();
                    let r = self.backend.disable_irqs(IRQ_MSI);
                    self.check("disabling MSI for MSI-X", r);
                }
                let n = self
                    .msix
                    .as_ref()
                    .map_or(0, Msix::size)
                    .min(self.msix_count);
                self.hand_over(IRQ_MSIX, n);
                self.forward_msix_control();
            }
            MsixChange::Disabled => {
                self.forward_msix_control();
                let r = self.backend.disable_irqs(IRQ_MSIX);
                self.check("disabling MSI-X", r);
            }
            MsixChange::None if control_written => self.forward_msix_control(),
            MsixChange::None => {}
        }
    }

    /// Reads MSI capability bytes (offset from the capability's start). The pending bits
    /// include the device's own.
    pub fn msi_read(&self, offset: usize, data: &mut [u8]) {
        let Some(msi) = &self.msi else {
            data.fill(0xff);
            return;
        };
        msi.read(offset, data, Some(&self.vectors));
        let (Some(pending), Some(cap)) = (msi.pending_offset(), self.regs.msi_cap) else {
            return;
        };
        let Some(range) = intersect(offset..offset + data.len(), pending..pending + 4) else {
            return;
        };
        let mut device = vec![0u8; range.len()];
        let r = self
            .backend
            .region_read(CONFIG_REGION, (cap + range.start) as u64, &mut device);
        if let Err(e) = r {
            self.errors.record(
                &self.owner,
                format_args!("reading the device's MSI pending bits"),
                &e,
            );
            return;
        }
        let valid = ((1u64 << msi.max_vectors()) - 1) as u32;
        for (k, dev) in range.clone().zip(device) {
            let byte_mask = (valid >> (8 * (k - pending))) as u8;
            data[k - offset] |= dev & byte_mask;
        }
    }

    /// A guest write to the MSI capability: emulated, then written through to the
    /// device's capability, and mask changes sent where MSI is maskable.
    pub fn msi_write(&mut self, offset: usize, data: &[u8]) {
        let Some(msi) = self.msi.as_mut() else {
            return;
        };
        let was_enabled = msi.enabled();
        let masks_before = msi.mask_bits();
        let len = msi.len();
        let change = msi.write(offset, data, &mut self.vectors);
        let masks_after = msi.mask_bits();
        // The guest's bytes that fall in the capability, as it wrote them.
        let through = &data[..data.len().min(len.saturating_sub(offset))];
        let cap = self.regs.msi_cap;
        let write_through = |irqs: &Self| {
            if let Some(cap) = cap {
                irqs.write_device_config("the MSI capability", cap + offset, through);
            }
        };
        match change {
            MsiChange::Enabled(n) => {
                if let Some(msix) = self.msix.as_mut().filter(|m| m.enabled()) {
                    msix.force_disable(&mut self.vectors);
                    msi.resync(&mut self.vectors);
                    self.forward_msix_control();
                    let r = self.backend.disable_irqs(IRQ_MSIX);
                    self.check("disabling MSI-X for MSI", r);
                }
                if was_enabled {
                    // VFIO cannot resize an enabled MSI block: switch it off first.
                    let r = self.backend.disable_irqs(IRQ_MSI);
                    self.check("resizing MSI", r);
                }
                self.hand_over(IRQ_MSI, n.min(self.msi_count));
                write_through(self);
            }
            MsiChange::Disabled => {
                write_through(self);
                let r = self.backend.disable_irqs(IRQ_MSI);
                self.check("disabling MSI", r);
            }
            MsiChange::None => write_through(self),
        }
        self.forward_msi_masks(masks_before, masks_after);
    }

    /// Reads the MSI-X table (offset from the table's start).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        match &self.msix {
            Some(m) => m.table_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write to the MSI-X table: emulated (KVM routes), then the mask changes are
    /// passed on to the device.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        if let Some(m) = self.msix.as_mut() {
            let changes = m.table_write(offset, data, &mut self.vectors);
            self.forward_msix_masks(&changes);
        }
    }

    /// Reads the MSI-X PBA (offset from the PBA's start): the VMM's pending vectors and
    /// the device's own PBA together.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let Some(m) = &self.msix else {
            data.fill(0xff);
            return;
        };
        let inside = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= m.pba_len());
        let mut device = vec![0u8; data.len()];
        let device = match self.regs.msix_pba {
            Some((bar, pba)) if inside => {
                let at = pba.saturating_add(offset);
                match self.backend.region_read(bar, at, &mut device) {
                    Ok(()) => Some(device),
                    Err(e) => {
                        self.errors.record(
                            &self.owner,
                            format_args!("reading the device's PBA at BAR {bar} + {at:#x}"),
                            &e,
                        );
                        None
                    }
                }
            }
            _ => None,
        };
        m.pba_read(offset, data, &self.vectors, device.as_deref());
    }

    /// Switches MSI-X and MSI off, in the device, the backend and KVM (device removal or
    /// reset).
    pub fn shutdown(&mut self) {
        if let Some(m) = self.msix.as_mut().filter(|m| m.enabled()) {
            m.force_disable(&mut self.vectors);
            self.forward_msix_control();
            let r = self.backend.disable_irqs(IRQ_MSIX);
            self.check("disabling MSI-X", r);
        }
        if let Some(m) = self.msi.as_mut().filter(|m| m.enabled()) {
            m.force_disable(&mut self.vectors);
            self.forward_msi_control();
            let r = self.backend.disable_irqs(IRQ_MSI);
            self.check("disabling MSI", r);
        }
    }
}

/// Whether `[offset, offset + len)` overlaps `range`.
fn overlaps(offset: usize, len: usize, range: Range<usize>) -> bool {
    intersect(offset..offset.saturating_add(len), range).is_some()
}

/// The common part of two ranges, if not empty.
fn intersect(a: Range<usize>, b: Range<usize>) -> Option<Range<usize>> {
    let r = a.start.max(b.start)..a.end.min(b.end);
    (!r.is_empty()).then_some(r)
}
