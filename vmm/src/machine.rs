//! [`Machine`]: the running VM's parts that the control API, snapshots and live migration
//! work on. The VMM's main thread owns it and answers every API request (see
//! [`crate::api`]); a live migration's thread shares it while it runs.
//!
//! Pause, resume and snapshot run on the main thread only, one request at a time, and are
//! refused while a migration runs; the migration thread is then the only one that pauses
//! or resumes the vCPUs. So no lock serialises them, and none is held across a migration.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::device_manager::Emulated;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use crate::device_manager::PciPassthrough;
use crate::exit::VmExit;
use crate::pause::{PauseControl, PauseError};
use crate::state::vcpu::{KvmCaps, VcpuState};
use crate::vcpu::ExitCounters;

/// One vCPU as the VMM controls it from outside its thread.
pub struct VcpuHandle {
    /// vCPU id.
    pub id: u8,
    /// Pause handshake.
    pub pause: Arc<PauseControl>,
    /// Kicks its thread.
    pub kicker: crate::vcpu::Kicker,
}

/// The running VM.
pub struct Machine {
    /// vCPU count.
    pub cpus: u8,
    /// Guest RAM size.
    pub mem_size: u64,
    /// The VM.
    pub vm: Arc<VmFd>,
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// The VM's memory slots (dirty logging of RAM).
    pub memslots: Arc<resources::memslots::MemSlots>,
    /// What KVM can save (None if probing failed: snapshots are then refused).
    pub caps: Option<Arc<KvmCaps>>,
    /// The passed-through devices.
    pub devices: Arc<Vec<PciPassthrough>>,
    /// The legacy devices and the PCI root.
    pub emulated: Emulated,
    /// KVM exit counters.
    pub exits: Arc<ExitCounters>,
    /// Where the VM's end is recorded (a completed migration ends the source).
    pub exit: Arc<VmExit>,
    /// The vCPUs.
    pub vcpus: Vec<VcpuHandle>,
    /// The current or last outgoing migration.
    pub migration: crate::migrate::progress::Tracker,
    /// True while paused by request (or for good, once migrated away); read and written
    /// through [`Machine::paused`] and [`Machine::set_paused`].
    pub(crate) paused: AtomicBool,
    /// The system-call filters, for the threads started while the VM runs.
    pub seccomp: crate::seccomp::Filters,
}

/// Why the VM could not be paused or resumed.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A vCPU did not pause, resume or give its state.
    #[error(transparent)]
    Pause(#[from] PauseError),
    /// Already in that state.
    #[error("the VM is already {0}")]
    Already(&'static str),
}

impl Machine {
    /// Pauses every vCPU (all or none: on failure the paused ones are resumed).
    pub fn pause_vcpus(&self) -> Result<(), MachineError> {
        for (n, v) in self.vcpus.iter().enumerate() {
            if let Err(e) = v.pause.pause(v.id, || v.kicker.kick()) {
                for u in &self.vcpus[..=n] {
                    let _ = u.pause.resume(u.id);
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Resumes every vCPU.
    pub fn resume_vcpus(&self) -> Result<(), MachineError> {
        let mut first = None;
        for v in &self.vcpus {
            if let Err(e) = v.pause.resume(v.id) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), |e| Err(e.into()))
    }

    /// The state of every (paused) vCPU, in id order.
    pub fn capture_vcpus(&self) -> Result<Vec<VcpuState>, MachineError> {
        self.vcpus
            .iter()
            .map(|v| v.pause.capture(v.id).map_err(MachineError::from))
            .collect()
    }

    /// Whether the VM is paused by request.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Records whether the VM is paused by request.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Release);
    }

    /// The API's pause: stops the vCPUs until [`resume`](Self::resume).
    pub fn pause(&self) -> Result<(), MachineError> {
        if self.paused() {
            return Err(MachineError::Already("paused"));
        }
        self.pause_vcpus()?;
        self.set_paused(true);
        Ok(())
    }

    /// The API's resume.
    pub fn resume(&self) -> Result<(), MachineError> {
        if !self.paused() {
            return Err(MachineError::Already("running"));
        }
        self.resume_vcpus()?;
        self.set_paused(false);
        Ok(())
    }
}
