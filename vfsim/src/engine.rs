//! Queue processing: the virtio state, guest memory, disk and interrupts together, and
//! the loop that completes the requests the driver made available.

use crate::blk::{Disk, SECTOR_SIZE};
use crate::common_cfg::{CommonCfg, STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1};
use crate::guest_mem::GuestMemory;
use crate::irq::{MsixVectors, Raised};
use crate::layout::{DEVICE_CFG_SIZE, MSIX_VECTORS, NUM_QUEUES};
use crate::virtqueue::{QueueError, NO_VECTOR};

/// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// `VIRTIO_BLK_F_FLUSH`: the flush command is supported.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Features offered.
pub const DEVICE_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
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
    /// The disk image.
    pub disk: Disk,
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
}

impl Engine {
    /// A device in its reset state with queues of at most `queue_size` entries.
    pub fn new(disk: Disk, queue_size: u16) -> Self {
        Engine {
            common: CommonCfg::new(DEVICE_FEATURES, NUM_QUEUES, queue_size, MSIX_VECTORS),
            mem: GuestMemory::new(),
            disk,
            irqs: MsixVectors::new(MSIX_VECTORS),
            isr: 0,
            quiesced: false,
            completed: 0,
        }
    }

    /// Virtio reset: status, features and queues back to their reset state. DMA
    /// mappings, eventfds, the DMA write log and the PF side's quiesce stay.
    pub fn reset(&mut self) {
        self.common.reset();
        self.isr = 0;
    }

    /// The virtio-blk device configuration (`struct virtio_blk_config`).
    pub fn device_config(&self) -> [u8; DEVICE_CFG_SIZE as usize] {
        let mut c = [0u8; DEVICE_CFG_SIZE as usize];
        c[0..8].copy_from_slice(&self.disk.sectors().to_le_bytes());
        let seg_max = u32::from(self.common.queues.first().map_or(2, |q| q.max_size))
            .saturating_sub(2)
            .max(1);
        c[12..16].copy_from_slice(&seg_max.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
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
        for q in self.common.queues.iter_mut().filter(|q| q.ready) {
            let mut completed = 0u32;
            let result: Result<(), QueueError> = (|| {
                // At most one ring's worth per pass so other work gets a turn.
                for _ in 0..q.size {
                    let Some(chain) = q.pop(&self.mem)? else {
                        break;
                    };
                    let len = self.disk.execute(&self.mem, &chain).unwrap_or_else(|e| {
                        tracing::warn!("completing a request without status: {e}");
                        0
                    });
                    q.add_used(&self.mem, chain.head, len)?;
                    completed += 1;
                    self.completed += 1;
                }
                Ok(())
            })();
            if completed > 0 {
                worked = true;
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
