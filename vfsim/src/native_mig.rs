//! [`NativeMigration`]: vfio-user's own migration (`--native-migration`), implemented
//! with the PF side's operations, so that the native path and the mediated path save and
//! load exactly the same state.
//!
//! - The v2 state machine, legal arcs only (the specification's "direct state
//!   transitions"); other transitions walk the shortest path of legal arcs that has no
//!   saving state inside it, as the kernel's `vfio_mig_get_next_state()` does without
//!   the P2P states. `STOP_COPY -> PRE_COPY`, `ERROR` as a target, the P2P states, and
//!   anything from `ERROR` (only a device reset leaves it) are refused with `EINVAL`
//!   before anything is done.
//! - Arcs: `RUNNING -> STOP` quiesces (requests in flight complete first),
//!   `STOP -> RUNNING` resumes; `PRE_COPY -> STOP_COPY` quiesces too; entering
//!   `STOP_COPY` takes the function's [`VfState`] as JSON (what the PF socket's
//!   `get_state` answers), which `MIG_DATA_READ` then hands out; leaving a saving state
//!   drops what was not read. `PRE_COPY` has no pre-copy data: the state is small and
//!   changes with every request, so it is all sent in `STOP_COPY`.
//! - `STOP -> RESUMING` starts an empty buffer, `MIG_DATA_WRITE` appends to it (at most
//!   [`MAX_RESUME_DATA`]), and `RESUMING -> STOP` parses and loads it (the PF socket's
//!   `set_state`). Data that does not parse or does not fit this device fails the
//!   transition with `EINVAL`: the buffer is dropped and the device stays in
//!   `RESUMING`, unchanged, so the client may send the state again (or reset).
//! - DMA logging: a second DMA write log beside the PF side's (see
//!   [`crate::guest_mem`]), limited to the client's ranges, kept at 4 KiB pages and
//!   reported as the specification's bitmap at whatever page size is asked for.

use std::sync::{Arc, Mutex, MutexGuard};

use pf_protocol::proto::VfState;
use vfio_bindings::bindings::vfio::{VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY};
use vfio_user::proto::dirty_bitmap;
use vfio_user::{DeviceResult, DmaLoggingRange, Errno, MigState};

use crate::engine::Engine;
use crate::guest_mem::LOG_PAGE_SIZE;
use crate::pf::control::Controller;

/// Most bytes of migration data accepted in `RESUMING` (a state is a few KiB).
pub const MAX_RESUME_DATA: usize = 16 << 20;

/// The function's vfio-user migration.
#[derive(Debug)]
pub struct NativeMigration {
    controller: Controller,
    engine: Arc<Mutex<Engine>>,
    state: MigState,
    /// The saved state being read out, and how much of it was read.
    save: Vec<u8>,
    save_at: usize,
    /// The state being written in `RESUMING`.
    resume: Vec<u8>,
}

/// The next state on the way from `from` to `to`, or `None` if `to` cannot be reached.
fn next_hop(from: MigState, to: MigState) -> Option<MigState> {
    use MigState::*;
    match (from, to) {
        (Error | RunningP2p | PreCopyP2p, _) | (_, Error | RunningP2p | PreCopyP2p) => None,
        (a, b) if a == b => Some(b),
        (StopCopy, PreCopy) => None,
        (Running, Stop | PreCopy) => Some(to),
        (Running, StopCopy | Resuming) => Some(Stop),
        (Stop, Running | StopCopy | Resuming) => Some(to),
        (Stop, PreCopy) => Some(Running),
        (PreCopy, Running | StopCopy) => Some(to),
        (PreCopy, Stop | Resuming) => Some(Running),
        (StopCopy, _) => Some(Stop),
        (Resuming, _) => Some(Stop),
        // Every other pair is equal, handled above.
        _ => None,
    }
}

/// The path of states from `from` (excluded) to `to` (included), or `None` if there is
/// none.
pub fn path(from: MigState, to: MigState) -> Option<Vec<MigState>> {
    let mut path = Vec::new();
    let mut at = from;
    while at != to {
        at = next_hop(at, to)?;
        path.push(at);
        if path.len() > MigState::ALL.len() {
            return None;
        }
    }
    if from == to && next_hop(from, to).is_none() {
        return None;
    }
    Some(path)
}

