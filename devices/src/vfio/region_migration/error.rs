//! [`OpsError`]: what the hooks behind a migration region report.

/// A failure a region's hooks (a mediator's `MigrationOps`) or a [`super::DirtyTracker`]
/// report, in their own words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OpsError(pub String);

impl OpsError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        OpsError(message.into())
    }
}

/// Result of a region hook or a dirty tracker.
pub type OpsResult<T> = Result<T, OpsError>;
