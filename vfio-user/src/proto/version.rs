//! `VFIO_USER_VERSION`: protocol version and the JSON capability string.

use serde::{Deserialize, Serialize};

use super::error::ProtoError;
use super::wire::{Reader, Writer};

/// Protocol major version implemented here.
pub const PROTOCOL_MAJOR: u16 = 0;
/// Highest protocol minor version implemented here: 1, libvfio-user's
/// `LIB_VFIO_USER_MINOR`. No message this crate sends or accepts differs between 0.0 and
/// 0.1 (the specification marks nothing as "added in 0.1"); a peer that answers 0 is
/// served the same way.
pub const PROTOCOL_MINOR: u16 = 1;

/// Default of `max_msg_fds` when a peer does not state it.
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;
/// Default of `max_data_xfer_size` when a peer does not state it (1 MiB).
pub const DEFAULT_MAX_DATA_XFER_SIZE: u32 = 1 << 20;
/// Default of `max_dma_maps` when a peer does not state it.
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;
/// Default of `pgsizes` when a peer does not state it (4 KiB pages only).
pub const DEFAULT_PGSIZES: u64 = 4096;

/// Largest capability string accepted (the JSON text is tiny in practice).
pub const MAX_CAPABILITIES_LEN: usize = 64 * 1024;

/// The `capabilities` object of the version message. Every member is optional; absent
/// members take the defaults above. Unknown members are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Most file descriptors the sender can receive in one message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_msg_fds: Option<u32>,
    /// Largest `count` of a region or DMA read/write the sender accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_data_xfer_size: Option<u32>,
    /// Most DMA mappings valid at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_dma_maps: Option<u32>,
    /// Page sizes supported for DMA mappings, or'ed together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgsizes: Option<u64>,
    /// Migration (dirty page tracking) parameters; present only if migration is offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationCapability>,
    /// Twin-socket mode (server-to-client commands on a second socket): parsed so that a
    /// server enabling it can be told apart; neither side of this crate offers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin_socket: Option<TwinSocketCapability>,
}

impl Capabilities {
    /// `max_msg_fds`, or its default.
    pub fn max_msg_fds_or_default(&self) -> u32 {
        self.max_msg_fds.unwrap_or(DEFAULT_MAX_MSG_FDS)
    }

    /// `max_data_xfer_size`, or its default.
    pub fn max_data_xfer_size_or_default(&self) -> u32 {
        self.max_data_xfer_size
            .unwrap_or(DEFAULT_MAX_DATA_XFER_SIZE)
    }

    /// `max_dma_maps`, or its default.
    pub fn max_dma_maps_or_default(&self) -> u32 {
        self.max_dma_maps.unwrap_or(DEFAULT_MAX_DMA_MAPS)
    }

    /// `pgsizes`, or its default.
    pub fn pgsizes_or_default(&self) -> u64 {
        self.pgsizes.unwrap_or(DEFAULT_PGSIZES)
    }
}

/// The `migration` capability object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapability {
    /// Page size of the dirty bitmaps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgsize: Option<u64>,
    /// Largest dirty bitmap, in bytes, that can be transferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bitmap_size: Option<u64>,
}

/// The `twin_socket` capability object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinSocketCapability {
    /// Whether the sender supports (in a reply: enabled) twin-socket mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supported: Option<bool>,
    /// In a reply: the index, among the descriptors sent with it, of the client's end of
    /// the server-to-client socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_index: Option<u32>,
}

impl TwinSocketCapability {
    /// Whether the sender says twin-socket mode is supported (enabled, in a reply).
    pub fn is_supported(&self) -> bool {
        self.supported == Some(true)
    }
}

#[derive(Serialize, Deserialize)]
struct VersionData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    capabilities: Option<Capabilities>,
}

/// The version message payload (same layout for the command and the reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// The capability object; `None` when the message carries no JSON (or no
    /// `capabilities` member).
    pub capabilities: Option<Capabilities>,
}

impl Version {
    const WHAT: &'static str = "version payload";

    /// Serialises the payload: versions, then the NUL-terminated JSON if there are
    /// capabilities.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(128);
        w.u16(self.major).u16(self.minor);
        if let Some(caps) = &self.capabilities {
            let data = VersionData {
                capabilities: Some(caps.clone()),
            };
            // Serialising plain integers and options into a string cannot fail; an empty
            // object is the harmless fallback.
            let json = serde_json::to_vec(&data).unwrap_or_else(|_| b"{}".to_vec());
            w.bytes(&json).bytes(&[0]);
        }
        w.finish()
    }

    /// Parses the payload; the JSON must be UTF-8, NUL-terminated or not, with no NUL
    /// inside, at most [`MAX_CAPABILITIES_LEN`] bytes, and of the documented shape.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(Self::WHAT, bytes);
        let major = r.u16()?;
        let minor = r.u16()?;
        let mut json = r.rest();
        if json.len() > MAX_CAPABILITIES_LEN {
            return Err(ProtoError::InvalidCapabilities(format!(
                "{} bytes exceed the limit of {MAX_CAPABILITIES_LEN}",
                json.len()
            )));
        }
        if let Some((&0, head)) = json.split_last() {
            json = head;
        }
        if json.contains(&0) {
            return Err(ProtoError::InvalidCapabilities(
                "NUL byte inside the JSON text".into(),
            ));
        }
        let capabilities = if json.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            let text = std::str::from_utf8(json)
                .map_err(|e| ProtoError::InvalidCapabilities(format!("not UTF-8: {e}")))?;
            let value: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| ProtoError::InvalidCapabilities(e.to_string()))?;
            check_objects(&value)?;
            let data: VersionData = serde_json::from_value(value)
                .map_err(|e| ProtoError::InvalidCapabilities(e.to_string()))?;
            data.capabilities
        };
        Ok(Version {
            major,
            minor,
            capabilities,
        })
    }
}

