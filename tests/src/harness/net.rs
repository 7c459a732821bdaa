//! Typed host-side calls for the agent's `net_*` ops (see [`crate::agent::net`]), as an
//! extension trait of [`Agent`].
//!
//! ```no_run
//! use vmm_tests::harness::{Agent, NetClient, NetStreamStartRequest};
//! # fn f(agent: &mut Agent) -> Result<(), Box<dyn std::error::Error>> {
//! let nic = agent.net_ifaces()?.virtio_net().cloned().expect("no NIC");
//! agent.net_config(&nic.name, Some("10.78.0.2/24"), None)?;
//! let h = agent.net_stream_start(&NetStreamStartRequest {
//!     duration_ms: Some(20_000),
//!     pace_bytes_per_s: Some(4 << 20),
//!     ..NetStreamStartRequest::new("10.78.0.100:7100", 1)
//! })?;
//! agent.net_stream_hold(h, 10_000)?; // the guest reads nothing for 10 s
//! // ... migrate the VM ...
//! let done = agent.net_stream_finish(h, 60_000)?;
//! assert!(done.report.is_ok(), "{:?}", done.report.problem());
//! # Ok(()) }
//! ```

use std::time::Duration;

use crate::agent::protocol::Op;
pub use crate::agent::protocol::{
    NetConfigRequest, NetIface, NetIfacesReply, NetStreamFinishReply, NetStreamFinishRequest,
    NetStreamHandle, NetStreamHoldRequest, NetStreamStartRequest, NetStreamStatus,
};

use super::client::{Agent, AgentError};

/// The `net_*` ops on an [`Agent`].
pub trait NetClient {
    /// The guest's interfaces.
    fn net_ifaces(&mut self) -> Result<NetIfacesReply, AgentError>;
    /// Sets `mac` (if given), adds `addr_cidr` (if given and missing) and brings `iface` up;
    /// its state afterwards.
    fn net_config(
        &mut self,
        iface: &str,
        addr_cidr: Option<&str>,
        mac: Option<&str>,
    ) -> Result<NetIface, AgentError>;
    /// Starts a stream to a peer (connecting in the background); its handle.
    fn net_stream_start(&mut self, req: &NetStreamStartRequest) -> Result<u64, AgentError>;
    /// A stream's progress.
    fn net_stream_status(&mut self, handle: u64) -> Result<NetStreamStatus, AgentError>;
    /// The guest reads nothing of the stream for `ms` (its data waits in the kernel).
    fn net_stream_hold(&mut self, handle: u64, ms: u64) -> Result<NetStreamStatus, AgentError>;
    /// Waits up to `timeout_ms` for the stream to end; its report (the handle is then gone).
    fn net_stream_finish(
        &mut self,
        handle: u64,
        timeout_ms: u64,
    ) -> Result<NetStreamFinishReply, AgentError>;
}

impl NetClient for Agent {
    fn net_ifaces(&mut self) -> Result<NetIfacesReply, AgentError> {
        let timeout = self.timeout();
        self.call(&Op::NetIfaces, timeout)
    }

    fn net_config(
        &mut self,
        iface: &str,
        addr_cidr: Option<&str>,
        mac: Option<&str>,
    ) -> Result<NetIface, AgentError> {
        let req = NetConfigRequest {
            iface: iface.to_owned(),
            addr_cidr: addr_cidr.map(str::to_owned),
            mac: mac.map(str::to_owned),
        };
        let timeout = self.timeout();
        self.call(&Op::NetConfig(req), timeout)
    }

    fn net_stream_start(&mut self, req: &NetStreamStartRequest) -> Result<u64, AgentError> {
        let timeout = self.timeout();
        let h: NetStreamHandle = self.call(&Op::NetStreamStart(req.clone()), timeout)?;
        Ok(h.handle)
    }

    fn net_stream_hold(&mut self, handle: u64, ms: u64) -> Result<NetStreamStatus, AgentError> {
        let timeout = self.timeout();
        self.call(
            &Op::NetStreamHold(NetStreamHoldRequest { handle, ms }),
            timeout,
        )
    }

    fn net_stream_status(&mut self, handle: u64) -> Result<NetStreamStatus, AgentError> {
        let timeout = self.timeout();
        self.call(&Op::NetStreamStatus(NetStreamHandle { handle }), timeout)
    }

    fn net_stream_finish(
        &mut self,
        handle: u64,
        timeout_ms: u64,
    ) -> Result<NetStreamFinishReply, AgentError> {
        let req = NetStreamFinishRequest {
            handle,
            timeout_ms: Some(timeout_ms),
        };
        let timeout = Duration::from_millis(timeout_ms).saturating_add(self.timeout());
        self.call(&Op::NetStreamFinish(req), timeout)
    }
}
