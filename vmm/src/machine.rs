//! [`Machine`]: the running VM's parts that the control API, snapshots and live migration
//! work on, shared with the API thread while the main thread runs the event loop.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::device_manager::Emulated;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use crate::device_setup::PciPassthrough;
use crate::exit::VmExit;
use crate::pause::{PauseControl, PauseError};
use crate::state::vcpu::{KvmCaps, VcpuState};
use crate::vcpu::ExitCounters;

/// Sends the kick signal to one vCPU thread.
pub struct Kicker(pub libc::pthread_t);

impl Kicker {
    /// Makes the thread leave KVM_RUN.
    pub fn kick(&self) {
        // SAFETY: the pthread id belongs to a vCPU thread of this VM; `vm::run` stops the
        // API (the only other user of kickers) before it joins the vCPU threads, so the
        // thread has not been joined yet. The signal's handler only sets immediate_exit.
        let r = unsafe { libc::pthread_kill(self.0, crate::vcpu::kick_signal()) };
        if r != 0 {
            tracing::warn!("cannot signal a vCPU thread: error {r}");
        }
    }
}

/// One vCPU as the VMM controls it from outside its thread.
pub struct VcpuHandle {
    /// vCPU id.
    pub id: u8,
    /// Pause handshake.
    pub pause: Arc<PauseControl>,
    /// Kicks its thread.
    pub kicker: Kicker,
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
    /// Serialises pause, resume, snapshot and migration; true while paused by request.
    paused: Mutex<bool>,
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

/// Held while one operation pauses/resumes the VM; says whether it is paused.
pub type PauseGuard<'a> = MutexGuard<'a, bool>;

impl Machine {
    /// A machine over its parts (vCPU handles are added once the threads run).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cpus: u8,
        mem_size: u64,
        vm: Arc<VmFd>,
        mem: GuestMemoryMmap,
        memslots: Arc<resources::memslots::MemSlots>,
        caps: Option<Arc<KvmCaps>>,
        devices: Arc<Vec<PciPassthrough>>,
        emulated: Emulated,
        exits: Arc<ExitCounters>,
        exit: Arc<VmExit>,
        vcpus: Vec<VcpuHandle>,
    ) -> Self {
        Machine {
            cpus,
            mem_size,
            vm,
            mem,
            memslots,
            caps,
            devices,
            emulated,
            exits,
            exit,
            vcpus,
            migration: Default::default(),
            paused: Mutex::new(false),
        }
    }

    /// Takes the pause lock: one pause/resume/snapshot/migration at a time.
    pub fn lock(&self) -> PauseGuard<'_> {
        self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the VM is paused by request; `None` while a snapshot or migration holds the
    /// pause lock (answering must not wait for it).
    pub fn paused_now(&self) -> Option<bool> {
        match self.paused.try_lock() {
            Ok(p) => Some(*p),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(*p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

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

    /// The API's pause: stops the vCPUs until [`resume`](Self::resume).
    pub fn pause(&self) -> Result<(), MachineError> {
        let mut paused = self.lock();
        if *paused {
            return Err(MachineError::Already("paused"));
        }
        self.pause_vcpus()?;
        *paused = true;
        Ok(())
    }

    /// The API's resume.
    pub fn resume(&self) -> Result<(), MachineError> {
        let mut paused = self.lock();
        if !*paused {
            return Err(MachineError::Already("running"));
        }
        self.resume_vcpus()?;
        *paused = false;
        Ok(())
    }
}
