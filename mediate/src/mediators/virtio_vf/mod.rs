//! The mediators of vfsim's virtio VFs, one per personality: `virtio-blk-vf` (the
//! counterpart of the 2019 proposal's i40e VF sample) and `virtio-net-vf` (a NIC VF).
//! Both personalities are split virtqueues behind the same PF socket, so one mediator
//! serves both; [`Personality`] holds what differs (identity, names, queue roles).
//!
//! - While the VM runs it traps nothing: the doorbell page stays mapped, at native speed.
//! - When dirty tracking starts (saving begins) it reads the queues' addresses from the
//!   PF socket, traps the notify (doorbell) page so every doorbell reaches it, and walks
//!   the rings: every device-writable buffer of every published chain (a disk's read data
//!   and status bytes, a NIC's receive buffers) and the used rings are dirty, and a chain's
//!   buffers stay dirty at every collection until the device has completed it (see
//!   `tracker`). A NIC's receive buffers are written whenever a frame arrives, long after
//!   the doorbell that posted them, so they stay dirty for as long as they are posted. It
//!   walks again when the pages are collected, so chains published without a doorbell are
//!   not missed.
//! - Device state comes from the PF socket (quiesce, get state; set state on restore)
//!   and travels through the mediator's migration region.
//! - It untraps when tracking stops, saving ends (migration completed or failed), or the
//!   device closes. The doorbell trap is a local one (`TrapOwner::Local`): the device's
//!   saved PCI state does not carry it, so the destination maps its doorbells.

mod ops;
pub mod rings;
#[cfg(test)]
mod test_mem;
mod tracker;

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use devices::vfio::migration::DeviceMigration;
use devices::vfio::region_migration::{OpsError, OpsResult, RegionMigration};
use devices::vfio::{BackendError, RegionInfo, VfioBackend};
use pf_protocol::proto::VfState;
use pf_protocol::PfClient;
use serde_json::{json, Value};

use crate::attach::{AttachContext, GuestMemory, TrapHandle, TrapOwner};
use crate::error::{MediateError, Result};
use crate::identity::{DeviceIdentity, MediatorOptions};
use crate::mediator::{Access, MediatedDevice, Mediator, Probe};
use crate::migration::MigrationRegion;
use ops::VfOps;
use rings::Ring;
use tracker::{QueueStart, Tracker};

/// vfsim's vendor (Red Hat / virtio).
const VENDOR: u16 = 0x1af4;
/// The notify page: BAR 0, 0x1000 + 0x1000.
const NOTIFY_BAR: usize = 0;
const NOTIFY: (u64, u64) = (0x1000, 0x1000);
/// Deadline of each PF request.
const PF_TIMEOUT: Duration = Duration::from_secs(5);

/// What differs between the virtio VF personalities.
#[derive(Debug)]
pub struct Personality {
    /// The mediator's name (`mediator=NAME`).
    pub mediator: &'static str,
    /// What kind of VF it takes, for messages (`virtio-blk`).
    pub kind: &'static str,
    /// The PCI device id (modern virtio: 0x1040 + device type).
    pub device_id: u16,
    /// The one-line description `vmm --list-mediators` shows.
    pub description: &'static str,
    /// The virtqueues' roles, by index (for the status request).
    pub queues: &'static [&'static str],
}

/// vfsim's virtio-blk VF.
pub const BLK: Personality = Personality {
    mediator: "virtio-blk-vf",
    kind: "virtio-blk",
    device_id: 0x1042,
    description: "migrates vfsim virtio-blk VFs: state over the PF socket (pf=PATH), dirty pages by trapping the doorbells while saving",
    queues: &["requests"],
};

/// vfsim's virtio-net VF: queue 0 receives (the device writes frames into posted
/// buffers whenever they arrive), queue 1 transmits.
pub const NET: Personality = Personality {
    mediator: "virtio-net-vf",
    kind: "virtio-net",
    device_id: 0x1041,
    description: "migrates vfsim virtio-net VFs: state over the PF socket (pf=PATH), receive buffers dirty while posted, doorbells trapped while saving",
    queues: &["receive", "transmit"],
};

