//! The measurement behind `benches/bar-access.sh` (ignored in the normal test run: a
//! benchmark, not a test). From guest user space, through sysfs `resource0` of a VF passed
//! through from `vfsim`: 32-bit writes to its mapped notify page, to its trapped register
//! page, and to guest RAM. The VMM's own share of each trapped write (time from KVM_RUN's
//! return to the next KVM_RUN) is the VMM's MMIO-write handling time over the trapped writes'
//! window, read through the control API before and after them: boot-time writes (MSI-X
//! programming with its GSI-route ioctls, virtio probing) are not in it.

use std::time::Duration;

use serde_json::Value;
use vmm_tests::harness::{boot_with_api, ApiClient, TestDir, Vfsim};

/// vfsim's BAR 0: page 0 (virtio common config, trapped) and the notify page at 0x1000
/// (mapped). Offset 0 is `device_feature_select`, harmless to write; 0x1020 is the doorbell
/// of queue 8, which the device does not have.
const TRAPPED_OFFSET: u64 = 0x0;
const MAPPED_OFFSET: u64 = 0x1020;
/// Rounds of mapped and RAM writes (alternating).
const ROUNDS: usize = 5;

#[test]
#[ignore = "benchmark: run by benches/bar-access.sh"]
fn bar_access_costs() {
    let mapped_count: u64 = env_u64("BAR_MAPPED_WRITES", 10_000_000);
    let trapped_count: u64 = env_u64("BAR_TRAPPED_WRITES", 2_000);
    let dir = TestDir::new("bar-access").expect("test dir");
    let disk = dir.disk("disk.img", 1 << 20);
    let vfsim = Vfsim::start(&dir, &disk, "vf0");
    let device = format!("vfio-user,socket={},id=vf0", vfsim.socket.display());
    let (vm, mut agent, mut api) = boot_with_api(&dir, &device);
    let resource = "/sys/bus/pci/devices/0000:00:01.0/resource0";
    // Sub-nanosecond writes are timed over milliseconds, where one host interrupt shows:
    // the best of several rounds is the cost.
    let (mut m, mut r) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..ROUNDS {
        let round = agent
            .bar_time(resource, &[MAPPED_OFFSET], mapped_count)
            .expect("mapped writes");
        m = m.min(round.mapped_ns[0]);
        r = r.min(round.ram_ns);
    }
    let (writes0, ns0) = mmio_writes(&mut api);
    let trapped = agent
        .bar_time(resource, &[TRAPPED_OFFSET], trapped_count)
        .expect("trapped writes");
    let (writes1, ns1) = mmio_writes(&mut api);
    agent.reboot().expect("reboot");
    vm.wait_exit(Duration::from_secs(120)).expect("vmm exits");

    let window_writes = writes1 - writes0;
    assert!(
        window_writes >= trapped_count,
        "{window_writes} MMIO-write exits for {trapped_count} trapped writes: the page is not trapped"
    );
    let vmm_share_us = (ns1 - ns0) as f64 / window_writes as f64 / 1000.0;
    let t = trapped.mapped_ns[0];
    println!("bar-access: guest RAM write          {r:>12.2} ns  (best of {ROUNDS} x {mapped_count} writes)");
    println!("bar-access: mapped BAR page write    {m:>12.2} ns  (best of {ROUNDS} x {mapped_count} writes)  mapped/RAM {:.2}", m / r);
    println!("bar-access: trapped BAR page write   {t:>12.2} ns  ({trapped_count} writes)  trapped/mapped {:.0}", t / m);
    println!("bar-access: VMM's share of a trapped MMIO write (KVM_RUN return to KVM_RUN): {vmm_share_us:.2} us  ({window_writes} MMIO-write exits in the window)");
}

/// The VMM's MMIO-write exit count and its total handling time in ns so far.
fn mmio_writes(api: &mut ApiClient) -> (u64, u64) {
    let stats = api
        .request(&serde_json::json!({"request": "device-stats"}))
        .expect("device-stats");
    let w: &Value = &stats["exits"]["mmio-write"];
    match (w["count"].as_u64(), w["handling_ns"].as_u64()) {
        (Some(c), Some(ns)) => (c, ns),
        _ => panic!("no mmio-write exit counters in {stats}"),
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
