//! [`RegionMigration`]: the VMM's side of the migration region, as a
//! [`DeviceMigration`].

use std::sync::{Arc, Mutex, MutexGuard};

use super::dirty::DirtyTracker;
use super::error::OpsError;
use super::layout::{
    decode_state, encode_state, transition, DATA_OFFSET, DATA_SIZE, DEVICE_STATE, HEADER_SIZE,
    PENDING_BYTES,
};
use crate::vfio::migration::{DeviceMigration, MigrationError, MigrationState, Result};
use crate::vfio::VfioBackend;

/// Drives a migration region (region `index` of a [`VfioBackend`]) with the v1 register
/// protocol, for the VMM's migration code.
///
/// The device's state goes through the region's bytes: the backend's `region_read` /
/// `region_write`, whether the region is served by a mediator in this process or by a
/// device server elsewhere. Dirty pages do not (the v1 layout has no field for them): they
/// come from a [`DirtyTracker`] beside it: for a mediated device its `MigrationRegion`
/// (in `mediate`) itself, for a vfio-user v1 server the server's dirty-page log.
///
/// Transitions are checked against the same table the region uses before anything is
/// written, so an illegal one is reported as such, with both states, and touches nothing.
/// Each call's register sequence (e.g. pending_bytes, data_offset, data_size, data) runs
/// under a lock, so two VMM threads cannot interleave them.
pub struct RegionMigration {
    backend: Arc<dyn VfioBackend>,
    index: u32,
    size: u64,
    dirty: Arc<dyn DirtyTracker>,
    lock: Mutex<()>,
}

impl RegionMigration {
    /// The migration region `index` of `backend` (found by the VMM from its type and
    /// subtype), with dirty pages from `dirty`. Fails if the region is too small to hold
    /// the registers or cannot be both read and written.
    pub fn new(
        backend: Arc<dyn VfioBackend>,
        index: u32,
        dirty: Arc<dyn DirtyTracker>,
    ) -> Result<Self> {
        let info = backend
            .region_info(index)
            .map_err(|source| MigrationError::Backend {
                op: format!("region info of migration region {index}"),
                source,
            })?;
        if info.size <= HEADER_SIZE || !info.flags.read || !info.flags.write {
            return Err(MigrationError::Protocol(format!(
                "region {index} ({:#x} bytes, {:?}) cannot be a migration region: it needs \
                 more than {HEADER_SIZE:#x} bytes, read and write",
                info.size, info.flags
            )));
        }
        Ok(RegionMigration {
            backend,
            index,
            size: info.size,
            dirty,
            lock: Mutex::new(()),
        })
    }

    fn serialize(&self) -> MutexGuard<'_, ()> {
        // Guards no data, only the order of register accesses.
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self, offset: u64, data: &mut [u8], what: &str) -> Result<()> {
        self.backend
            .region_read(self.index, offset, data)
            .map_err(|source| MigrationError::Backend {
                op: format!("reading {what} of migration region {}", self.index),
                source,
            })
    }

    fn write(&self, offset: u64, data: &[u8], what: &str) -> Result<()> {
        self.backend
            .region_write(self.index, offset, data)
            .map_err(|source| MigrationError::Backend {
                op: format!("writing {what} of migration region {}", self.index),
                source,
            })
    }

    fn read_u64(&self, offset: u64, what: &str) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(offset, &mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_state(&self) -> Result<MigrationState> {
        let mut b = [0u8; 4];
        self.read(DEVICE_STATE, &mut b, "device_state")?;
        let value = u32::from_le_bytes(b);
        decode_state(value).map_err(|why| {
            MigrationError::Protocol(format!("device_state reads {value:#x}: {why}"))
        })
    }

    /// Reads `data_offset` and `data_size` and checks the chunk lies in the region after
    /// the registers.
    fn chunk_bounds(&self) -> Result<(u64, u64)> {
        let offset = self.read_u64(DATA_OFFSET, "data_offset")?;
        let size = self.read_u64(DATA_SIZE, "data_size")?;
        let fits =
            offset >= HEADER_SIZE && offset.checked_add(size).is_some_and(|e| e <= self.size);
        if !fits {
            return Err(MigrationError::Protocol(format!(
                "a {size:#x}-byte chunk at data_offset {offset:#x} does not fit between the \
                 registers and the end of the {:#x}-byte region",
                self.size
            )));
        }
        Ok((offset, size))
    }

    fn expect_state(&self, op: &'static str, ok: &[MigrationState]) -> Result<MigrationState> {
        let state = self.read_state()?;
        if !ok.contains(&state) {
            return Err(MigrationError::WrongState { op, state });
        }
        Ok(state)
    }

    fn dirty_err(op: &str, e: OpsError) -> MigrationError {
        MigrationError::Device {
            op: op.to_string(),
            reason: e.to_string(),
        }
    }
}

