//! INTx of a passed-through function: a level-triggered interrupt on an IOAPIC pin,
//! delivered through a KVM irqfd with a resample eventfd.
//!
//! The device signals `trigger` (`SET_IRQS` INTx `ACTION_TRIGGER` with an eventfd); KVM,
//! through the irqfd, asserts the GSI and keeps it asserted until the guest's EOI, when it
//! deasserts it and signals `resample`. A device whose INTx masks itself when it fires
//! (`VFIO_IRQ_INFO_AUTOMASKED`: kernel VFIO) must then be unmasked: kernel VFIO takes
//! `resample` as its unmask eventfd ([`VfioBackend::set_intx_unmask_eventfd`]) and does it
//! itself, as QEMU sets it up; for a backend that cannot (vfio-user, whose unmask eventfd
//! means something else), a relay thread waits on `resample` and sends `ACTION_UNMASK`
//! ([`VfioBackend::mask_irqs`]). A device that does not mask itself (libvfio-user's,
//! which only report `VFIO_IRQ_INFO_EVENTFD`) is never sent an UNMASK: none is needed, and
//! libvfio-user's `samples/server` sends DMA requests on the socket right after it raises
//! INTx and takes whatever message comes next for their reply.
//!
//! INTx is live only while the guest has neither MSI nor MSI-X enabled, as in QEMU: it is
//! disabled at the device before either gets its vectors, and set up again once both are
//! off. While the command register's INTx Disable bit is set, the irqfd is removed (KVM
//! deasserts the line), so nothing reaches the guest; a signal the device makes meanwhile
//! stays counted in `trigger` and is delivered when the bit is cleared.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{VfioBackend, IRQ_INTX};
use super::errlog::ErrorLog;
use crate::pci::msix::RouteError;

/// The VM's level-triggered interrupt lines, as INTx needs them. The vmm implements it with
/// KVM irqfds with a resample eventfd; tests use a recorder.
pub trait IntxRoutes: Send + Sync {
    /// Asserts `gsi` whenever `trigger` is signalled and keeps it asserted until the guest's
    /// EOI, which deasserts it and signals `resample` (`KVM_IRQFD` with
    /// `KVM_IRQFD_FLAG_RESAMPLE`).
    fn enable_level(
        &self,
        gsi: u32,
        trigger: &EventFd,
        resample: &EventFd,
    ) -> Result<(), RouteError>;
    /// Stops that (removes the irqfd); the line is deasserted.
    fn disable_level(&self, gsi: u32, trigger: &EventFd) -> Result<(), RouteError>;
}

/// Where a function's INTx goes: what the guest was told (interrupt pin, and the routing the
/// MP table describes), so a restored device must have the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntxRouting {
    /// Interrupt pin, 1-4 (INTA-INTD).
    pub pin: u8,
    /// The GSI (IOAPIC pin) it is routed to.
    pub gsi: u32,
}

/// Whether a configuration write of `data` at `offset` sets bit `mask` of the byte at
/// `byte` (e.g. an MSI or MSI-X enable bit).
pub fn write_sets_bit(offset: usize, data: &[u8], byte: usize, mask: u8) -> bool {
    byte.checked_sub(offset)
        .and_then(|k| data.get(k))
        .is_some_and(|b| b & mask != 0)
}

