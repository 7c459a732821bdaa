//! Tests of the vfio-user backend: against the vfio-user crate's server over a socket pair
//! (`backend.rs`), and the vfio-pci function over it against a real vfsim (`msix.rs`) and
//! QEMU's own vfio-user server (`qemu.rs`, ignored without one).

mod backend;
mod msix;
mod qemu;
