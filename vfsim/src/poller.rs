//! The poller thread: it owns queue processing. It watches the doorbells in the notify
//! page (a memfd the VMM may map straight into the guest, so the device never sees those
//! writes) and the available rings, spinning briefly after activity and then backing
//! off with sleeps of up to [`MAX_SLEEP`]. Trapped doorbell writes land in the same page
//! and [`Poller::kick`] the thread awake (an eventfd), so every queue is processed from
//! one place. The sleeps are `ppoll()`s on that eventfd and on the personality's wake
//! descriptor ([`crate::engine::Engine::wake_fd`]: a NIC's tap while it has receive
//! buffers), so a frame arriving is taken at once, not after the sleep.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
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
    /// The wake-up eventfd could not be created.
    #[error("creating the queue poller's eventfd failed: {0}")]
    Eventfd(#[source] io::Error),
    /// A doorbell offset is outside the notify page.
    #[error("arming the doorbell at offset {offset:#x} of the notify page failed: {reason}")]
    Doorbell {
        /// Offset in the page mapping.
        offset: u64,
        /// What failed.
        reason: String,
    },
}

#[derive(Debug)]
struct Flags {
    stop: AtomicBool,
    kicked: AtomicBool,
    doorbells: AtomicU64,
    /// Written to wake the thread from its `ppoll()`.
    wake: OwnedFd,
}

impl Flags {
    fn new() -> io::Result<Flags> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Flags {
            stop: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
            doorbells: AtomicU64::new(0),
            // SAFETY: a new descriptor nothing else owns.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from `one` to the eventfd this struct owns. A full
        // counter (EAGAIN) means a wake-up is pending anyway.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn drain(&self) {
        let mut v = 0u64;
        // SAFETY: reads at most 8 bytes into `v` from the nonblocking eventfd owned here.
        let _ = unsafe { libc::read(self.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
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
}

impl PollerHandle {
    /// Wakes the thread now (see [`Poller::kick`]).
    pub fn kick(&self) {
        self.flags.kicked.store(true, Ordering::Release);
        self.flags.wake();
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
        let flags = Arc::new(Flags::new().map_err(PollerError::Eventfd)?);
        let f = flags.clone();
        let thread = thread::Builder::new()
            .name("vfsim-poller".into())
            .spawn(move || run(&engine, &page, &doorbells, &f))
            .map_err(PollerError::Spawn)?;
        Ok(Poller {
            handle: PollerHandle { flags },
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
        self.handle.flags.wake();
        if let Some(t) = self.thread.take() {
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
        let (worked, live, wake_fd) = {
            let mut e = engine.lock().unwrap_or_else(|p| p.into_inner());
            let worked = e.process();
            (worked, e.can_process(), e.wake_fd())
        };
        if worked || rang {
            idle = 0;
            continue;
        }
        if !live {
            sleep(flags, None, MAX_SLEEP);
            continue;
        }
        idle = idle.saturating_add(1);
        if idle < SPIN_ROUNDS {
            std::hint::spin_loop();
            thread::yield_now();
        } else {
            let shift = (idle - SPIN_ROUNDS).min(16);
            let time = MIN_SLEEP.saturating_mul(1 << shift).min(MAX_SLEEP);
            sleep(flags, wake_fd, time);
        }
    }
}

/// Waits up to `time` for a kick, or for `extra` to become readable. `extra` belongs to
/// the engine, which outlives this thread (the poller holds an `Arc` of it), so it stays
/// open while waited on.
fn sleep(flags: &Flags, extra: Option<RawFd>, time: Duration) {
    let mut fds = [
        libc::pollfd {
            fd: flags.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: extra.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ts = libc::timespec {
        tv_sec: time.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(time.subsec_nanos() as i32),
    };
    let n = if extra.is_some() { 2 } else { 1 };
    // SAFETY: `fds` holds `n` valid pollfds, `ts` is a valid timespec, no signal mask.
    let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), n, &ts, std::ptr::null()) };
    if rc > 0 && fds[0].revents & libc::POLLIN != 0 {
        flags.drain();
    }
}
