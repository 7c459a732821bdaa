//! Everything that can go wrong writing, reading or checking a stream.

use crate::SectionType;

/// A `Result` whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Renders a raw section type: its name when known, else the number.
fn type_name(ty: u32) -> String {
    match SectionType::from_u32(ty) {
        Some(t) => format!("{t} ({ty})"),
        None => ty.to_string(),
    }
}

/// An error from the stream format. Each message names what was wrong and where, since the
/// destination of a failed migration exits with it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot file could not be made or opened safely.
    #[error(transparent)]
    File(#[from] crate::file::FileError),
    /// The underlying reader or writer failed.
    #[error("stream I/O error while {op}: {source}")]
    Io {
        /// What the stream was doing.
        op: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The stream does not start with [`crate::MAGIC`].
    #[error("bad magic {found:02x?}: not a VMM state stream (expected {expected:02x?})")]
    BadMagic {
        /// The first 8 bytes read.
        found: [u8; 8],
        /// The magic this code expects.
        expected: [u8; 8],
    },
    /// The stream was written in a format version this code does not read.
    #[error("stream format version {found} but this VMM reads version {supported}")]
    Version {
        /// The stream's version.
        found: u32,
        /// The version this code reads.
        supported: u32,
    },
    /// The header's CRC does not match its contents.
    #[error("CRC mismatch in stream header: expected {expected:#010x} got {found:#010x}")]
    HeaderChecksum {
        /// CRC computed over the header bytes.
        expected: u32,
        /// CRC stored in the stream.
        found: u32,
    },
    /// The header sets flag bits this version does not know.
    #[error("stream header has unknown flags {flags:#x} (known: {known:#x})")]
    UnknownFlags {
        /// The flags found.
        flags: u32,
        /// The flags this version knows.
        known: u32,
    },
    /// The stream ended inside its header.
    #[error("truncated stream: header ended after {got} of {want} bytes")]
    TruncatedHeader {
        /// Bytes read.
        got: usize,
        /// Header size.
        want: usize,
    },
    /// The stream ended inside a section.
    #[error("truncated stream in section {section} {part} after {got} of {want} bytes")]
    Truncated {
        /// Section number (from 0).
        section: u64,
        /// Which part of the section: "header", "payload" or "checksum".
        part: &'static str,
        /// Bytes of that part read.
        got: u64,
        /// Bytes of that part expected.
        want: u64,
    },
    /// The stream ended cleanly between sections, but before an end-of-stream section.
    #[error("truncated stream: ended after {sections} sections without an end-of-stream section")]
    MissingEnd {
        /// Sections read.
        sections: u64,
    },
    /// A section type this code does not know; it cannot restore what it does not know.
    #[error("section {section} has unknown type {ty}")]
    UnknownSectionType {
        /// Section number.
        section: u64,
        /// The type found.
        ty: u32,
    },
    /// A section's length field exceeds [`crate::MAX_SECTION_LEN`], or for the VM config
    /// [`crate::MAX_CONFIG_LEN`].
    #[error("section {section} type {} length {len} exceeds the maximum {max}", type_name(*ty))]
    SectionTooLong {
        /// Section number.
        section: u64,
        /// The section's raw type.
        ty: u32,
        /// The length found.
        len: u64,
        /// The maximum.
        max: u64,
    },
    /// A section of another type stands where the stream's layout requires one type (the
    /// VM config first).
    #[error("section {section} is of type {} where the stream must have its {expected} section", type_name(*ty))]
    UnexpectedSection {
        /// Section number.
        section: u64,
        /// The section's raw type.
        ty: u32,
        /// The type required there.
        expected: SectionType,
    },
    /// A section's CRC does not match its contents.
    #[error("CRC mismatch in section {section} (type {}): expected {expected:#010x} got {found:#010x}", type_name(*ty))]
    Checksum {
        /// Section number.
        section: u64,
        /// The section's raw type.
        ty: u32,
        /// CRC computed over the section.
        expected: u32,
        /// CRC stored in the stream.
        found: u32,
    },
    /// A section's CRC matched but its payload does not follow the layout of its type.
    #[error("malformed {ty} payload in section {section}: {what}")]
    Malformed {
        /// Section number.
        section: u64,
        /// The section's type.
        ty: SectionType,
        /// What is wrong with it.
        what: String,
    },
    /// The end-of-stream section counts a different number of sections than were read.
    #[error("end-of-stream section counts {expected} sections before it but {found} were read")]
    SectionCount {
        /// Count stored in the end section.
        expected: u64,
        /// Sections read.
        found: u64,
    },
    /// A read was attempted after the end-of-stream section.
    #[error("read past the end-of-stream section")]
    PastEnd,
    /// Bytes follow the end-of-stream section where the stream should end (a file).
    #[error("unexpected data after the end-of-stream section")]
    TrailingData,
    /// A section to be written exceeds [`crate::MAX_SECTION_LEN`] (or a field its limit).
    #[error("cannot write {ty} section: {what}")]
    TooLarge {
        /// The section's type.
        ty: SectionType,
        /// What is too large.
        what: String,
    },
    /// A call the writer does not allow (e.g. writing the end section by hand).
    #[error("stream writer misuse: {0}")]
    Misuse(&'static str),
    /// An earlier write failed part-way, so the stream is incomplete; nothing more is
    /// written to it.
    #[error("stream writer is unusable after an earlier error")]
    Poisoned,
    /// A RAM page given to [`crate::RamPagesBuilder`] is not a whole aligned page.
    #[error("bad RAM page at {gpa:#x}: {what}")]
    BadPage {
        /// Guest physical address given.
        gpa: u64,
        /// What is wrong.
        what: String,
    },
    /// An opaque state payload could not be encoded or decoded.
    #[error("{op} state {what}: {source}")]
    State {
        /// "encoding" or "decoding".
        op: &'static str,
        /// The Rust type.
        what: &'static str,
        /// postcard's error.
        #[source]
        source: postcard::Error,
    },
    /// An opaque state payload decoded but left bytes over, so it was not written as this
    /// type.
    #[error("decoding state {what}: {left} bytes left over")]
    StateTrailing {
        /// The Rust type.
        what: &'static str,
        /// Bytes not consumed.
        left: usize,
    },
    /// The stream's VM has a different memory size than the local VM.
    #[error("memory size mismatch: stream has {stream} bytes, this VM {local} bytes")]
    MemorySizeMismatch {
        /// Memory size in the stream.
        stream: u64,
        /// Memory size configured here.
        local: u64,
    },
    /// The stream's VM has a different vCPU count than the local VM.
    #[error("vCPU count mismatch: stream has {stream}, this VM {local}")]
    VcpuCountMismatch {
        /// vCPUs in the stream.
        stream: u32,
        /// vCPUs configured here.
        local: u32,
    },
    /// The stream carries a device the local VM does not have, so its state cannot be
    /// restored.
    #[error("the stream carries device {0:?}, which this VM has not configured")]
    UnknownDevice(String),
    /// The local VM has a device the stream does not carry.
    #[error("device {0:?} is configured here but the stream has no such device")]
    MissingDevice(String),
}

impl Error {
    pub(crate) fn io(op: &'static str, source: std::io::Error) -> Self {
        Error::Io { op, source }
    }
}
