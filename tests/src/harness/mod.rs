//! Host-side harness for integration tests: build the guest image, boot it with the `vmm`
//! binary, and talk to the in-guest agent.
//!
//! ```no_run
//! use std::time::Duration;
//! use vmm_tests::harness::{Vm, DEFAULT_BOOT_TIMEOUT};
//!
//! let vm = Vm::builder().cpus(2).memory("256M").boot()?;
//! let mut agent = vm.agent(DEFAULT_BOOT_TIMEOUT)?;
//! let out = agent.run(&["uname", "-r"])?;
//! assert_eq!(out.status, Some(0));
//! agent.reboot()?;
//! vm.wait_exit(Duration::from_secs(120))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod api;
pub mod build_digest;
pub mod client;
pub mod diag;
pub mod golden;
pub mod guest_run;
pub mod guest_vfio;
pub mod image;
pub mod lan;
pub mod migration;
pub mod net;
pub mod net_migration;
pub mod net_peer;
pub mod netns;
pub mod paths;
pub mod peers;
pub mod ports;
pub mod testdir;
pub mod tls;
pub mod vfsim;
pub mod vm;
pub mod workload;

pub use crate::agent::protocol::{
    BlkRequest, BlkVerifyReply, BlkWriteReply, ChecksumReply, MemCheckReply, MemFillReply,
    PingReply, PokeReply, Reply, RunOutput, RunRequest,
};
pub use api::{
    assert_migration_refused, boot_with_api, golden_with_api, start_with_api, ApiClient, CtlOutcome,
};
pub use client::{Agent, AgentError, DEFAULT_TIMEOUT};
pub use golden::{Device, DeviceProcess, Function};
pub use guest_run::{interrupts, run, virtio_msix_interrupts};
pub use image::{GuestImage, ImageError};
pub use lan::{Host, Lan};
pub use net::{NetClient, NetStreamStartRequest};
pub use netns::{NetnsError, NetnsPair, Side};
pub use paths::{guest_cmdline, vmm_binary, workspace_root, PathsError};
pub use testdir::{TestDir, TestDirError};
pub use vfsim::{tap_name, Vfsim, Wire};
pub use vm::{Vm, VmBuilder, VmError, DEFAULT_BOOT_TIMEOUT};
pub use workload::{
    WorkloadClient, WorkloadDisk, WorkloadStartRequest, WorkloadStatus, WorkloadVerifyReply,
};
