//! The kernel's VFIO migration v2 state machine: its states, its direct arcs (each with the
//! reason it exists), and the path this module walks for each transition.
//!
//! The kernel accepts any target state and walks a "combination transition" itself
//! (`vfio_mig_get_next_state()`), but then a failure may leave the device anywhere on that
//! path and the caller cannot tell which step failed. So [`path`] computes the walk here
//! and the device is moved one direct arc per ioctl, by the same rules the uAPI gives for
//! combination transitions: the shortest path over the states the device supports, with
//! no state of the saving group (`PRE_COPY`, `PRE_COPY_P2P`, `STOP_COPY`) in its interior
//! (passing through one would open and drop a data transfer session).

use std::collections::VecDeque;
use std::fmt;

use vfio_bindings::bindings::vfio::{
    vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR as ERROR,
    vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY as PRE_COPY,
    vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P as PRE_COPY_P2P,
    vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING as RESUMING,
    vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING as RUNNING,
    vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P as RUNNING_P2P,
    vfio_device_mig_state_VFIO_DEVICE_STATE_STOP as STOP,
    vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY as STOP_COPY, VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
};

/// `VFIO_MIGRATION_STOP_COPY`: STOP, STOP_COPY and RESUMING exist (always set).
pub const FLAG_STOP_COPY: u64 = VFIO_MIGRATION_STOP_COPY as u64;
/// `VFIO_MIGRATION_P2P`: RUNNING_P2P (and with PRE_COPY, PRE_COPY_P2P) exist.
pub const FLAG_P2P: u64 = VFIO_MIGRATION_P2P as u64;
/// `VFIO_MIGRATION_PRE_COPY`: PRE_COPY (and with P2P, PRE_COPY_P2P) exist.
pub const FLAG_PRE_COPY: u64 = VFIO_MIGRATION_PRE_COPY as u64;

/// A state of `enum vfio_device_mig_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelState {
    /// `VFIO_DEVICE_STATE_ERROR`: failed; only `VFIO_DEVICE_RESET` leaves it.
    Error,
    /// `VFIO_DEVICE_STATE_STOP`: no DMA, no interrupts, no state change.
    Stop,
    /// `VFIO_DEVICE_STATE_RUNNING`: fully operational.
    Running,
    /// `VFIO_DEVICE_STATE_STOP_COPY`: stopped, the state streams out of the data fd.
    StopCopy,
    /// `VFIO_DEVICE_STATE_RESUMING`: stopped, the state streams into the data fd.
    Resuming,
    /// `VFIO_DEVICE_STATE_RUNNING_P2P`: running, but initiates no peer-to-peer DMA.
    RunningP2p,
    /// `VFIO_DEVICE_STATE_PRE_COPY`: running while its state streams out.
    PreCopy,
    /// `VFIO_DEVICE_STATE_PRE_COPY_P2P`: PRE_COPY without peer-to-peer DMA.
    PreCopyP2p,
}

impl KernelState {
    /// Every state, in uAPI order.
    pub const ALL: [KernelState; 8] = [
        KernelState::Error,
        KernelState::Stop,
        KernelState::Running,
        KernelState::StopCopy,
        KernelState::Resuming,
        KernelState::RunningP2p,
        KernelState::PreCopy,
        KernelState::PreCopyP2p,
    ];

    /// The uAPI value.
    pub fn raw(self) -> u32 {
        match self {
            KernelState::Error => ERROR,
            KernelState::Stop => STOP,
            KernelState::Running => RUNNING,
            KernelState::StopCopy => STOP_COPY,
            KernelState::Resuming => RESUMING,
            KernelState::RunningP2p => RUNNING_P2P,
            KernelState::PreCopy => PRE_COPY,
            KernelState::PreCopyP2p => PRE_COPY_P2P,
        }
    }