/// A virtio VF mediator of one personality.
pub struct VirtioVf(pub &'static Personality);

impl Mediator for VirtioVf {
    fn name(&self) -> &str {
        self.0.mediator
    }

    fn description(&self) -> &str {
        self.0.description
    }

    fn probe(
        &self,
        identity: &DeviceIdentity,
        options: &MediatorOptions,
        backend: &Arc<dyn VfioBackend>,
    ) -> Result<Probe> {
        let p = self.0;
        if (identity.vendor, identity.device) != (VENDOR, p.device_id) {
            return Ok(Probe::Decline(format!(
                "takes {} VFs ({VENDOR:04x}:{:04x}), not {:04x}:{:04x}",
                p.kind, p.device_id, identity.vendor, identity.device
            )));
        }
        let Some(pf_path) = &options.pf else {
            return Ok(Probe::Decline(
                "needs the VF's PF-side control socket: add pf=PATH".into(),
            ));
        };
        let pf = PfClient::connect(pf_path, PF_TIMEOUT).map_err(|e| {
            MediateError::Failed(format!("{}: cannot reach the PF socket: {e}", p.mediator))
        })?;
        let region_index = backend
            .device_info()
            .map_err(|source| MediateError::Backend {
                what: format!("asking {identity} for its region count"),
                source,
            })?
            .num_regions;
        let shared = Arc::new(Shared {
            personality: p,
            name: format!("{} {}", p.mediator, identity.address),
            traps: OnceLock::new(),
            memory: OnceLock::new(),
            tracker: Tracker::default(),
        });
        let region = Arc::new(MigrationRegion::new(VfOps::new(
            shared.clone(),
            Arc::new(pf),
        )));
        Ok(Probe::Accept(Box::new(VirtioVfDevice {
            shared,
            region,
            region_index,
        })))
    }
}

/// What the device handle and its migration hooks share.
pub(crate) struct Shared {
    personality: &'static Personality,
    /// The mediator and the device's address, for messages.
    name: String,
    traps: OnceLock<TrapHandle>,
    memory: OnceLock<Arc<dyn GuestMemory>>,
    tracker: Tracker,
}

impl Shared {
    fn attached(&self) -> OpsResult<(&TrapHandle, &dyn GuestMemory)> {
        match (self.traps.get(), self.memory.get()) {
            (Some(t), Some(m)) => Ok((t, &**m)),
            _ => Err(OpsError::new(format!(
                "{} is not attached to a vfio-pci device",
                self.name
            ))),
        }
    }

    /// Traps the doorbells and starts walking the rings of the ready queues in `state`.
    fn start_tracking(&self, state: &VfState) -> OpsResult<()> {
        let (traps, mem) = self.attached()?;
        let rings: Vec<QueueStart> = state
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready && q.size > 0)
            .map(|(index, q)| QueueStart {
                index: index as u16,
                ring: Ring {
                    size: q.size,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                },
                // Every chain the device has not completed may still be written.
                walk_from: q.used_idx.min(q.last_avail_idx),
                used_idx: q.used_idx,
            })
            .collect();
        // Local: the trap serves this VMM's saving only, so the saved state does not carry
        // it and the device is restored with its doorbells mapped.
        traps
            .trap(NOTIFY_BAR, NOTIFY.0, NOTIFY.1, TrapOwner::Local)
            .map_err(|e| OpsError::new(format!("trapping the doorbells: {e}")))?;
        tracing::info!(
            "{}: dirty tracking on, doorbells trapped, {} queue(s)",
            self.name,
            rings.len()
        );
        self.tracker.start(mem, rings);
        Ok(())
    }

    fn stop_tracking(&self) -> OpsResult<()> {
        if !self.tracker.is_on() {
            return Ok(());
        }
        self.tracker.stop();
        let (traps, _) = self.attached()?;
        traps
            .untrap(NOTIFY_BAR, NOTIFY.0, NOTIFY.1, TrapOwner::Local)
            .map_err(|e| OpsError::new(format!("untrapping the doorbells: {e}")))?;
        tracing::info!("{}: dirty tracking off, doorbells mapped again", self.name);
        Ok(())
    }

    fn take_dirty(&self) -> Vec<u64> {
        match self.memory.get() {
            Some(m) => self.tracker.take(&**m),
            None => Vec::new(),
        }
    }
}

struct VirtioVfDevice {
    shared: Arc<Shared>,
    region: Arc<MigrationRegion<VfOps>>,
    /// Index of the migration region (the first after the device's own).
    region_index: u32,
}

