//! The migration region's layout, its state encoding and its transition table.
//!
//! ```text
//! 0x0000  u32 device_state   RUNNING=1, SAVING=2, RESUMING=4 (read/write)
//! 0x0004  u32 reserved       reads 0, writes ignored (as in v1)
//! 0x0008  u64 pending_bytes  read-only
//! 0x0010  u64 data_offset    read-only; reading it while saving stages the next chunk
//! 0x0018  u64 data_size      read while saving, written while resuming
//! 0x0020  (unused up to the data window; any access fails)
//! 0x1000  data window        DEFAULT_WINDOW_SIZE bytes unless the mediator chose another
//! ```
//!
//! The offsets are those of `struct vfio_device_migration_info` of VFIO migration v1 (taken
//! from vfio-bindings so they cannot drift). The data window starts on a page boundary and
//! its size is a multiple of the page size, so that a mediator could one day offer it as a
//! sparse mmap area instead of copying through region reads and writes.

use std::mem::{offset_of, size_of};

use crate::vfio::migration::MigrationState;
use vfio_bindings::bindings::vfio::{
    vfio_device_migration_info, VFIO_DEVICE_STATE_MASK, VFIO_DEVICE_STATE_V1_RESUMING,
    VFIO_DEVICE_STATE_V1_RUNNING, VFIO_DEVICE_STATE_V1_SAVING, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE, VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED,
    VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
};

/// Offset of `device_state` (u32).
pub const DEVICE_STATE: u64 = offset_of!(vfio_device_migration_info, device_state) as u64;
/// Offset of `reserved` (u32).
pub const RESERVED: u64 = offset_of!(vfio_device_migration_info, reserved) as u64;
/// Offset of `pending_bytes` (u64, read-only).
pub const PENDING_BYTES: u64 = offset_of!(vfio_device_migration_info, pending_bytes) as u64;
/// Offset of `data_offset` (u64, read-only).
pub const DATA_OFFSET: u64 = offset_of!(vfio_device_migration_info, data_offset) as u64;
/// Offset of `data_size` (u64).
pub const DATA_SIZE: u64 = offset_of!(vfio_device_migration_info, data_size) as u64;
/// Size of the register block; `[HEADER_SIZE, DATA_WINDOW_OFFSET)` is unused.
pub const HEADER_SIZE: u64 = size_of::<vfio_device_migration_info>() as u64;

/// Page size the window is aligned to.
pub const PAGE_SIZE: u64 = 4096;
/// Where the data window starts (the value `data_offset` reads).
pub const DATA_WINDOW_OFFSET: u64 = PAGE_SIZE;
/// Default size of the data window: 64 KiB. Big enough that a device state of a few
/// hundred KiB takes a handful of round trips, small enough to keep per device for the
/// VM's lifetime.
pub const DEFAULT_WINDOW_SIZE: u64 = 64 * 1024;
/// Largest data window a region accepts (keeps a mistaken size from allocating gigabytes).
pub const MAX_WINDOW_SIZE: u64 = 64 * 1024 * 1024;

/// `device_state` bit: the device runs.
pub const STATE_RUNNING: u32 = VFIO_DEVICE_STATE_V1_RUNNING;
/// `device_state` bit: the device's state is being saved.
pub const STATE_SAVING: u32 = VFIO_DEVICE_STATE_V1_SAVING;
/// `device_state` bit: the device's state is being restored.
pub const STATE_RESUMING: u32 = VFIO_DEVICE_STATE_V1_RESUMING;
/// The defined `device_state` bits; bits 3-31 are reserved.
pub const STATE_MASK: u32 = VFIO_DEVICE_STATE_MASK;
/// The v1 error state (`SAVING | RESUMING`): reported, never accepted.
pub const STATE_ERROR: u32 = STATE_SAVING | STATE_RESUMING;

/// VFIO region type a mediator advertises for this region (v1's, now "deprecated" upstream
/// since the kernel moved to v2; the layout is what this project implements).
pub const REGION_TYPE: u32 = VFIO_REGION_TYPE_MIGRATION_DEPRECATED;
/// VFIO region subtype of the migration region.
pub const REGION_SUBTYPE: u32 = VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED;
/// VFIO region-info flags of the migration region: read and write, no mmap.
pub const REGION_FLAGS: u32 = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;

