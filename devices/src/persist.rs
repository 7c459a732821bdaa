//! One way to save and load a device's guest-visible state, in the spirit of Firecracker's
//! `Persist`: each device has a plain serde `State` struct, taken from a built device and
//! loaded into one built the same way (the VMM builds the VM first, then loads the state).
//! The stream that carries states is versioned as a whole by the `migration` crate, which
//! also owns their one encoding; the states themselves carry no version.
//!
//! A passed-through device's *internal* state (what only its hardware or server knows)
//! travels through [`vfio::migration::DeviceMigration`](crate::vfio::migration); this trait
//! is for what the VMM itself emulates: the legacy devices and a passed-through function's
//! virtualized PCI configuration.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A device whose emulated state can be saved and loaded.
pub trait Persist {
    /// The saved state: a plain struct, compared field by field in round-trip tests.
    type State: Serialize + DeserializeOwned;
    /// Why a state cannot be loaded (on an error the device is left as it was).
    type Error: std::error::Error + Send + Sync + 'static;

    /// The device's state now. Take it with the vCPUs stopped, so nothing changes meanwhile.
    fn save(&self) -> Self::State;

    /// Replaces the device's state with `state`, checking it first.
    fn restore(&self, state: &Self::State) -> Result<(), Self::Error>;
}
