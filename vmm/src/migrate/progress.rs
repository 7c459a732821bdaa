//! The source's migration status, shared with the API.

use std::sync::{Mutex, MutexGuard};

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
}

impl Tracker {
    /// The status now.
    pub fn get(&self) -> Status {
        self.lock().clone()
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
