//! [`Probe`]: the test's view of a fake device that a server thread owns. It holds what
//! the device recorded (resets, DMA maps, `SET_IRQS`, disconnects) and its migration
//! state, which the test may also change (e.g. the state to hand out, dirty pages).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::migration::MigrationData;

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

/// What the device did and holds.
#[derive(Debug, Default)]
pub struct FakeState {
    /// `DEVICE_RESET`s.
    pub resets: u32,
    /// Accepted `DMA_MAP`s, in order.
    pub dma_maps: Vec<DmaMapRecord>,
    /// `SET_IRQS` requests, in order.
    pub set_irqs: Vec<SetIrqsRecord>,
    /// How often a client went away.
    pub disconnects: u32,
    /// Migration state (unused by a device without migration).
    pub migration: MigrationData,
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
}