/// A thread that unmasks INTx at the device on each signal of the resample eventfd.
struct Relay {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The thread holds the backend: it must end for the device to close.
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The INTx state of one function.
pub struct Intx {
    owner: String,
    backend: Arc<dyn VfioBackend>,
    routes: Arc<dyn IntxRoutes>,
    routing: IntxRouting,
    trigger: EventFd,
    resample: EventFd,
    /// The device signals `trigger` (INTx is enabled at the device).
    at_device: bool,
    /// The irqfd is registered.
    routed: bool,
    /// The device masks INTx when it fires and waits for an UNMASK after the EOI.
    automasked: bool,
    /// The relay thread, once a backend did not take `resample` itself.
    relay: Option<Relay>,
    /// Whether the relay may unmask (INTx enabled at the device); shared with the thread.
    armed: Arc<AtomicBool>,
    errors: Arc<ErrorLog>,
}

impl Intx {
    /// INTx of `owner`, routed as `routing`, of a device that masks it when it fires
    /// (`automasked`) or not; nothing is set up until [`update`](Self::update).
    pub fn new(
        owner: &str,
        backend: Arc<dyn VfioBackend>,
        routes: Arc<dyn IntxRoutes>,
        routing: IntxRouting,
        automasked: bool,
    ) -> io::Result<Self> {
        Ok(Intx {
            owner: owner.to_string(),
            backend,
            routes,
            routing,
            trigger: EventFd::new(EFD_NONBLOCK)?,
            resample: EventFd::new(EFD_NONBLOCK)?,
            at_device: false,
            routed: false,
            automasked,
            relay: None,
            armed: Arc::new(AtomicBool::new(false)),
            errors: Arc::new(ErrorLog::default()),
        })
    }

    /// The pin and GSI.
    pub fn routing(&self) -> IntxRouting {
        self.routing
    }

    /// Whether INTx is enabled at the device, and whether its irqfd is registered.
    pub fn live(&self) -> (bool, bool) {
        (self.at_device, self.routed)
    }

    /// The eventfd the device signals.
    pub fn trigger(&self) -> &EventFd {
        &self.trigger
    }

    /// The eventfd KVM signals on the guest's EOI.
    pub fn resample(&self) -> &EventFd {
        &self.resample
    }

    /// Failures so far (each logged, rate-limited).
    pub fn errors(&self) -> u64 {
        self.errors.count()
    }

    fn check<T>(&self, what: &str, r: Result<T, impl std::fmt::Display>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.errors.record(&self.owner, format_args!("{what}"), &e);
                None
            }
        }
    }

    /// Brings INTx to what the guest's configuration asks: enabled at the device unless MSI
    /// or MSI-X is on (`msi_on`), and delivering unless the command register's INTx Disable
    /// bit is set as well (`disabled`). Failures are logged and retried on the next call.
    pub fn update(&mut self, msi_on: bool, disabled: bool) {
        let want_device = !msi_on;
        let want_routed = want_device && !disabled;
        if self.routed && !want_routed {
            let r = self.routes.disable_level(self.routing.gsi, &self.trigger);
            if self.check("removing the INTx irqfd", r).is_some() {
                self.routed = false;
            }
        }
        if self.at_device && !want_device {
            self.armed.store(false, Ordering::Release);
            let r = self.backend.disable_irqs(IRQ_INTX);
            if self.check("disabling INTx", r).is_some() {
                self.at_device = false;
            }
        }
        if want_device && !self.at_device {
            let r = self
                .backend
                .set_irq_eventfds(IRQ_INTX, 0, &[Some(&self.trigger)]);
            if self.check("enabling INTx", r).is_some() {
                self.at_device = true;
                if self.automasked {
                    self.set_up_unmasking();
                }
                self.armed.store(true, Ordering::Release);
            }
        }
        if want_routed && self.at_device && !self.routed {
            let r = self
                .routes
                .enable_level(self.routing.gsi, &self.trigger, &self.resample);
            if self.check("registering the INTx irqfd", r).is_some() {
                self.routed = true;
                // Get to a known state: the device may be masked, waiting for an EOI of a
                // signal that went nowhere.
                self.unmask();
            }
        }
    }

    /// Hands `resample` to the device as its unmask eventfd or, if it cannot take it,
    /// starts the relay thread (once).
    fn set_up_unmasking(&mut self) {
        let r = self.backend.set_intx_unmask_eventfd(&self.resample);
        if self.check("setting the INTx unmask eventfd", r) == Some(true) || self.relay.is_some() {
            return;
        }
        match self.start_relay() {
            Ok(relay) => self.relay = Some(relay),
            Err(e) => self.errors.record(
                &self.owner,
                format_args!("starting the INTx unmask relay"),
                &e,
            ),
        }
    }

    fn start_relay(&self) -> io::Result<Relay> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let (resample, stopped) = (self.resample.try_clone()?, stop.try_clone()?);
        let backend = self.backend.clone();
        let (armed, errors, owner) = (self.armed.clone(), self.errors.clone(), self.owner.clone());
        let thread = std::thread::Builder::new()
            .name(format!("{}-intx", self.owner))
            .spawn(move || relay(&owner, &*backend, &resample, &stopped, &armed, &errors))?;
        Ok(Relay {
            stop,
            thread: Some(thread),
        })
    }

    /// Unmasks INTx at the device if it is enabled there and masks itself (after a
    /// restore, or when the irqfd is registered again).
    pub fn unmask(&self) {
        if self.at_device && self.automasked {
            self.check(
                "unmasking INTx",
                self.backend.mask_irqs(IRQ_INTX, 0, 1, false),
            );
        }
    }

    /// Whether the device signalled INTx and the signal has not reached KVM (INTx Disable
    /// set): `trigger` holds a count.
    pub fn is_pending(&self) -> bool {
        readable(&self.trigger)
    }

    /// Records a signal, as if the device had made it (restoring a pending one).
    pub fn mark_pending(&self) {
        self.check("marking INTx pending", self.trigger.write(1));
    }

    /// Takes INTx down: the irqfd, the device's eventfds, the relay thread.
    pub fn shutdown(&mut self) {
        self.update(true, true);
        self.relay = None;
    }
}