impl MediatedDevice for VirtioVfDevice {
    fn attach(&self, ctx: AttachContext) {
        let _ = self.shared.traps.set(ctx.traps);
        let _ = self.shared.memory.set(ctx.memory);
    }

    fn extra_regions(&self) -> Vec<RegionInfo> {
        vec![self.region.region_info()]
    }

    fn read(
        &self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> std::result::Result<Access, BackendError> {
        if index == self.region_index {
            self.region
                .read(offset, data)
                .map_err(|e| e.into_backend_error(index))?;
            return Ok(Access::Handled);
        }
        Ok(Access::PassThrough)
    }

    fn write(
        &self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> std::result::Result<Access, BackendError> {
        if index == self.region_index {
            self.region
                .write(offset, data)
                .map_err(|e| e.into_backend_error(index))?;
            return Ok(Access::Handled);
        }
        let in_notify =
            index == NOTIFY_BAR as u32 && offset >= NOTIFY.0 && offset < NOTIFY.0 + NOTIFY.1;
        if in_notify {
            if let Some(m) = self.shared.memory.get() {
                self.shared.tracker.doorbell(&**m);
            }
        }
        Ok(Access::PassThrough)
    }

    fn migration(
        &self,
        backend: Arc<dyn VfioBackend>,
        first_extra: u32,
    ) -> Option<Arc<dyn DeviceMigration>> {
        match RegionMigration::new(backend, first_extra, self.region.clone()) {
            Ok(m) => Some(Arc::new(m)),
            Err(e) => {
                tracing::error!("{}: no migration: {e}", self.shared.name);
                None
            }
        }
    }

    fn control(&self, command: &str, args: &Value) -> Result<Value> {
        match command {
            "status" => Ok(self.stats()),
            "skip-ring-walk" => {
                let on = args
                    .get("on")
                    .and_then(Value::as_bool)
                    .ok_or_else(|| MediateError::BadRequest("give {\"on\": true|false}".into()))?;
                self.shared
                    .tracker
                    .skip_ring_walk
                    .store(on, Ordering::Relaxed);
                tracing::warn!(
                    "{}: test switch skip-ring-walk {on}: dirty tracking is {}",
                    self.shared.name,
                    if on { "INCOMPLETE" } else { "complete" }
                );
                Ok(json!({"skip_ring_walk": on}))
            }
            "skip-queue" => {
                let queues = self.shared.personality.queues;
                let (queue, on) = match (
                    args.get("queue").and_then(Value::as_u64),
                    args.get("on").and_then(Value::as_bool),
                ) {
                    (Some(q), Some(on)) if (q as usize) < queues.len() => (q as u16, on),
                    _ => {
                        return Err(MediateError::BadRequest(format!(
                            "give {{\"queue\": N, \"on\": true|false}} with N below {} ({})",
                            queues.len(),
                            queues.join(", ")
                        )))
                    }
                };
                let bit = 1u64 << queue;
                let t = &self.shared.tracker;
                if on {
                    t.skipped_queues.fetch_or(bit, Ordering::Relaxed);
                } else {
                    t.skipped_queues.fetch_and(!bit, Ordering::Relaxed);
                }
                tracing::warn!(
                    "{}: test switch skip-queue {queue} ({}) {on}: dirty tracking is {}",
                    self.shared.name,
                    queues[usize::from(queue)],
                    if on { "INCOMPLETE" } else { "complete" }
                );
                Ok(json!({"queue": queue, "skipped": on}))
            }
            _ => Err(MediateError::BadRequest(format!(
                "{} knows the requests status, skip-ring-walk and skip-queue, not {command:?}",
                self.shared.personality.mediator
            ))),
        }
    }

    fn stats(&self) -> Value {
        let t = &self.shared.tracker;
        json!({
            "tracking": t.is_on(),
            "doorbells": t.doorbells.load(Ordering::Relaxed),
            "chains_walked": t.chains.load(Ordering::Relaxed),
            "skip_ring_walk": t.skip_ring_walk.load(Ordering::Relaxed),
            "skipped_queues": t.skipped_queues.load(Ordering::Relaxed),
            "queues": self.shared.personality.queues,
            "migration_state": format!("{:?}", self.region.state()),
        })
    }

    fn release(&self) {
        if let Err(e) = self.shared.stop_tracking() {
            tracing::warn!("{}: on release: {e}", self.shared.name);
        }
    }
}
