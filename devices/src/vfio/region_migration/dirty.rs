//! [`DirtyTracker`]: the pages a device with a v1 migration region wrote by DMA.

use super::error::OpsResult;

/// Dirty-page tracking beside a v1 migration region, for [`super::RegionMigration`]: the
/// v1 region has no dirty-page fields, so this goes beside the register protocol rather
/// than through it. A mediated device's `MigrationRegion` (in `mediate`) implements it
/// over its mediator's hooks; a vfio-user v1 server's comes from `VFIO_USER_DIRTY_PAGES`.
pub trait DirtyTracker: Send + Sync {
    /// Starts recording pages the device writes.
    fn start_dirty_tracking(&self) -> OpsResult<()>;
    /// Stops recording.
    fn stop_dirty_tracking(&self) -> OpsResult<()>;
    /// Page-aligned guest physical addresses written since the start or the last call,
    /// sorted, without duplicates.
    fn take_dirty_pages(&self) -> OpsResult<Vec<u64>>;
}
