//! `vfsim`: a software SR-IOV virtual function for tests, served over vfio-user. It is a
//! virtio 1.x modern PCI function of one of two personalities: virtio-blk backed by a
//! disk image file, or virtio-net whose wire is a Linux tap interface. One virtqueue
//! engine serves both; the personality plugs into it.
//!
//! - [`layout`]: identities (ids, queue and vector counts per personality),
//!   configuration-space and BAR layout constants;
//! - [`pci_config`]: the PCI configuration space with its write masks;
//! - [`common_cfg`]: the virtio common configuration registers and device status;
//! - [`mmap`]: memfds and bounds-checked shared mappings;
//! - [`guest_mem`]: the DMA mappings the client made (IOVA to mapping);
//! - [`virtqueue`]: split virtqueues read from and written to guest memory;
//! - [`personality`]: what a personality provides, and the queue view it works on;
//! - [`blk`]: the disk image and virtio-blk request execution;
//! - [`net`]: the tap, virtio-net receive and transmit, and the announcements after a
//!   move;
//! - [`irq`]: MSI-X as strict as hardware: enable, function mask, vector masks, pending
//!   bits and the eventfds;
//! - [`engine`]: queue processing over all of the above, shared by the personalities;
//! - [`poller`]: the thread that owns queue processing and watches the doorbells;
//! - [`device`]: [`VfSim`], the [`vfio_user::Device`] implementation;
//! - [`serve`]: binding the socket and serving one client after another;
//! - [`native_mig`]: vfio-user's own migration messages (`--native-migration`);
//! - [`pf`]: the PF-side control socket (`--pf-socket`, serving `pf-protocol`): state
//!   save/load, quiesce and resume, and a log of the guest pages the device wrote by DMA,
//!   for mediators.

#![deny(missing_docs)]

pub mod blk;
pub mod common_cfg;
pub mod device;
pub mod engine;
pub mod guest_mem;
pub mod irq;
pub mod layout;
pub mod mmap;
pub mod native_mig;
pub mod net;
pub mod pci_config;
pub mod personality;
pub mod pf;
pub mod poller;
pub mod serve;
pub mod virtqueue;

pub use device::{DeviceError, PersonalityConfig, SimConfig, VfSim};
