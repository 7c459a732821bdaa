//! The one error type of the wire-format parsers and serialisers.

/// Why a byte string is not a valid vfio-user header or payload (or a value cannot be
/// encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The input ends before a field that the structure requires.
    #[error("{what} is truncated: {need} bytes are needed but only {have} are present")]
    Truncated {
        /// The structure being parsed.
        what: &'static str,
        /// How many bytes the structure needs at least.
        need: usize,
        /// How many bytes were present.
        have: usize,
    },
    /// The input is longer than the structure it should hold.
    #[error("{what} has {extra} unexpected trailing bytes")]
    TrailingBytes {
        /// The structure being parsed.
        what: &'static str,
        /// How many bytes follow the end of the structure.
        extra: usize,
    },
    /// A field holds a value the protocol does not allow.
    #[error("{what}: field `{field}` has invalid value {value:#x}: {reason}")]
    InvalidField {
        /// The structure being parsed.
        what: &'static str,
        /// The offending field.
        field: &'static str,
        /// The value found.
        value: u64,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The version message's capability string is not valid JSON of the expected shape.
    #[error("version capabilities are invalid: {0}")]
    InvalidCapabilities(String),
    /// A value is too large to be encoded in its wire field.
    #[error("{what} cannot be encoded: {len} bytes do not fit a 32-bit size field")]
    TooLarge {
        /// The structure being encoded.
        what: &'static str,
        /// The size that does not fit.
        len: usize,
    },
}

/// Shorthand for a [`ProtoError::InvalidField`].
pub(crate) fn invalid(
    what: &'static str,
    field: &'static str,
    value: impl Into<u64>,
    reason: &'static str,
) -> ProtoError {
    ProtoError::InvalidField {
        what,
        field,
        value: value.into(),
        reason,
    }
}
