//! `pf-protocol`: the protocol a PF-side agent implements. The agent owns a VF's physical
//! function: it reads and loads the VF's state, quiesces and resumes it, and reports the
//! guest pages the VF wrote by DMA. A client (a mediator migrating the VF, a test
//! checking dirty tracking) talks to it over a Unix socket in JSON lines: one
//! [`Request`](proto::Request) object per line, answered with one
//! [`Response`](proto::Response) object on one line, in order.
//!
//! ```text
//! -> {"op":"quiesce"}
//! <- {"type":"quiesced","in_flight":0,"requests_completed":12}
//! -> {"op":"get_state"}
//! <- {"type":"state","state":{"version":1,"device_status":15,...}}
//! -> {"op":"bogus"}
//! <- {"type":"error","kind":"bad_request","message":"unknown variant `bogus`, ..."}
//! ```
//!
//! `vfsim` (the simulated VF) serves it on `--pf-socket`; the `virtio-blk-vf` mediator
//! uses it to migrate the VF.
//!
//! - [`proto`]: the request, response and state types, and the limits both sides keep;
//! - [`client`]: [`PfClient`], a blocking client with a deadline on every call.

#![deny(missing_docs)]

pub mod client;
pub mod proto;

pub use client::{PfClient, PfError};