    /// The state of uAPI value `raw`, if it is one.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.raw() == raw)
    }

    /// In the saving group (one data transfer session shared by all three states).
    pub fn saving(self) -> bool {
        matches!(
            self,
            KernelState::PreCopy | KernelState::PreCopyP2p | KernelState::StopCopy
        )
    }

    /// A data transfer session (a data fd) is open in this state.
    pub fn has_session(self) -> bool {
        self.saving() || self == KernelState::Resuming
    }

    /// Whether a device with migration `flags` has this state.
    pub fn supported(self, flags: u64) -> bool {
        let needs = match self {
            KernelState::Error | KernelState::Running => 0,
            KernelState::Stop | KernelState::StopCopy | KernelState::Resuming => FLAG_STOP_COPY,
            KernelState::RunningP2p => FLAG_STOP_COPY | FLAG_P2P,
            KernelState::PreCopy => FLAG_STOP_COPY | FLAG_PRE_COPY,
            KernelState::PreCopyP2p => FLAG_STOP_COPY | FLAG_P2P | FLAG_PRE_COPY,
        };
        flags & needs == needs
    }
}

impl fmt::Display for KernelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KernelState::Error => "ERROR",
            KernelState::Stop => "STOP",
            KernelState::Running => "RUNNING",
            KernelState::StopCopy => "STOP_COPY",
            KernelState::Resuming => "RESUMING",
            KernelState::RunningP2p => "RUNNING_P2P",
            KernelState::PreCopy => "PRE_COPY",
            KernelState::PreCopyP2p => "PRE_COPY_P2P",
        })
    }
}

/// What an arc does to the data transfer session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Session {
    /// The kernel returns a new data fd.
    Opens,
    /// The session (and its fd) ends.
    Ends,
    /// No session before or after, or the saving group's session goes on unchanged.
    Keeps,
}

/// One direct arc of the FSM, as the uAPI (`include/uapi/linux/vfio.h`) defines it.
#[derive(Clone, Copy, Debug)]
pub struct FsmArc {
    /// Where it starts.
    pub from: KernelState,
    /// Where it ends.
    pub to: KernelState,
    /// Migration flags that must be absent: an arc that exists only because the optional
    /// state it skips is unsupported ("the states behave as though the device was fully
    /// running if not supported").
    pub unless: u64,
    /// Its effect on the data fd.
    pub session: Session,
    /// Why the arc exists / what it does.
    pub why: &'static str,
}

use KernelState::{
    PreCopy as KPreCopy, PreCopyP2p as KPreCopyP2p, Resuming as KResuming, Running as KRunning,
    RunningP2p as KRunningP2p, Stop as KStop, StopCopy as KStopCopy,
};

const fn arc(
    from: KernelState,
    to: KernelState,
    unless: u64,
    session: Session,
    why: &'static str,
) -> FsmArc {
    FsmArc {
        from,
        to,
        unless,
        session,
        why,
    }
}

