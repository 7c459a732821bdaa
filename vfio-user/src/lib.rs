//! The vfio-user protocol: a PCI device emulated in another process, reached over a Unix
//! socket (specification: QEMU's `docs/interop/vfio-user.rst`).
//!
//! - [`proto`]: the wire format (header, command numbers, payloads);
//! - [`socket`]: a framed message channel with file-descriptor passing and deadlines;
//! - [`client`]: [`Client`], what a VMM uses to drive a device;
//! - [`server`]: [`serve`], the loop a device process runs around its [`Device`];
//! - `testing` (feature `testing`, for tests only): a configurable fake device and server.

#![deny(missing_docs)]

pub mod client;
mod device;
mod dispatch;
pub mod proto;
pub mod server;
pub mod socket;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod types;

pub use client::{Client, ClientError, FeatureOp, Negotiated, ServerRequests, DEFAULT_TIMEOUT};
pub use device::{Device, DeviceResult, DmaMapping, Errno, IrqData};
pub use proto::{DmaLoggingRange, MigState, SparseArea};
pub use server::{accept_and_serve, serve, ServerConfig, ServerError};
pub use types::{DeviceInfo, IrqInfo, RegionInfo};
