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
    /// The chain does not have the shape the device type requires (e.g. a virtio-net
    /// transmit chain with device-writable buffers, or a frame over 64 KiB).
    #[error("the descriptor chain starting at {head} is malformed: {why}")]
    Malformed {
        /// Head index.
        head: u16,
        /// What is wrong with it.
        why: String,
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

impl Chain {
    /// Total length of the device-readable buffers.
    pub fn readable_len(&self) -> u64 {
        total_len(&self.readable)
    }

    /// Total length of the device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        total_len(&self.writable)
    }
}

/// Total length of `segs`.
pub fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// `addr + offset`, or why it does not exist.
pub fn addr_at(addr: u64, offset: u64) -> Result<u64, String> {
    addr.checked_add(offset)
        .ok_or_else(|| format!("buffer address {addr:#x} + {offset:#x} wraps around"))
}

/// Copies `out.len()` bytes from the buffers `segs`, starting `skip` bytes in; fails if
/// they hold fewer.
pub fn gather(
    mem: &GuestMemory,
    segs: &[Segment],
    mut skip: u64,
    out: &mut [u8],
) -> Result<(), String> {
    let mut done = 0usize;
    for seg in segs {
        if done == out.len() {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = ((seg_len - skip) as usize).min(out.len() - done);
        mem.read(addr_at(seg.addr, skip)?, &mut out[done..done + n])
            .map_err(|e| e.to_string())?;
        done += n;
        skip = 0;
    }
    if done < out.len() {
        return Err(format!(
            "the buffers hold fewer than the {} bytes wanted",
            out.len()
        ));
    }
    Ok(())
}

/// Writes each of `parts` in turn into the buffers `segs` (through the logged writes of
/// [`GuestMemory`]), never past their end: fails without writing anything if they are
/// shorter than the parts together.
pub fn scatter(mem: &GuestMemory, segs: &[Segment], parts: &[&[u8]]) -> Result<(), String> {
    let want: u64 = parts.iter().map(|p| p.len() as u64).sum();
    if total_len(segs) < want {
        return Err(format!(
            "the buffers hold {} bytes, fewer than the {want} to write",
            total_len(segs)
        ));
    }
    let mut segs = segs.iter().filter(|s| s.len > 0);
    let mut cur: Option<(Segment, u64)> = None;
    for part in parts {
        let mut done = 0usize;
        while done < part.len() {
            let (seg, used) = match cur {
                Some((seg, used)) if used < u64::from(seg.len) => (seg, used),
                _ => {
                    // The length check above guarantees a next buffer.
                    let seg = *segs.next().ok_or("buffers ran out")?;
                    (seg, 0)
                }
            };
            let n = ((u64::from(seg.len) - used) as usize).min(part.len() - done);
            mem.write(addr_at(seg.addr, used)?, &part[done..done + n])
                .map_err(|e| e.to_string())?;
            done += n;
            cur = Some((seg, used + n as u64));
        }
    }
    Ok(())
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
