//! Walking a split virtqueue's rings in guest memory to find every guest page the device
//! will write for the requests the driver made available: the device-writable buffers of
//! each descriptor chain (read data, status bytes) and the used ring.
//!
//! The rings are guest memory, so everything read here may be garbage: chains are cut at
//! the queue size, indirect tables at their length, and unreadable memory ends the walk
//! of that chain. Over-reporting is harmless (a page sent twice); under-reporting loses
//! data, so when in doubt a page is reported.

use std::collections::BTreeSet;

use crate::attach::GuestMemory;

pub(super) const DESC_F_NEXT: u16 = 1;
pub(super) const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const PAGE: u64 = 4096;
/// Largest indirect table walked (the virtio limit for a split ring is the queue size; a
/// guest writing garbage must not make us read megabytes).
const MAX_INDIRECT: u64 = 1024;

/// Where one queue's rings are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    /// Queue size (a power of two, at most 32768).
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
}

fn read_u16(mem: &dyn GuestMemory, gpa: u64) -> Option<u16> {
    let mut b = [0u8; 2];
    mem.read(gpa, &mut b).ok()?;
    Some(u16::from_le_bytes(b))
}

struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(mem: &dyn GuestMemory, table: u64, i: u64) -> Option<Desc> {
    let mut b = [0u8; 16];
    mem.read(table.checked_add(i.checked_mul(16)?)?, &mut b)
        .ok()?;
    Some(Desc {
        addr: u64::from_le_bytes(b[0..8].try_into().ok()?),
        len: u32::from_le_bytes(b[8..12].try_into().ok()?),
        flags: u16::from_le_bytes(b[12..14].try_into().ok()?),
        next: u16::from_le_bytes(b[14..16].try_into().ok()?),
    })
}

/// Adds the pages of `[addr, addr + len)` to `pages`, up to the first page that is not
/// guest RAM (the device cannot write there, and a garbage length must not make us list
/// billions of pages).
pub fn add_range(mem: &dyn GuestMemory, pages: &mut BTreeSet<u64>, addr: u64, len: u64) {
    if len == 0 {
        return;
    }
    let end = addr.saturating_add(len - 1) / PAGE;
    for p in addr / PAGE..=end {
        if !pages.contains(&(p * PAGE)) && mem.read(p * PAGE, &mut [0u8; 1]).is_err() {
            return;
        }
        pages.insert(p * PAGE);
    }
}

impl Ring {
    /// The available ring's `idx` (how many entries the driver has published).
    pub fn avail_idx(&self, mem: &dyn GuestMemory) -> Option<u16> {
        read_u16(mem, self.avail.checked_add(2)?)
    }

    /// The pages of the used ring (flags, idx, entries, avail_event).
    pub fn used_pages(&self, mem: &dyn GuestMemory, pages: &mut BTreeSet<u64>) {
        add_range(mem, pages, self.used, 6 + 8 * u64::from(self.size));
    }

    /// The used ring's `idx` (how many requests the device has completed).
    pub fn used_idx(&self, mem: &dyn GuestMemory) -> Option<u16> {
        read_u16(mem, self.used.checked_add(2)?)
    }

    /// The head of the chain completed at used-ring position `pos` (wrapping).
    pub fn used_head(&self, mem: &dyn GuestMemory, pos: u16) -> Option<u16> {
        if self.size == 0 {
            return None;
        }
        let slot = u64::from(pos % self.size);
        let mut b = [0u8; 4];
        mem.read(self.used.checked_add(4 + 8 * slot)?, &mut b)
            .ok()?;
        // A head beyond the ring is garbage: no chain of ours has it.
        u16::try_from(u32::from_le_bytes(b)).ok()
    }

    /// Calls `chain(head, pages)` with the device-writable pages of each chain published
    /// at available-ring positions `from..to` (wrapping u16 indices), oldest first. At
    /// most one ring's worth is walked. Returns how many chains were walked.
    pub fn walk(
        &self,
        mem: &dyn GuestMemory,
        from: u16,
        to: u16,
        mut chain: impl FnMut(u16, BTreeSet<u64>),
    ) -> u32 {
        if self.size == 0 {
            return 0;
        }
        let count = to.wrapping_sub(from).min(self.size);
        let first = to.wrapping_sub(count);
        for k in 0..count {
            let pos = u64::from(first.wrapping_add(k) % self.size);
            let Some(head) = self
                .avail
                .checked_add(4 + 2 * pos)
                .and_then(|a| read_u16(mem, a))
            else {
                continue;
            };
            let mut pages = BTreeSet::new();
            self.walk_chain(mem, head, &mut pages);
            chain(head, pages);
        }
        u32::from(count)
    }

