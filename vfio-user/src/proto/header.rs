//! The 16-byte header that precedes every message.

use super::command::Command;
use super::error::{invalid, ProtoError};
use super::wire::{len_u32, Reader};

/// Size of the message header in bytes.
pub const HEADER_SIZE: usize = 16;

/// Mask of the message-type bits of [`Header::flags`].
pub const FLAGS_TYPE_MASK: u32 = 0xf;
/// Message type: a command.
pub const FLAGS_TYPE_COMMAND: u32 = 0x0;
/// Message type: a reply to the command with the same message ID.
pub const FLAGS_TYPE_REPLY: u32 = 0x1;
/// The command wants no reply.
pub const FLAGS_NO_REPLY: u32 = 0x10;
/// The reply reports a failure; [`Header::error`] holds an errno (possibly 0).
pub const FLAGS_ERROR: u32 = 0x20;
const FLAGS_KNOWN: u32 = FLAGS_TYPE_MASK | FLAGS_NO_REPLY | FLAGS_ERROR;

/// The message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message ID, chosen by the sender of a command and echoed in its reply.
    pub msg_id: u16,
    /// Command number (see [`Command`]); kept raw so unknown commands can be refused.
    pub command: u16,
    /// Size of the whole message, header included.
    pub msg_size: u32,
    /// Type, no-reply and error flags (`FLAGS_*`).
    pub flags: u32,
    /// Errno of a failed command, valid in a reply with [`FLAGS_ERROR`].
    pub error: u32,
}

impl Header {
    /// The header of a command message with `payload_len` bytes of payload.
    pub fn command(msg_id: u16, command: Command, payload_len: usize) -> Result<Self, ProtoError> {
        Ok(Header {
            msg_id,
            command: command as u16,
            msg_size: msg_size(payload_len)?,
            flags: FLAGS_TYPE_COMMAND,
            error: 0,
        })
    }

    /// The header of a successful reply to `request` with `payload_len` bytes of payload.
    pub fn reply(request: &Header, payload_len: usize) -> Result<Self, ProtoError> {
        Ok(Header {
            msg_id: request.msg_id,
            command: request.command,
            msg_size: msg_size(payload_len)?,
            flags: FLAGS_TYPE_REPLY,
            error: 0,
        })
    }

    /// The header (the whole message) of an error reply to `request`.
    pub fn error_reply(request: &Header, errno: i32) -> Self {
        Header {
            msg_id: request.msg_id,
            command: request.command,
            msg_size: HEADER_SIZE as u32,
            flags: FLAGS_TYPE_REPLY | FLAGS_ERROR,
            error: errno.unsigned_abs(),
        }
    }

    /// The command, if the number is a known one.
    pub fn known_command(&self) -> Option<Command> {
        Command::from_u16(self.command)
    }

    /// Whether this is a reply (rather than a command).
    pub fn is_reply(&self) -> bool {
        self.flags & FLAGS_TYPE_MASK == FLAGS_TYPE_REPLY
    }

    /// Whether the sender of this command wants no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & FLAGS_NO_REPLY != 0
    }

    /// Whether this reply reports a failure.
    pub fn is_error(&self) -> bool {
        self.flags & FLAGS_ERROR != 0
    }

    /// Payload size in bytes (message size less the header).
    pub fn payload_len(&self) -> usize {
        (self.msg_size as usize).saturating_sub(HEADER_SIZE)
    }

    /// Serialises the header.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..2].copy_from_slice(&self.msg_id.to_ne_bytes());
        out[2..4].copy_from_slice(&self.command.to_ne_bytes());
        out[4..8].copy_from_slice(&self.msg_size.to_ne_bytes());
        out[8..12].copy_from_slice(&self.flags.to_ne_bytes());
        out[12..16].copy_from_slice(&self.error.to_ne_bytes());
        out
    }

    /// Parses exactly [`HEADER_SIZE`] bytes, checking the size and flag fields.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        const WHAT: &str = "message header";
        let mut r = Reader::new(WHAT, bytes);
        r.require(HEADER_SIZE)?;
        let h = Header {
            msg_id: r.u16()?,
            command: r.u16()?,
            msg_size: r.u32()?,
            flags: r.u32()?,
            error: r.u32()?,
        };
        r.finish()?;
        if (h.msg_size as usize) < HEADER_SIZE {
            return Err(invalid(
                WHAT,
                "msg_size",
                h.msg_size,
                "smaller than the header",
            ));
        }
        if h.flags & !FLAGS_KNOWN != 0 {
            return Err(invalid(WHAT, "flags", h.flags, "reserved bits are set"));
        }
        let kind = h.flags & FLAGS_TYPE_MASK;
        if kind != FLAGS_TYPE_COMMAND && kind != FLAGS_TYPE_REPLY {
            return Err(invalid(WHAT, "flags", h.flags, "unknown message type"));
        }
        if kind == FLAGS_TYPE_COMMAND && h.is_error() {
            return Err(invalid(
                WHAT,
                "flags",
                h.flags,
                "error bit set on a command",
            ));
        }
        Ok(h)
    }
}

fn msg_size(payload_len: usize) -> Result<u32, ProtoError> {
    len_u32("message", payload_len.saturating_add(HEADER_SIZE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let h = Header::command(0x1234, Command::RegionRead, 16).unwrap();
        let b = h.to_bytes();
        assert_eq!(&b[0..2], &0x1234u16.to_ne_bytes());
        assert_eq!(&b[2..4], &9u16.to_ne_bytes());
        assert_eq!(&b[4..8], &32u32.to_ne_bytes());
        assert_eq!(Header::parse(&b).unwrap(), h);
        assert!(!h.is_reply());

        let r = Header::reply(&h, 0).unwrap();
        assert!(r.is_reply() && !r.is_error());
        let e = Header::error_reply(&h, libc::EINVAL);
        assert!(e.is_reply() && e.is_error());
        assert_eq!(e.error, libc::EINVAL as u32);
        assert_eq!(Header::parse(&e.to_bytes()).unwrap(), e);
    }

    #[test]
    fn rejects_bad_input() {
        let good = Header::command(1, Command::Version, 0).unwrap().to_bytes();
        for len in 0..HEADER_SIZE {
            assert!(matches!(
                Header::parse(&good[..len]),
                Err(ProtoError::Truncated { .. })
            ));
        }
        let mut long = good.to_vec();
        long.push(0);
        assert!(matches!(
            Header::parse(&long),
            Err(ProtoError::TrailingBytes { .. })
        ));

        let mut small = Header::command(1, Command::Version, 0).unwrap();
        small.msg_size = 15;
        assert!(Header::parse(&small.to_bytes()).is_err());

        for flags in [0x2, 0xf, 0x40, 0x8000_0000, FLAGS_ERROR] {
            let mut h = Header::command(1, Command::Version, 0).unwrap();
            h.flags = flags;
            assert!(Header::parse(&h.to_bytes()).is_err(), "flags {flags:#x}");
        }
        assert!(Header::command(1, Command::Version, u32::MAX as usize).is_err());
    }
}
