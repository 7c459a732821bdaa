//! The migration hooks of the virtio VF mediators (`virtio-blk-vf`, `virtio-net-vf`): device state from vfsim's PF
//! socket, dirty pages from the ring walk while the doorbells are trapped.

use std::sync::Arc;

use devices::vfio::region_migration::{OpsError, OpsResult};
use pf_protocol::proto::VfState;
use pf_protocol::PfClient;

use super::Shared;
use crate::migration::MigrationOps;

/// [`MigrationOps`] for a vfsim VF.
pub struct VfOps {
    pub(super) shared: Arc<Shared>,
    pub(super) pf: Arc<PfClient>,
    /// The serialized state being handed out, and how much of it was.
    saving: Option<(Vec<u8>, usize)>,
    stopped: bool,
    restoring: Vec<u8>,
}

impl VfOps {
    pub(super) fn new(shared: Arc<Shared>, pf: Arc<PfClient>) -> Self {
        VfOps {
            shared,
            pf,
            saving: None,
            stopped: false,
            restoring: Vec::new(),
        }
    }
}

fn pf_err(what: &str) -> impl FnOnce(pf_protocol::PfError) -> OpsError + '_ {
    move |e| OpsError::new(format!("{what} through the PF socket: {e}"))
}

impl MigrationOps for VfOps {
    fn stop_device(&mut self) -> OpsResult<()> {
        let r = self.pf.quiesce().map_err(pf_err("quiescing the VF"))?;
        tracing::info!("{}: VF quiesced ({r:?})", self.shared.name);
        self.stopped = true;
        Ok(())
    }

    fn resume_device(&mut self) -> OpsResult<()> {
        self.pf.resume().map_err(pf_err("resuming the VF"))?;
        self.stopped = false;
        Ok(())
    }

    fn begin_save(&mut self, live: bool) -> OpsResult<()> {
        tracing::info!(
            "{}: saving starts ({})",
            self.shared.name,
            if live { "pre-copy" } else { "stop-and-copy" }
        );
        self.saving = None;
        Ok(())
    }

    fn end_save(&mut self) -> OpsResult<()> {
        self.saving = None;
        // Completed or failed: the doorbells go back to the guest's direct mapping.
        self.shared.stop_tracking()
    }

    fn pending_bytes(&mut self) -> OpsResult<u64> {
        // The state is a few hundred bytes and only final once the VF is quiesced, so
        // nothing is sent during pre-copy.
        if !self.stopped {
            return Ok(0);
        }
        if self.saving.is_none() {
            let state = self
                .pf
                .get_state()
                .map_err(pf_err("reading the VF state"))?;
            let bytes = serde_json::to_vec(&state)
                .map_err(|e| OpsError::new(format!("encoding the VF state: {e}")))?;
            self.saving = Some((bytes, 0));
        }
        Ok(self
            .saving
            .as_ref()
            .map_or(0, |(b, pos)| (b.len() - pos) as u64))
    }

    fn save_chunk(&mut self, buf: &mut [u8]) -> OpsResult<usize> {
        let Some((bytes, pos)) = &mut self.saving else {
            return Ok(0);
        };
        let n = buf.len().min(bytes.len() - *pos);
        buf[..n].copy_from_slice(&bytes[*pos..*pos + n]);
        *pos += n;
        Ok(n)
    }

    fn begin_restore(&mut self) -> OpsResult<()> {
        self.restoring.clear();
        Ok(())
    }

    fn restore_chunk(&mut self, data: &[u8]) -> OpsResult<()> {
        // The state is small; a stream far larger than any VfState is garbage.
        if self.restoring.len() + data.len() > 1 << 20 {
            return Err(OpsError::new(
                "the saved VF state is larger than 1 MiB: not a virtio VF state",
            ));
        }
        self.restoring.extend_from_slice(data);
        Ok(())
    }

    fn end_restore(&mut self) -> OpsResult<()> {
        // Applied or refused, this restore's bytes are spent (vfsim checks a state whole
        // before it loads any of it, so a refused one leaves the VF as it was).
        let bytes = std::mem::take(&mut self.restoring);
        let state: VfState = serde_json::from_slice(&bytes).map_err(|e| {
            OpsError::new(format!(
                "the saved VF state ({} bytes) does not parse: {e}",
                bytes.len()
            ))
        })?;
        self.pf
            .set_state(&state)
            .map_err(pf_err("loading the VF state"))?;
        tracing::info!("{}: VF state restored", self.shared.name);
        Ok(())
    }

    fn start_dirty_tracking(&mut self) -> OpsResult<()> {
        let state = self.pf.get_state().map_err(pf_err("reading the queues"))?;
        self.shared.start_tracking(&state)
    }

    fn stop_dirty_tracking(&mut self) -> OpsResult<()> {
        self.shared.stop_tracking()
    }

    fn take_dirty_pages(&mut self) -> OpsResult<Vec<u64>> {
        Ok(self.shared.take_dirty())
    }
}
