//! A configurable fake vfio-user device for tests; compiled only with the `testing`
//! feature, which only dev-dependencies turn on.
//!
//! - [`FakeDevice`], made by [`FakeDeviceBuilder`]: regions ([`Region`]: sizes, flags,
//!   contents, memfd-backed memory with sparse areas, read-only ranges, write
//!   [`Trigger`]s that raise an interrupt or DMA into client memory), IRQ types with
//!   eventfds, DMA mappings, and optional v2 migration ([`Migration`]: the state
//!   machine, data, DMA logging). It is a [`Device`](crate::Device), served by the
//!   crate's own [`serve`](crate::serve); its [`Probe`] shows the test what it did.
//! - [`FakeServer`] serves one on a thread; with [`Fault`]s, a relay between it and the
//!   client makes it misbehave as a test needs (error or rewritten replies, raw bytes no
//!   server would send, silence, closing, no longer reading, commands such as
//!   `DMA_READ`/`DMA_WRITE` sent to the client) and records what the client sends.
//! - Helpers for tests: [`memfd`] and [`Mapping`], [`eventfd`], [`signal`],
//!   [`wait_event`].

mod builder;
mod device;
mod dma;
mod error;
mod eventfd;
mod fault;
mod irq;
mod memfd;
mod migration;
mod probe;
mod region;
mod relay;
mod server;
#[cfg(test)]
mod tests;
mod transcript;

pub use builder::FakeDeviceBuilder;
pub use device::FakeDevice;
pub use error::FakeError;
pub use eventfd::{eventfd, signal, wait_event};
pub use fault::{Fault, Inject, Outgoing};
pub use memfd::{memfd, Mapping};
pub use migration::{Arcs, Migration, MigrationData};
pub use probe::{DmaMapRecord, FakeState, Probe, RegionWriteRecord, SetIrqsRecord};
pub use region::{Region, Trigger};
pub use server::{FakeServer, FakeServerBuilder};
pub use transcript::Received;
