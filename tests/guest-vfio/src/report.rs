//! What the program prints: one JSON object per line, `{"step": name, ...}`, so that the host
//! side test asserts each step by name; a failed step prints `{"step": "error", ...}` and the
//! program exits 1.

use devices::vfio::migration::MigrationError;
use devices::vfio::BackendError;
use serde_json::{json, Value};

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The backend refused or failed.
    #[error("{step}: {source}")]
    Backend {
        /// The step.
        step: &'static str,
        /// The backend's error.
        source: BackendError,
    },
    /// The migration interface refused or failed.
    #[error("{step}: {source}")]
    Migration {
        /// The step.
        step: &'static str,
        /// The migration error.
        source: MigrationError,
    },
    /// A system call failed.
    #[error("{step}: {source}")]
    Io {
        /// The step.
        step: &'static str,
        /// The system's error.
        source: std::io::Error,
    },
    /// The device did something the step did not expect.
    #[error("{step}: {what}")]
    Check {
        /// The step.
        step: &'static str,
        /// What was wrong.
        what: String,
    },
}

/// Adds the step name to errors of each kind.
pub trait Step<T> {
    /// Names the step that failed.
    fn step(self, step: &'static str) -> Result<T, StepError>;
}

impl<T> Step<T> for Result<T, BackendError> {
    fn step(self, step: &'static str) -> Result<T, StepError> {
        self.map_err(|source| StepError::Backend { step, source })
    }
}

impl<T> Step<T> for Result<T, MigrationError> {
    fn step(self, step: &'static str) -> Result<T, StepError> {
        self.map_err(|source| StepError::Migration { step, source })
    }
}

impl<T> Step<T> for std::io::Result<T> {
    fn step(self, step: &'static str) -> Result<T, StepError> {
        self.map_err(|source| StepError::Io { step, source })
    }
}

/// Fails `step` with `what` unless `ok`.
pub fn check(ok: bool, step: &'static str, what: impl FnOnce() -> String) -> Result<(), StepError> {
    if ok {
        Ok(())
    } else {
        Err(StepError::Check { step, what: what() })
    }
}

/// Prints one step's findings.
pub fn emit(step: &str, mut fields: Value) {
    if let Value::Object(m) = &mut fields {
        m.insert("step".into(), json!(step));
    }
    println!("{fields}");
}

/// The variant name of a migration error, for the host to assert the typed mapping.
pub fn migration_error_kind(e: &MigrationError) -> &'static str {
    match e {
        MigrationError::IllegalTransition { .. } => "IllegalTransition",
        MigrationError::TransitionFailed { .. } => "TransitionFailed",
        MigrationError::WrongState { .. } => "WrongState",
        MigrationError::Device { .. } => "Device",
        MigrationError::Protocol(_) => "Protocol",
        MigrationError::Backend { .. } => "Backend",
    }
}
