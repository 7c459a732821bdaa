//! The PF side of the simulated VF: a control socket through which a mediator reads and
//! loads the function's state, quiesces and resumes it, and learns which guest pages it
//! wrote by DMA (ground truth for dirty-page tracking tests).
//!
//! - [`proto`]: the request and response types (JSON lines), shared with other crates;
//! - [`state`]: the function's state as a [`proto::VfState`], taken and loaded;
//! - [`control`]: the operations themselves, and how quiesce is synchronised with
//!   queue processing;
//! - [`server`]: the socket's accept loop and per-connection line protocol;
//! - [`client`]: [`PfClient`], a blocking client with a deadline on every call.

pub mod client;
pub mod control;
pub mod proto;
pub mod server;
pub mod state;

pub use client::{PfClient, PfError};
pub use control::Controller;
