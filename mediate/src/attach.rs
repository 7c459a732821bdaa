//! What a mediator gets once its vfio-pci device exists: a handle to trap and untrap BAR
//! ranges at run time, and read access to guest memory.

use std::sync::{Arc, Weak};

pub use devices::vfio::TrapOwner;
use devices::vfio::VfioPciDevice;

use crate::error::{MediateError, Result};

/// Traps and untraps page ranges of the device's BARs while the guest runs. Holds the
/// device weakly: the device owns its mediator, not the other way round.
#[derive(Clone)]
pub struct TrapHandle {
    name: String,
    dev: Weak<VfioPciDevice>,
}

impl TrapHandle {
    /// A handle for `dev`.
    pub fn new(dev: &Arc<VfioPciDevice>) -> Self {
        TrapHandle {
            name: dev.name().to_string(),
            dev: Arc::downgrade(dev),
        }
    }

    fn dev(&self) -> Result<Arc<VfioPciDevice>> {
        self.dev
            .upgrade()
            .ok_or_else(|| MediateError::DeviceGone(self.name.clone()))
    }

    /// Guest accesses to `[offset, offset + size)` of BAR `bar` exit and reach the
    /// mediator from when this returns. The range must be whole pages inside the BAR.
    /// `owner`: [`TrapOwner::Device`] for a trap that is part of how the device is
    /// mediated (saved with it, trapped again where it is restored),
    /// [`TrapOwner::Local`] for one this VMM needs for a while (e.g. dirty tracking).
    pub fn trap(&self, bar: usize, offset: u64, size: u64, owner: TrapOwner) -> Result<()> {
        self.dev()?
            .trap(bar, offset, size, owner)
            .map_err(|e| MediateError::Trap(Box::new(e)))
    }

    /// Lifts `owner`'s trap of the range: the guest reaches its mappable pages directly
    /// again from when this returns, unless the other owner traps them too.
    pub fn untrap(&self, bar: usize, offset: u64, size: u64, owner: TrapOwner) -> Result<()> {
        self.dev()?
            .untrap(bar, offset, size, owner)
            .map_err(|e| MediateError::Trap(Box::new(e)))
    }

    /// The ranges of BAR `bar` trapped now by either owner, as `(offset, size)`.
    pub fn trapped(&self, bar: usize) -> Vec<(u64, u64)> {
        self.dev().map(|d| d.trapped(bar)).unwrap_or_default()
    }

    /// Where BAR `bar` is in guest physical memory now, if it is placed.
    pub fn bar_base(&self, bar: usize) -> Option<u64> {
        let dev = self.dev().ok()?;
        dev.bar_stats().into_iter().find(|s| s.index == bar)?.base
    }
}

/// Reads guest physical memory (to walk rings, descriptors, ...).
pub trait GuestMemory: Send + Sync {
    /// Reads `buf.len()` bytes at guest physical address `gpa`; an error if any of it is
    /// not guest RAM.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

/// Given to [`MediatedDevice::attach`](crate::MediatedDevice::attach).
#[derive(Clone)]
pub struct AttachContext {
    /// Run-time trap/untrap of the device's BARs.
    pub traps: TrapHandle,
    /// Guest memory.
    pub memory: Arc<dyn GuestMemory>,
}
