//! What kind of function vfsim is: the [`Personality`] plugged into the one shared
//! virtqueue engine ([`crate::engine::Engine`]). The engine owns the queues, guest
//! memory, interrupts, quiesce and `DEVICE_NEEDS_RESET`; the personality brings the
//! identity (ids, queue and vector counts), the features, the device configuration, what
//! a chain means on each queue, and its part of the PF-side state.
//!
//! Personalities: [`crate::blk::BlkFunction`] (a disk image) and
//! [`crate::net::NetFunction`] (a tap interface).

use std::fs::File;
use std::io;
use std::os::fd::RawFd;

use pf_protocol::proto::{Stats, VfState};

use crate::guest_mem::GuestMemory;
use crate::layout::{Identity, DEVICE_CFG_SIZE};
use crate::virtqueue::{Chain, Queue, QueueError};

/// The device configuration block (BAR 0 at [`crate::layout::DEVICE_CFG_OFFSET`]).
pub type DeviceConfig = [u8; DEVICE_CFG_SIZE as usize];

/// One kind of virtio function.
pub trait Personality: Send + std::fmt::Debug {
    /// A name for messages ("virtio-blk", "virtio-net").
    fn name(&self) -> &'static str;

    /// PCI ids, queue and MSI-X vector counts.
    fn identity(&self) -> &'static Identity;

    /// The features offered (including `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;

    /// The device configuration; `max_queue_size` is the largest queue size offered.
    fn device_config(&self, max_queue_size: u16) -> DeviceConfig;

    /// Takes and completes what queue `index` has available, through `ring`. An error
    /// (a queue or chain the driver set up wrongly) marks the device
    /// `DEVICE_NEEDS_RESET`.
    fn serve(&mut self, index: usize, ring: &mut Ring<'_>) -> Result<(), QueueError>;

    /// A descriptor the poller should also wait on while idle (readable means work for
    /// a queue), given the queues as the driver set them up; `None` if there is none now.
    fn wake_fd(&self, _queues: &[Queue], _mem: &GuestMemory) -> Option<RawFd> {
        None
    }

    /// Adds the personality's part to a state being taken.
    fn save(&self, state: &mut VfState);

    /// Why `state` (another function's) cannot be loaded here, if it cannot: a state of
    /// another personality, or one whose device configuration differs.
    fn check(&self, state: &VfState) -> Result<(), String>;

    /// Loads the personality's part of a state [`Personality::check`] accepted.
    fn load(&mut self, state: &VfState);

    /// The device runs again after a state was loaded into it (it moved here).
    fn resumed_after_load(&mut self) {}

    /// Adds the personality's counters.
    fn stats(&self, _stats: &mut Stats) {}

    /// A second handle on a backing file to flush on exit, if there is one.
    fn backing_file(&self) -> Option<io::Result<File>> {
        None
    }
}

/// One queue in one processing pass, as a personality sees it: chains to take, used
/// entries to add. It takes at most one ring's worth per pass so other queues get a turn.
#[derive(Debug)]
pub struct Ring<'a> {
    queue: &'a mut Queue,
    mem: &'a GuestMemory,
    taken: u16,
    completed: u32,
}

impl<'a> Ring<'a> {
    /// `queue` over `mem` for one pass.
    pub fn new(queue: &'a mut Queue, mem: &'a GuestMemory) -> Self {
        Ring {
            queue,
            mem,
            taken: 0,
            completed: 0,
        }
    }

    /// Guest memory (DMA through it is logged, see [`crate::guest_mem`]).
    pub fn mem(&self) -> &GuestMemory {
        self.mem
    }

    /// Whether a chain is available to take in this pass.
    pub fn has_available(&self) -> Result<bool, QueueError> {
        Ok(self.taken < self.queue.size && self.queue.has_work(self.mem)?)
    }

    /// Takes the next available chain, if any is left for this pass.
    pub fn pop(&mut self) -> Result<Option<Chain>, QueueError> {
        if self.taken >= self.queue.size {
            return Ok(None);
        }
        let chain = self.queue.pop(self.mem)?;
        if chain.is_some() {
            self.taken += 1;
        }
        Ok(chain)
    }

    /// Puts `head` with `len` bytes written into the used ring.
    pub fn complete(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        self.queue.add_used(self.mem, head, len)?;
        self.completed += 1;
        Ok(())
    }

    /// Chains completed in this pass.
    pub fn completed(&self) -> u32 {
        self.completed
    }
}
