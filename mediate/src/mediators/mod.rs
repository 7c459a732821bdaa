//! The bundled mediators.
//!
//! - [`trace`]: passes everything through, traps the BAR ranges it is told to, and counts
//!   and logs the accesses that reach it (a debugging tool);
//! - [`virtio_vf`]: `virtio-blk-vf` and `virtio-net-vf`, which migrate vfsim's virtio-blk
//!   and virtio-net VFs (state over the PF socket, dirty pages by trapping the doorbells
//!   and walking the rings while saving).

use std::sync::Arc;

use crate::mediator::Mediator;

pub mod trace;
pub mod virtio_vf;

/// The bundled mediators, in the order `mediator=auto` tries them.
pub fn bundled() -> Vec<Arc<dyn Mediator>> {
    vec![
        Arc::new(virtio_vf::VirtioVf(&virtio_vf::BLK)),
        Arc::new(virtio_vf::VirtioVf(&virtio_vf::NET)),
        Arc::new(trace::Trace),
    ]
}
