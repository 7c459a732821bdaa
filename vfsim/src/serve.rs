//! Binding the listening socket and serving one client after another.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vfio_user::{accept_and_serve, Device, ServerConfig, ServerError};

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Something other than a socket is in the way.
    #[error("cannot listen on {path}: it exists and is not a socket")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// A stale socket could not be removed.
    #[error("removing the stale socket {path} failed: {source}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
    /// `bind()` failed.
    #[error("listening on {path} failed: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
}

/// Listens on `path`, replacing a stale socket left there by an earlier run.
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServeError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(|source| ServeError::RemoveStale {
            path: path.to_path_buf(),
            source,
        })?;
    }
    UnixListener::bind(path).map_err(|source| ServeError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

/// Serves clients of `listener` one at a time, forever: after a client disconnects (or
/// its connection breaks) the next one is accepted.
pub fn serve_clients<D: Device + ?Sized>(listener: &UnixListener, device: &mut D) -> ! {
    let config = ServerConfig::default();
    loop {
        match accept_and_serve(listener, device, &config) {
            Ok(()) => tracing::info!("client disconnected; waiting for the next one"),
            Err(e @ ServerError::Accept(_)) => {
                tracing::error!("{e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => tracing::warn!("{e}; waiting for the next client"),
        }
    }
}
