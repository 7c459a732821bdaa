//! Golden snapshots (tests/src/harness/golden.rs): one snapshot restored twice at the same
//! time gives two guests that each pass the agent's checks and share neither disk images nor
//! device processes, nor, after the harness's `refresh`, the wall clock of the moment the
//! snapshot was taken, the kernel's random numbers or the boot id.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vmm_tests::harness::{run, Agent, BlkRequest, Device, TestDir, Vm, DEFAULT_BOOT_TIMEOUT};

const DISK_SIZE: u64 = 16 << 20;

fn req(seed: u64) -> BlkRequest {
    BlkRequest {
        path: "/dev/vda".into(),
        offset: 0,
        block_size: 4096,
        blocks: 16,
        seed,
        direct: true,
    }
}

/// The guest's wall clock, seconds since the epoch.
fn guest_time(agent: &mut Agent) -> u64 {
    let out = run(agent, &["date", "+%s"]);
    assert!(out.success(), "{out:?}");
    out.stdout.trim().parse().unwrap()
}

fn host_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn one_golden_snapshot_restored_twice_gives_two_independent_guests() {
    if !vmm_tests::harness::golden::enabled() {
        eprintln!("VMM_TEST_GOLDEN=off: this test is about golden snapshots; nothing to do");
        return;
    }
    let device = Device::mediated("vf0", "virtio-blk-vf", DISK_SIZE);
    let dir = TestDir::new("golden-twice").expect("test dir");
    let mut guests = Vec::new();
    for name in ["a", "b"] {
        let (vf, dev) = device.start_vfsim(&dir, &format!("vf-{name}"), None, None);
        let vm = Vm::builder()
            .vmm_args(&["--device", dev.as_str()])
            .golden(std::slice::from_ref(&device))
            .boot()
            .expect("restore the golden snapshot");
        guests.push((vm, vf, dev));
    }
    let (a, b) = (&guests[0], &guests[1]);
    // Restored, not booted, and from the same snapshot.
    let (ga, gb) = (a.0.golden().unwrap(), b.0.golden().unwrap());
    assert_eq!(ga.snapshot, gb.snapshot);
    assert!(
        a.0.command().iter().any(|w| w == "--restore"),
        "{:?}",
        a.0.command()
    );
    // Separate device processes and disk images.
    assert_ne!(a.1.pid(), b.1.pid());
    assert_ne!(a.1.socket, b.1.socket);
    assert_ne!(a.2, b.2);

    let mut agents: Vec<Agent> = guests
        .iter()
        .map(|(vm, _, _)| {
            vm.agent(DEFAULT_BOOT_TIMEOUT)
                .unwrap_or_else(|e| panic!("restored guest does not answer: {e}"))
        })
        .collect();
    let mut randoms = Vec::new();
    let mut boot_ids = Vec::new();
    for (i, agent) in agents.iter_mut().enumerate() {
        // The harness refreshed it already; a second refresh shows the clock is now right
        // (a step of a second or two at most) and gives this guest's random draw.
        let r = agent.refresh().expect("refresh");
        assert!(r.clock_step_ms.abs() < 5_000, "{r:?}");
        let t = guest_time(agent);
        assert!(t.abs_diff(host_time()) <= 5, "guest {i} clock {t}");
        randoms.push(r.random);
        boot_ids.push(r.boot_id);
        // Each passes the agent's checks: memory, and disk I/O through its own VF.
        let fill = agent.mem_fill(16, 0x1000 + i as u64).expect("mem fill");
        assert!(fill.bytes > 0);
        assert!(agent.mem_check().expect("mem check").intact);
        agent.blk_write(&req(0xa0 + i as u64)).expect("blk write");
        let v = agent.blk_verify(&req(0xa0 + i as u64)).expect("blk verify");
        assert_eq!(v.mismatches, 0, "{v:?}");
    }
    assert_ne!(
        randoms[0], randoms[1],
        "the two guests draw the same random numbers"
    );
    // Linux makes the boot id at its first read, which comes after the restore.
    assert_ne!(boot_ids[0], boot_ids[1], "the two guests share a boot id");
    // Each guest's writes went to its own image: a's data is not on b's disk and back.
    for (i, agent) in agents.iter_mut().enumerate() {
        let other = agent.blk_verify(&req(0xa0 + 1 - i as u64)).unwrap();
        assert_eq!(
            other.mismatches, 16,
            "guest {i} sees the other's data: {other:?}"
        );
    }
    for (agent, (vm, _, _)) in agents.iter_mut().zip(&guests) {
        agent.reboot().expect("reboot");
        let status = vm.wait_exit(Duration::from_secs(60)).expect("vmm exits");
        assert_eq!(status.code(), Some(0), "{}", vm.describe());
    }
}
