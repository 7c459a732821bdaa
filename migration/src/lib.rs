//! The VM state stream: one versioned, checksummed format for snapshot files and live
//! migration.
//!
//! A whole VM (guest RAM, vCPU state, irqchip, PIT, KVM clock and every device's state)
//! travels as one byte stream written front to back over any [`std::io::Write`] and read
//! front to back over any [`std::io::Read`]: no seeking, so the same code writes a
//! snapshot file or a TCP socket, and a receiver acts on each section as it arrives.
//!
//! # Layout
//! All integers are little-endian. The stream is a header followed by sections, the last of
//! which is an end-of-stream section.
//!
//! ## Header (20 bytes)
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic [`MAGIC`] = `b"VMMSTRM\0"` |
//! | 8 | 4 | format version (u32), [`FORMAT_VERSION`] |
//! | 12 | 4 | flags (u32): [`FLAG_LIVE`], [`FLAG_REPLY`]; other bits are an error |
//! | 16 | 4 | CRC32C of bytes 0..16 |
//!
//! The magic and the version come first and are checked before the header CRC, so that a
//! later format (which may change everything after them) is reported as a version mismatch
//! rather than as corruption.
//!
//! ## Section (16 bytes + payload)
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | type (u32), [`SectionType`] |
//! | 4 | 8 | payload length L (u64), at most [`MAX_SECTION_LEN`] (1 GiB) |
//! | 12 | L | payload |
//! | 12+L | 4 | CRC32C of the type, length and payload bytes as sent |
//!
//! The length is checked against the maximum before anything is allocated, and a payload
//! buffer grows only as the bytes actually arrive, so a lying length costs nothing.
//! Sections are numbered from 0 in the order sent; errors name that number.
//!
//! ## Section types and payloads
//! | type | name | payload |
//! | --- | --- | --- |
//! | 0 | (reserved) | never valid: a run of zero bytes must not parse |
//! | 1 | [`SectionType::End`] | u64: number of sections before this one (detects a section dropped whole) |
//! | 2 | [`SectionType::VmConfig`] | [`VmConfig`]: u64 memory size, u32 vCPU count, u32 device count, then per device a u16 length + UTF-8 id; at most [`MAX_CONFIG_LEN`] (64 KiB) and always the first section, both checked from its header |
//! | 3 | [`SectionType::RamPages`] | runs of guest pages, see below |
//! | 4 | [`SectionType::Vcpu`] | u32 vCPU index, then the vCPU's state (opaque) |
//! | 5 | [`SectionType::Irqchip`] | opaque (the VM-wide KVM state: PIC, IOAPIC, PIT, clock) |
//! | 6, 7 | (retired) | never valid: PIT and clock sections of format 3, which nothing wrote |
//! | 8 | [`SectionType::Device`] | [`DeviceState`]: u16 length + UTF-8 device id, u8 phase ([`DevicePhase`]), then the device's own bytes (opaque) |
//! | 9 | [`SectionType::Control`] | [`Control`]: u32 kind, then kind-specific fields |
//!
//! A device's state ends with an empty [`DevicePhase::Final`] section of its id, the
//! end-of-state marker (format 3): a device may have no bytes of state at all, so only the
//! marker tells a receiver the state is whole. A receiver refuses a stream in which a
//! device of its config has no marker, rather than run that device reset.
//!
//! "Opaque" payloads are produced and consumed by their owners (the vmm's KVM state code,
//! each device's save/restore); [`encode_state`] / [`decode_state`] give them one compact
//! serde encoding (postcard). This crate owns the layouts of RAM, device and config
//! sections because their framing is part of the protocol.
//!
//! ## RAM pages
//! A [`SectionType::RamPages`] payload is a sequence of runs, back to back to the end of
//! the payload. Pages are [`PAGE_SIZE`] (4 KiB) bytes.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | guest physical address of the run's first page (page aligned) |
//! | 8 | 4 | page count N (u32, at least 1) |
//! | 12 | 1 | kind: 0 = data (N * 4096 bytes follow), 1 = zero (the pages are all zeros; nothing follows) |
//! | 13 | 0 or N * 4096 | page data |
//!
//! Contiguous pages share one 13-byte run header (0.3% overhead for a lone dirty page), so
//! the first full pass over RAM and each pre-copy iteration's scattered dirty pages use the
//! same encoding; zero pages cost 13 bytes per run of any length. A page sent again later in
//! the stream (dirtied again) replaces the earlier copy: the receiver applies runs in order.
//!
//! ## Live migration
//! A snapshot is header, [`SectionType::VmConfig`], state sections, end. A live migration
//! source sends (with [`FLAG_LIVE`]) header, config, then for each pre-copy iteration
//! [`Control::IterationBegin`], RAM and device pre-copy sections, [`Control::IterationEnd`];
//! then [`Control::StopAndCopy`], the remaining dirty RAM, vCPU, irqchip, PIT, clock and
//! device sections, [`Control::Complete`] and the end section. The destination answers on
//! the same connection with a stream of its own in this format (flags
//! `FLAG_LIVE | FLAG_REPLY`): [`Control::Ready`] once the config matches its own,
//! [`Control::Synced`] once it has applied each pre-copy pass (version 2),
//! [`Control::Resumed`] once the VM runs there, or [`Control::Abort`] with a reason at any
//! point; either side may send `Abort`. The source keeps the guest until it reads
//! `Resumed`.
#![deny(missing_docs)]

