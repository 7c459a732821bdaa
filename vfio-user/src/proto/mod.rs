//! The vfio-user wire format: the message header, the command numbers and each command's
//! payload, with `to_bytes` (serialise) and `parse` (validate and decode; never panics on
//! any input) for every type. Fields are in host byte order, as the protocol specifies.
//!
//! Request and reply payloads that share a layout share a type; where a command and its
//! reply differ in whether data follows, there are two types (e.g. [`RegionAccess`] and
//! [`RegionAccessData`]).

mod command;
mod device;
pub mod dirty_bitmap;
pub mod dirty_pages;
mod dma;
mod error;
mod header;
mod migration;
mod region;
mod version;
mod wire;

pub use command::Command;
pub use device::{DeviceInfo, IrqInfo, IrqSet, NoPayload};
pub use dma::{DmaAccess, DmaAccessData, DmaMap, DmaUnmap};
pub use error::ProtoError;
pub use header::{
    Header, FLAGS_ERROR, FLAGS_NO_REPLY, FLAGS_TYPE_COMMAND, FLAGS_TYPE_MASK, FLAGS_TYPE_REPLY,
    HEADER_SIZE,
};
pub use migration::{
    DeviceFeature, DmaLoggingRange, DmaLoggingReport, DmaLoggingStart, FeatureMigDeviceState,
    FeatureMigration, MigData, MigDataReadRequest, MigState,
};
pub use region::{
    RegionAccess, RegionAccessData, RegionInfoReply, RegionInfoRequest, RegionIoFdsRequest,
    RegionType, SparseArea, MAX_REGION_CAPS, REGION_INFO_SIZE, SPARSE_MMAP_CAP_VERSION,
    TYPE_CAP_VERSION,
};
pub use version::{
    Capabilities, MigrationCapability, TwinSocketCapability, Version, DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_DMA_MAPS, DEFAULT_MAX_MSG_FDS, DEFAULT_PGSIZES, MAX_CAPABILITIES_LEN,
    PROTOCOL_MAJOR, PROTOCOL_MINOR,
};
