//! The PF side of the simulated VF: vfsim's agent for the `pf-protocol` protocol, a
//! control socket through which a mediator reads and loads the function's state,
//! quiesces and resumes it, and learns which guest pages it wrote by DMA (ground truth
//! for dirty-page tracking tests). The protocol's types and its client are in
//! `pf-protocol`.
//!
//! - [`state`]: the function's state as a [`VfState`](pf_protocol::proto::VfState),
//!   taken and loaded;
//! - [`control`]: the operations themselves, and how quiesce is synchronised with
//!   queue processing;
//! - [`server`]: the socket's accept loop and per-connection line protocol.

pub mod control;
pub mod server;
pub mod state;

pub use control::Controller;
