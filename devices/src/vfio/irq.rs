//! The interrupts of a passed-through function: MSI-X and MSI emulated in the VMM, wired
//! to the backend.
//!
//! The capabilities and the MSI-X table are emulated by [`Msix`] and [`MsiCap`], which
//! program KVM through the shared [`MsiVectors`]. What the backend must know is only when
//! MSI-X or MSI is switched on (it gets every vector's eventfd at once, so the device
//! signals them directly) or off. A guest enabling one while the other is on gets the one
//! it enabled last.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::backend::{BackendError, VfioBackend, IRQ_MSI, IRQ_MSIX};
use super::errlog::ErrorLog;
use crate::pci::msi::{MsiCap, MsiChange};
use crate::pci::msix::{MsiVectors, Msix, MsixChange};

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
    errors: ErrorLog,
}

impl Irqs {
    /// Interrupt state over `vectors`, with the capabilities the function exposes and the
    /// backend's vector counts.
    pub fn new(
        owner: &str,
        backend: Arc<dyn VfioBackend>,
        vectors: MsiVectors,
        msix: Option<Msix>,
        msi: Option<MsiCap>,
        (msix_count, msi_count): (usize, usize),
    ) -> Self {
        Irqs {
            owner: owner.to_string(),
            backend,
            vectors,
            msix,
            msi,
            msix_count,
            msi_count,
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

    /// Failures so far: backend requests and KVM routing changes.
    pub fn errors(&self) -> u64 {
        self.errors.count() + self.vectors.errors()
    }

    fn check(&self, what: &str, r: Result<(), BackendError>) {
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

    /// Reads MSI-X capability bytes (offset from the capability's start).
    pub fn msix_cap_read(&self, offset: usize, data: &mut [u8]) {
        match &self.msix {
            Some(m) => m.cap_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write to the MSI-X capability.
    pub fn msix_cap_write(&mut self, offset: usize, data: &[u8]) {
        let Some(msix) = self.msix.as_mut() else {
            return;
        };
        match msix.cap_write(offset, data, &mut self.vectors) {
            MsixChange::Enabled => {
                if let Some(msi) = self.msi.as_mut().filter(|m| m.enabled()) {
                    msi.force_disable(&mut self.vectors);
                    msix.resync(&mut self.vectors);
                    let r = self.backend.disable_irqs(IRQ_MSI);
                    self.check("disabling MSI for MSI-X", r);
                }
                let n = self
                    .msix
                    .as_ref()
                    .map_or(0, Msix::size)
                    .min(self.msix_count);
                self.hand_over(IRQ_MSIX, n);
            }
            MsixChange::Disabled => {
                let r = self.backend.disable_irqs(IRQ_MSIX);
                self.check("disabling MSI-X", r);
            }
            MsixChange::None => {}
        }
    }

    /// Reads MSI capability bytes (offset from the capability's start).
    pub fn msi_read(&self, offset: usize, data: &mut [u8]) {
        match &self.msi {
            Some(m) => m.read(offset, data, Some(&self.vectors)),
            None => data.fill(0xff),
        }
    }

    /// A guest write to the MSI capability.
    pub fn msi_write(&mut self, offset: usize, data: &[u8]) {
        let Some(msi) = self.msi.as_mut() else {
            return;
        };
        let was_enabled = msi.enabled();
        match msi.write(offset, data, &mut self.vectors) {
            MsiChange::Enabled(n) => {
                if let Some(msix) = self.msix.as_mut().filter(|m| m.enabled()) {
                    msix.force_disable(&mut self.vectors);
                    msi.resync(&mut self.vectors);
                    let r = self.backend.disable_irqs(IRQ_MSIX);
                    self.check("disabling MSI-X for MSI", r);
                }
                if was_enabled {
                    // VFIO cannot resize an enabled MSI block: switch it off first.
                    let r = self.backend.disable_irqs(IRQ_MSI);
                    self.check("resizing MSI", r);
                }
                self.hand_over(IRQ_MSI, n.min(self.msi_count));
            }
            MsiChange::Disabled => {
                let r = self.backend.disable_irqs(IRQ_MSI);
                self.check("disabling MSI", r);
            }
            MsiChange::None => {}
        }
    }

    /// Reads the MSI-X table (offset from the table's start).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        match &self.msix {
            Some(m) => m.table_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write to the MSI-X table.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        if let Some(m) = self.msix.as_mut() {
            m.table_write(offset, data, &mut self.vectors);
        }
    }

    /// Reads the MSI-X PBA (offset from the PBA's start).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        match &self.msix {
            Some(m) => m.pba_read(offset, data, &self.vectors),
            None => data.fill(0xff),
        }
    }

    /// Switches MSI-X and MSI off, in the backend and in KVM (device removal or reset).
    pub fn shutdown(&mut self) {
        if let Some(m) = self.msix.as_mut().filter(|m| m.enabled()) {
            m.force_disable(&mut self.vectors);
            let r = self.backend.disable_irqs(IRQ_MSIX);
            self.check("disabling MSI-X", r);
        }
        if let Some(m) = self.msi.as_mut().filter(|m| m.enabled()) {
            m.force_disable(&mut self.vectors);
            let r = self.backend.disable_irqs(IRQ_MSI);
            self.check("disabling MSI", r);
        }
    }
}
