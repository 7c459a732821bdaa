//! The fake device's migration (vfio-user's v2 messages): what the test configures
//! ([`Migration`]) and the state it can look at and change while the device runs
//! ([`MigrationData`], in the device's [`Probe`](super::Probe)).
//!
//! `STOP_COPY` hands out [`MigrationData::saved`], `PRE_COPY`
//! [`MigrationData::pre_copy`], each from its start after every transition; `RESUMING`
//! collects what is written into [`MigrationData::restored`] (emptied on entry). DMA
//! logging records the ranges it was started with and reports the pages the test puts
//! into [`MigrationData::dirty`], at 4 KiB or coarser.

use std::collections::BTreeSet;

use vfio_bindings::bindings::vfio::{VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY};

use crate::device::{DeviceResult, Errno};
use crate::proto::{dirty_bitmap, DmaLoggingRange, MigState};

/// Which transitions the device accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arcs {
    /// Any the specification allows, the device walking the arcs between (as the
    /// kernel's VFIO core does): all but those into or out of `ERROR`, `STOP_COPY` to
    /// `PRE_COPY`, and states the flags do not offer.
    Walk,
    /// Only the state machine's single arcs (`RUNNING` -> `STOP` -> `STOP_COPY`, ...), as
    /// a kernel driver's step function sees them; anything else is `EINVAL`.
    Direct,
}

/// How the fake device migrates.
#[derive(Debug, Clone)]
pub struct Migration {
    flags: u64,
    arcs: Arcs,
}

impl Migration {
    /// A device with `VFIO_MIGRATION_*` `flags` (`STOP_COPY` at least) that walks any
    /// allowed transition, with DMA logging.
    pub fn new(flags: u64) -> Self {
        Migration {
            flags,
            arcs: Arcs::Walk,
        }
    }

    /// Accepts only the state machine's single arcs.
    pub fn direct_arcs_only(mut self) -> Self {
        self.arcs = Arcs::Direct;
        self
    }

    /// The `VFIO_MIGRATION_*` flags.
    pub fn flags(&self) -> u64 {
        self.flags
    }

    fn offers(&self, state: MigState) -> bool {
        let pre_copy = self.flags & u64::from(VFIO_MIGRATION_PRE_COPY) != 0;
        let p2p = self.flags & u64::from(VFIO_MIGRATION_P2P) != 0;
        match state {
            MigState::PreCopy => pre_copy,
            MigState::RunningP2p => p2p,
            MigState::PreCopyP2p => pre_copy && p2p,
            _ => true,
        }
    }

    /// Whether the device moves from `from` to `to`.
    fn allows(&self, from: MigState, to: MigState) -> bool {
        use MigState::*;
        if !self.offers(to) {
            return false;
        }
        match self.arcs {
            Arcs::Walk => {
                from == to || !(from == Error || to == Error || (from == StopCopy && to == PreCopy))
            }
            Arcs::Direct => matches!(
                (from, to),
                (Running, Stop)
                    | (StopCopy, Stop)
                    | (Resuming, Stop)
                    | (PreCopy, Running)
                    | (Stop, Running)
                    | (Running, PreCopy)
                    | (Stop, StopCopy)
                    | (PreCopy, StopCopy)
                    | (Stop, Resuming)
            ),
        }
    }
}

/// The migration state of the device, shared with the test.
#[derive(Debug)]
pub struct MigrationData {
    /// The current state (`RUNNING` after a reset).
    pub state: MigState,
    /// The state handed out in `STOP_COPY`.
    pub saved: Vec<u8>,
    /// The data handed out in `PRE_COPY`.
    pub pre_copy: Vec<u8>,
    /// What was written in `RESUMING`.
    pub restored: Vec<u8>,
    /// Dirty 4 KiB pages by address; `None` while DMA logging is off.
    pub dirty: Option<BTreeSet<u64>>,
    /// The ranges DMA logging was last started with.
    pub log_ranges: Vec<DmaLoggingRange>,
    /// `(iova, length, page_size)` of the last DMA logging report asked for.
    pub last_report: Option<(u64, u64, u64)>,
    /// A device that cannot leave this state (e.g. `RESUMING`: it refuses the data it
    /// was given): every move out of it is refused with `EINVAL`.
    pub refuse_to_leave: Option<MigState>,
    /// How far the data of the current saving state has been read.
    read_at: usize,
}

impl Default for MigrationData {
    fn default() -> Self {
        MigrationData {
            state: MigState::Running,
            saved: Vec::new(),
            pre_copy: Vec::new(),
            restored: Vec::new(),
            dirty: None,
            log_ranges: Vec::new(),
            last_report: None,
            refuse_to_leave: None,
            read_at: 0,
        }
    }
}

impl MigrationData {
    /// `SET` of `MIG_DEVICE_STATE`.
    pub(crate) fn set_state(&mut self, spec: &Migration, to: MigState) -> DeviceResult<()> {
        let from = self.state;
        let stuck = self.refuse_to_leave == Some(from) && to != from;
        if stuck || !spec.allows(from, to) {
            return Err(Errno(libc::EINVAL));
        }
        self.read_at = 0;
        if to == MigState::Resuming {
            self.restored.clear();
        }
        self.state = to;
        Ok(())
    }

    /// A device reset.
    pub(crate) fn reset(&mut self) {
        self.state = MigState::Running;
        self.read_at = 0;
    }

    /// `MIG_DATA_READ`: the next `size` bytes at most of the current saving state's data.
    pub(crate) fn read(&mut self, size: u32) -> DeviceResult<Vec<u8>> {
        let data = match self.state {
            MigState::StopCopy => &self.saved,
            MigState::PreCopy => &self.pre_copy,
            _ => return Err(Errno(libc::EINVAL)),
        };
        let start = self.read_at.min(data.len());
        let end = data.len().min(start.saturating_add(size as usize));
        let out = data[start..end].to_vec();
        self.read_at = end;
        Ok(out)
    }

    /// `MIG_DATA_WRITE`.
    pub(crate) fn write(&mut self, data: &[u8]) -> DeviceResult<()> {
        if self.state != MigState::Resuming {
            return Err(Errno(libc::EINVAL));
        }
        self.restored.extend_from_slice(data);
        Ok(())
    }

    /// `DMA_LOGGING_START` (`EBUSY` while started); the page size chosen is at least
    /// 4 KiB.
    pub(crate) fn logging_start(
        &mut self,
        page_size: u64,
        ranges: &[DmaLoggingRange],
    ) -> DeviceResult<u64> {
        if self.dirty.is_some() {
            return Err(Errno(libc::EBUSY));
        }
        self.dirty = Some(BTreeSet::new());
        self.log_ranges = ranges.to_vec();
        Ok(page_size.max(dirty_bitmap::LOG_PAGE_SIZE))
    }

    /// `DMA_LOGGING_STOP` (also when not started).
    pub(crate) fn logging_stop(&mut self) {
        self.dirty = None;
    }

    /// `DMA_LOGGING_REPORT`: the dirty pages in the range, which are then clean.
    pub(crate) fn logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> DeviceResult<Vec<u64>> {
        self.last_report = Some((iova, length, page_size));
        let dirty = self.dirty.as_mut().ok_or(Errno(libc::EINVAL))?;
        let end = iova.saturating_add(length);
        let pages: Vec<u64> = dirty.range(iova..end).copied().collect();
        for p in &pages {
            dirty.remove(p);
        }
        Ok(dirty_bitmap::encode(&pages, iova, length, page_size))
    }
}
