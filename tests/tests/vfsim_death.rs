//! Guest test: `vfsim` (the passed-through VF's process) is killed with SIGKILL while the
//! guest writes to its disk in a loop. The VMM must keep running, log that the device is
//! gone (naming it), not panic, and exit 0 when stopped.
//!
//! What the guest sees, and why it is not an I/O error: Linux 6.1's virtio_blk has no
//! request timeout handler, so the block layer re-arms the timer of a request the device
//! never completes, forever. The requests in flight when vfsim dies stay in flight (`dd`
//! blocks in uninterruptible sleep, `/sys/block/vda/inflight` stays non-zero); the guest
//! kernel and every other process carry on. Nothing the VMM can do generically turns this
//! into errors: new requests are queued in guest memory and kicked through the doorbell
//! page, which is mapped into the guest (no exit at all) or trapped (the write is dropped,
//! PCI writes have no completion to fail); reads of the trapped registers return all ones,
//! which virtio_pci only looks at on an INTx interrupt or a config-change interrupt, and
//! neither fires. The driver fails requests only once the device is marked broken, which
//! happens on surprise removal (`virtio_pci_remove` calls `virtio_break_device` when the
//! function is no longer present), and this machine has no hotplug controller (no ACPI,
//! no PCIe slot, no SHPC) through which the VMM could unplug it. Failing the guest's
//! requests needs device-specific help: a mediator that knows the virtqueue layout could
//! complete them with `VIRTIO_BLK_S_IOERR` (a later issue).

use std::time::{Duration, Instant};

use vmm_tests::harness::{run, Device, TestDir, Vm, DEFAULT_BOOT_TIMEOUT};

const DISK_SIZE: u64 = 16 << 20;
/// The VF's function in the guest (the first --device).
const SYSFS_DEVICE: &str = "/sys/bus/pci/devices/0000:00:01.0";

/// The guest's write loop: single-block O_DIRECT writes over the first MiB, counting the
/// ones that succeed in /tmp/dd.ok and logging failures to /tmp/dd.err. Started in the
/// background (its output goes to files, so `sh -c` returns at once). The count is
/// replaced by a rename: `echo > file` truncates first, and a reader in between saw an
/// empty file (it failed a clean-clone CI run once).
const WRITE_LOOP: &str = "i=0; while :; do \
     if dd if=/dev/urandom of=/dev/vda bs=4096 count=1 seek=$((i % 256)) oflag=direct \
        2>>/tmp/dd.err; then i=$((i+1)); echo $i > /tmp/dd.ok.new; \
        mv /tmp/dd.ok.new /tmp/dd.ok; fi; done";

#[test]
fn vmm_survives_vfsim_killed_during_guest_io() {
    let dir = TestDir::new("vfsim-death").expect("test dir");
    // vfsim passed through as plain vfio-user (migrating by itself, so that the guest can
    // start from a golden snapshot).
    let spec = Device::native("vf0", DISK_SIZE);
    let (mut vfsim, device) = spec.start_vfsim(&dir, "vf0", None, None);
    let socket = vfsim.socket.display().to_string();
    let vm = Vm::builder()
        .vmm_args(&["--device", device.as_str()])
        .golden(&[spec])
        .boot()
        .expect("start vmm");
    let mut agent = vm
        .agent(DEFAULT_BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest did not come up: {e}\n{}", vm.describe()));

    let start = run(
        &mut agent,
        &[
            "sh",
            "-c",
            &format!("({WRITE_LOOP}) </dev/null >/dev/null 2>&1 &"),
        ],
    );
    assert_eq!(start.status, Some(0), "{start:?}");
    // The loop makes progress while the device is alive.
    let before = wait_for_writes(&mut agent, 5, Duration::from_secs(120));
    eprintln!("guest: {before} single-block writes done before vfsim is killed");

    let killed = vfsim.kill().expect("kill vfsim");
    eprintln!("vfsim killed: {killed:?}");
    // Let whatever was in flight settle (or not).
    std::thread::sleep(Duration::from_secs(5));

    // The guest goes on: the agent answers, other commands run.
    agent
        .ping()
        .unwrap_or_else(|e| panic!("agent after vfsim died: {e}"));
    let uptime = run(&mut agent, &["cat", "/proc/uptime"]);
    assert_eq!(uptime.status, Some(0), "{uptime:?}");

    // The writes stopped: no write completes any more, successfully or not, because the
    // request in flight never completes (see the module comment).
    let ok1 = read_count(&mut agent);
    std::thread::sleep(Duration::from_secs(10));
    let ok2 = read_count(&mut agent);
    let errors = run(&mut agent, &["cat", "/tmp/dd.err"]);
    let inflight = run(&mut agent, &["cat", "/sys/block/vda/inflight"]);
    let dd_state = run(
        &mut agent,
        &[
            "sh",
            "-c",
            "grep -l '^dd' /proc/[0-9]*/comm | sed 's/comm$/stat/' | xargs cat",
        ],
    );
    eprintln!(
        "guest after vfsim died: successful writes {ok1} then {ok2} (10 s later); \
         dd errors: {:?}; /sys/block/vda/inflight: {:?}; dd's /proc stat: {:?}",
        errors.stdout.trim(),
        inflight.stdout.trim(),
        dd_state.stdout.trim()
    );
    assert_eq!(
        ok1, ok2,
        "the guest still completes writes to a dead device?"
    );
    let in_flight: u64 = inflight
        .stdout
        .split_whitespace()
        .filter_map(|n| n.parse::<u64>().ok())
        .sum();
    assert!(
        in_flight > 0,
        "a request is left in flight in the dead device: {inflight:?}"
    );
    assert!(
        dd_state.stdout.contains(") D "),
        "dd waits in uninterruptible sleep for its request: {dd_state:?}"
    );

    // A guest access that reaches the backend (a trapped BAR write) fails and is logged
    // with the device's name; the guest is not disturbed.
    agent
        .bar_time(&format!("{SYSFS_DEVICE}/resource0"), &[0], 1)
        .expect("trapped write to the dead device");
    agent.ping().expect("agent after the trapped write");

    // The VMM is still running, and stops cleanly on SIGTERM.
    assert!(
        vm.try_exit_status().expect("vmm status").is_none(),
        "the VMM exited when vfsim died\n{}",
        vm.describe()
    );
    let status = vm.kill().expect("stop vmm");
    let stderr = vm.vmm_stderr();
    assert_eq!(status.code(), Some(0), "{}", vm.describe());
    assert!(!stderr.contains("panicked"), "{stderr}");
    let hangup = stderr
        .lines()
        .find(|l| l.contains("closing the connection") && l.contains(&socket));
    assert!(
        hangup.is_some_and(|l| l.contains("ERROR")),
        "the VMM logs the server's hang-up at once, naming its socket:\n{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("vf0: writing 4 bytes at BAR 0") && l.contains("failed")),
        "the failed access is logged with the device's name:\n{stderr}"
    );
}

/// The guest's count of successful writes (0 before the first).
fn read_count(agent: &mut vmm_tests::harness::Agent) -> u64 {
    let out = run(agent, &["sh", "-c", "cat /tmp/dd.ok 2>/dev/null || echo 0"]);
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("count: {out:?}"))
}

/// Waits until the guest's loop has done at least `n` writes; returns the count.
fn wait_for_writes(agent: &mut vmm_tests::harness::Agent, n: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let done = read_count(agent);
        if done >= n {
            return done;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's write loop made {done} writes in {timeout:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}
