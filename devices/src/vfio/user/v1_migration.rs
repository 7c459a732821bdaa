//! Migration of a vfio-user device through its own v1 migration region: what servers
//! built on libvfio-user 0.1 offer (QEMU 10.0's bundled copy among them), the register
//! protocol of the proposal this VMM comes from. The register protocol is driven by the
//! same [`RegionMigration`] that drives a mediator's region; the pages the server wrote
//! into guest RAM come from `VFIO_USER_DIRTY_PAGES` (the dirty-page command of protocol
//! 0.1, before DMA logging), beside the register protocol since v1 has no field for them.
//!
//! Chosen by what the server offers: [`super::VfioUserBackend`] asks for the v2 migration
//! feature first and falls back to a region of type
//! `VFIO_REGION_TYPE_MIGRATION_DEPRECATED`/`VFIO_REGION_SUBTYPE_MIGRATION`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_user::{Client, ClientError};

use crate::vfio::region_migration::layout::{REGION_SUBTYPE, REGION_TYPE};
use crate::vfio::region_migration::{DirtyTracker, OpsError, OpsResult, RegionMigration};
use crate::vfio::VfioBackend;

/// `VFIO_REGION_TYPE_MIGRATION_DEPRECATED` and `VFIO_REGION_SUBTYPE_MIGRATION`.
const MIGRATION_REGION: (u32, u32) = (REGION_TYPE, REGION_SUBTYPE);
/// First device-specific region index (after BARs 0-5, the ROM, config space and VGA).
const FIRST_EXTRA_REGION: u32 = 9;
/// The page size dirty bitmaps are asked in (the client's DMA page size).
const PAGE_SIZE: u64 = 4096;

/// The pages a v1 server wrote, through `VFIO_USER_DIRTY_PAGES`.
struct DirtyPages {
    client: Arc<Client>,
    socket: PathBuf,
    /// Guest RAM as DMA-mapped (IOVA = GPA): the server answers per mapping.
    ram: Vec<(u64, u64)>,
}

impl DirtyPages {
    fn err(&self, what: &str, e: ClientError) -> OpsError {
        OpsError::new(format!(
            "{what} (vfio-user server at {}): {e}",
            self.socket.display()
        ))
    }
}

impl DirtyTracker for DirtyPages {
    fn start_dirty_tracking(&self) -> OpsResult<()> {
        self.client
            .dirty_pages_start()
            .map_err(|e| self.err("starting dirty page logging", e))
    }

    fn stop_dirty_tracking(&self) -> OpsResult<()> {
        self.client
            .dirty_pages_stop()
            .map_err(|e| self.err("stopping dirty page logging", e))
    }

    fn take_dirty_pages(&self) -> OpsResult<Vec<u64>> {
        let mut pages = Vec::new();
        for &(iova, size) in &self.ram {
            let got = self
                .client
                .dirty_pages_get(iova, size, PAGE_SIZE)
                .map_err(|e| {
                    self.err(
                        &format!("reading the dirty pages of {iova:#x}+{size:#x}"),
                        e,
                    )
                })?;
            pages.extend(got);
        }
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }
}

/// The device's v1 migration region, if its server offers one: the first region after
/// the standard ones whose type capability says migration. `backend` is the device's
/// backend (the region is read and written through it); `ram` the DMA-mapped guest RAM.
/// A region that is there but unusable is logged and taken as no migration, which makes
/// the device block snapshots and migration.
pub fn probe(
    backend: Arc<dyn VfioBackend>,
    client: Arc<Client>,
    socket: &Path,
    ram: Vec<(u64, u64)>,
) -> Result<Option<RegionMigration>, ClientError> {
    let regions = client.device_info()?.num_regions;
    for index in FIRST_EXTRA_REGION..regions {
        let (_, ty) = match client.region_info_with_type(index) {
            Ok(found) => found,
            // A server may have no region at an index (libvfio-user answers EINVAL).
            Err(ClientError::Remote { .. }) => continue,
            Err(e) => return Err(e),
        };
        if ty.map(|t| (t.type_, t.subtype)) != Some(MIGRATION_REGION) {
            continue;
        }
        let dirty = Arc::new(DirtyPages {
            client: client.clone(),
            socket: socket.to_path_buf(),
            ram,
        });
        return match RegionMigration::new(backend, index, dirty) {
            Ok(m) => {
                tracing::info!(
                    "vfio-user server at {} offers migration through its v1 migration region {index}",
                    socket.display()
                );
                Ok(Some(m))
            }
            Err(e) => {
                tracing::warn!(
                    "vfio-user server at {}: its migration region {index} is unusable: {e}",
                    socket.display()
                );
                Ok(None)
            }
        };
    }
    Ok(None)
}