/// The `device_state` value of a state.
pub fn encode_state(state: MigrationState) -> u32 {
    match state {
        MigrationState::Stopped => 0,
        MigrationState::Running => STATE_RUNNING,
        MigrationState::StopCopy => STATE_SAVING,
        MigrationState::PreCopy => STATE_SAVING | STATE_RUNNING,
        MigrationState::Resuming => STATE_RESUMING,
        MigrationState::Error => STATE_ERROR,
    }
}

/// The state a `device_state` value stands for, or why it stands for none. The error
/// state (6) decodes to [`MigrationState::Error`]: a device may report it, even though
/// no one may ask for it.
pub fn decode_state(value: u32) -> Result<MigrationState, &'static str> {
    if value & !STATE_MASK != 0 {
        return Err("reserved bits 3-31 are set");
    }
    match value {
        0 => Ok(MigrationState::Stopped),
        STATE_RUNNING => Ok(MigrationState::Running),
        STATE_SAVING => Ok(MigrationState::StopCopy),
        v if v == STATE_SAVING | STATE_RUNNING => Ok(MigrationState::PreCopy),
        STATE_RESUMING => Ok(MigrationState::Resuming),
        STATE_ERROR => Ok(MigrationState::Error),
        _ => Err("a device cannot run while it is being restored (RESUMING with RUNNING)"),
    }
}

/// One atomic change a transition is made of; each flips one `device_state` bit and is
/// one call into the mediator (`mediate`'s `MigrationOps`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Clear RUNNING: `MigrationOps::stop_device`.
    StopDevice,
    /// Set RUNNING: `MigrationOps::resume_device`.
    ResumeDevice,
    /// Set SAVING: `MigrationOps::begin_save` (live if RUNNING is set).
    BeginSave,
    /// Clear SAVING: `MigrationOps::end_save`.
    EndSave,
    /// Set RESUMING: `MigrationOps::begin_restore`.
    BeginRestore,
    /// Clear RESUMING: `MigrationOps::end_restore`.
    EndRestore,
}

impl Step {
    /// The `device_state` value after this step, from `value`.
    pub fn apply(self, value: u32) -> u32 {
        match self {
            Step::StopDevice => value & !STATE_RUNNING,
            Step::ResumeDevice => value | STATE_RUNNING,
            Step::BeginSave => value | STATE_SAVING,
            Step::EndSave => value & !STATE_SAVING,
            Step::BeginRestore => value | STATE_RESUMING,
            Step::EndRestore => value & !STATE_RESUMING,
        }
    }

    /// The mediator call, for error messages.
    pub fn name(self) -> &'static str {
        match self {
            Step::StopDevice => "stop_device",
            Step::ResumeDevice => "resume_device",
            Step::BeginSave => "begin_save",
            Step::EndSave => "end_save",
            Step::BeginRestore => "begin_restore",
            Step::EndRestore => "end_restore",
        }
    }
}

/// A legal transition: the steps that make it, in order, and why it exists.
#[derive(Clone, Copy, Debug)]
pub struct Transition {
    /// From this state...
    pub from: MigrationState,
    /// ...to this one.
    pub to: MigrationState,
    /// The steps, in order. Every intermediate value is a valid state, so a step that
    /// fails leaves the device in a state that is both true and legal to continue from.
    pub steps: &'static [Step],
    /// Why the transition is allowed (who uses it).
    pub why: &'static str,
}

use MigrationState::{PreCopy, Resuming, Running, StopCopy, Stopped};
use Step::{BeginRestore, BeginSave, EndRestore, EndSave, ResumeDevice, StopDevice};

