//! Why a control API request could not be done; the text is the error response.

use std::path::PathBuf;

use devices::vfio::migration::MigrationError;

use super::protocol::MigrationOp;

/// Why a request failed (the VM runs on).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The line is not a request.
    #[error("bad request ({0}); send one JSON object per line with \"request\": \"info\", \"device-stats\", \"pause\", \"resume\", \"snapshot\", \"migrate\", \"migration-status\", \"mediator\" or \"device-migration\"")]
    BadRequest(#[source] serde_json::Error),
    /// No device has that id.
    #[error("no device {id:?}; devices: {}", if .known.is_empty() { "none".to_owned() } else { .known.join(", ") })]
    UnknownDevice {
        /// The id asked for.
        id: String,
        /// The ids there are.
        known: Vec<String>,
    },
    /// A device-migration step needs a file.
    #[error("{0:?} needs \"path\": the state file")]
    NeedsPath(MigrationOp),
    /// A device-migration step failed.
    #[error(transparent)]
    Migration(#[from] MigrationError),
    /// Saving a device's state failed; it runs on.
    #[error("saving: {0} (the device was resumed)")]
    Save(#[source] MigrationError),
    /// Loading a device's state failed; `after` says what state the device is in now.
    #[error("restoring from {}: {source}; {after}", .path.display())]
    Restore {
        /// The state file.
        path: PathBuf,
        /// Why (boxed: the error is returned on every request's path).
        source: Box<MigrationError>,
        /// The device's state after the failure, in words.
        after: String,
    },
    /// The state file could not be read or written.
    #[error(transparent)]
    File(#[from] migration::file::FileError),
}
