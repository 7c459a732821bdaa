//! Pausing vCPU threads and capturing their state on the thread that owns each vCPU.
//!
//! A [`PauseControl`] per vCPU: the VMM asks for a pause, kicks the thread out of KVM_RUN,
//! and waits until the thread has finished any half-done I/O instruction
//! ([`complete_pending_io`]) and parked. While parked the thread serves capture requests
//! (KVM's vCPU ioctls must come from the thread that runs the vCPU, and the fd lives
//! there), and it leaves the park on resume or when the VM stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use kvm_ioctls::VcpuFd;

use crate::state::vcpu::{complete_pending_io, KvmCaps, VcpuState};

/// How long a pause or capture may take before it is reported as stuck.
const WAIT: Duration = Duration::from_secs(10);

/// Why a pause, capture or resume failed.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// The vCPU thread did not answer in time (it may have stopped).
    #[error("vCPU {0} did not {1} within 10 s")]
    Stuck(u8, &'static str),
    /// A capture was asked of a running vCPU.
    #[error("vCPU {0} is not paused")]
    NotPaused(u8),
    /// KVM refused to give the state.
    #[error(transparent)]
    Capture(#[from] crate::state::StateError),
    /// The vCPU's state cannot be read: KVM's capabilities were not probed.
    #[error("vCPU {0}: KVM capabilities were not probed")]
    NoCaps(u8),
}

#[derive(Default)]
struct Inner {
    paused: bool,
    capture: bool,
    captured: Option<Result<VcpuState, PauseError>>,
}

/// The pause handshake of one vCPU thread.
#[derive(Default)]
pub struct PauseControl {
    /// Mirror of "a pause is wanted", read on every exit without taking the lock.
    want: AtomicBool,
    inner: Mutex<Inner>,
    cv: Condvar,
}

impl PauseControl {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_until(
        &self,
        id: u8,
        what: &'static str,
        mut done: impl FnMut(&mut Inner) -> bool,
    ) -> Result<MutexGuard<'_, Inner>, PauseError> {
        let guard = self.lock();
        let (guard, timeout) = self
            .cv
            .wait_timeout_while(guard, WAIT, |i| !done(i))
            .unwrap_or_else(|e| e.into_inner());
        if timeout.timed_out() {
            return Err(PauseError::Stuck(id, what));
        }
        Ok(guard)
    }

    /// Whether the thread should park (cheap; checked on every exit).
    pub fn wanted(&self) -> bool {
        self.want.load(Ordering::Acquire)
    }

    /// Asks vCPU `id` to pause; `kick` makes it leave KVM_RUN. Returns once it is parked.
    pub fn pause(&self, id: u8, kick: impl FnOnce()) -> Result<(), PauseError> {
        self.want.store(true, Ordering::Release);
        kick();
        self.wait_until(id, "pause", |i| i.paused).map(drop)
    }

    /// The state of the parked vCPU `id`, captured on its thread.
    pub fn capture(&self, id: u8) -> Result<VcpuState, PauseError> {
        {
            let mut i = self.lock();
            if !i.paused {
                return Err(PauseError::NotPaused(id));
            }
            i.capture = true;
            i.captured = None;
        }
        self.cv.notify_all();
        let mut i = self.wait_until(id, "capture its state", |i| i.captured.is_some())?;
        match i.captured.take() {
            Some(Ok(s)) => Ok(s),
            Some(Err(e)) => Err(e),
            None => Err(PauseError::Stuck(id, "capture its state")),
        }
    }

    /// Lets vCPU `id` run again; returns once it has left the park.
    pub fn resume(&self, id: u8) -> Result<(), PauseError> {
        self.want.store(false, Ordering::Release);
        self.cv.notify_all();
        self.wait_until(id, "resume", |i| !i.paused).map(drop)
    }

    /// Wakes a parked thread so that it sees the VM's stop flag.
    pub fn wake(&self) {
        self.cv.notify_all();
    }

    /// The vCPU thread's side: finishes the instruction in progress, parks, serves
    /// captures, and returns on resume or when `stop` is set.
    pub fn park(&self, id: u8, vcpu: &mut VcpuFd, caps: Option<&KvmCaps>, stop: &AtomicBool) {
        if let Err(e) = complete_pending_io(vcpu, u32::from(id)) {
            tracing::warn!("vCPU {id}: completing the pending I/O before pausing failed: {e}");
        }
        let mut i = self.lock();
        i.paused = true;
        self.cv.notify_all();
        loop {
            if i.capture {
                i.capture = false;
                i.captured = Some(match caps {
                    Some(caps) => {
                        VcpuState::capture(vcpu, u32::from(id), caps).map_err(PauseError::from)
                    }
                    None => Err(PauseError::NoCaps(id)),
                });
                self.cv.notify_all();
            }
            if !self.wanted() || stop.load(Ordering::Acquire) {
                break;
            }
            i = self
                .cv
                .wait_timeout(i, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        i.paused = false;
        self.cv.notify_all();
    }
}
