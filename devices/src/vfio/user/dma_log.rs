//! [`DmaWriteLog`]: the guest pages a server wrote through `DMA_WRITE` messages, and the
//! decorator that adds them to a vfio-user device's migration's dirty pages.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::vfio::migration::{DeviceMigration, MigrationState, Result, DIRTY_PAGE_SIZE};

/// The guest pages a server wrote through `DMA_WRITE` messages while tracking is on.
#[derive(Default)]
pub struct DmaWriteLog {
    /// `None` while not tracking.
    pages: Mutex<Option<BTreeSet<u64>>>,
}

impl DmaWriteLog {
    fn lock(&self) -> MutexGuard<'_, Option<BTreeSet<u64>>> {
        self.pages.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts recording (what was recorded before is dropped).
    pub fn start(&self) {
        *self.lock() = Some(BTreeSet::new());
    }

    /// Stops recording.
    pub fn stop(&self) {
        *self.lock() = None;
    }

    /// Records a write of `len` bytes at `addr`, if tracking.
    pub fn record(&self, addr: u64, len: usize) {
        if let Some(pages) = self.lock().as_mut() {
            let end = addr.saturating_add(len as u64);
            let mut page = addr & !(DMA_LOG_PAGE - 1);
            while page < end {
                pages.insert(page);
                page = page.saturating_add(DMA_LOG_PAGE);
            }
        }
    }

    /// The pages recorded since the start or the last call.
    pub fn take(&self) -> Vec<u64> {
        self.lock()
            .as_mut()
            .map(|p| std::mem::take(p).into_iter().collect())
            .unwrap_or_default()
    }
}

/// Page size of [`DmaWriteLog`] (that of device dirty tracking).
const DMA_LOG_PAGE: u64 = DIRTY_PAGE_SIZE;

/// A vfio-user device's migration with the pages its server wrote through `DMA_WRITE`
/// added to the pages it reports itself: a decorator, the migration never notices.
pub(super) struct WithDmaWrites {
    pub(super) inner: Arc<dyn DeviceMigration>,
    pub(super) log: Arc<DmaWriteLog>,
}

impl DeviceMigration for WithDmaWrites {
    fn state(&self) -> Result<MigrationState> {
        self.inner.state()
    }
    fn set_state(&self, state: MigrationState) -> Result<()> {
        self.inner.set_state(state)
    }
    fn pending_bytes(&self) -> Result<u64> {
        self.inner.pending_bytes()
    }
    fn save_chunk(&self) -> Result<Option<Vec<u8>>> {
        self.inner.save_chunk()
    }
    fn restore_chunk(&self, data: &[u8]) -> Result<()> {
        self.inner.restore_chunk(data)
    }
    fn start_dirty_tracking(&self) -> Result<()> {
        self.log.start();
        self.inner.start_dirty_tracking()
    }
    fn stop_dirty_tracking(&self) -> Result<()> {
        self.log.stop();
        self.inner.stop_dirty_tracking()
    }
    fn take_dirty_pages(&self) -> Result<Vec<u64>> {
        let mut pages = self.inner.take_dirty_pages()?;
        pages.extend(self.log.take());
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }
}