/// Every legal transition (writing the current state again is a no-op and not listed).
/// Following the v1 uAPI's diagram and the way QEMU's v1 code drove it. Not listed, so
/// refused:
/// - Stopped -> PreCopy: a live save starts from a running device; a stopped one is saved
///   with stop-and-copy, and a migration must not start a device the VMM paused.
/// - PreCopy -> Stopped: a save in progress ends by completing stop-and-copy or by being
///   cancelled back to Running, not by silently dropping it.
/// - StopCopy -> PreCopy: the state read so far is final; running the device again would
///   make it stale.
/// - PreCopy/StopCopy <-> Resuming: a save and a restore never overlap; end one first.
/// - anything to Error: it is reported, not chosen.
pub const TRANSITIONS: &[Transition] = &[
    Transition {
        from: Running,
        to: PreCopy,
        steps: &[BeginSave],
        why: "live migration starts: save while the guest runs",
    },
    Transition {
        from: Running,
        to: StopCopy,
        steps: &[StopDevice, BeginSave],
        why: "snapshot or migration without pre-copy: stop, then save",
    },
    Transition {
        from: Running,
        to: Stopped,
        steps: &[StopDevice],
        why: "the VM is paused (or shut down)",
    },
    Transition {
        from: Running,
        to: Resuming,
        steps: &[StopDevice, BeginRestore],
        why: "a fresh destination device (running by default) takes a saved state",
    },
    Transition {
        from: PreCopy,
        to: StopCopy,
        steps: &[StopDevice],
        why: "pre-copy converged: the vCPUs stop and so does the device",
    },
    Transition {
        from: PreCopy,
        to: Running,
        steps: &[EndSave],
        why: "live migration cancelled or failed before stop-and-copy",
    },
    Transition {
        from: StopCopy,
        to: Stopped,
        steps: &[EndSave],
        why: "the save is complete (the destination took over)",
    },
    Transition {
        from: StopCopy,
        to: Running,
        steps: &[EndSave, ResumeDevice],
        why: "migration failed or cancelled during stop-and-copy: the source runs on",
    },
    Transition {
        from: Stopped,
        to: Running,
        steps: &[ResumeDevice],
        why: "the VM is resumed",
    },
    Transition {
        from: Stopped,
        to: StopCopy,
        steps: &[BeginSave],
        why: "snapshot of a paused VM",
    },
    Transition {
        from: Stopped,
        to: Resuming,
        steps: &[BeginRestore],
        why: "restore into a device that was stopped",
    },
    Transition {
        from: Resuming,
        to: Running,
        steps: &[EndRestore, ResumeDevice],
        why: "restore complete: the destination runs",
    },
    Transition {
        from: Resuming,
        to: Stopped,
        steps: &[EndRestore],
        why: "restore complete, the VM stays paused (or the restore is abandoned)",
    },
];

/// The legal transition from `from` to `to`, if there is one.
pub fn transition(from: MigrationState, to: MigrationState) -> Option<&'static Transition> {
    TRANSITIONS.iter().find(|t| t.from == from && t.to == to)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [MigrationState; 6] = [
        Running,
        PreCopy,
        StopCopy,
        Stopped,
        Resuming,
        MigrationState::Error,
    ];

    #[test]
    fn offsets_are_v1s() {
        assert_eq!(
            (
                DEVICE_STATE,
                RESERVED,
                PENDING_BYTES,
                DATA_OFFSET,
                DATA_SIZE
            ),
            (0, 4, 8, 16, 24)
        );
        assert_eq!(HEADER_SIZE, 32);
        assert_eq!((REGION_TYPE, REGION_SUBTYPE, REGION_FLAGS), (3, 1, 3));
    }

    #[test]
    fn encoding_round_trips_and_rejects_the_rest() {
        for s in ALL {
            assert_eq!(decode_state(encode_state(s)), Ok(s));
        }
        assert!(decode_state(5).is_err());
        assert!(decode_state(7).is_err());
        assert!(decode_state(8).is_err());
        assert!(decode_state(0x8000_0001).is_err());
    }

    #[test]
    fn every_step_sequence_ends_where_it_says_through_valid_states() {
        for t in TRANSITIONS {
            let mut v = encode_state(t.from);
            for step in t.steps {
                v = step.apply(v);
                let s = decode_state(v).expect("intermediate state is valid");
                assert_ne!(s, MigrationState::Error, "{t:?} passes through error");
            }
            assert_eq!(v, encode_state(t.to), "{t:?}");
        }
    }

    #[test]
    fn the_table_has_no_duplicates_self_loops_or_error() {
        for (i, a) in TRANSITIONS.iter().enumerate() {
            assert_ne!(a.from, a.to);
            assert!(a.from != MigrationState::Error && a.to != MigrationState::Error);
            for b in &TRANSITIONS[i + 1..] {
                assert!(a.from != b.from || a.to != b.to, "{a:?} twice");
            }
        }
    }
}
