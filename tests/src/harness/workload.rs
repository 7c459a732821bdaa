//! Typed host-side calls for the agent's background workload (`workload_*` ops; see
//! [`crate::agent::workload`]), as an extension trait of [`Agent`].
//!
//! ```no_run
//! use vmm_tests::harness::{Agent, WorkloadClient, WorkloadDisk, WorkloadStartRequest};
//! # fn f(agent: &mut Agent) -> Result<(), Box<dyn std::error::Error>> {
//! agent.workload_start(&WorkloadStartRequest {
//!     mem_mib: 128,
//!     disk: Some(WorkloadDisk {
//!         path: "/dev/vda".into(),
//!         offset: 0,
//!         block_size: 4096,
//!         blocks: 4096,
//!         direct: Some(true),
//!         readback: None,
//!     }),
//!     seed: 1,
//!     ..Default::default()
//! })?;
//! // ... migrate the VM ...
//! let v = agent.workload_verify()?;
//! assert!(v.is_clean(), "{v:?}");
//! # Ok(()) }
//! ```

use std::time::Duration;

use crate::agent::protocol::Op;
pub use crate::agent::protocol::{
    DiskWorkloadStatus, MemWorkloadStatus, WorkloadCorruptReply, WorkloadCorruptRequest,
    WorkloadDisk, WorkloadMismatch, WorkloadStartRequest, WorkloadStatus, WorkloadVerifyReply,
    WorkloadVerifyRequest,
};

use super::client::{Agent, AgentError};

/// How long the agent waits for its writers to pause in a `workload_verify` sent by
/// [`WorkloadClient::workload_verify`].
pub const VERIFY_PAUSE_TIMEOUT: Duration = Duration::from_secs(60);

/// The `workload_*` ops on an [`Agent`].
pub trait WorkloadClient {
    /// Starts the memory and/or disk writers; their initial counters.
    fn workload_start(&mut self, req: &WorkloadStartRequest) -> Result<WorkloadStatus, AgentError>;
    /// The writers' counters (`running: false` when there is no workload).
    fn workload_status(&mut self) -> Result<WorkloadStatus, AgentError>;
    /// Pauses the writers, checks every recorded chunk and block, and resumes them; waits for
    /// the writers to pause for up to [`VERIFY_PAUSE_TIMEOUT`].
    fn workload_verify(&mut self) -> Result<WorkloadVerifyReply, AgentError>;
    /// Test-only: flips byte `offset` (default 100) of memory chunk `chunk` without updating
    /// its checksum.
    fn workload_corrupt_mem(
        &mut self,
        chunk: u64,
        offset: Option<u64>,
    ) -> Result<WorkloadCorruptReply, AgentError>;
    /// Stops and joins the writers; their final counters.
    fn workload_stop(&mut self) -> Result<WorkloadStatus, AgentError>;
}

impl WorkloadClient for Agent {
    fn workload_start(&mut self, req: &WorkloadStartRequest) -> Result<WorkloadStatus, AgentError> {
        let timeout = self.timeout();
        self.call(&Op::WorkloadStart(req.clone()), timeout)
    }

    fn workload_status(&mut self) -> Result<WorkloadStatus, AgentError> {
        let timeout = self.timeout();
        self.call(&Op::WorkloadStatus, timeout)
    }

    fn workload_verify(&mut self) -> Result<WorkloadVerifyReply, AgentError> {
        let req = WorkloadVerifyRequest {
            timeout_ms: Some(VERIFY_PAUSE_TIMEOUT.as_millis() as u64),
        };
        let timeout = VERIFY_PAUSE_TIMEOUT.saturating_add(self.timeout());
        self.call(&Op::WorkloadVerify(req), timeout)
    }

    fn workload_corrupt_mem(
        &mut self,
        chunk: u64,
        offset: Option<u64>,
    ) -> Result<WorkloadCorruptReply, AgentError> {
        let timeout = self.timeout();
        let req = WorkloadCorruptRequest { chunk, offset };
        self.call(&Op::WorkloadCorruptMem(req), timeout)
    }

    fn workload_stop(&mut self) -> Result<WorkloadStatus, AgentError> {
        // Stopping may wait up to 30 s for a writer stuck in I/O.
        let timeout = Duration::from_secs(30).saturating_add(self.timeout());
        self.call(&Op::WorkloadStop, timeout)
    }
}