impl NativeMigration {
    /// Migration over the function's shared parts; the device starts `RUNNING`.
    pub fn new(controller: Controller, engine: Arc<Mutex<Engine>>) -> Self {
        NativeMigration {
            controller,
            engine,
            state: MigState::Running,
            save: Vec::new(),
            save_at: 0,
            resume: Vec::new(),
        }
    }

    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `VFIO_DEVICE_FEATURE_MIGRATION`: stop-copy and (empty) pre-copy.
    pub fn flags(&self) -> u64 {
        u64::from(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY)
    }

    /// The current state.
    pub fn state(&self) -> MigState {
        self.state
    }

    /// Moves to `to` along legal arcs; see the module docs.
    pub fn set_state(&mut self, to: MigState) -> DeviceResult<()> {
        let Some(path) = path(self.state, to) else {
            tracing::warn!(from = %self.state, %to, "illegal migration state transition refused");
            return Err(Errno(libc::EINVAL));
        };
        for next in path {
            self.arc(next)?;
            tracing::info!(from = %self.state, to = %next, "vfio-user migration state");
            self.state = next;
        }
        Ok(())
    }

    /// Carries out the arc from the current state to `next`.
    fn arc(&mut self, next: MigState) -> DeviceResult<()> {
        use MigState::*;
        match (self.state, next) {
            (Running, Stop) => {
                self.controller.quiesce();
            }
            (Stop, Running) => self.controller.resume(),
            (Running, PreCopy) => self.start_save(Vec::new()),
            (PreCopy, Running) | (StopCopy, Stop) => self.start_save(Vec::new()),
            (PreCopy, StopCopy) | (Stop, StopCopy) => {
                self.controller.quiesce();
                let state = self.controller.get_state();
                let json = serde_json::to_vec(&state).map_err(|e| {
                    tracing::error!("serialising the device state failed: {e}");
                    Errno(libc::EIO)
                })?;
                self.start_save(json);
            }
            (Stop, Resuming) => self.resume = Vec::new(),
            (Resuming, Stop) => {
                let data = std::mem::take(&mut self.resume);
                let state: VfState = serde_json::from_slice(&data).map_err(|e| {
                    tracing::warn!(
                        bytes = data.len(),
                        "migration data written in RESUMING is not a device state: {e}"
                    );
                    Errno(libc::EINVAL)
                })?;
                self.controller.set_state(&state).map_err(|e| {
                    tracing::warn!("migration data written in RESUMING refused: {e}");
                    Errno(libc::EINVAL)
                })?;
            }
            (from, to) => {
                // `path` yields legal arcs only.
                tracing::error!(%from, %to, "no such migration arc");
                return Err(Errno(libc::EINVAL));
            }
        }
        Ok(())
    }

    fn start_save(&mut self, data: Vec<u8>) {
        self.save = data;
        self.save_at = 0;
    }

    /// `MIG_DATA_READ`: the next `size` bytes at most of the saved state.
    pub fn read(&mut self, size: u32) -> DeviceResult<Vec<u8>> {
        if !self.state.is_saving() {
            tracing::warn!(state = %self.state, "MIG_DATA_READ outside PRE_COPY/STOP_COPY refused");
            return Err(Errno(libc::EINVAL));
        }
        let end = self
            .save
            .len()
            .min(self.save_at.saturating_add(size as usize));
        let out = self.save[self.save_at..end].to_vec();
        self.save_at = end;
        Ok(out)
    }

    /// `MIG_DATA_WRITE`: more of the state being restored.
    pub fn write(&mut self, data: &[u8]) -> DeviceResult<()> {
        if self.state != MigState::Resuming {
            tracing::warn!(state = %self.state, "MIG_DATA_WRITE outside RESUMING refused");
            return Err(Errno(libc::EINVAL));
        }
        if self.resume.len().saturating_add(data.len()) > MAX_RESUME_DATA {
            tracing::warn!("MIG_DATA_WRITE refused: more than {MAX_RESUME_DATA} bytes of state");
            return Err(Errno(libc::EFBIG));
        }
        self.resume.extend_from_slice(data);
        Ok(())
    }

