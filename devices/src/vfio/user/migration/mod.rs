//! [`VfioUserMigration`]: a [`DeviceMigration`] over vfio-user's own migration messages,
//! for a plain `--device vfio-user,...` whose server offers migration (e.g. `vfsim
//! --native-migration`). A mediated device keeps its mediator's migration region.
//!
//! - States map one to one onto the v2 state machine: `Running` = `RUNNING`, `PreCopy`
//!   = `PRE_COPY`, `StopCopy` = `STOP_COPY`, `Stopped` = `STOP`, `Resuming` =
//!   `RESUMING`, `Error` = `ERROR`. The server walks the arcs between them. Transitions
//!   the specification forbids (`STOP_COPY -> PRE_COPY`, to `ERROR`, anything from
//!   `ERROR`, `PRE_COPY` on a device without it) are refused here without a message.
//! - Saving: the stream is read with `MIG_DATA_READ` until it answers 0 bytes.
//!   vfio-user has no message for the amount pending, so
//!   [`pending_bytes`](DeviceMigration::pending_bytes) reads what the device has now
//!   into a buffer and answers its size (exact in stop-copy, where the stream ends;
//!   what is available now in pre-copy); [`save_chunk`](DeviceMigration::save_chunk)
//!   hands the buffer out first.
//! - Restoring: each chunk goes out as `MIG_DATA_WRITE` (split to the transfer size).
//! - Dirty pages: DMA logging over guest RAM's ranges (IOVA = GPA, as the RAM is
//!   DMA-mapped); each [`take_dirty_pages`](DeviceMigration::take_dirty_pages) asks for
//!   the bitmap of every range and turns it into 4 KiB page addresses.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vfio_bindings::bindings::vfio::VFIO_MIGRATION_PRE_COPY;
use vfio_user::proto::dirty_bitmap;
use vfio_user::{Client, ClientError, DmaLoggingRange, MigState};

use crate::vfio::migration::{
    DeviceMigration, MigrationError, MigrationState, Result, DIRTY_PAGE_SIZE,
};
use crate::vfio::BackendError;

// The report's bitmaps decode to the pages the migration copies.
const _: () = assert!(dirty_bitmap::LOG_PAGE_SIZE == DIRTY_PAGE_SIZE);

/// Largest `MIG_DATA_READ` asked for (the negotiated transfer size may be smaller).
const READ_CHUNK: u32 = 1 << 20;

/// The vfio-user migration of one device.
pub struct VfioUserMigration {
    client: Arc<Client>,
    socket: PathBuf,
    /// `VFIO_MIGRATION_*` flags the server announced.
    flags: u64,
    /// Guest RAM: `(gpa, length)` of each region, sorted.
    ram: Vec<(u64, u64)>,
    inner: Mutex<Inner>,
}

struct Inner {
    /// The state after the last transition (the server's answer to `state()` wins).
    state: MigrationState,
    /// Saved state already read from the server and not yet handed out.
    buffered: Vec<u8>,
    /// Page size of the DMA log, while it is on.
    log_page_size: Option<u64>,
}

/// The v2 state for `s`.
fn to_v2(s: MigrationState) -> Option<MigState> {
    Some(match s {
        MigrationState::Running => MigState::Running,
        MigrationState::PreCopy => MigState::PreCopy,
        MigrationState::StopCopy => MigState::StopCopy,
        MigrationState::Stopped => MigState::Stop,
        MigrationState::Resuming => MigState::Resuming,
        MigrationState::Error => return None,
    })
}

/// The interface's state for the v2 state `s` (P2P states are not used by vfio-user).
fn from_v2(s: MigState) -> Option<MigrationState> {
    Some(match s {
        MigState::Running => MigrationState::Running,
        MigState::PreCopy => MigrationState::PreCopy,
        MigState::StopCopy => MigrationState::StopCopy,
        MigState::Stop => MigrationState::Stopped,
        MigState::Resuming => MigrationState::Resuming,
        MigState::Error => MigrationState::Error,
        MigState::RunningP2p | MigState::PreCopyP2p => return None,
    })
}

