//! [`FakeError`]: why a fake device could not be made, or its server did not start or
//! end cleanly.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::server::ServerError;
use crate::socket::SocketError;

/// A failure of the fake device or its server (each message includes its cause, which is
/// not a `source()`).
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    /// A memory region's memfd could not be made or mapped.
    #[error("cannot make the fake device's memory: {0}")]
    Memory(io::Error),
    /// A region does not fit in this process's memory.
    #[error("a region of the fake device is too large to hold")]
    RegionTooLarge,
    /// Initial contents given outside the region's reachable bytes.
    #[error("initial contents at {at:#x} lie outside the region")]
    ContentsOutside {
        /// Where they were to go.
        at: u64,
    },
    /// A socket could not be made, copied or written.
    #[error("fake server socket: {0}")]
    Socket(io::Error),
    /// The listening socket could not be bound.
    #[error("cannot listen on {}: {error}", path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// No client connection could be accepted.
    #[error("accepting the client failed: {0}")]
    Accept(io::Error),
    /// The server thread could not be started.
    #[error("cannot start the fake server thread: {0}")]
    Thread(io::Error),
    /// The relay between the client and the server failed.
    #[error("the fake server's relay failed {what}: {error}")]
    Relay {
        /// What it was doing.
        what: &'static str,
        /// The socket failure.
        error: SocketError,
    },
    /// The crate's server, serving the fake device, ended with an error.
    #[error("{0}")]
    Server(ServerError),
    /// The server had not ended when asked to finish.
    #[error("the fake server was still running after {0:?}")]
    StillRunning(Duration),
    /// The server thread panicked (or its result was already taken).
    #[error("the fake server thread panicked or has already been finished")]
    Panicked,
}