    fn walk_chain(&self, mem: &dyn GuestMemory, head: u16, pages: &mut BTreeSet<u64>) {
        let mut i = head;
        for _ in 0..self.size {
            if i >= self.size {
                return;
            }
            let Some(d) = read_desc(mem, self.desc, u64::from(i)) else {
                return;
            };
            if d.flags & DESC_F_INDIRECT != 0 {
                let n = (u64::from(d.len) / 16).min(MAX_INDIRECT);
                walk_indirect(mem, d.addr, n, pages);
            } else if d.flags & DESC_F_WRITE != 0 {
                add_range(mem, pages, d.addr, u64::from(d.len));
            }
            if d.flags & DESC_F_NEXT == 0 {
                return;
            }
            i = d.next;
        }
    }
}

fn walk_indirect(mem: &dyn GuestMemory, table: u64, n: u64, pages: &mut BTreeSet<u64>) {
    let mut i = 0u64;
    for _ in 0..n {
        if i >= n {
            return;
        }
        let Some(d) = read_desc(mem, table, i) else {
            return;
        };
        if d.flags & DESC_F_WRITE != 0 {
            add_range(mem, pages, d.addr, u64::from(d.len));
        }
        if d.flags & DESC_F_NEXT == 0 {
            return;
        }
        i = u64::from(d.next);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_mem::Mem;
    use super::*;

    const RING: Ring = Ring {
        size: 8,
        desc: 0x1000,
        avail: 0x2000,
        used: 0x3000,
    };

    #[test]
    fn writable_buffers_of_published_chains_are_found() {
        let mem = Mem::new(0x40000);
        // Chain 0: header (read-only), data 0x10000+0x2000 (device writes), status.
        mem.desc(0x1000, 0, 0x8000, 16, DESC_F_NEXT, 1);
        mem.desc(0x1000, 1, 0x10000, 0x2000, DESC_F_NEXT | DESC_F_WRITE, 2);
        mem.desc(0x1000, 2, 0x20ff0, 1, DESC_F_WRITE, 0);
        // Chain 3: indirect table at 0x30000 with a writable 0x100 bytes at 0x33000.
        mem.desc(0x1000, 3, 0x30000, 32, DESC_F_INDIRECT, 0);
        mem.desc(0x30000, 0, 0x9000, 16, DESC_F_NEXT, 1);
        mem.desc(0x30000, 1, 0x33000, 0x100, DESC_F_WRITE, 0);
        // Published: positions 0 and 1 with heads 0 and 3.
        mem.put(0x2004, &0u16.to_le_bytes());
        mem.put(0x2006, &3u16.to_le_bytes());
        mem.put(0x2002, &2u16.to_le_bytes());
        assert_eq!(RING.avail_idx(&mem), Some(2));
        let mut pages = BTreeSet::new();
        assert_eq!(RING.walk(&mem, 0, 2, |_, p| pages.extend(p)), 2);
        let got: Vec<u64> = pages.into_iter().collect();
        assert_eq!(got, vec![0x10000, 0x11000, 0x20000, 0x33000]);
        let mut used = BTreeSet::new();
        RING.used_pages(&mem, &mut used);
        assert_eq!(used.into_iter().collect::<Vec<_>>(), vec![0x3000]);
    }

    #[test]
    fn garbage_rings_end_the_walk_without_hanging() {
        let mem = Mem::new(0x40000);
        // A loop: 0 -> 1 -> 0 ... ; heads out of range; addresses outside memory.
        mem.desc(0x1000, 0, 0x10000, 0x1000, DESC_F_NEXT | DESC_F_WRITE, 1);
        mem.desc(0x1000, 1, 0x11000, 0x1000, DESC_F_NEXT | DESC_F_WRITE, 0);
        mem.desc(0x1000, 2, u64::MAX - 10, u32::MAX, DESC_F_INDIRECT, 0);
        for (i, head) in [0u16, 9, 2, 0xffff].iter().enumerate() {
            mem.put(0x2004 + 2 * i as u64, &head.to_le_bytes());
        }
        let mut pages = BTreeSet::new();
        RING.walk(&mem, 0, 4, |_, p| pages.extend(p));
        assert_eq!(
            pages.into_iter().collect::<Vec<_>>(),
            vec![0x10000, 0x11000]
        );
        // A huge index jump walks at most one ring's worth.
        let mut pages = BTreeSet::new();
        assert_eq!(RING.walk(&mem, 0, 60000, |_, p| pages.extend(p)), 8);
        // Unreadable rings: nothing, no panic.
        let far = Ring {
            size: 8,
            desc: u64::MAX - 3,
            avail: u64::MAX - 1,
            used: u64::MAX - 2,
        };
        let mut pages = BTreeSet::new();
        far.walk(&mem, 0, 8, |_, p| pages.extend(p));
        assert!(far.avail_idx(&mem).is_none());
        far.used_pages(&mem, &mut pages);
        add_range(&mem, &mut pages, u64::MAX, 1);
        assert!(pages.is_empty());
        // A huge writable descriptor is cut where guest memory ends.
        add_range(&mem, &mut pages, 0x3f000, u64::from(u32::MAX));
        assert_eq!(pages.into_iter().collect::<Vec<_>>(), vec![0x3f000]);
    }
}
