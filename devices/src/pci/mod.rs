//! PCI: configuration space, the host bridge and the configuration-mechanism-#1 root.

pub mod config;
pub mod host_bridge;
pub mod msi;
pub mod msix;
pub mod persist;
pub mod root;

pub use config::ConfigSpace;
pub use host_bridge::HostBridge;
pub use persist::{
    ConfigSpaceState, MsiState, MsixEntryState, MsixState, PciPersistError, PciRootState,
};
pub use root::{PciDevice, PciRoot};
