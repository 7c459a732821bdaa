//! Errors of the mediate crate.

use devices::vfio::{BackendError, VfioPciError};

/// Why a mediator could not be registered, chosen, attached or asked something.
#[derive(Debug, thiserror::Error)]
pub enum MediateError {
    /// No mediator is registered under that name.
    #[error("no mediator is named {name:?}; registered mediators: {known}")]
    UnknownMediator {
        /// The name asked for.
        name: String,
        /// The registered names, comma-separated.
        known: String,
    },
    /// A mediator with that name is already registered.
    #[error("a mediator named {0:?} is already registered")]
    Duplicate(String),
    /// The mediator is used by devices and cannot be unregistered.
    #[error("mediator {name:?} is in use by {users} device(s); close them first")]
    InUse {
        /// The mediator.
        name: String,
        /// How many devices use it.
        users: usize,
    },
    /// The named mediator does not take the device.
    #[error("mediator {name:?} declined device {device}: {reason}")]
    Declined {
        /// The mediator.
        name: String,
        /// The device, as `vendor:device (backend)`.
        device: String,
        /// Why.
        reason: String,
    },
    /// With `mediator=auto`, no registered mediator took the device.
    #[error("no mediator accepts device {device}: {reasons}")]
    NoneAccepts {
        /// The device.
        device: String,
        /// Each mediator's reason, `name: reason; ...`.
        reasons: String,
    },
    /// The device's backend failed while the mediator was being set up or used.
    #[error("{what}: {source}")]
    Backend {
        /// What was attempted.
        what: String,
        /// The backend's error.
        source: BackendError,
    },
    /// A trap or untrap request failed.
    #[error(transparent)]
    Trap(#[from] Box<VfioPciError>),
    /// The vfio-pci device the mediator was attached to is gone.
    #[error("the device {0} is closed")]
    DeviceGone(String),
    /// The mediator was used before it was attached to its vfio-pci device.
    #[error("the mediator of {0} is not attached to a vfio-pci device yet")]
    NotAttached(String),
    /// A control request the mediator does not know or whose arguments are wrong.
    #[error("{0}")]
    BadRequest(String),
    /// Anything else a mediator reports (its PF side failed, ...).
    #[error("{0}")]
    Failed(String),
}

/// Result of mediate operations.
pub type Result<T> = std::result::Result<T, MediateError>;
