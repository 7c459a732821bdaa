//! Why a live migration could not start or failed on the source. The messages are what
//! `vmm ctl migrate` and the migration status show; each keeps its cause as its source.

use std::io;

use devices::vfio::migration::MigrationError;
use resources::memslots::MemSlotsError;

use crate::machine::MachineError;
use crate::snapshot::SnapshotError;

/// A `tcp:HOST:PORT` or `tls:HOST:PORT` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// Another scheme than `tcp:` or `tls:`.
    #[error("{0:?}: only tcp:HOST:PORT and tls:HOST:PORT are supported")]
    Scheme(String),
    /// HOST:PORT does not resolve.
    #[error("{url:?}: {source}; write tcp:HOST:PORT or tls:HOST:PORT, e.g. tls:10.0.0.2:4444")]
    Resolve {
        /// The URL given.
        url: String,
        /// The resolver's answer.
        source: io::Error,
    },
    /// It resolves to nothing.
    #[error("{0:?} resolves to no address")]
    NoAddress(String),
}

/// Why the source could not migrate the guest (it runs on here).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The destination URL.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// `tls:` without the source's TLS files.
    #[error("{url} needs this VMM's certificate, key and the CA it trusts: give tls cert=PATH,key=PATH,ca=PATH (vmm ctl migrate --tls ...)")]
    TlsNotConfigured {
        /// The URL.
        url: String,
    },
    /// TLS files with a clear-text URL.
    #[error("TLS files were given but {url} is clear text; use tls:HOST:PORT")]
    TlsForTcp {
        /// The URL.
        url: String,
    },
    /// The TLS files cannot be used.
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
    /// The TLS handshake with the destination failed (its certificate is not signed by
    /// the CA or not issued for the name, or it refused ours).
    #[error("TLS handshake with {url} failed: {source}")]
    Handshake {
        /// The destination.
        url: String,
        /// Why.
        source: io::Error,
    },
    /// `max_bandwidth_mb_s` of 0.
    #[error("max_bandwidth_mb_s must be at least 1 (leave it out for no cap)")]
    ZeroBandwidth,
    /// KVM's capabilities were not probed, so no state can be saved.
    #[error("KVM state cannot be saved on this host")]
    NoCaps,
    /// Another migration runs.
    #[error("a migration to {0} is already running")]
    Busy(String),
    /// The migration thread did not start.
    #[error("cannot start the migration thread: {0}")]
    Thread(#[source] io::Error),
    /// No connection to the destination.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The destination.
        url: String,
        /// Why.
        source: io::Error,
    },
    /// The connected socket could not be set up (timeouts, a second handle).
    #[error("setting up the connection: {0}")]
    Socket(#[source] io::Error),
    /// Sending or receiving stopped making progress for the I/O timeout.
    #[error("{what}: no progress for {secs} s: the connection is cut or the destination stalled ({source})")]
    Stalled {
        /// What was being sent or awaited.
        what: &'static str,
        /// The I/O timeout.
        secs: u64,
        /// The stream's error.
        source: migration::Error,
    },
    /// The stream failed otherwise.
    #[error("{what}: {source}")]
    Stream {
        /// What was being sent or awaited.
        what: &'static str,
        /// The stream's error.
        source: migration::Error,
    },
    /// The destination sent Abort.
    #[error("{what}: {reason}")]
    Aborted {
        /// What its Abort means at this point.
        what: &'static str,
        /// The destination's reason.
        reason: String,
    },
    /// The destination answered out of turn.
    #[error("the destination answered {got} instead of {expected}")]
    Unexpected {
        /// What came.
        got: String,
        /// What was due.
        expected: String,
    },
    /// The destination's answer stream is missing (it never said Ready).
    #[error("no answer channel from the destination")]
    NoAnswerChannel,
    /// KVM's dirty log could not be read.
    #[error("reading KVM's dirty log: {0}")]
    DirtyLog(#[source] MemSlotsError),
    /// KVM's dirty logging could not be switched.
    #[error("turning dirty logging {}: {source}", if *.on { "on" } else { "off" })]
    DirtyLogging {
        /// On or off.
        on: bool,
        /// Why.
        source: MemSlotsError,
    },
    /// A device's dirty pages could not be read.
    #[error("device {id}: reading its dirty pages: {source}")]
    DeviceDirtyPages {
        /// The device.
        id: String,
        /// Why.
        source: MigrationError,
    },
    /// A device's migration step failed.
    #[error("device {id}: {source}")]
    Device {
        /// The device.
        id: String,
        /// Why.
        source: MigrationError,
    },
    /// The VM's state could not be saved (devices that cannot migrate, KVM state).
    #[error(transparent)]
    Snapshot(SnapshotError),
    /// The vCPUs could not be paused.
    #[error(transparent)]
    Machine(#[from] MachineError),
}

impl From<SnapshotError> for MigrateError {
    /// A stream error from the snapshot layer is a send like any other (its timeouts
    /// explained); the rest is the snapshot's own.
    fn from(e: SnapshotError) -> Self {
        match e {
            SnapshotError::Stream(source) => MigrateError::stream("sending", source),
            other => MigrateError::Snapshot(other),
        }
    }
}

impl MigrateError {
    /// A stream error while `what`: a timeout is a stall (the socket's timeouts are the
    /// I/O timeout), anything else as it is.
    pub fn stream(what: &'static str, source: migration::Error) -> Self {
        match &source {
            migration::Error::Io { source: io, .. }
                if matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                MigrateError::Stalled {
                    what,
                    secs: super::source::IO_TIMEOUT.as_secs(),
                    source,
                }
            }
            _ => MigrateError::Stream { what, source },
        }
    }
}

/// Why the destination could not answer the source.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// The answer stream could not be opened on the socket.
    #[error("opening the answer stream to the source: {0}")]
    Open(#[source] migration::Error),
    /// A second handle on the socket could not be made.
    #[error("opening the answer stream to the source: {0}")]
    Clone(#[source] io::Error),
    /// The answer could not be sent.
    #[error("answering the source: {0}")]
    Send(#[source] migration::Error),
}