impl Drop for Intx {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether `fd` can be read without blocking.
fn readable(fd: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one initialised pollfd over a descriptor that stays open for the call;
    // poll only writes its `revents`.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r == 1 && p.revents & libc::POLLIN != 0
}

/// The relay thread: on each signal of `resample` (the guest's EOI), unmasks INTx at the
/// device while it is `armed`; ends when `stop` is signalled.
fn relay(
    owner: &str,
    backend: &dyn VfioBackend,
    resample: &EventFd,
    stop: &EventFd,
    armed: &AtomicBool,
    errors: &ErrorLog,
) {
    // SAFETY: `resample` outlives every wait below.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(resample.as_raw_fd()) };
    loop {
        match crate::wait::readable_or_stopped(fd, stop) {
            Ok(crate::wait::Woken::Stopped) => return,
            Ok(crate::wait::Woken::Readable) => {}
            Err(e) => {
                tracing::error!(
                    "{owner}: the INTx unmask relay stops, so INTx may stay masked after the next interrupt: poll: {e}"
                );
                return;
            }
        }
        // Non-blocking: another reader (kernel VFIO's own) may have taken the count.
        let _ = resample.read();
        if armed.load(Ordering::Acquire) {
            if let Err(e) = backend.mask_irqs(IRQ_INTX, 0, 1, false) {
                errors.record(owner, format_args!("unmasking INTx after an EOI"), &e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enable_bits_are_found_in_writes_of_any_width() {
        // MSI-X control at 0x52: enable is bit 7 of byte 0x53.
        assert!(write_sets_bit(0x50, &[0, 0, 0, 0x80], 0x53, 0x80));
        assert!(write_sets_bit(0x52, &0x8000u16.to_le_bytes(), 0x53, 0x80));
        assert!(write_sets_bit(0x53, &[0xc0], 0x53, 0x80));
        assert!(
            !write_sets_bit(0x52, &[0xff], 0x53, 0x80),
            "misses the byte"
        );
        assert!(
            !write_sets_bit(0x54, &[0xff; 4], 0x53, 0x80),
            "after the byte"
        );
        assert!(
            !write_sets_bit(0x50, &[0, 0, 0, 0x40], 0x53, 0x80),
            "other bit"
        );
    }
}
