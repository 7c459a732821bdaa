//! Split virtqueues (virtio 1.x section 2.7): descriptor chains popped from the
//! available ring, completions pushed to the used ring, all through [`GuestMemory`].
//! Indirect descriptors and event indexes are not offered, so not handled.

use std::sync::atomic::{fence, Ordering};

use crate::guest_mem::{GuestMemError, GuestMemory};

/// "No MSI-X vector" in `config_msix_vector` / `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const DESC_SIZE: u64 = 16;

/// A queue the driver set up wrongly; the device needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A ring could not be read or written.
    #[error("the {what} of the virtqueue is not accessible: {source}")]
    Ring {
        /// Which part.
        what: &'static str,
        /// The access error.
        source: GuestMemError,
    },
    /// The available index moved further than the queue size.
    #[error("the available index {avail} is {ahead} entries ahead of the device's {next}, more than the queue size {size}")]
    AvailTooFar {
        /// The driver's index.
        avail: u16,
        /// The device's next index.
        next: u16,
        /// The difference.
        ahead: u16,
        /// Queue size.
        size: u16,
    },
    /// A descriptor index is out of range.
    #[error("descriptor index {index} is out of range for a queue of size {size}")]
    BadIndex {
        /// The index.
        index: u16,
        /// Queue size.
        size: u16,
    },
    /// The chain loops or is longer than the queue.
    #[error(
        "the descriptor chain starting at {head} is longer than the queue size {size} (a loop?)"
    )]
    ChainTooLong {
        /// Head index.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// An indirect descriptor, which was not negotiated.
    #[error("descriptor {index} is indirect, which the device does not offer")]
    Indirect {
        /// The descriptor index.
        index: u16,
    },
    /// A device-readable descriptor after a device-writable one.
    #[error("descriptor {index} is device-readable after a device-writable one")]
    ReadableAfterWritable {
        /// The descriptor index.
        index: u16,
    },
}

/// A guest buffer: address and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// One request: the head index and its buffers, readable ones first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// Index of the head descriptor (what goes into the used ring).
    pub head: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Segment>,
}

/// The state of one virtqueue, as the common configuration sets it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// Largest size the device supports.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// `queue_enable`.
    pub ready: bool,
    /// `queue_msix_vector`.
    pub msix_vector: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available (driver) ring address.
    pub avail: u64,
    /// Used (device) ring address.
    pub used: u64,
    /// Next available-ring entry to consume.
    pub next_avail: u16,
    /// Next used-ring entry to fill.
    pub next_used: u16,
}

impl Queue {
    /// A queue in its reset state.
    pub fn new(max_size: u16) -> Self {
        Queue {
            max_size,
            size: max_size,
            ready: false,
            msix_vector: NO_VECTOR,
            desc: 0,
            avail: 0,
            used: 0,
            next_avail: 0,
            next_used: 0,
        }
    }

    /// Back to the reset state.
    pub fn reset(&mut self) {
        *self = Queue::new(self.max_size);
    }

    /// Whether the size is usable: a power of two, at most the maximum.
    pub fn size_is_valid(&self) -> bool {
        self.size.is_power_of_two() && self.size <= self.max_size
    }

    /// Whether the driver made new requests available.
    pub fn has_work(&self, mem: &GuestMemory) -> Result<bool, QueueError> {
        Ok(self.avail_idx(mem)? != self.next_avail)
    }

    /// Takes the next available chain, if any.
    pub fn pop(&mut self, mem: &GuestMemory) -> Result<Option<Chain>, QueueError> {
        let avail = self.avail_idx(mem)?;
        let ahead = avail.wrapping_sub(self.next_avail);
        if ahead == 0 {
            return Ok(None);
        }
        if ahead > self.size {
            return Err(QueueError::AvailTooFar {
                avail,
                next: self.next_avail,
                ahead,
                size: self.size,
            });
        }
        // The ring entries are read after the index that published them.
        fence(Ordering::Acquire);
        let slot = u64::from(self.next_avail % self.size);
        let head = mem
            .read_u16(self.avail + 4 + 2 * slot)
            .map_err(|source| QueueError::Ring {
                what: "available ring",
                source,
            })?;
        let chain = self.walk(mem, head)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(chain))
    }

    /// Puts `head` with `len` bytes written into the used ring.
    pub fn add_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<(), QueueError> {
        let ring = |source| QueueError::Ring {
            what: "used ring",
            source,
        };
        let slot = u64::from(self.next_used % self.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(self.used + 4 + 8 * slot, &elem).map_err(ring)?;
        self.next_used = self.next_used.wrapping_add(1);
        // The element is visible before the index that publishes it.
        fence(Ordering::Release);
        mem.write_u16(self.used + 2, self.next_used).map_err(ring)
    }

    /// Whether the driver wants an interrupt for used buffers (no `NO_INTERRUPT` flag).
    pub fn wants_interrupt(&self, mem: &GuestMemory) -> Result<bool, QueueError> {
        fence(Ordering::SeqCst);
        let flags = mem
            .read_u16(self.avail)
            .map_err(|source| QueueError::Ring {
                what: "available ring flags",
                source,
            })?;
        Ok(flags & AVAIL_F_NO_INTERRUPT == 0)
    }

    fn avail_idx(&self, mem: &GuestMemory) -> Result<u16, QueueError> {
        mem.read_u16(self.avail + 2)
            .map_err(|source| QueueError::Ring {
                what: "available ring index",
                source,
            })
    }

    fn walk(&self, mem: &GuestMemory, head: u16) -> Result<Chain, QueueError> {
        let mut chain = Chain {
            head,
            ..Chain::default()
        };
        let mut index = head;
        for _ in 0..self.size {
            if index >= self.size {
                return Err(QueueError::BadIndex {
                    index,
                    size: self.size,
                });
            }
            let mut d = [0u8; DESC_SIZE as usize];
            mem.read(self.desc + DESC_SIZE * u64::from(index), &mut d)
                .map_err(|source| QueueError::Ring {
                    what: "descriptor table",
                    source,
                })?;
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([d[12], d[13]]);
            let next = u16::from_le_bytes([d[14], d[15]]);
            if flags & DESC_F_INDIRECT != 0 {
                return Err(QueueError::Indirect { index });
            }
            let seg = Segment { addr, len };
            if flags & DESC_F_WRITE != 0 {
                chain.writable.push(seg);
            } else if chain.writable.is_empty() {
                chain.readable.push(seg);
            } else {
                return Err(QueueError::ReadableAfterWritable { index });
            }
            if flags & DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            index = next;
        }
        Err(QueueError::ChainTooLong {
            head,
            size: self.size,
        })
    }
}
