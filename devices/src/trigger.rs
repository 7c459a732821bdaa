//! An interrupt line that is an eventfd: registered with KVM as an irqfd, a write to it
//! injects the interrupt without a VMM thread on the path.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// A [`vm_superio::Trigger`] backed by an eventfd (typically a KVM irqfd).
#[derive(Clone, Debug)]
pub struct EventFdTrigger(Arc<EventFd>);

impl EventFdTrigger {
    /// Wraps `evt`; clones share the same eventfd.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(Arc::new(evt))
    }

    /// The eventfd, e.g. to register it as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
