//! The bundled mediators.
//!
//! - [`trace`]: passes everything through, traps the BAR ranges it is told to, and counts
//!   and logs the accesses that reach it (a debugging tool);
//! - [`virtio_blk_vf`]: migrates vfsim's virtio-blk VFs (state over the PF socket, dirty
//!   pages by trapping the doorbells and walking the rings while saving).

use std::sync::Arc;

use crate::mediator::Mediator;

pub mod trace;
pub mod virtio_blk_vf;

/// The bundled mediators, in the order `mediator=auto` tries them.
pub fn bundled() -> Vec<Arc<dyn Mediator>> {
    vec![Arc::new(virtio_blk_vf::VirtioBlkVf), Arc::new(trace::Trace)]
}
