//! Device migration as the VMM sees it: one interface for every source of device state.
//!
//! [`DeviceMigration`] is what the VMM's snapshot, restore and live-migration code talks
//! to. It has (or will have) three implementations, and knows none of them:
//!
//! - a VFIO migration v1 region ([`super::region_migration::RegionMigration`], a
//!   mediator's or a vfio-user server's), the register protocol of the 2019 "mediate ops" /
//!   VFIO migration v1 proposal;
//! - the kernel's VFIO migration v2 uAPI (device feature, state machine, data fd, DMA
//!   logging);
//! - vfio-user's migration messages.
//!
//! So the interface speaks in states and opaque chunks of bytes only: no offsets, no file
//! descriptors, no register layouts.
//!
//! # Saving (source)
//!
//! ```text
//! start_dirty_tracking()                      // before the first pass over guest RAM
//! set_state(PreCopy)                          // optional: live save while the guest runs
//! loop {                                      // pre-copy: as long as the VMM likes
//!     while let Some(chunk) = save_chunk()? { send(chunk) }
//!     send(take_dirty_pages()?)               // with KVM's dirty log, per pass over RAM
//!     if pending_bytes()? is small enough and RAM converged { break }
//! }
//! // stop the vCPUs
//! set_state(StopCopy)                         // the device stops; its state is final
//! while pending_bytes()? > 0 {                // exact now: loop until 0
//!     if let Some(chunk) = save_chunk()? { send(chunk) }
//! }
//! send(take_dirty_pages()?)                   // the last pages the device wrote
//! stop_dirty_tracking()
//! set_state(Stopped)                          // after the destination acknowledged
//! ```
//!
//! `Running -> StopCopy` directly (no pre-copy) is a plain snapshot. Cancelling or failing a
//! migration before the destination acknowledged goes back with `set_state(Running)` from
//! `PreCopy` or `StopCopy`: the source keeps running with nothing lost.
//!
//! # Restoring (destination)
//!
//! ```text
//! set_state(Resuming)                         // from Running (a fresh device) or Stopped
//! for chunk in received { restore_chunk(&chunk)? }   // in the order they were saved
//! set_state(Running)                          // or Stopped, to resume later
//! ```
//!
//! Chunk boundaries need not be preserved between the two sides: the state is a byte
//! stream, which an implementation may cut differently on each side.

use std::fmt;

use super::backend::BackendError;

/// Size of the pages reported by [`DeviceMigration::take_dirty_pages`].
pub const DIRTY_PAGE_SIZE: u64 = 4096;

/// Where a device is in its migration state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigrationState {
    /// Running normally; nothing is being saved or restored. A device starts here.
    Running,
    /// Running while its state is being saved (live pre-copy): chunks may be read, and
    /// [`DeviceMigration::pending_bytes`] is an estimate that may grow.
    PreCopy,
    /// Stopped and saving (stop-and-copy): the state is final and
    /// [`DeviceMigration::pending_bytes`] is exact.
    StopCopy,
    /// Stopped: no DMA, no interrupts, nothing saved or restored.
    Stopped,
    /// Stopped and taking state through [`DeviceMigration::restore_chunk`].
    Resuming,
    /// The device failed and its state is unknown (kernel v2's ERROR, v1's `110b`); only a
    /// device reset leaves it. It cannot be asked for.
    Error,
}

impl fmt::Display for MigrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationState::Running => "running",
            MigrationState::PreCopy => "pre-copy",
            MigrationState::StopCopy => "stop-copy",
            MigrationState::Stopped => "stopped",
            MigrationState::Resuming => "resuming",
            MigrationState::Error => "error",
        })
    }
}

/// Why a device migration operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The state machine does not allow this transition; nothing was changed.
    #[error("illegal device migration transition from {from} to {to}")]
    IllegalTransition {
        /// The state the device is in.
        from: MigrationState,
        /// The state asked for.
        to: MigrationState,
    },
    /// The device accepted the transition but failed on the way; `now` is where it is.
    #[error(
        "device migration transition from {from} to {to} failed, the device is {now}: {reason}"
    )]
    TransitionFailed {
        /// The state the device was in.
        from: MigrationState,
        /// The state asked for.
        to: MigrationState,
        /// The state the device is in after the failure.
        now: MigrationState,
        /// What the device said.
        reason: String,
    },
    /// The operation makes no sense in the device's current state (e.g. restoring a chunk
    /// while running).
    #[error("cannot {op} while the device is {state}")]
    WrongState {
        /// What was attempted.
        op: &'static str,
        /// The state the device is in.
        state: MigrationState,
    },
    /// The device (or whatever serves its state) reported a failure.
    #[error("{op}: the device failed: {reason}")]
    Device {
        /// What was attempted.
        op: String,
        /// What the device said.
        reason: String,
    },
    /// The device answered something the protocol does not allow (a chunk outside its
    /// window, an unknown state value, pending bytes that never arrive, ...).
    #[error("the device broke the migration protocol: {0}")]
    Protocol(String),
    /// Talking to the device failed.
    #[error("{op} failed: {source}")]
    Backend {
        /// What was attempted.
        op: String,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
}

/// Result of device migration operations.
pub type Result<T> = std::result::Result<T, MigrationError>;

/// A device's migration interface: its state machine, its saved state as a stream of
/// opaque chunks, and the guest pages it wrote by DMA. See the [module docs](self) for the
/// call sequences. Shared between the VMM's threads (`Send + Sync`); implementations
/// serialize their own protocol steps.
pub trait DeviceMigration: Send + Sync {
    /// The device's current state.
    fn state(&self) -> Result<MigrationState>;

    /// Moves the device to `state`. An illegal transition fails with
    /// [`MigrationError::IllegalTransition`] and changes nothing; a transition the device
    /// fails part-way reports where it ended ([`MigrationError::TransitionFailed`]).
    fn set_state(&self, state: MigrationState) -> Result<()>;

    /// Bytes of state still to be saved: an estimate in [`MigrationState::PreCopy`] (the
    /// running device may add more), exact in [`MigrationState::StopCopy`], 0 otherwise.
    fn pending_bytes(&self) -> Result<u64>;

    /// The next chunk of saved state, or `None` if nothing is pending right now (in
    /// stop-copy: the save is complete). Only in pre-copy or stop-copy.
    fn save_chunk(&self) -> Result<Option<Vec<u8>>>;

    /// Gives the device the next piece of saved state, in the order it was saved. Only in
    /// [`MigrationState::Resuming`]; any length (an implementation splits or gathers as its
    /// transport needs).
    fn restore_chunk(&self, data: &[u8]) -> Result<()>;

    /// Starts recording the guest pages the device writes by DMA.
    fn start_dirty_tracking(&self) -> Result<()>;

    /// Stops recording dirty pages (what was recorded and not taken is dropped).
    fn stop_dirty_tracking(&self) -> Result<()>;

    /// Guest physical addresses of the pages ([`DIRTY_PAGE_SIZE`], aligned) the device
    /// wrote since tracking started or since the last call, sorted, without duplicates.
    fn take_dirty_pages(&self) -> Result<Vec<u64>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_both_states() {
        let e = MigrationError::IllegalTransition {
            from: MigrationState::Stopped,
            to: MigrationState::PreCopy,
        };
        assert_eq!(
            e.to_string(),
            "illegal device migration transition from stopped to pre-copy"
        );
    }
}
