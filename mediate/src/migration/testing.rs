//! [`FakeOps`]: a [`MigrationOps`] over a byte vector, with a journal of calls and
//! injectable failures. Public so that the vmm's tests can migrate a fake mediated device.

use std::sync::{Arc, Mutex, MutexGuard};

use devices::vfio::region_migration::{OpsError, OpsResult};

use super::region::MigrationOps;

/// The fake device behind [`FakeOps`]; every field is open to the test.
#[derive(Debug, Default)]
pub struct FakeDevice {
    /// The device's state: what a save streams out and a completed restore replaces.
    pub state: Vec<u8>,
    /// The device runs.
    pub running: bool,
    /// A save is in progress (and whether it began live).
    pub saving: Option<bool>,
    /// Bytes of `state` handed out by the current save.
    pub cursor: usize,
    /// A restore is in progress.
    pub resuming: bool,
    /// What the current restore received so far.
    pub incoming: Vec<u8>,
    /// Sizes of the pieces the current restore received.
    pub restore_pieces: Vec<usize>,
    /// Dirty tracking is on.
    pub tracking: bool,
    /// Addresses marked dirty while tracking, not yet taken.
    pub dirty: Vec<u64>,
    /// Hooks called, in order.
    pub journal: Vec<&'static str>,
    /// The next call of this hook fails (once), changing nothing.
    pub fail: Option<&'static str>,
    /// Largest chunk the device hands out (0: as big as the window).
    pub max_chunk: usize,
    /// Reported as pending regardless of `state` while set (to test a device that lies).
    pub fake_pending: Option<u64>,
}

/// A [`MigrationOps`] whose device is a [`FakeDevice`] behind a shared lock, so the test
/// keeps a handle (a clone) after giving one to the region.
#[derive(Clone, Debug, Default)]
pub struct FakeOps {
    dev: Arc<Mutex<FakeDevice>>,
}

impl FakeOps {
    /// A running device whose state is `state`.
    pub fn new(state: Vec<u8>) -> Self {
        FakeOps {
            dev: Arc::new(Mutex::new(FakeDevice {
                state,
                running: true,
                ..Default::default()
            })),
        }
    }

    /// The device.
    pub fn dev(&self) -> MutexGuard<'_, FakeDevice> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device wrote guest page(s) at `gpa` by DMA (recorded if tracking).
    pub fn mark_dirty(&self, gpa: u64) {
        let mut d = self.dev();
        if d.tracking {
            d.dirty.push(gpa);
        }
    }

    /// Journals `op` and fails it if it was told to.
    fn enter(&self, op: &'static str) -> OpsResult<MutexGuard<'_, FakeDevice>> {
        let mut d = self.dev();
        d.journal.push(op);
        if d.fail == Some(op) {
            d.fail = None;
            return Err(OpsError::new(format!("{op} failed (injected)")));
        }
        Ok(d)
    }
}

impl MigrationOps for FakeOps {
    fn stop_device(&mut self) -> OpsResult<()> {
        self.enter("stop_device")?.running = false;
        Ok(())
    }

    fn resume_device(&mut self) -> OpsResult<()> {
        self.enter("resume_device")?.running = true;
        Ok(())
    }

    fn begin_save(&mut self, live: bool) -> OpsResult<()> {
        let mut d = self.enter("begin_save")?;
        d.saving = Some(live);
        d.cursor = 0;
        Ok(())
    }

    fn end_save(&mut self) -> OpsResult<()> {
        self.enter("end_save")?.saving = None;
        Ok(())
    }

    fn pending_bytes(&mut self) -> OpsResult<u64> {
        let d = self.enter("pending_bytes")?;
        if d.saving.is_none() {
            return Err(OpsError::new("pending_bytes asked while not saving"));
        }
        Ok(d.fake_pending
            .unwrap_or((d.state.len().saturating_sub(d.cursor)) as u64))
    }

    fn save_chunk(&mut self, buf: &mut [u8]) -> OpsResult<usize> {
        let mut d = self.enter("save_chunk")?;
        if d.saving.is_none() {
            return Err(OpsError::new("save_chunk asked while not saving"));
        }
        let limit = if d.max_chunk == 0 {
            buf.len()
        } else {
            d.max_chunk.min(buf.len())
        };
        let start = d.cursor.min(d.state.len());
        let n = (d.state.len() - start).min(limit);
        buf[..n].copy_from_slice(&d.state[start..start + n]);
        d.cursor = start + n;
        Ok(n)
    }

    fn begin_restore(&mut self) -> OpsResult<()> {
        let mut d = self.enter("begin_restore")?;
        d.resuming = true;
        d.incoming.clear();
        d.restore_pieces.clear();
        Ok(())
    }

    fn restore_chunk(&mut self, data: &[u8]) -> OpsResult<()> {
        let mut d = self.enter("restore_chunk")?;
        if !d.resuming {
            return Err(OpsError::new("restore_chunk while not resuming"));
        }
        d.incoming.extend_from_slice(data);
        d.restore_pieces.push(data.len());
        Ok(())
    }

    fn end_restore(&mut self) -> OpsResult<()> {
        let mut d = match self.enter("end_restore") {
            Ok(d) => d,
            Err(e) => {
                // Refused: the restore is abandoned, the device keeps its state.
                self.dev().resuming = false;
                return Err(e);
            }
        };
        d.resuming = false;
        d.state = std::mem::take(&mut d.incoming);
        Ok(())
    }

    fn start_dirty_tracking(&mut self) -> OpsResult<()> {
        self.enter("start_dirty_tracking")?.tracking = true;
        Ok(())
    }

    fn stop_dirty_tracking(&mut self) -> OpsResult<()> {
        let mut d = self.enter("stop_dirty_tracking")?;
        d.tracking = false;
        d.dirty.clear();
        Ok(())
    }

    fn take_dirty_pages(&mut self) -> OpsResult<Vec<u64>> {
        Ok(std::mem::take(&mut self.enter("take_dirty_pages")?.dirty))
    }
}
