//! Dirty-page tracking for a vfsim VF: which guest pages the device wrote (or will write)
//! by DMA, found by walking the rings whenever a doorbell arrives and whenever the pages
//! are collected.
//!
//! A request's buffers are dirty from the moment it is published until the first
//! collection after the device completed it: the migration copies each collected page
//! right after collecting, so a page collected while the request is still in flight is
//! copied before the device's write and must be collected again. The device writes the
//! data before it publishes the completion in the used ring, so once a completion is seen
//! the next collection copies the final data.
//!
//! vfsim completes the requests of a queue in order; completions are matched to chains by
//! head index all the same (oldest first), as a device completing out of order would need.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::rings::Ring;
use crate::attach::GuestMemory;

/// The tracking state of one device.
#[derive(Default)]
pub struct Tracker {
    inner: Mutex<Inner>,
    /// Test-only switch: skip the ring walk (only the used ring is reported), to show that
    /// a dirty-tracking test catches an incomplete mediator.
    pub skip_ring_walk: AtomicBool,
    /// Test-only switch: queues (bit `n`: virtqueue `n`, below 64) that are not tracked at
    /// all, neither their buffers nor their used ring; e.g. a NIC's receive queue, to show
    /// that a migration test catches the loss of the packets the device wrote there.
    pub skipped_queues: AtomicU64,
    /// Doorbells seen while tracking.
    pub doorbells: AtomicU64,
    /// Chains walked while tracking.
    pub chains: AtomicU64,
}

#[derive(Default)]
struct Inner {
    on: bool,
    queues: Vec<Queue>,
    /// Pages to report at the next collection (chains completed since the last one).
    dirty: BTreeSet<u64>,
}

/// Where tracking of one queue starts.
pub struct QueueStart {
    /// The virtqueue's index.
    pub index: u16,
    /// Its rings.
    pub ring: Ring,
    /// The available-ring position to walk from: every chain from there on may still be
    /// written.
    pub walk_from: u16,
    /// The device's used index: completions from there on are matched to chains.
    pub used_idx: u16,
}

/// One queue being tracked.
struct Queue {
    index: u16,
    ring: Ring,
    /// Available-ring position walked up to.
    walked: u16,
    /// Used-ring position whose completions have been matched up to.
    used_seen: u16,
    /// Chains published and not yet seen completed, oldest first: head and the pages the
    /// device may write for it. At most a ring's worth (more cannot be outstanding).
    in_flight: VecDeque<(u16, BTreeSet<u64>)>,
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether tracking is on.
    pub fn is_on(&self) -> bool {
        self.lock().on
    }

    /// Starts tracking `queues`. Walks what is outstanding now.
    pub fn start(&self, mem: &dyn GuestMemory, queues: Vec<QueueStart>) {
        let mut inner = self.lock();
        inner.on = true;
        inner.queues = queues
            .into_iter()
            .map(|q| Queue {
                index: q.index,
                ring: q.ring,
                walked: q.walk_from,
                used_seen: q.used_idx,
                in_flight: VecDeque::new(),
            })
            .collect();
        inner.dirty.clear();
        self.catch_up(&mut inner, mem);
    }

    /// Stops tracking and forgets the pages.
    pub fn stop(&self) {
        let mut inner = self.lock();
        inner.on = false;
        inner.queues.clear();
        inner.dirty.clear();
    }

    /// A doorbell: walk the chains published since the last walk.
    pub fn doorbell(&self, mem: &dyn GuestMemory) {
        let mut inner = self.lock();
        if inner.on {
            self.doorbells.fetch_add(1, Ordering::Relaxed);
            self.catch_up(&mut inner, mem);
        }
    }

    /// The pages to copy now, sorted: those of chains completed since the last call, those
    /// of chains still in flight (again), and the used rings.
    pub fn take(&self, mem: &dyn GuestMemory) -> Vec<u64> {
        let mut inner = self.lock();
        if !inner.on {
            return Vec::new();
        }
        self.catch_up(&mut inner, mem);
        let mut out = std::mem::take(&mut inner.dirty);
        for q in inner.queues.iter().filter(|q| !self.skipped(q.index)) {
            for (_, pages) in &q.in_flight {
                out.extend(pages);
            }
            // The used ring is written on every completion.
            q.ring.used_pages(mem, &mut out);
        }
        out.into_iter().collect()
    }

    /// Whether the test switch took queue `index` out of tracking.
    fn skipped(&self, index: u16) -> bool {
        index < 64 && self.skipped_queues.load(Ordering::Relaxed) & (1 << index) != 0
    }