/// Every direct arc. Both ends must be states the device supports; arcs with `unless`
/// exist only when those flags are absent. `STOP_COPY -> PRE_COPY(_P2P)` is not an arc
/// ("not permitted"), and ERROR is never asked for.
pub const ARCS: &[FsmArc] = &[
    arc(
        KRunning,
        KRunningP2p,
        0,
        Session::Keeps,
        "quiesce peer-to-peer DMA before stopping",
    ),
    arc(
        KRunningP2p,
        KStop,
        0,
        Session::Keeps,
        "stop: no DMA, no interrupts, no state change",
    ),
    arc(
        KStop,
        KRunningP2p,
        0,
        Session::Keeps,
        "restart with peer-to-peer DMA still quiesced",
    ),
    arc(
        KRunningP2p,
        KRunning,
        0,
        Session::Keeps,
        "fully running again",
    ),
    arc(
        KRunning,
        KStop,
        FLAG_P2P,
        Session::Keeps,
        "stop (no RUNNING_P2P to pass: it behaves as RUNNING)",
    ),
    arc(
        KStop,
        KRunning,
        FLAG_P2P,
        Session::Keeps,
        "run again (no RUNNING_P2P to pass)",
    ),
    arc(
        KStop,
        KStopCopy,
        0,
        Session::Opens,
        "save a stopped device: its state is final, read to EOF",
    ),
    arc(
        KStopCopy,
        KStop,
        0,
        Session::Ends,
        "the save is complete or abandoned",
    ),
    arc(
        KStop,
        KResuming,
        0,
        Session::Opens,
        "load a saved state: write it to the new data fd",
    ),
    arc(
        KResuming,
        KStop,
        0,
        Session::Ends,
        "the load is complete: the driver checks what it was given",
    ),
    arc(
        KRunning,
        KPreCopy,
        0,
        Session::Opens,
        "live save: read while the device runs",
    ),
    arc(
        KPreCopy,
        KRunning,
        0,
        Session::Ends,
        "the live save is abandoned",
    ),
    arc(
        KRunningP2p,
        KPreCopyP2p,
        0,
        Session::Opens,
        "live save with peer-to-peer DMA quiesced",
    ),
    arc(
        KPreCopyP2p,
        KRunningP2p,
        0,
        Session::Ends,
        "the live save is abandoned (P2P still quiesced)",
    ),
    arc(
        KPreCopy,
        KPreCopyP2p,
        0,
        Session::Keeps,
        "quiesce peer-to-peer DMA before stop-copy; same session",
    ),
    arc(
        KPreCopyP2p,
        KPreCopy,
        0,
        Session::Keeps,
        "back to full pre-copy; same session",
    ),
    arc(
        KPreCopyP2p,
        KStopCopy,
        0,
        Session::Keeps,
        "stop; the rest of the state follows on the same fd",
    ),
    arc(
        KPreCopy,
        KStopCopy,
        FLAG_P2P,
        Session::Keeps,
        "stop (no PRE_COPY_P2P to pass); same fd",
    ),
];

/// The direct arc from `from` to `to` on a device with migration `flags`, if there is one.
pub fn direct(from: KernelState, to: KernelState, flags: u64) -> Option<&'static FsmArc> {
    ARCS.iter().find(|a| {
        a.from == from
            && a.to == to
            && a.unless & flags == 0
            && from.supported(flags)
            && to.supported(flags)
    })
}

/// The arcs to walk from `from` to `to`: the shortest path over supported states that
/// does not pass through a saving-group state once it is outside the group (that would
/// drop the session and open another), as the kernel's `vfio_mig_get_next_state()` walks
/// a combination transition. Empty if `from == to`; `None` if there is no way: out of
/// ERROR, or `STOP_COPY -> PRE_COPY(_P2P)`, which the uAPI does not permit. Ties go to the
/// arc listed first in [`ARCS`].
pub fn path(from: KernelState, to: KernelState, flags: u64) -> Option<Vec<&'static FsmArc>> {
    if from == to {
        return Some(Vec::new());
    }
    if from == KernelState::StopCopy && matches!(to, KernelState::PreCopy | KernelState::PreCopyP2p)
    {
        return None;
    }
    // Breadth-first; `via[state]` is the arc that first reached it, `in_session[state]`
    // says every state from `from` to it was in the saving group.
    let mut via: [Option<&'static FsmArc>; 8] = [None; 8];
    let mut in_session = [false; 8];
    in_session[from as usize] = from.saving();
    let mut queue = VecDeque::from([from]);
    while let Some(at) = queue.pop_front() {
        if at != from && at.saving() && !in_session[at as usize] {
            continue; // may end a path, not lead through one
        }
        for a in ARCS.iter().filter(|a| a.from == at) {
            let next = a.to;
            if next == from || via[next as usize].is_some() || direct(at, next, flags).is_none() {
                continue;
            }
            via[next as usize] = Some(a);
            in_session[next as usize] = in_session[at as usize] && next.saving();
            if next == to {
                let mut steps = vec![a];
                let mut cur = at;
                while cur != from {
                    let prev = via[cur as usize].expect("reached states have an arc");
                    steps.push(prev);
                    cur = prev.from;
                }
                steps.reverse();
                return Some(steps);
            }
            queue.push_back(next);
        }
    }
    None
}
