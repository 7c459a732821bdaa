//! Queue processing, shared by every personality: the virtio state, guest memory and
//! interrupts together, and the loop that takes what the driver made available, hands
//! each queue to the [`Personality`], signals the queues' vectors, and marks the device
//! `DEVICE_NEEDS_RESET` when a queue is set up wrongly.

use std::os::fd::RawFd;

use crate::common_cfg::{CommonCfg, STATUS_NEEDS_RESET};
use crate::guest_mem::GuestMemory;
use crate::irq::{MsixVectors, Raised};
use crate::personality::{DeviceConfig, Personality, Ring};
use crate::virtqueue::{QueueError, NO_VECTOR};

/// ISR bit: a queue interrupt.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: a configuration change.
pub const ISR_CONFIG: u8 = 2;

/// Everything queue processing touches; shared by the server thread (register accesses,
/// DMA and IRQ setup) and the poller thread (processing) behind one mutex.
#[derive(Debug)]
pub struct Engine {
    /// The common configuration and the queues.
    pub common: CommonCfg,
    /// The client's DMA mappings.
    pub mem: GuestMemory,
    /// What kind of function this is (disk, NIC).
    pub personality: Box<dyn Personality>,
    /// MSI-X state and eventfds: what the device may signal (see [`crate::irq`]).
    pub irqs: MsixVectors,
    /// ISR status (read to clear).
    pub isr: u8,
    /// Set by the PF side: no new requests are taken from the available rings. Requests
    /// are popped and completed within one [`Engine::process`] pass under the engine's
    /// lock, so whoever sets this with the lock held knows nothing is in flight.
    pub quiesced: bool,
    /// Requests completed since the device was created.
    pub completed: u64,
    /// A state was loaded (the device moved here) and it has not run since: the next
    /// resume tells the personality ([`Personality::resumed_after_load`]).
    pub loaded: bool,
}

impl Engine {
    /// A device in its reset state with queues of at most `queue_size` entries.
    pub fn new(personality: Box<dyn Personality>, queue_size: u16) -> Self {
        let id = personality.identity();
        Engine {
            common: CommonCfg::new(
                personality.features(),
                id.num_queues,
                queue_size,
                id.msix_vectors,
            ),
            mem: GuestMemory::new(),
            irqs: MsixVectors::new(id.msix_vectors),
            personality,
            isr: 0,
            quiesced: false,
            completed: 0,
            loaded: false,
        }
    }

    /// Virtio reset: status, features and queues back to their reset state. DMA
    /// mappings, eventfds, the DMA write log and the PF side's quiesce stay.
    pub fn reset(&mut self) {
        self.common.reset();
        self.isr = 0;
    }

    /// The device configuration of the personality.
    pub fn device_config(&self) -> DeviceConfig {
        let max = self.common.queues.first().map_or(2, |q| q.max_size);
        self.personality.device_config(max)
    }

    /// Whether queues may be processed: the driver is done with initialisation, the
    /// device is not broken, memory is mapped and the PF side has not quiesced it.
    pub fn can_process(&self) -> bool {
        self.common.is_live() && !self.mem.is_empty() && !self.quiesced
    }

    /// Completes every available request of every ready queue and signals the queues'
    /// vectors. Returns whether anything was completed. A queue the driver set up
    /// wrongly marks the device `DEVICE_NEEDS_RESET`.
    pub fn process(&mut self) -> bool {
        if !self.can_process() {
            return false;
        }
        let mut worked = false;
        let mut failure = None;
        let personality = &mut self.personality;
        for (index, q) in self.common.queues.iter_mut().enumerate() {
            if !q.ready {
                continue;
            }
            let mut ring = Ring::new(q, &self.mem);
            let result = personality.serve(index, &mut ring);
            let completed = ring.completed();
            if completed > 0 {
                worked = true;
                self.completed += u64::from(completed);
                if q.wants_interrupt(&self.mem).unwrap_or(true) {
                    self.isr |= ISR_QUEUE;
                    signal(&mut self.irqs, q.msix_vector);
                }
            }
            if let Err(e) = result {
                failure = Some(e);
                break;
            }
        }
        if let Some(e) = failure {
            self.needs_reset(&e);
            worked = true;
        }
        worked
    }

    /// A descriptor the poller should also wait on (see [`Personality::wake_fd`]), while
    /// queues may be processed.
    pub fn wake_fd(&self) -> Option<RawFd> {
        if !self.can_process() {
            return None;
        }
        self.personality.wake_fd(&self.common.queues, &self.mem)
    }

    /// Marks the device broken and tells the driver through the configuration vector.
    fn needs_reset(&mut self, why: &QueueError) {
        tracing::warn!("virtio device needs a reset: {why}");
        self.common.status |= STATUS_NEEDS_RESET;
        self.isr |= ISR_CONFIG;
        signal(&mut self.irqs, self.common.config_msix_vector);
    }
}

/// Raises `vector`: signalled, or pending while MSI-X is off or the vector masked.
fn signal(irqs: &mut MsixVectors, vector: u16) {
    if vector == NO_VECTOR {
        return;
    }
    match irqs.raise(vector) {
        Ok(Raised::Signalled) => {}
        Ok(Raised::Pending) => tracing::trace!(vector, "MSI-X vector held pending"),
        Ok(Raised::NoEventfd) => {
            tracing::debug!(vector, "no eventfd for MSI-X vector; interrupt dropped")
        }
        Err(e) => tracing::warn!("{e}"),
    }
}