    fn catch_up(&self, inner: &mut Inner, mem: &dyn GuestMemory) {
        let skip_walk = self.skip_ring_walk.load(Ordering::Relaxed);
        let Inner { queues, dirty, .. } = inner;
        for q in queues.iter_mut() {
            let skip = skip_walk || self.skipped(q.index);
            // (The used ring's own pages are added at each collection, in `take`.)
            // The used index first: every chain completed by then was published before,
            // so the walk below has it in flight when its completion is matched.
            let used_now = q.ring.used_idx(mem);
            if let Some(now) = q.ring.avail_idx(mem) {
                if !skip {
                    let Queue {
                        ring, in_flight, ..
                    } = q;
                    let n = ring.walk(mem, q.walked, now, |head, pages| {
                        in_flight.push_back((head, pages))
                    });
                    self.chains.fetch_add(u64::from(n), Ordering::Relaxed);
                    // More than a ring's worth outstanding: completions were missed (or
                    // the guest writes garbage). Report the oldest once more and let go.
                    while in_flight.len() > usize::from(ring.size) {
                        if let Some((_, pages)) = in_flight.pop_front() {
                            dirty.extend(pages);
                        }
                    }
                }
                q.walked = now;
            }
            if let Some(used_now) = used_now {
                let mut ignored = BTreeSet::new();
                let sink = if self.skipped(q.index) {
                    &mut ignored
                } else {
                    &mut *dirty
                };
                q.complete(mem, used_now, sink);
            }
        }
    }
}

impl Queue {
    /// Matches the completions up to `used_now` to chains in flight; their pages go to
    /// `dirty` for the next collection.
    fn complete(&mut self, mem: &dyn GuestMemory, used_now: u16, dirty: &mut BTreeSet<u64>) {
        // The used ring holds one ring's worth: older entries are overwritten.
        let count = used_now.wrapping_sub(self.used_seen).min(self.ring.size);
        let first = used_now.wrapping_sub(count);
        for k in 0..count {
            let Some(head) = self.ring.used_head(mem, first.wrapping_add(k)) else {
                continue;
            };
            // A completion of no chain we walked (published before tracking, or garbage)
            // matches nothing.
            if let Some(i) = self.in_flight.iter().position(|(h, _)| *h == head) {
                if let Some((_, pages)) = self.in_flight.remove(i) {
                    dirty.extend(pages);
                }
            }
        }
        self.used_seen = used_now;
    }
}

#[cfg(test)]
mod tests {
    use super::super::rings::{DESC_F_NEXT, DESC_F_WRITE};
    use super::super::test_mem::Mem;
    use super::*;

    const RING: Ring = Ring {
        size: 16,
        desc: 0x1000,
        avail: 0x2000,
        used: 0x3000,
    };
    const DATA: u64 = 0x10000;
    const STATUS: u64 = 0x20000;

    /// The driver publishes a read request with head `head` (data page `data`) at
    /// available position `pos`.
    fn publish(mem: &Mem, pos: u16, head: u16, data: u64) {
        let d = u64::from(head);
        mem.desc(RING.desc, d, 0x8000, 16, DESC_F_NEXT, head + 1);
        mem.desc(
            RING.desc,
            d + 1,
            data,
            4096,
            DESC_F_NEXT | DESC_F_WRITE,
            head + 2,
        );
        mem.desc(RING.desc, d + 2, STATUS + 16 * d, 1, DESC_F_WRITE, 0);
        let slot = u64::from(pos % RING.size);
        mem.put(RING.avail + 4 + 2 * slot, &head.to_le_bytes());
        mem.put(RING.avail + 2, &(pos + 1).to_le_bytes());
    }

    /// The device completes `head` at used position `pos`.
    fn complete(mem: &Mem, pos: u16, head: u16) {
        let slot = u64::from(pos % RING.size);
        mem.put(RING.used + 4 + 8 * slot, &u32::from(head).to_le_bytes());
        mem.put(RING.used + 2, &(pos + 1).to_le_bytes());
    }

    /// Tracking from position 0 of an idle queue.
    fn start() -> QueueStart {
        QueueStart {
            index: 0,
            ring: RING,
            walk_from: 0,
            used_idx: 0,
        }
    }

    fn has(pages: &[u64], page: u64) -> bool {
        pages.contains(&page)
    }

    /// The race a migration hit: the pages were collected (and copied) between the
    /// doorbell and the device's write; the next collection must report them again.
    #[test]
    fn a_request_in_flight_stays_dirty_until_collected_after_its_completion() {
        let mem = Mem::new(0x40000);
        let t = Tracker::default();
        t.start(&mem, vec![start()]);
        publish(&mem, 0, 0, DATA);
        t.doorbell(&mem);
        assert!(has(&t.take(&mem), DATA), "published: dirty");
        assert!(has(&t.take(&mem), DATA), "still in flight: dirty again");
        complete(&mem, 0, 0);
        let after = t.take(&mem);
        assert!(has(&after, DATA), "completed since the last collection");
        assert!(has(&after, STATUS), "status byte");
        assert!(has(&after, RING.used), "used ring");
        let later = t.take(&mem);
        assert!(!has(&later, DATA), "done with: {later:x?}");
        assert_eq!(later, vec![RING.used]);
    }