impl VfioUserMigration {
    /// The device's migration if its server offers one (`VFIO_DEVICE_FEATURE_MIGRATION`
    /// answers), `None` if it refuses. `ram` lists guest RAM as `(gpa, length)`, the
    /// ranges whose DMA writes are tracked. Transport failures are errors.
    pub fn probe(
        client: Arc<Client>,
        socket: &Path,
        ram: Vec<(u64, u64)>,
    ) -> std::result::Result<Option<Self>, ClientError> {
        let flags = match client.migration_flags() {
            Ok(flags) => flags,
            Err(ClientError::Remote { errno, .. }) => {
                tracing::debug!(
                    "vfio-user server at {} offers no migration (errno {errno})",
                    socket.display()
                );
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let state = client.mig_state()?;
        let state = from_v2(state).ok_or_else(|| ClientError::Protocol {
            command: vfio_user::proto::Command::DeviceFeature,
            reason: format!("the device is in {state}, which vfio-user does not use"),
        })?;
        let mut ram = ram;
        ram.sort_unstable();
        tracing::info!(
            "vfio-user server at {} offers migration (flags {flags:#x}, device {state})",
            socket.display()
        );
        Ok(Some(VfioUserMigration {
            client,
            socket: socket.to_path_buf(),
            flags,
            ram,
            inner: Mutex::new(Inner {
                state,
                buffered: Vec::new(),
                log_page_size: None,
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A client error as a migration error: a refusal is the device's, the rest the
    /// transport's.
    fn error(&self, op: &str, e: ClientError) -> MigrationError {
        let op = format!("{op} (vfio-user server at {})", self.socket.display());
        match e {
            ClientError::Remote { errno, .. } => MigrationError::Device {
                op,
                reason: format!(
                    "{} (errno {errno})",
                    std::io::Error::from_raw_os_error(errno)
                ),
            },
            ClientError::Protocol { ref reason, .. } if !self.client.is_broken() => {
                MigrationError::Protocol(reason.clone())
            }
            ClientError::InvalidArgument { .. } => MigrationError::Backend {
                op,
                source: BackendError::Unsupported {
                    op: "the request".into(),
                    reason: e.to_string(),
                },
            },
            other => MigrationError::Backend {
                op: op.clone(),
                source: BackendError::Disconnected {
                    op,
                    reason: other.to_string(),
                },
            },
        }
    }

    /// The server's state now.
    fn server_state(&self) -> Result<MigrationState> {
        let s = self
            .client
            .mig_state()
            .map_err(|e| self.error("reading the migration state", e))?;
        from_v2(s).ok_or_else(|| {
            MigrationError::Protocol(format!(
                "the device is in {s}, which vfio-user does not use"
            ))
        })
    }

    /// Reads everything the device has for now into `inner.buffered`.
    fn fill(&self, inner: &mut Inner) -> Result<()> {
        while let Some(data) = self.read_once()? {
            inner.buffered.extend_from_slice(&data);
        }
        Ok(())
    }

    /// One `MIG_DATA_READ`; `None` when it answers nothing.
    fn read_once(&self) -> Result<Option<Vec<u8>>> {
        let size = READ_CHUNK.min(self.client.negotiated().max_data_xfer_size);
        let data = self
            .client
            .mig_data_read(size)
            .map_err(|e| self.error("reading migration data", e))?;
        Ok((!data.is_empty()).then_some(data))
    }

    fn check_saving(&self, inner: &Inner, op: &'static str) -> Result<()> {
        match inner.state {
            MigrationState::PreCopy | MigrationState::StopCopy => Ok(()),
            state => Err(MigrationError::WrongState { op, state }),
        }
    }
}

impl DeviceMigration for VfioUserMigration {
    fn state(&self) -> Result<MigrationState> {
        let mut inner = self.lock();
        let s = self.server_state()?;
        inner.state = s;
        Ok(s)
    }

    fn set_state(&self, to: MigrationState) -> Result<()> {
        let mut inner = self.lock();
        // The server's word, not the cache: a device reset moves it back to RUNNING.
        let from = self.server_state()?;
        if from != inner.state {
            inner.buffered.clear();
            inner.state = from;
        }
        let illegal = || MigrationError::IllegalTransition { from, to };
        let Some(target) = to_v2(to) else {
            return Err(illegal());
        };
        if from == to {
            return Ok(());
        }
        let no_pre_copy = self.flags & u64::from(VFIO_MIGRATION_PRE_COPY) == 0;
        if from == MigrationState::Error
            || (from == MigrationState::StopCopy && to == MigrationState::PreCopy)
            || (to == MigrationState::PreCopy && no_pre_copy)
        {
            return Err(illegal());
        }
        if let Err(e) = self.client.set_mig_state(target) {
            let reason = e.to_string();
            let refused = matches!(e, ClientError::Remote { .. });
            if !refused {
                return Err(self.error(&format!("moving the device from {from} to {to}"), e));
            }
            let now = self.server_state()?;
            inner.state = now;
            if now != from {
                inner.buffered.clear();
            }
            return Err(MigrationError::TransitionFailed {
                from,
                to,
                now,
                reason,
            });
        }
        // Whatever was buffered belongs to the session that just ended (or to none).
        if !(from == MigrationState::PreCopy && to == MigrationState::StopCopy) {
            inner.buffered.clear();
        }
        inner.state = to;
        Ok(())
    }

    fn pending_bytes(&self) -> Result<u64> {
        let mut inner = self.lock();
        if self.check_saving(&inner, "count pending bytes").is_err() {
            return Ok(0);
        }
        self.fill(&mut inner)?;
        Ok(inner.buffered.len() as u64)
    }

    fn save_chunk(&self) -> Result<Option<Vec<u8>>> {
        let mut inner = self.lock();
        self.check_saving(&inner, "save a chunk")?;
        if !inner.buffered.is_empty() {
            return Ok(Some(std::mem::take(&mut inner.buffered)));
        }
        self.read_once()
    }

    fn restore_chunk(&self, data: &[u8]) -> Result<()> {
        let inner = self.lock();
        if inner.state != MigrationState::Resuming {
            return Err(MigrationError::WrongState {
                op: "restore a chunk",
                state: inner.state,
            });
        }
        self.client.mig_data_write(data).map_err(|e| {
            self.error(
                &format!("writing {} bytes of migration data", data.len()),
                e,
            )
        })
    }

    fn start_dirty_tracking(&self) -> Result<()> {
        let mut inner = self.lock();
        let ranges: Vec<DmaLoggingRange> = self
            .ram
            .iter()
            .map(|&(iova, length)| DmaLoggingRange { iova, length })
            .collect();
        let page_size = self
            .client
            .dma_logging_start(DIRTY_PAGE_SIZE, &ranges)
            .map_err(|e| self.error("starting DMA logging", e))?;
        if !page_size.is_power_of_two() {
            return Err(MigrationError::Protocol(format!(
                "the device chose DMA logging page size {page_size:#x}, not a power of two"
            )));
        }
        inner.log_page_size = Some(page_size);
        Ok(())
    }

    fn stop_dirty_tracking(&self) -> Result<()> {
        let mut inner = self.lock();
        self.client
            .dma_logging_stop()
            .map_err(|e| self.error("stopping DMA logging", e))?;
        inner.log_page_size = None;
        Ok(())
    }

    fn take_dirty_pages(&self) -> Result<Vec<u64>> {
        let inner = self.lock();
        let Some(page_size) = inner.log_page_size else {
            return Err(MigrationError::Device {
                op: "take the dirty pages".into(),
                reason: "dirty tracking is not started".into(),
            });
        };
        let mut pages = BTreeSet::new();
        for &(iova, length) in &self.ram {
            let bitmap = self
                .client
                .dma_logging_report(iova, length, page_size)
                .map_err(|e| {
                    self.error(&format!("reading the DMA log of {iova:#x}+{length:#x}"), e)
                })?;
            pages.extend(dirty_bitmap::decode(&bitmap, iova, length, page_size));
        }
        Ok(pages.into_iter().collect())
    }
}

#[cfg(test)]
mod tests;
