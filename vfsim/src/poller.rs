//! The poller thread: it owns queue processing. It watches the doorbells in the notify
//! page (a memfd the VMM may map straight into the guest, so the device never sees those
//! writes) and the available rings, spinning briefly after activity and then backing
//! off with sleeps of up to [`MAX_SLEEP`]. Trapped doorbell writes land in the same page
//! and [`Poller::kick`] the thread awake, so every queue is processed from one place.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};
use std::time::Duration;

use crate::engine::Engine;
use crate::mmap::Mapping;

/// What a doorbell word holds while no doorbell is pending. Drivers write a queue
/// index (16 bits), which always differs from this, so even repeated writes of the
/// same index are seen.
pub const DOORBELL_IDLE: u32 = u32::MAX;
/// Rounds of busy polling after the last activity before sleeping.
pub const SPIN_ROUNDS: u32 = 64;
/// Shortest sleep once idle.
pub const MIN_SLEEP: Duration = Duration::from_micros(16);
/// Longest sleep once idle.
pub const MAX_SLEEP: Duration = Duration::from_millis(1);

/// Why the poller could not start.
#[derive(Debug, thiserror::Error)]
pub enum PollerError {
    /// The thread could not be spawned.
    #[error("spawning the queue poller thread failed: {0}")]
    Spawn(#[source] io::Error),
    /// A doorbell offset is outside the notify page.
    #[error("arming the doorbell at offset {offset:#x} of the notify page failed: {reason}")]
    Doorbell {
        /// Offset in the page mapping.
        offset: u64,
        /// What failed.
        reason: String,
    },
}

#[derive(Debug, Default)]
struct Flags {
    stop: AtomicBool,
    kicked: AtomicBool,
    doorbells: AtomicU64,
}

/// The running poller; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct Poller {
    handle: PollerHandle,
    thread: Option<JoinHandle<()>>,
}

/// A handle other threads keep to wake the poller and read its counters.
#[derive(Debug, Clone)]
pub struct PollerHandle {
    flags: Arc<Flags>,
    thread: Thread,
}

impl PollerHandle {
    /// Wakes the thread now (see [`Poller::kick`]).
    pub fn kick(&self) {
        self.flags.kicked.store(true, Ordering::Release);
        self.thread.unpark();
    }

    /// Doorbells seen in the notify page (several writes between two polls count once).
    pub fn doorbells(&self) -> u64 {
        self.flags.doorbells.load(Ordering::Relaxed)
    }
}

impl Poller {
    /// Starts polling `doorbells` (offsets in `page`) and processing `engine`'s queues.
    pub fn spawn(
        engine: Arc<Mutex<Engine>>,
        page: Arc<Mapping>,
        doorbells: Vec<u64>,
    ) -> Result<Self, PollerError> {
        for &offset in &doorbells {
            page.write_u32_volatile(offset, DOORBELL_IDLE)
                .map_err(|e| PollerError::Doorbell {
                    offset,
                    reason: e.to_string(),
                })?;
        }
        let flags = Arc::new(Flags::default());
        let f = flags.clone();
        let thread = thread::Builder::new()
            .name("vfsim-poller".into())
            .spawn(move || run(&engine, &page, &doorbells, &f))
            .map_err(PollerError::Spawn)?;
        Ok(Poller {
            handle: PollerHandle {
                flags,
                thread: thread.thread().clone(),
            },
            thread: Some(thread),
        })
    }

    /// Wakes the thread now (a trapped doorbell, or a register change).
    pub fn kick(&self) {
        self.handle.kick();
    }

    /// A handle for other threads (the PF side).
    pub fn handle(&self) -> PollerHandle {
        self.handle.clone()
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.handle.flags.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn run(engine: &Mutex<Engine>, page: &Mapping, doorbells: &[u64], flags: &Flags) {
    let mut idle = 0u32;
    while !flags.stop.load(Ordering::Acquire) {
        let mut rang = flags.kicked.swap(false, Ordering::AcqRel);
        for &offset in doorbells {
            if page
                .read_u32_volatile(offset)
                .is_ok_and(|v| v != DOORBELL_IDLE)
            {
                rang = true;
                flags.doorbells.fetch_add(1, Ordering::Relaxed);
                let _ = page.write_u32_volatile(offset, DOORBELL_IDLE);
            }
        }
        let (worked, live) = {
            let mut e = engine.lock().unwrap_or_else(|p| p.into_inner());
            let worked = e.process();
            (worked, e.can_process())
        };
        if worked || rang {
            idle = 0;
            continue;
        }
        if !live {
            thread::park_timeout(MAX_SLEEP);
            continue;
        }
        idle = idle.saturating_add(1);
        if idle < SPIN_ROUNDS {
            std::hint::spin_loop();
            thread::yield_now();
        } else {
            let shift = (idle - SPIN_ROUNDS).min(16);
            let sleep = MIN_SLEEP.saturating_mul(1 << shift).min(MAX_SLEEP);
            thread::park_timeout(sleep);
        }
    }
}
