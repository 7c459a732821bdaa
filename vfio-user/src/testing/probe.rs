//! [`Probe`]: the test's view of a fake device that a server thread owns. It holds what
//! the device recorded (resets, DMA maps, `SET_IRQS`, region writes, disconnects) and
//! its migration state, which the test may also change (e.g. the state to hand out,
//! dirty pages), and raises the device's interrupts.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::irq::Irqs;
use super::migration::MigrationData;
use crate::device::DeviceResult;

/// One `DMA_MAP` the device accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMapRecord {
    /// DMA address.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset in the file.
    pub file_offset: u64,
    /// Whether a file descriptor came with it.
    pub had_fd: bool,
}

/// One `SET_IRQS` the device received (whether it accepted it or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetIrqsRecord {
    /// IRQ type.
    pub index: u32,
    /// `VFIO_IRQ_SET_DATA_*` and `VFIO_IRQ_SET_ACTION_*` bits.
    pub flags: u32,
    /// First vector.
    pub start: u32,
    /// Number of vectors.
    pub count: u32,
    /// Number of eventfds that came with it.
    pub fds: usize,
}

/// One write to a region made with [`Region::record_writes`](super::Region::record_writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionWriteRecord {
    /// The region.
    pub index: u32,
    /// Where in it.
    pub offset: u64,
    /// What was written.
    pub data: Vec<u8>,
}

/// What the device did and holds.
#[derive(Debug, Default)]
pub struct FakeState {
    /// `DEVICE_RESET`s.
    pub resets: u32,
    /// Accepted `DMA_MAP`s, in order.
    pub dma_maps: Vec<DmaMapRecord>,
    /// `SET_IRQS` requests, in order.
    pub set_irqs: Vec<SetIrqsRecord>,
    /// Writes to the regions that record them, in order (refused ones included).
    pub region_writes: Vec<RegionWriteRecord>,
    /// How often a client went away.
    pub disconnects: u32,
    /// Migration state (unused by a device without migration).
    pub migration: MigrationData,
    /// The interrupts and the eventfds the client set.
    pub(crate) irqs: Irqs,
}

/// A handle on a fake device's [`FakeState`], shared with the device.
#[derive(Debug, Clone, Default)]
pub struct Probe(Arc<Mutex<FakeState>>);

impl Probe {
    /// Locks the state (a panic elsewhere while it was locked does not poison it: the
    /// test still gets to see it).
    pub fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The device raises vector `vector` of IRQ type `index`, as its own interrupt
    /// logic would (`ENXIO` when the client set no eventfd for it).
    pub fn raise(&self, index: u32, vector: u32) -> DeviceResult<()> {
        self.lock().irqs.raise(index, vector)
    }
}