    /// A device reset: back to `RUNNING` (resumed), buffers dropped. DMA logging stays.
    pub fn reset(&mut self) {
        if self.state != MigState::Running {
            tracing::info!(from = %self.state, "device reset: migration state back to RUNNING");
            self.controller.resume();
        }
        self.state = MigState::Running;
        self.start_save(Vec::new());
        self.resume = Vec::new();
    }

    /// The client left: its DMA log means nothing to the next one. The migration state
    /// stays (the specification keeps device state across reconnections).
    pub fn client_disconnected(&mut self) {
        self.engine().mem.native_log_stop();
    }

    /// `DMA_LOGGING_START`: logs the writes into `ranges`; returns the page size used
    /// for reports by default (`page_size`, at least 4 KiB).
    pub fn log_start(&mut self, page_size: u64, ranges: &[DmaLoggingRange]) -> DeviceResult<u64> {
        let mut sorted: Vec<(u64, u64)> = ranges.iter().map(|r| (r.iova, r.length)).collect();
        sorted.sort_unstable();
        let bad =
            sorted.iter().any(|r| r.1 == 0) || sorted.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0);
        if bad {
            tracing::warn!("DMA_LOGGING_START refused: empty or overlapping ranges");
            return Err(Errno(libc::EINVAL));
        }
        if !self.engine().mem.native_log_start(sorted) {
            tracing::warn!("DMA_LOGGING_START refused: logging is already on");
            return Err(Errno(libc::EBUSY));
        }
        tracing::info!(ranges = ranges.len(), "vfio-user DMA logging started");
        Ok(page_size.max(LOG_PAGE_SIZE))
    }

    /// `DMA_LOGGING_STOP` (nothing happens if logging is off).
    pub fn log_stop(&mut self) -> DeviceResult<()> {
        if self.engine().mem.native_log_stop() {
            tracing::info!("vfio-user DMA logging stopped");
        }
        Ok(())
    }

    /// `DMA_LOGGING_REPORT`: the bitmap of `iova..iova + length` at `page_size`; the
    /// 4 KiB pages reported (every one overlapping the range) leave the log.
    pub fn log_report(&mut self, iova: u64, length: u64, page_size: u64) -> DeviceResult<Vec<u64>> {
        let Some(pages) = self.engine().mem.native_log_take(iova, length) else {
            tracing::warn!("DMA_LOGGING_REPORT refused: logging is off");
            return Err(Errno(libc::EINVAL));
        };
        Ok(dirty_bitmap::encode(&pages, iova, length, page_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigState::*;

    #[test]
    fn paths_follow_the_legal_arcs() {
        assert_eq!(path(Running, StopCopy), Some(vec![Stop, StopCopy]));
        assert_eq!(path(Running, Resuming), Some(vec![Stop, Resuming]));
        assert_eq!(path(PreCopy, StopCopy), Some(vec![StopCopy]));
        assert_eq!(path(PreCopy, Stop), Some(vec![Running, Stop]));
        assert_eq!(path(StopCopy, Running), Some(vec![Stop, Running]));
        assert_eq!(path(Resuming, Running), Some(vec![Stop, Running]));
        assert_eq!(path(Resuming, StopCopy), Some(vec![Stop, StopCopy]));
        assert_eq!(path(Stop, PreCopy), Some(vec![Running, PreCopy]));
        assert_eq!(path(Resuming, PreCopy), Some(vec![Stop, Running, PreCopy]));
        assert_eq!(path(Running, Running), Some(vec![]));
        assert_eq!(path(StopCopy, PreCopy), None);
        for s in MigState::ALL {
            assert_eq!(path(s, Error), None);
            assert_eq!(path(Error, s), None);
            assert_eq!(path(s, RunningP2p), None);
            assert_eq!(path(s, PreCopyP2p), None);
        }
        // No saving state inside a path.
        for from in MigState::ALL {
            for to in MigState::ALL {
                if let Some(p) = path(from, to) {
                    assert!(p.len() <= 3, "{from} -> {to}: {p:?}");
                    if let Some((_, inner)) = p.split_last() {
                        assert!(inner.iter().all(|s| !s.is_saving()), "{from} -> {to}");
                    }
                }
            }
        }
    }
}
