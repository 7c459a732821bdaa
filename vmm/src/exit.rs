//! How the VM ends: the first vCPU or signal that decides it records the reason and wakes
//! the event loop.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 reset, triple fault): `reboot` in the guest.
    GuestReset,
    /// The guest powered off.
    GuestPowerOff,
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// The guest was migrated to this destination and runs there now.
    Migrated(String),
    /// A fatal vCPU error (KVM emulation failure, entry failure, ioctl error).
    Error(String),
}

impl ExitReason {
    /// The VMM's exit status for this reason.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::Error(_) => 1,
            _ => 0,
        }
    }
}

/// Shared between vCPU threads, devices and the event loop.
pub struct VmExit {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl VmExit {
    /// A fresh, not yet triggered exit.
    pub fn new() -> std::io::Result<Self> {
        Ok(VmExit {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless another was recorded first, and wakes the event loop.
    pub fn trigger(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot wake the event loop to stop the VM: {e}");
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Readable once the VM should stop.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}
