//! The control API's answers, as typed structs: what each request's `result` holds.
//! A mediator's own answers (`mediator` requests) are that mediator's JSON; `snapshot`'s is
//! [`crate::snapshot::file::Written`], `migration-status`'s the migration's report.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::migrate::progress::Phase;

/// `info`.
#[derive(Debug, Serialize)]
pub struct Info {
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Whether the vCPUs are paused by request (or for good, once migrated away).
    pub paused: bool,
    /// The current or last migration's phase.
    pub migration: Phase,
    /// The passed-through devices.
    pub devices: Vec<DeviceSummary>,
}

/// One device in [`Info`].
#[derive(Debug, Serialize)]
pub struct DeviceSummary {
    /// Its id.
    pub id: String,
    /// Its mediator's name, if it is mediated.
    pub mediator: Option<String>,
}

/// `pause` and `resume`.
#[derive(Debug, Serialize)]
pub struct Paused {
    /// Whether the vCPUs are paused now.
    pub paused: bool,
}

/// `migrate`: the migration started (follow it with `migration-status`).
#[derive(Debug, Serialize)]
pub struct MigrationStarted {
    /// The destination.
    pub started: String,
}

/// `device-stats`.
#[derive(Debug, Serialize)]
pub struct DeviceStats {
    /// KVM exits by kind.
    pub exits: BTreeMap<String, ExitCount>,
    /// All KVM exits.
    pub total_exits: u64,
    /// Per device.
    pub devices: Vec<DeviceCounters>,
}

/// One kind of KVM exit in [`DeviceStats`].
#[derive(Debug, Serialize)]
pub struct ExitCount {
    /// How many.
    pub count: u64,
    /// Time the VMM spent handling them.
    pub handling_ns: u64,
}

/// One device in [`DeviceStats`].
#[derive(Debug, Serialize)]
pub struct DeviceCounters {
    /// Its id.
    pub id: String,
    /// Backend failures on the guest's access paths.
    pub backend_errors: u64,
    /// Per BAR.
    pub bars: Vec<BarCounters>,
    /// Its migration state, if it can migrate.
    pub migration_state: Option<String>,
    /// Its mediator, if it is mediated.
    pub mediator: Option<MediatorStats>,
}

/// One BAR in [`DeviceCounters`].
#[derive(Debug, Serialize)]
pub struct BarCounters {
    /// BAR number.
    pub index: usize,
    /// Size the guest sees.
    pub size: u64,
    /// Where it is registered, if it is.
    pub base: Option<u64>,
    /// Trapped guest reads that reached it.
    pub reads: u64,
    /// Trapped guest writes that reached it.
    pub writes: u64,
    /// Ranges mapped into the guest (offset, size).
    pub mapped: Vec<(u64, u64)>,
    /// Ranges trapped (offset, size).
    pub trapped: Vec<(u64, u64)>,
}

/// A mediator in [`DeviceCounters`].
#[derive(Debug, Serialize)]
pub struct MediatorStats {
    /// Its name.
    pub name: String,
    /// Its own statistics (the mediator's JSON).
    pub stats: Value,
}

/// `device-migration state`.
#[derive(Debug, Serialize)]
pub struct MigrationStateReply {
    /// The device's migration state.
    pub state: String,
}

/// `device-migration take-dirty-pages`.
#[derive(Debug, Serialize)]
pub struct DirtyPages {
    /// Guest physical addresses of the pages written.
    pub pages: Vec<u64>,
}

/// `device-migration start-dirty-tracking` and `stop-dirty-tracking`.
#[derive(Debug, Serialize)]
pub struct Done {}

/// `device-migration save` and `restore`.
#[derive(Debug, Serialize)]
pub struct StateFile {
    /// Bytes of device state written or read.
    pub bytes: usize,
    /// How long the device was stopped (`save` only), in µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_stopped_us: Option<u64>,
}
