//! Version negotiation from the client's side: what it proposes and how it checks the
//! server's answer.
//!
//! The client proposes [`PROTOCOL_MINOR`] and takes any minor version up to it: the
//! server answers the highest one both implement, which is recorded in [`Negotiated`].
//! Capability members it does not know are ignored, at any depth.
//!
//! Twin-socket mode (a second socket, passed by the server in its reply, for
//! server-to-client commands) is not offered. The specification is clear, but no server
//! this client is used with implements it (libvfio-user 0.1, QEMU's vfio-user server),
//! commands from the server on the one socket must be served anyway, and a second socket
//! would need its reader running from the handshake on. A server that enables it
//! unasked breaks the rule that its capabilities are a subset of the proposal, and the
//! connection is closed: its commands would arrive where nobody reads.

use crate::proto::{
    Capabilities, MigrationCapability, Version, DEFAULT_MAX_DATA_XFER_SIZE, PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
};
use crate::socket::{Message, MAX_FDS_PER_MESSAGE};

/// Most descriptors the client accepts in one message (it advertises this).
pub(super) const CLIENT_MAX_MSG_FDS: u32 = 16;
/// Largest data transfer the client accepts (it advertises this).
pub(super) const CLIENT_MAX_DATA_XFER_SIZE: u32 = DEFAULT_MAX_DATA_XFER_SIZE;
/// Page sizes the client offers for DMA mappings.
const CLIENT_PGSIZES: u64 = 4096;

/// The outcome of version negotiation: what the server accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Major version agreed.
    pub major: u16,
    /// Minor version agreed: the server's answer, at most [`PROTOCOL_MINOR`].
    pub minor: u16,
    /// Most descriptors the server accepts in one message (at most 253).
    pub max_msg_fds: u32,
    /// Largest data transfer in one message, the smaller of both sides' limits; longer
    /// region reads and writes are split.
    pub max_data_xfer_size: u32,
    /// Most DMA mappings the server keeps at once.
    pub max_dma_maps: u32,
    /// Page sizes the server supports for DMA mappings.
    pub pgsizes: u64,
    /// The server's migration capability (only if the client offered migration, which it
    /// does not yet).
    pub migration: Option<MigrationCapability>,
}

/// Checks the server's version reply and settles the limits.
pub(super) fn negotiate(reply: &Message) -> Result<Negotiated, String> {
    let version = Version::parse(&reply.payload).map_err(|e| e.to_string())?;
    if version.major != PROTOCOL_MAJOR {
        return Err(format!(
            "server answered major version {}, {PROTOCOL_MAJOR} was proposed",
            version.major
        ));
    }
    if version.minor > PROTOCOL_MINOR {
        return Err(format!(
            "server answered minor version {}, above the {PROTOCOL_MINOR} proposed",
            version.minor
        ));
    }
    let caps = version.capabilities.unwrap_or_default();
    if caps.twin_socket.as_ref().is_some_and(|t| t.is_supported()) {
        return Err(
            "server enabled twin-socket mode, which this client did not offer (it does not \
             implement it)"
                .into(),
        );
    }
    let max_data_xfer_size = caps
        .max_data_xfer_size_or_default()
        .min(CLIENT_MAX_DATA_XFER_SIZE);
    if max_data_xfer_size == 0 {
        return Err("server allows no data transfer (max_data_xfer_size 0)".into());
    }
    let pgsizes = caps.pgsizes_or_default();
    if pgsizes == 0 {
        return Err("server supports no DMA page size (pgsizes 0)".into());
    }
    Ok(Negotiated {
        major: version.major,
        minor: version.minor,
        max_msg_fds: caps
            .max_msg_fds_or_default()
            .min(MAX_FDS_PER_MESSAGE as u32),
        max_data_xfer_size,
        max_dma_maps: caps.max_dma_maps_or_default(),
        pgsizes,
        // Not offered by this client, so not taken from the reply.
        migration: None,
    })
}

/// The client's version proposal.
pub(super) fn proposal() -> Version {
    Version {
        major: PROTOCOL_MAJOR,
        minor: PROTOCOL_MINOR,
        capabilities: Some(Capabilities {
            max_msg_fds: Some(CLIENT_MAX_MSG_FDS),
            max_data_xfer_size: Some(CLIENT_MAX_DATA_XFER_SIZE),
            max_dma_maps: None,
            pgsizes: Some(CLIENT_PGSIZES),
            migration: None,
            twin_socket: None,
        }),
    }
}
