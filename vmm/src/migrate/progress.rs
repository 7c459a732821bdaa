//! The source's migration status, shared with the API.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;

/// Where a migration is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// None started.
    #[default]
    None,
    /// Connecting and checking the destination.
    Setup,
    /// Copying while the guest runs.
    PreCopy,
    /// Guest stopped, sending the rest.
    StopAndCopy,
    /// The destination runs the guest; this VMM exits.
    Completed,
    /// Failed or cancelled; the guest runs here.
    Failed,
}

/// Progress of the current (or last) migration.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    /// The phase.
    pub phase: Phase,
    /// The destination.
    pub url: String,
    /// Pre-copy iteration (0: the first full pass).
    pub iteration: u32,
    /// Bytes sent so far.
    pub bytes: u64,
    /// RAM pages sent so far (pages sent again count again).
    pub pages: u64,
    /// Dirty pages found by the last pass (RAM and device).
    pub dirty_pages: u64,
    /// Of which the devices reported.
    pub device_dirty_pages: u64,
    /// Pages dirtied per second over the last pass.
    pub dirty_rate_pages_s: f64,
    /// Measured bandwidth in MB/s.
    pub bandwidth_mb_s: f64,
    /// Expected downtime of stopping now, in ms.
    pub expected_downtime_ms: f64,
    /// The budget.
    pub downtime_budget_ms: u64,
    /// Downtime of the completed migration (guest stopped here until it ran there), ms.
    pub downtime_ms: Option<f64>,
    /// Where the downtime went, once completed.
    pub stop_and_copy: Option<StopAndCopyTimes>,
    /// Total time so far, ms.
    pub total_ms: f64,
    /// Why it failed.
    pub error: Option<String>,
}

/// The steps of stop-and-copy, in ms from the guest's stop.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StopAndCopyTimes {
    /// The vCPUs are parked.
    pub vcpus_paused_ms: f64,
    /// The devices are stopped.
    pub devices_stopped_ms: f64,
    /// The last dirty pages and the final state are sent: the source's part of the
    /// downtime (what QEMU reports as `downtime`).
    pub sent_ms: f64,
    /// The destination answered that the guest runs there ([`Status::downtime_ms`]).
    pub resumed_ms: f64,
}

/// The status, behind a lock.
#[derive(Default)]
pub struct Tracker {
    status: Mutex<Status>,
    /// Bytes on the wire so far, counted as they leave (so progress shows during a pass).
    sent: Arc<AtomicU64>,
    /// Someone asked for the status during this migration (a `vmm ctl migrate` following it).
    followed: AtomicBool,
    /// A client has been told the migration completed.
    completion_told: Mutex<bool>,
    told: Condvar,
}

impl Tracker {
    /// The status now (the byte count live while a migration runs).
    pub fn get(&self) -> Status {
        let mut s = self.lock().clone();
        if matches!(s.phase, Phase::PreCopy | Phase::StopAndCopy) {
            s.bytes = s.bytes.max(self.sent.load(Ordering::Relaxed));
        }
        s
    }

    /// The status as a client is told it: a client told "completed" is remembered, so
    /// the source can wait for it before exiting ([`Self::wait_completion_told`]).
    pub fn report(&self) -> Status {
        let s = self.get();
        if s.phase != Phase::None {
            self.followed.store(true, Ordering::Relaxed);
        }
        if s.phase == Phase::Completed {
            *self
                .completion_told
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = true;
            self.told.notify_all();
        }
        s
    }

    /// Starts a new migration's status (counters and followers reset).
    pub fn begin(&self, status: Status) {
        *self.lock() = status;
        self.sent.store(0, Ordering::Relaxed);
        self.followed.store(false, Ordering::Relaxed);
        *self
            .completion_told
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = false;
    }

    /// A client will follow this migration (it said so in its request): counted as
    /// following from the start, so a migration that completes before its first status
    /// request still waits for it.
    pub fn expect_follower(&self) {
        self.followed.store(true, Ordering::Relaxed);
    }

    /// After a completed migration, before this VMM exits: if a client follows the
    /// migration, waits (at most `limit`) until it has been told the migration completed,
    /// so that it does not mistake the source's exit for a failure. Returns whether it was.
    pub fn wait_completion_told(&self, limit: Duration) -> bool {
        if !self.followed.load(Ordering::Relaxed) {
            return true;
        }
        let told = self
            .completion_told
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (told, _) = self
            .told
            .wait_timeout_while(told, limit, |t| !*t)
            .unwrap_or_else(|e| e.into_inner());
        *told
    }

    /// A writer that counts the bytes `inner` takes into this migration's progress.
    pub fn counted<W: Write>(&self, inner: W) -> Counted<W> {
        Counted {
            inner,
            sent: self.sent.clone(),
        }
    }

    /// Changes it.
    pub fn lock(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a migration is in progress.
    pub fn busy(&self) -> bool {
        matches!(
            self.lock().phase,
            Phase::Setup | Phase::PreCopy | Phase::StopAndCopy
        )
    }
}

/// Counts the bytes written through it into a migration's progress.
pub struct Counted<W> {
    inner: W,
    sent: Arc<AtomicU64>,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_show_while_a_pass_runs() {
        let t = Tracker::default();
        t.begin(Status {
            phase: Phase::PreCopy,
            ..Default::default()
        });
        let mut w = t.counted(Vec::new());
        w.write_all(&[0u8; 5000]).unwrap();
        assert_eq!(t.get().bytes, 5000);
    }

    #[test]
    fn the_exit_waits_for_a_follower_to_be_told() {
        let t = Arc::new(Tracker::default());
        // Nobody follows: no wait.
        t.begin(Status::default());
        assert!(t.wait_completion_told(Duration::from_secs(5)));
        // A follower asked during the migration: the exit waits until it is told.
        t.begin(Status {
            phase: Phase::PreCopy,
            ..Default::default()
        });
        t.report();
        t.lock().phase = Phase::Completed;
        assert!(!t.wait_completion_told(Duration::from_millis(50)));
        let t2 = t.clone();
        let follower = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            t2.report()
        });
        assert!(t.wait_completion_told(Duration::from_secs(5)));
        assert_eq!(follower.join().unwrap().phase, Phase::Completed);
    }
}
