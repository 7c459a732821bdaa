//! Saving the VM into a `migration` stream and loading it back: snapshots
//! (`vmm ctl snapshot PATH`, `vmm --restore PATH`) and the state part of live migration.
//!
//! - [`save`]: the sections a stopped VM is written as (config, RAM, vCPUs, irqchip, PIT,
//!   clock, devices), and RAM pages by list for pre-copy;
//! - [`restore`]: reading a stream into a freshly built VM before its vCPUs run;
//! - [`file`]: the snapshot request itself (pause, save, resume).
//!
//! Device ids in the stream ([`section_key::SectionKey`]): each `--device` id carries its
//! device's own state (from its
//! [`DeviceMigration`](devices::vfio::migration::DeviceMigration)); `pci/ID` its
//! virtualized PCI configuration; `legacy/serial0`, `legacy/serial1` and `legacy/i8042` the
//! legacy devices. A `--device` id cannot contain `/`, so none collides with the VMM's own.

use std::fmt::Write as _;

pub mod file;
pub mod persist;
pub mod restore;
pub mod save;
pub mod section_key;

/// Why a snapshot or restore failed. Messages say which part and why.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The stream could not be written or read.
    #[error("{0}")]
    Stream(#[from] migration::Error),
    /// vCPUs could not be paused or captured.
    #[error("{0}")]
    Machine(#[from] crate::machine::MachineError),
    /// KVM state could not be captured or loaded.
    #[error("{0}")]
    State(#[from] crate::state::StateError),
    /// A device could not save or load its state.
    #[error("device {id}: {reason}")]
    Device {
        /// The device id.
        id: String,
        /// What failed.
        reason: String,
    },
    /// Guest RAM could not be read or written.
    #[error("guest RAM at {gpa:#x}: {reason}")]
    Ram {
        /// Where.
        gpa: u64,
        /// What failed.
        reason: String,
    },
    /// The stream does not fit this VM, or lacks something.
    #[error("{0}")]
    Mismatch(String),
    /// The VM holds devices that cannot migrate: saving it would lose their state.
    #[error("{}", blocked_text(.0))]
    NotMigratable(Vec<Blocked>),
    /// `--incoming` could not get a source.
    #[error(transparent)]
    Incoming(#[from] crate::migrate::incoming::IncomingError),
    /// The destination could not answer the source.
    #[error(transparent)]
    Reply(#[from] crate::migrate::error::ReplyError),
    /// KVM capabilities were not probed, so nothing can be saved.
    #[error("KVM state cannot be saved on this host: {0}")]
    NoCaps(String),
}

/// A device that cannot migrate, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The device id.
    pub id: String,
    /// Why it cannot migrate.
    pub reason: String,
}

fn blocked_text(devices: &[Blocked]) -> String {
    let mut out = String::new();
    for (n, b) in devices.iter().enumerate() {
        let sep = if n == 0 { "" } else { "; " };
        let _ = write!(out, "{sep}device {} cannot migrate: {}", b.id, b.reason);
    }
    out.push_str(" (its state would be lost; remove the device or give it a migration path)");
    out
}
