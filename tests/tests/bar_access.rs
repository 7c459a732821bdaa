//! The measurement behind `benches/bar-access.sh` (ignored in the normal test run: a
//! benchmark, not a test). From guest user space, through sysfs `resource0` of a VF passed
//! through from `vfsim`: 32-bit writes to its mapped notify page, to its trapped register
//! page, and to guest RAM. The VMM's own share of each trapped write comes from its
//! `--exit-stats` (time from KVM_RUN's return to the next KVM_RUN).

use std::time::Duration;

use vmm_tests::harness::{TestDir, Vfsim, Vm, DEFAULT_BOOT_TIMEOUT};

/// vfsim's BAR 0: page 0 (virtio common config, trapped) and the notify page at 0x1000
/// (mapped). Offset 0 is `device_feature_select`, harmless to write; 0x1020 is the doorbell
/// of queue 8, which the device does not have.
const TRAPPED_OFFSET: u64 = 0x0;
const MAPPED_OFFSET: u64 = 0x1020;

#[test]
#[ignore = "benchmark: run by benches/bar-access.sh"]
fn bar_access_costs() {
    let mapped_count: u64 = env_u64("BAR_MAPPED_WRITES", 10_000_000);
    let trapped_count: u64 = env_u64("BAR_TRAPPED_WRITES", 2_000);
    let dir = TestDir::new("bar-access").expect("test dir");
    let disk = dir.disk("disk.img", 1 << 20);
    let vfsim = Vfsim::start(&dir, &disk, "vf0");
    let device = format!("vfio-user,socket={},id=vf0", vfsim.socket.display());
    let vm = Vm::builder()
        .vmm_args(&["--device", device.as_str(), "--exit-stats"])
        .boot()
        .expect("start vmm");
    let mut agent = vm
        .agent(DEFAULT_BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest did not come up: {e}\n{}", vm.describe()));
    let resource = "/sys/bus/pci/devices/0000:00:01.0/resource0";
    let mapped = agent
        .bar_time(resource, &[MAPPED_OFFSET], mapped_count)
        .expect("mapped writes");
    let trapped = agent
        .bar_time(resource, &[TRAPPED_OFFSET], trapped_count)
        .expect("trapped writes");
    agent.reboot().expect("reboot");
    vm.wait_exit(Duration::from_secs(120)).expect("vmm exits");

    let stderr = vm.vmm_stderr();
    let vmm_share_us = stderr
        .lines()
        .find(|l| l.starts_with("exit-stats: cause mmio-write"))
        .and_then(|l| l.split("VMM handling ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    let (m, t, r) = (mapped.mapped_ns[0], trapped.mapped_ns[0], mapped.ram_ns);
    println!("bar-access: guest RAM write          {r:>12.2} ns  ({mapped_count} writes)");
    println!("bar-access: mapped BAR page write    {m:>12.2} ns  ({mapped_count} writes)  mapped/RAM {:.2}", m / r);
    println!("bar-access: trapped BAR page write   {t:>12.2} ns  ({trapped_count} writes)  trapped/mapped {:.0}", t / m);
    println!("bar-access: VMM's share of a trapped MMIO write (KVM_RUN return to KVM_RUN): {vmm_share_us} us");
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
