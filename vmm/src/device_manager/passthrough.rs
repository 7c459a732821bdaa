//! A passed-through PCI function as the VM holds it: the device, its mediator, how it
//! migrates (or why it cannot), its slot and INTx line. The device manager owns them; the
//! API, snapshots and migrations read them through [`crate::machine::Machine`].

use std::sync::Arc;

use devices::vfio::{BarStats, VfioPciDevice};
use mediate::MediatedBackend;

/// A built device and its id.
pub struct PciPassthrough {
    /// The id from `--device`.
    pub id: String,
    /// The function.
    pub device: Arc<VfioPciDevice>,
    /// Its mediated backend, for `vfio-mediated` devices.
    pub mediated: Option<Arc<MediatedBackend>>,
    /// How its state is saved and restored, if it can be.
    pub migration: Option<Arc<dyn devices::vfio::migration::DeviceMigration>>,
    /// Why it cannot migrate: `Some` exactly when `migration` is `None`. A VM holding such a
    /// device refuses snapshots and live migration (its state would be lost silently).
    pub migration_blocker: Option<String>,
    /// Its slot on PCI bus 0.
    pub slot: u8,
    /// Where its INTx is routed, if it has INTx.
    pub intx: Option<devices::vfio::IntxRouting>,
}

/// Per-device access statistics, for `--exit-stats`.
#[derive(Clone, Debug)]
pub struct DeviceStats {
    /// The device's id.
    pub id: String,
    /// Per-BAR counters.
    pub bars: Vec<BarStats>,
    /// Backend failures on the guest's access paths.
    pub errors: u64,
}

impl PciPassthrough {
    /// The device's statistics now.
    pub fn stats(&self) -> DeviceStats {
        DeviceStats {
            id: self.id.clone(),
            bars: self.device.bar_stats(),
            errors: self.device.backend_errors(),
        }
    }
}