impl DeviceMigration for RegionMigration {
    fn state(&self) -> Result<MigrationState> {
        let _order = self.serialize();
        self.read_state()
    }

    fn set_state(&self, to: MigrationState) -> Result<()> {
        let _order = self.serialize();
        let from = self.read_state()?;
        if from == to {
            return Ok(());
        }
        if to == MigrationState::Error || transition(from, to).is_none() {
            return Err(MigrationError::IllegalTransition { from, to });
        }
        let value = encode_state(to).to_le_bytes();
        if let Err(e) = self.write(DEVICE_STATE, &value, "device_state") {
            // The device says where it ended up; if it cannot even say that, its state
            // is unknown.
            let now = self.read_state().unwrap_or(MigrationState::Error);
            return Err(MigrationError::TransitionFailed {
                from,
                to,
                now,
                reason: e.to_string(),
            });
        }
        Ok(())
    }

    fn pending_bytes(&self) -> Result<u64> {
        let _order = self.serialize();
        self.read_u64(PENDING_BYTES, "pending_bytes")
    }

    fn save_chunk(&self) -> Result<Option<Vec<u8>>> {
        let _order = self.serialize();
        let state = self.expect_state(
            "save a chunk",
            &[MigrationState::PreCopy, MigrationState::StopCopy],
        )?;
        // Also acknowledges the previous chunk (v1 step f).
        let pending = self.read_u64(PENDING_BYTES, "pending_bytes")?;
        if pending == 0 {
            return Ok(None);
        }
        // Reading data_offset makes the device stage the next chunk.
        let (offset, size) = self.chunk_bounds()?;
        if size == 0 {
            // While running the estimate may have been early; once stopped, pending bytes
            // that never come would make the caller loop forever.
            if state == MigrationState::StopCopy {
                return Err(MigrationError::Protocol(format!(
                    "{pending} bytes are pending in stop-copy but the device offered an \
                     empty chunk"
                )));
            }
            return Ok(None);
        }
        // `size` fits in the region, whose size the backend gave as a u64; a region larger
        // than the address space could not have been read anyway.
        let len = usize::try_from(size).map_err(|_| {
            MigrationError::Protocol(format!("a chunk of {size:#x} bytes does not fit in memory"))
        })?;
        let mut chunk = vec![0u8; len];
        self.read(offset, &mut chunk, "the data window")?;
        Ok(Some(chunk))
    }

    fn restore_chunk(&self, data: &[u8]) -> Result<()> {
        let _order = self.serialize();
        self.expect_state("restore a chunk", &[MigrationState::Resuming])?;
        if data.is_empty() {
            return Ok(());
        }
        let offset = self.read_u64(DATA_OFFSET, "data_offset")?;
        if offset < HEADER_SIZE || offset >= self.size {
            return Err(MigrationError::Protocol(format!(
                "data_offset {offset:#x} is not after the registers inside the {:#x}-byte region",
                self.size
            )));
        }
        // The window runs from data_offset to the end of the region.
        let window = usize::try_from(self.size - offset).unwrap_or(usize::MAX);
        for piece in data.chunks(window) {
            self.write(offset, piece, "the data window")?;
            let size = (piece.len() as u64).to_le_bytes();
            self.write(DATA_SIZE, &size, "data_size")?;
        }
        Ok(())
    }

    fn start_dirty_tracking(&self) -> Result<()> {
        self.dirty
            .start_dirty_tracking()
            .map_err(|e| Self::dirty_err("start dirty tracking", e))
    }

    fn stop_dirty_tracking(&self) -> Result<()> {
        self.dirty
            .stop_dirty_tracking()
            .map_err(|e| Self::dirty_err("stop dirty tracking", e))
    }

    fn take_dirty_pages(&self) -> Result<Vec<u64>> {
        self.dirty
            .take_dirty_pages()
            .map_err(|e| Self::dirty_err("report dirty pages", e))
    }
}
