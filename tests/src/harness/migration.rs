//! What the live-migration tests and the migration benchmark share: the guest workload
//! they migrate under, waiting for it to reach its steady state, the two VMMs (a source
//! with its guest up, a destination listening for the stream) and following a migration
//! through the source's API.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::workload::{WorkloadClient, WorkloadDisk, WorkloadStartRequest};
use super::{Agent, ApiClient, Vm, VmBuilder, DEFAULT_BOOT_TIMEOUT};

/// The workload migrations run under: a 64 MiB memory writer at 16 MiB/s and, with
/// `disk`, a writer of 32 blocks to `/dev/vda` (O_DIRECT) that reads each block back into
/// buffers only the device writes (by DMA) before rewriting it.
pub fn workload(disk: bool) -> WorkloadStartRequest {
    WorkloadStartRequest {
        mem_mib: 64,
        mem_mib_per_s: Some(16),
        disk: disk.then(|| WorkloadDisk {
            path: "/dev/vda".into(),
            offset: 0,
            block_size: 4096,
            blocks: 32,
            direct: Some(true),
            readback: Some(true),
        }),
        seed: 0x1234,
    }
}

/// Waits (up to 2 minutes) until the memory writer has made a full pass and the disk
/// writer, if any, reads blocks back, so the migration sees the workload's steady state.
pub fn settle_workload(agent: &mut Agent) {
    let t = Instant::now();
    loop {
        let s = agent.workload_status().expect("workload status");
        let mem_ok = s.mem.as_ref().is_none_or(|m| m.passes >= 1);
        let disk_ok = s.disk.as_ref().is_none_or(|d| d.readbacks > 64);
        if (mem_ok && disk_ok) || t.elapsed() > Duration::from_secs(120) {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Boots a source VMM (`builder` with `--device device --api-socket api`) and waits for
/// its guest; the VM, a client of its API and the guest's agent.
pub fn start_source(builder: VmBuilder, device: &str, api: &Path) -> (Vm, ApiClient, Agent) {
    let vm = builder
        .vmm_args(&["--device", device, "--api-socket", &api.to_string_lossy()])
        .boot()
        .expect("start the source");
    let agent = vm
        .agent(DEFAULT_BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest did not come up: {e}\n{}", vm.describe()));
    let api = ApiClient::connect(api, Duration::from_secs(10)).unwrap();
    (vm, api, agent)
}

/// Starts a destination VMM (`builder` with `--incoming url --device device --api-socket
/// api`) and returns once it listens.
pub fn start_destination(builder: VmBuilder, url: &str, device: &str, api: &Path) -> Vm {
    let vm = builder
        .incoming(url)
        .vmm_args(&["--device", device, "--api-socket", &api.to_string_lossy()])
        .boot()
        .expect("start the destination");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !vm.vmm_stderr().contains("waiting for a migration") {
        assert!(
            Instant::now() < deadline,
            "destination not listening\n{}",
            vm.describe()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    vm
}

/// Follows a started migration until it completes or fails; its last status. A completed
/// source waits for the client following it to be told before it exits, so losing the
/// source before "completed" is a failure. Panics after `timeout`.
pub fn follow(api: &mut ApiClient, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        match api.request(&json!({"request": "migration-status"})) {
            Ok(s) => {
                if s["phase"] == "completed" || s["phase"] == "failed" {
                    return s;
                }
                last = s;
            }
            Err(e) => panic!(
                "lost the source before it said the migration ended ({e}); last status {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("migration did not end within {timeout:?}: {last}");
}
