//! Dirty-page tracking for a vfsim VF: which guest pages the device wrote (or will write)
//! by DMA, found by walking the rings whenever a doorbell arrives and whenever the pages
//! are collected.

use std::collections::BTreeSet;
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
    /// Doorbells seen while tracking.
    pub doorbells: AtomicU64,
    /// Chains walked while tracking.
    pub chains: AtomicU64,
}

#[derive(Default)]
struct Inner {
    on: bool,
    /// Per queue: its rings and the available index walked up to.
    queues: Vec<(Ring, u16)>,
    dirty: BTreeSet<u64>,
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether tracking is on.
    pub fn is_on(&self) -> bool {
        self.lock().on
    }

    /// Starts tracking the queues `rings` (with the device's used index of each: every
    /// chain from there on may still be written). Walks what is outstanding now.
    pub fn start(&self, mem: &dyn GuestMemory, rings: Vec<(Ring, u16)>) {
        let mut inner = self.lock();
        inner.on = true;
        inner.queues = rings;
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

    /// The pages found since the last call (after a last walk), sorted.
    pub fn take(&self, mem: &dyn GuestMemory) -> Vec<u64> {
        let mut inner = self.lock();
        if !inner.on {
            return Vec::new();
        }
        self.catch_up(&mut inner, mem);
        let mut out = std::mem::take(&mut inner.dirty);
        // The used ring is written on every completion.
        for (ring, _) in &inner.queues {
            ring.used_pages(mem, &mut out);
        }
        out.into_iter().collect()
    }

    fn catch_up(&self, inner: &mut Inner, mem: &dyn GuestMemory) {
        let skip = self.skip_ring_walk.load(Ordering::Relaxed);
        let Inner { queues, dirty, .. } = inner;
        for (ring, walked) in queues.iter_mut() {
            ring.used_pages(mem, dirty);
            let Some(now) = ring.avail_idx(mem) else {
                continue;
            };
            if !skip {
                let n = ring.walk(mem, *walked, now, dirty);
                self.chains.fetch_add(u64::from(n), Ordering::Relaxed);
            }
            *walked = now;
        }
    }
}
