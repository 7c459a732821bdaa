//! The vfio-user backend: a PCI function served by another process over a vfio-user
//! socket ([`vfio_user::Client`]), with the device's own migration.
//!
//! - `backend.rs`: [`VfioUserBackend`], the [`VfioBackend`](super::VfioBackend) over the
//!   client (posted BAR writes, interrupts, DMA maps of guest RAM's file), and the choice
//!   of the device's migration;
//! - `dma.rs`: [`GuestDma`], the server's `DMA_READ`/`DMA_WRITE` commands served from
//!   guest RAM; `dma_log.rs`: [`DmaWriteLog`], the pages those writes dirtied, added to
//!   whichever migration the device has;
//! - [`migration`]: [`VfioUserMigration`], vfio-user's v2 migration messages (device
//!   feature, `MIG_DATA_READ`/`WRITE`, DMA logging);
//! - `v1_migration.rs`: a libvfio-user 0.1 server's v1 migration region, driven by
//!   [`RegionMigration`](super::region_migration::RegionMigration) with dirty pages from
//!   `VFIO_USER_DIRTY_PAGES`.

mod backend;
mod dma;
mod dma_log;
pub mod migration;
mod v1_migration;

#[cfg(test)]
mod tests;

pub use backend::VfioUserBackend;
pub use dma::GuestDma;
pub use dma_log::DmaWriteLog;
pub use migration::VfioUserMigration;