    #[test]
    fn completions_are_matched_by_head_even_out_of_order_and_with_heads_reused() {
        let mem = Mem::new(0x40000);
        let t = Tracker::default();
        t.start(&mem, vec![start()]);
        publish(&mem, 0, 0, DATA);
        publish(&mem, 1, 3, DATA + 0x1000);
        t.doorbell(&mem);
        // Head 3 completes first; head 0 stays in flight.
        complete(&mem, 0, 3);
        let first = t.take(&mem);
        assert!(has(&first, DATA) && has(&first, DATA + 0x1000));
        let second = t.take(&mem);
        assert!(has(&second, DATA) && !has(&second, DATA + 0x1000));
        // Head 3 reused for a new request, published (and walked) before the collection
        // that sees head 0 complete.
        publish(&mem, 2, 3, DATA + 0x2000);
        t.doorbell(&mem);
        complete(&mem, 1, 0);
        let third = t.take(&mem);
        assert!(has(&third, DATA) && has(&third, DATA + 0x2000));
        let fourth = t.take(&mem);
        assert!(!has(&fourth, DATA) && has(&fourth, DATA + 0x2000));
    }

    #[test]
    fn requests_published_before_tracking_and_not_completed_are_in_flight() {
        let mem = Mem::new(0x40000);
        // The device picked up position 0 (last_avail 1) and completed nothing yet.
        publish(&mem, 0, 0, DATA);
        let t = Tracker::default();
        t.start(&mem, vec![start()]);
        assert!(has(&t.take(&mem), DATA));
        assert!(has(&t.take(&mem), DATA));
    }

    #[test]
    fn garbage_completions_neither_panic_nor_grow_without_bound() {
        let mem = Mem::new(0x40000);
        let t = Tracker::default();
        t.start(&mem, vec![start()]);
        // The guest publishes far more than a ring's worth, the "device" completes heads
        // that were never published.
        for pos in 0..40u16 {
            publish(&mem, pos, 0, DATA);
            t.doorbell(&mem);
            complete(&mem, pos, 1);
        }
        mem.put(RING.used + 2, &u16::MAX.to_le_bytes());
        t.doorbell(&mem);
        assert!(t.lock().queues[0].in_flight.len() <= usize::from(RING.size));
        assert!(has(&t.take(&mem), DATA));
    }

    #[test]
    fn the_test_switch_reports_only_the_used_ring() {
        let mem = Mem::new(0x40000);
        let t = Tracker::default();
        t.skip_ring_walk.store(true, Ordering::Relaxed);
        t.start(&mem, vec![start()]);
        publish(&mem, 0, 0, DATA);
        t.doorbell(&mem);
        complete(&mem, 0, 0);
        assert_eq!(t.take(&mem), vec![RING.used]);
    }

    #[test]
    fn a_skipped_queue_reports_nothing_and_the_others_everything() {
        const RX: Ring = Ring {
            size: 16,
            desc: 0x4000,
            avail: 0x5000,
            used: 0x6000,
        };
        let mem = Mem::new(0x40000);
        let t = Tracker::default();
        t.skipped_queues.store(1, Ordering::Relaxed);
        let rx = QueueStart {
            index: 0,
            ring: RX,
            walk_from: 0,
            used_idx: 0,
        };
        let tx = QueueStart {
            index: 1,
            ..start()
        };
        t.start(&mem, vec![rx, tx]);
        // A receive buffer posted on queue 0 (the skipped one) and a request on queue 1.
        mem.desc(RX.desc, 0, DATA + 0x8000, 1514, DESC_F_WRITE, 0);
        mem.put(RX.avail + 4, &0u16.to_le_bytes());
        mem.put(RX.avail + 2, &1u16.to_le_bytes());
        publish(&mem, 0, 0, DATA);
        t.doorbell(&mem);
        let pages = t.take(&mem);
        assert!(has(&pages, DATA) && has(&pages, RING.used), "{pages:x?}");
        assert!(
            !has(&pages, DATA + 0x8000) && !has(&pages, RX.used),
            "{pages:x?}"
        );
        // Switched back on, the receive queue's used ring is reported again.
        t.skipped_queues.store(0, Ordering::Relaxed);
        let pages = t.take(&mem);
        assert!(has(&pages, RX.used), "{pages:x?}");
    }
}