mod error;
pub mod file;
mod ram;
mod section;
pub mod snapshot;
mod state;
mod stream;

pub use error::{Error, Result};
pub use ram::{RamPages, RamPagesBuilder, RamRun};
pub use section::{Control, DevicePhase, DeviceState, Section, SectionType, VmConfig};
pub use state::{decode_state, encode_state};
pub use stream::{StreamReader, StreamWriter};

/// The first 8 bytes of every stream.
pub const MAGIC: [u8; 8] = *b"VMMSTRM\0";

/// The format version this code writes and the only one it reads. Bump it on any change to
/// the layout of the header, a section or a payload this crate defines, or to what a
/// section means (3: the device end-of-state marker; 4: the VMM's own device sections have a
/// `/` in their ids, which a user's device id cannot have, e.g. `legacy/i8042`, `pci/vf0`,
/// and every state payload the VMM writes, KVM's and its devices', is [`encode_state`]'s;
/// 5: the host bridge's configuration, `legacy/host-bridge`).
pub const FORMAT_VERSION: u32 = 5;

/// Header flag: the stream is a live migration (control sections are expected), not a
/// snapshot.
pub const FLAG_LIVE: u32 = 1 << 0;

/// Header flag: the stream is a destination's replies to a migration source.
pub const FLAG_REPLY: u32 = 1 << 1;

/// Every flag this version understands; a header with any other bit set is rejected, since
/// a flag may change the meaning of what follows.
pub const KNOWN_FLAGS: u32 = FLAG_LIVE | FLAG_REPLY;

/// The largest section payload, in bytes. Readers reject longer lengths before allocating;
/// writers refuse to produce them.
pub const MAX_SECTION_LEN: u64 = 1 << 30;

/// The largest [`SectionType::VmConfig`] payload, in bytes: room for 250 devices of the
/// longest ids. The config is a stream's first section, read before anything has vouched
/// for the sender ([`StreamReader::read_config`]), so its bound is a config's and not
/// [`MAX_SECTION_LEN`]; writers refuse a longer one.
pub const MAX_CONFIG_LEN: u64 = 64 * 1024;

/// Size of a guest page in [`SectionType::RamPages`] sections.
pub const PAGE_SIZE: usize = 4096;

/// Size of the stream header in bytes.
pub const HEADER_LEN: usize = 20;

/// Size of a section's type and length fields in bytes.
pub const SECTION_HEADER_LEN: usize = 12;

/// Size of a section's trailing CRC32C in bytes.
pub const SECTION_CRC_LEN: usize = 4;

/// Longest device id (bytes of UTF-8) a stream may carry.
pub const MAX_ID_LEN: usize = 256;

/// Longest [`Control::Abort`] reason (bytes of UTF-8) a stream may carry.
pub const MAX_REASON_LEN: usize = 4096;

/// CRC32C (Castagnoli) of `data`, the checksum used throughout the stream.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}
