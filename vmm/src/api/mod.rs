//! The control API: a Unix socket (`--api-socket PATH`) that answers JSON requests (see
//! [`protocol`]) while the VM runs.
//!
//! [`server`] serves the socket's clients, each on its own thread; every request goes to
//! the VM's owner through [`owner`] (a channel and an eventfd in the owner's event loop),
//! which answers it from the [`Machine`](crate::machine::Machine) in [`handle`] and replies
//! with the typed structs of [`replies`]. Requests never panic the VMM: bad ones get an
//! error response.

pub mod error;
mod handle;
mod migration;
pub mod owner;
pub mod protocol;
pub mod replies;
pub mod server;

use std::path::PathBuf;

pub use server::ApiServer;

/// Why the API socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process serves the path.
    #[error(
        "--api-socket {0}: another process is listening there; choose another path or stop it"
    )]
    InUse(PathBuf),
    /// Something other than a socket is there.
    #[error("--api-socket {0}: the path exists and is not a socket; choose another path")]
    NotASocket(PathBuf),
    /// The socket could not be created.
    #[error("--api-socket {path}: cannot listen: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The server thread could not start.
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
}

#[cfg(test)]
mod server_tests;