/// Serde would also accept arrays for structures; the protocol wants objects.
fn check_objects(value: &serde_json::Value) -> Result<(), ProtoError> {
    let not_object =
        |name: &str| ProtoError::InvalidCapabilities(format!("{name} is not an object"));
    let top = value
        .as_object()
        .ok_or_else(|| not_object("the version data"))?;
    if let Some(caps) = top.get("capabilities") {
        let caps = caps
            .as_object()
            .ok_or_else(|| not_object("`capabilities`"))?;
        for name in ["migration", "twin_socket"] {
            if let Some(member) = caps.get(name) {
                member
                    .as_object()
                    .ok_or_else(|| not_object(&format!("`{name}`")))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Vec<u8> {
        let mut v = vec![0, 0, 0, 0];
        v.extend_from_slice(json.as_bytes());
        v.push(0);
        v
    }

    #[test]
    fn round_trip() {
        let v = Version {
            major: 0,
            minor: 0,
            capabilities: Some(Capabilities {
                max_msg_fds: Some(8),
                max_data_xfer_size: Some(1 << 20),
                max_dma_maps: None,
                pgsizes: Some(4096),
                migration: Some(MigrationCapability {
                    pgsize: Some(4096),
                    max_bitmap_size: Some(256 << 20),
                }),
                twin_socket: Some(TwinSocketCapability {
                    supported: Some(true),
                    fd_index: Some(0),
                }),
            }),
        };
        let bytes = v.to_bytes();
        assert_eq!(bytes.last(), Some(&0));
        assert_eq!(Version::parse(&bytes).unwrap(), v);

        let bare = Version {
            major: 0,
            minor: 3,
            capabilities: None,
        };
        assert_eq!(bare.to_bytes().len(), 4);
        assert_eq!(Version::parse(&bare.to_bytes()).unwrap(), bare);
    }

    #[test]
    fn parses_qemu_style_text() {
        let v = Version::parse(&raw(
            r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"migration":{"pgsize":4096,"max_bitmap_size":268435456},"write_multiple":true}}"#,
        ))
        .unwrap();
        let caps = v.capabilities.unwrap();
        assert_eq!(caps.max_msg_fds_or_default(), 16);
        assert_eq!(caps.max_dma_maps_or_default(), 65535);
        assert_eq!(caps.migration.unwrap().pgsize, Some(4096));
        let empty = Version::parse(&raw("{}")).unwrap();
        assert_eq!(empty.capabilities, None);
        let defaults = Version::parse(&raw(r#"{"capabilities":{}}"#)).unwrap();
        let caps = defaults.capabilities.unwrap();
        assert_eq!(caps.max_msg_fds_or_default(), DEFAULT_MAX_MSG_FDS);
        assert_eq!(
            caps.max_data_xfer_size_or_default(),
            DEFAULT_MAX_DATA_XFER_SIZE
        );
        assert_eq!(caps.pgsizes_or_default(), DEFAULT_PGSIZES);
    }

    #[test]
    fn unknown_members_are_ignored_at_every_level() {
        let v = Version::parse(&raw(
            r#"{"capabilities":{"max_msg_fds":8,"write_multiple":true,
                "twin_socket":{"supported":false,"future":[1,{"x":null}]},
                "migration":{"pgsize":4096,"dirty":{"modes":["bitmap"]},"v":2.5},
                "future_cap":{"nested":{"deeper":{"a":"b"}}},"flag":null},
               "vendor":{"anything":[true]}}"#,
        ))
        .unwrap();
        let caps = v.capabilities.unwrap();
        assert_eq!(caps.max_msg_fds, Some(8));
        assert_eq!(caps.migration.unwrap().pgsize, Some(4096));
        assert!(!caps.twin_socket.unwrap().is_supported());
        // libvfio-user's reply, as it builds it.
        let v = Version::parse(&raw(
            r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#,
        ))
        .unwrap();
        assert_eq!(v.capabilities.unwrap().twin_socket, None);
    }

    #[test]
    fn rejects_bad_input() {
        for len in 0..4 {
            assert!(Version::parse(&[0u8; 4][..len]).is_err());
        }
        for bad in [
            "{",
            "[]",
            r#"{"capabilities":{"max_msg_fds":-1}}"#,
            r#"{"capabilities":{"max_msg_fds":"8"}}"#,
            r#"{"capabilities":{"max_data_xfer_size":4294967296}}"#,
            r#"{"capabilities":{"migration":7}}"#,
            r#"{"capabilities":3}"#,
            r#"{"capabilities":[8]}"#,
            r#"{"capabilities":{"migration":[4096]}}"#,
            r#"{"capabilities":{"twin_socket":[true,0]}}"#,
            r#"{"capabilities":{"twin_socket":{"supported":"yes"}}}"#,
        ] {
            assert!(Version::parse(&raw(bad)).is_err(), "{bad}");
        }
        let mut nul_inside = raw("{}");
        nul_inside.insert(5, 0);
        assert!(Version::parse(&nul_inside).is_err());
        let mut not_utf8 = raw("{}");
        not_utf8.insert(5, 0xff);
        assert!(Version::parse(&not_utf8).is_err());
        let huge = raw(&format!(
            "{{\"x\":\"{}\"}}",
            "a".repeat(MAX_CAPABILITIES_LEN)
        ));
        assert!(Version::parse(&huge).is_err());
    }
}
