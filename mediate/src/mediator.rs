//! The mediator interface: what a mediator plug-in implements.
//!
//! A [`Mediator`] is registered once, by name. When a vfio-pci device opens, the registry
//! offers it the device ([`Mediator::probe`]); a mediator that accepts returns a
//! [`MediatedDevice`], the per-device handle through which every region-info query,
//! region read/write and mmap decision of that device passes from then on.

use std::sync::Arc;

use devices::vfio::migration::DeviceMigration;
use devices::vfio::{BackendError, RegionInfo};

use crate::attach::AttachContext;
use crate::error::{MediateError, Result};
use crate::identity::{DeviceIdentity, MediatorOptions};

/// What a mediator did with an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The mediator handled it (a read's data is filled in); the device does not see it.
    Handled,
    /// Forward it to the device unchanged.
    PassThrough,
}

/// A mediator's answer to a device offered to it.
pub enum Probe {
    /// Takes the device, with its handle.
    Accept(Box<dyn MediatedDevice>),
    /// Does not take it, and why (shown to the user if no mediator takes the device).
    Decline(String),
}

/// A mediator plug-in, registered with the [`Registry`](crate::Registry) by name.
pub trait Mediator: Send + Sync {
    /// The name users give with `mediator=NAME`.
    fn name(&self) -> &str;

    /// One line for `--help` and logs.
    fn description(&self) -> &str;

    /// Offered a device: accept it with a handle, or decline with a reason. `backend` is
    /// the device's own backend (the mediator may keep it to reach the device).
    fn probe(
        &self,
        identity: &DeviceIdentity,
        options: &MediatorOptions,
        backend: &Arc<dyn devices::vfio::VfioBackend>,
    ) -> Result<Probe>;
}

/// A mediator's handle for one device. Called from vCPU threads (trapped accesses), the
/// VMM's main thread (set-up, control requests) and its migration thread, so every method
/// takes `&self`.
///
/// Region indices are the device's (0-5 BARs, 7 configuration space, ...); regions the
/// mediator adds ([`extra_regions`](Self::extra_regions)) follow the device's own, and
/// accesses to them must be [`Access::Handled`].
pub trait MediatedDevice: Send + Sync {
    /// The vfio-pci device exists: here are the means to trap/untrap its BARs and to read
    /// guest memory. Called once, before the guest runs.
    fn attach(&self, ctx: AttachContext) {
        let _ = ctx;
    }

    /// May change a region's flags and size as the VMM sees them (`info` is the device's).
    fn region_info(&self, index: u32, info: RegionInfo) -> RegionInfo {
        let _ = index;
        info
    }

    /// Which of the areas `(offset, size)` of region `index` the device offers for mmap
    /// may be mapped into the guest. Default: all of them. (Run-time changes go through
    /// [`AttachContext::traps`] instead.)
    fn mmap_areas(&self, index: u32, areas: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
        let _ = index;
        areas
    }

    /// Regions the mediator adds after the device's own (e.g. its migration region).
    fn extra_regions(&self) -> Vec<RegionInfo> {
        Vec::new()
    }

    /// A read of region `index` (a trapped BAR access, a configuration read, a read of an
    /// extra region).
    fn read(
        &self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> std::result::Result<Access, BackendError> {
        let _ = (index, offset, data);
        Ok(Access::PassThrough)
    }

    /// A write of region `index`.
    fn write(
        &self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> std::result::Result<Access, BackendError> {
        let _ = (index, offset, data);
        Ok(Access::PassThrough)
    }

    /// The device's migration, if the mediator provides one. `backend` is the mediated
    /// backend (through which the mediator's extra regions are reached) and
    /// `first_extra` the index of the first extra region.
    fn migration(
        &self,
        backend: Arc<dyn devices::vfio::VfioBackend>,
        first_extra: u32,
    ) -> Option<Arc<dyn DeviceMigration>> {
        let _ = (backend, first_extra);
        None
    }

    /// A control request (from the VMM's API): `command` with JSON arguments; the answer is
    /// JSON.
    fn control(&self, command: &str, args: &serde_json::Value) -> Result<serde_json::Value> {
        let _ = args;
        Err(MediateError::BadRequest(format!(
            "this mediator takes no control request {command:?}"
        )))
    }

    /// Counters and state for statistics, as JSON.
    fn stats(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// The device is closing: undo what the mediator changed. Called once.
    fn release(&self) {}
}
