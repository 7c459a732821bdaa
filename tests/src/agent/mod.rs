//! The in-guest agent: runs as the test guest's `/init` and serves JSON-line requests from the
//! host on a serial port (or on stdin/stdout for host-side tests).
//!
//! [`protocol`] and [`pattern`] are shared with the host-side harness.

pub mod aligned;
pub mod bar_time;
pub mod blk;
pub mod cli;
pub mod lines;
pub mod mem;
pub mod net;
pub mod net_peer;
pub mod netstream;
pub mod pattern;
pub mod pid1;
pub mod poke;
pub mod protocol;
pub mod refresh;
pub mod run;
pub mod server;
pub mod sys;
pub mod tty;
pub mod workload;
