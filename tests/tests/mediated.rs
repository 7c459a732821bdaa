//! Guest tests of mediated vfio-pci (`--device vfio-mediated`): run-time trap/untrap of the
//! VF's notify (doorbell) page while the guest does I/O through its stock virtio-blk driver.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_tests::agent::pattern;
use vmm_tests::harness::{
    boot_with_api, golden_with_api, ApiClient, BlkRequest, Device, TestDir, Vfsim,
};

const DISK_SIZE: u64 = 16 << 20;
const BLOCK: u64 = 4096;
/// vfsim's notify page: BAR 0, 0x1000 + 0x1000.
const NOTIFY: (u64, u64) = (0x1000, 0x1000);
const CYCLES: usize = 100;

fn bar0_accesses(api: &mut ApiClient) -> u64 {
    let s = api.device_stats("vf0").expect("device stats");
    let bar = &s["bars"][0];
    bar["reads"].as_u64().unwrap() + bar["writes"].as_u64().unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// While the guest writes and verifies patterns on /dev/vda in a loop, the notify page is
/// trapped and untrapped 100 times through the `trace` mediator: every pattern reads back
/// intact (in the guest and in the image), and BAR 0 accesses reach the VMM only while
/// the page is trapped.
#[test]
fn trap_untrap_notify_page_during_guest_io() {
    // Booted, not restored from a golden snapshot: the trace mediator cannot migrate, so no
    // snapshot of a VM with it can be taken.
    let dir = TestDir::new("mediated-trap").expect("test dir");
    let disk = dir.disk("disk.img", DISK_SIZE);
    let vfsim = Vfsim::start(&dir, &disk, "vf0");
    let (vm, mut agent, mut api) = boot_with_api(&dir, &vfsim.mediated("trace", "vf0"));
    let info = api.request(&json!({"request": "info"})).unwrap();
    assert_eq!(info["devices"][0]["mediator"], "trace", "{info}");
    // Nothing is trapped at first: the notify page is in a memory slot.
    let stats = api.device_stats("vf0").unwrap();
    assert_eq!(stats["bars"][0]["trapped"], json!([]), "{stats}");

    let done = AtomicBool::new(false);
    let rounds = std::thread::scope(|s| {
        let io = s.spawn(|| {
            // Writer/verifier: a new pattern per round over 32 blocks, O_DIRECT.
            let mut round = 0u64;
            while !done.load(Ordering::Acquire) || round < 4 {
                let req = BlkRequest {
                    path: "/dev/vda".into(),
                    offset: (round % 8) * (32 * BLOCK),
                    block_size: BLOCK,
                    blocks: 32,
                    seed: 0x1000 + round,
                    direct: true,
                };
                agent.blk_write(&req).expect("guest write");
                let v = agent.blk_verify(&req).expect("guest verify");
                assert_eq!(v.mismatches, 0, "round {round}: {v:?}");
                round += 1;
            }
            (round, agent)
        });

        let arg = json!({"bar": 0, "offset": NOTIFY.0, "size": NOTIFY.1});
        let (mut trap_us, mut untrap_us) = (Vec::new(), Vec::new());
        let (mut rise_trapped, mut rise_untrapped) = (0u64, 0u64);
        for _ in 0..CYCLES {
            let t = Instant::now();
            api.mediator("vf0", "trap", arg.clone()).expect("trap");
            trap_us.push(t.elapsed().as_secs_f64() * 1e6);
            let before = bar0_accesses(&mut api);
            std::thread::sleep(Duration::from_millis(150));
            rise_trapped += bar0_accesses(&mut api) - before;

            let t = Instant::now();
            let r = api.mediator("vf0", "untrap", arg.clone()).expect("untrap");
            untrap_us.push(t.elapsed().as_secs_f64() * 1e6);
            assert_eq!(r["trapped"], json!([]), "{r}");
            // An access that exited just before the untrap may still be on its way.
            std::thread::sleep(Duration::from_millis(20));
            let before = bar0_accesses(&mut api);
            std::thread::sleep(Duration::from_millis(150));
            rise_untrapped += bar0_accesses(&mut api) - before;
        }
        done.store(true, Ordering::Release);
        let (rounds, agent_back) = io.join().expect("I/O thread");
        eprintln!(
            "{CYCLES} trap/untrap cycles of the notify page during guest I/O ({rounds} write+verify rounds): \
             median trap {:.0} us, median untrap {:.0} us (API round trip included); \
             BAR 0 exits while trapped {rise_trapped}, while untrapped {rise_untrapped}",
            median(trap_us),
            median(untrap_us)
        );
        assert!(
            rise_trapped > 0,
            "doorbells must exit while the page is trapped"
        );
        assert_eq!(
            rise_untrapped, 0,
            "no BAR 0 exit while the notify page is mapped"
        );
        (rounds, agent_back)
    });
    let (rounds, mut agent) = rounds;
    // The last pattern of each slot is in the image byte for byte.
    let image = std::fs::File::open(&disk).unwrap();
    for slot in 0..8u64.min(rounds) {
        let last = (0..rounds).filter(|r| r % 8 == slot).max().unwrap();
        for i in 0..32 {
            let block = slot * 32 + i;
            let mut got = vec![0u8; BLOCK as usize];
            image.read_exact_at(&mut got, block * BLOCK).unwrap();
            assert!(
                got == pattern::block(0x1000 + last, block, BLOCK as usize),
                "block {block} (round {last}) differs in the image"
            );
        }
    }
    let stats = api.device_stats("vf0").unwrap();
    assert_eq!(stats["mediator"]["name"], "trace");
    assert!(
        stats["mediator"]["stats"]["bar_writes"][0]
            .as_u64()
            .unwrap()
            >= 1,
        "{stats}"
    );
    // Bad requests get errors and the VMM lives on.
    let e = api
        .mediator("vf0", "trap", json!({"bar": 0, "offset": 1, "size": 2}))
        .unwrap_err();
    assert!(e.contains("not page-aligned"), "{e}");
    let e = api.mediator("nope", "trap", Value::Null).unwrap_err();
    assert!(e.contains("no device \"nope\""), "{e}");
    agent.reboot().expect("reboot");
    let status = vm.wait_exit(Duration::from_secs(120)).expect("vmm exits");
    assert_eq!(status.code(), Some(0), "{}", vm.describe());
    drop(vfsim);
}

fn migration(api: &mut ApiClient, op: &str) -> Result<Value, String> {
    api.device_migration("vf0", op)
}

/// Guest reads and writes on /dev/vda: `rounds` write+verify passes of 32 blocks.
fn guest_io(agent: &mut vmm_tests::harness::Agent, seed: u64, rounds: u64) {
    for r in 0..rounds {
        let req = BlkRequest {
            path: "/dev/vda".into(),
            offset: r * 32 * BLOCK,
            block_size: BLOCK,
            blocks: 32,
            seed: seed + r,
            direct: true,
        };
        agent.blk_write(&req).expect("guest write");
        let v = agent.blk_verify(&req).expect("guest verify");
        assert_eq!(v.mismatches, 0, "{v:?}");
    }
}

/// The `virtio-blk-vf` mediator over a vfsim VF with its PF socket:
/// - it traps nothing while the VM runs, and traps the doorbells while tracking;
/// - dirty tracking is complete: every guest page vfsim really wrote by DMA (its own log,
///   ground truth) is in the mediator's dirty set; with the ring walk switched off (a
///   test-only switch) the same check finds pages missing, so it can fail;
/// - the VF's state is saved through the migration region while the guest runs (the
///   device runs on), and restored through the real mediator into a fresh vfsim over the
///   same image, whose PF socket reads back the same state;
/// - guest garbage written to the trapped BAR pages crashes neither the VMM nor vfsim.
#[test]
fn virtio_blk_vf_tracks_dirty_pages_and_migrates_state() {
    use pf_protocol::proto::VfState;
    use pf_protocol::PfClient;

    let dir = TestDir::new("mediated-blk").expect("test dir");
    let disk = dir.disk("disk.img", DISK_SIZE);
    let spec = Device::mediated("vf0", "auto", DISK_SIZE);
    let (vfsim, device) = spec.start_vfsim(&dir, "vf0", None, Some(&disk));
    let pf_path = vfsim.pf.clone().unwrap();
    let (vm, mut agent, mut api) = golden_with_api(&dir, &spec, &device);
    let info = api.request(&json!({"request": "info"})).unwrap();
    assert_eq!(
        info["devices"][0]["mediator"], "virtio-blk-vf",
        "auto picks it: {info}"
    );
    let trapped =
        |api: &mut ApiClient| api.device_stats("vf0").unwrap()["bars"][0]["trapped"].clone();
    assert_eq!(
        trapped(&mut api),
        json!([]),
        "nothing trapped while the VM runs"
    );

    // Ground truth from vfsim, and the mediator's dirty set, over the same guest I/O.
    let pf = PfClient::connect(&pf_path, Duration::from_secs(5)).expect("pf socket");
    migration(&mut api, "start-dirty-tracking").expect("start tracking");
    assert_eq!(
        trapped(&mut api),
        json!([[NOTIFY.0, NOTIFY.1]]),
        "the doorbells are trapped while tracking"
    );
    pf.dma_log_start().expect("dma log");
    migration(&mut api, "take-dirty-pages").unwrap();
    guest_io(&mut agent, 0x2000, 4);
    let truth = pf.dma_log_take().unwrap();
    let dirty = api.dirty_pages("vf0").unwrap();
    let missing: Vec<_> = truth.iter().filter(|p| !dirty.contains(p)).collect();
    eprintln!(
        "dirty tracking: vfsim wrote {} pages by DMA, the mediator reported {} ({} missing)",
        truth.len(),
        dirty.len(),
        missing.len()
    );
    assert!(
        truth.len() > 32,
        "the guest's reads made the device write: {truth:?}"
    );
    assert!(
        missing.is_empty(),
        "pages written by DMA but not reported: {missing:x?}"
    );

    // The same check catches a mediator that skips the ring walk.
    api.mediator("vf0", "skip-ring-walk", json!({"on": true}))
        .unwrap();
    migration(&mut api, "take-dirty-pages").unwrap();
    pf.dma_log_take().unwrap();
    guest_io(&mut agent, 0x3000, 2);
    let truth = pf.dma_log_take().unwrap();
    let dirty = api.dirty_pages("vf0").unwrap();
    let missed = truth.iter().filter(|p| !dirty.contains(p)).count();
    eprintln!(
        "with the ring walk skipped: {missed} of {} DMA pages missing",
        truth.len()
    );
    assert!(
        missed > 0,
        "the completeness check must fail for an incomplete mediator"
    );
    api.mediator("vf0", "skip-ring-walk", json!({"on": false}))
        .unwrap();
    migration(&mut api, "stop-dirty-tracking").unwrap();
    pf.dma_log_stop().unwrap();
    assert_eq!(
        trapped(&mut api),
        json!([]),
        "untrapped when tracking stops"
    );

    // Save the running VF's state through the migration region; the VF runs on.
    let state_file = dir.join("vf0.state");
    let saved = api
        .request(
            &json!({"request": "device-migration", "device": "vf0", "op": "save",
                         "path": state_file}),
        )
        .expect("save");
    eprintln!("VF state saved: {saved}");
    let state: VfState =
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).expect("a VfState");
    assert!(state.queues.iter().any(|q| q.ready), "{state:?}");
    guest_io(&mut agent, 0x4000, 2);
    assert_eq!(trapped(&mut api), json!([]));

    // Restore into a fresh vfsim over the same image, through the real mediator and
    // region protocol (the vfio-user side is not needed to load state, so a fake stands
    // in for it here; the PF side is the real second vfsim).
    let vfsim2 = Vfsim::start_with_pf(&dir, &disk, "vf1");
    let registry = mediate::Registry::with_bundled();
    let backend = mediate::Registry::open(
        &registry,
        &"virtio-blk-vf".parse().unwrap(),
        "vfio-user:restore-target",
        &mediate::MediatorOptions {
            pf: vfsim2.pf.clone(),
            ..Default::default()
        },
        devices::vfio::testing::FakeBackend::standard().unwrap(),
    )
    .expect("mediator for the second vfsim");
    let m = backend.migration().expect("a migration region");
    use devices::vfio::migration::MigrationState;
    m.set_state(MigrationState::Resuming).unwrap();
    m.restore_chunk(&std::fs::read(&state_file).unwrap())
        .unwrap();
    m.set_state(MigrationState::Stopped).expect("state loaded");
    let pf2 = PfClient::connect(vfsim2.pf.as_ref().unwrap(), Duration::from_secs(5)).unwrap();
    assert_eq!(
        pf2.get_state().unwrap(),
        state,
        "the second vfsim reads back the saved state"
    );
    // A corrupt state is refused with a reason and the device stays as it was.
    m.set_state(MigrationState::Resuming).unwrap();
    m.restore_chunk(b"{not a state").unwrap();
    let e = m
        .set_state(MigrationState::Running)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not parse"), "{e}");
    assert_eq!(pf2.get_state().unwrap(), state);
    // The refused restore is abandoned: the device is stopped (not left resuming) and
    // runs again with the state it had.
    assert_eq!(m.state().unwrap(), MigrationState::Stopped);
    m.set_state(MigrationState::Running)
        .expect("the device runs again after a refused restore");
    assert_eq!(pf2.get_state().unwrap(), state);

    // Garbage from the guest into the trapped pages (common config, ISR, device config)
    // and the doorbell page while it is trapped: the VMM and vfsim survive.
    migration(&mut api, "start-dirty-tracking").unwrap();
    let base = api.device_stats("vf0").unwrap()["bars"][0]["base"]
        .as_u64()
        .unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut cmds = Vec::new();
    for _ in 0..40 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = ((x >> 8) % 0x2000) & !3;
        cmds.push(format!("devmem {:#x} 32 {:#x}", base + off, x as u32));
    }
    let script = cmds.join("; ");
    // 40 devmem processes: about a second each in this emulated guest, longer when the
    // machine is busy (a run beside two other guests took over 60 s), hence 300 s.
    let mut req = vmm_tests::agent::protocol::RunRequest::new(&["sh", "-c", &script]);
    req.timeout_ms = Some(300_000);
    let out = agent.run_request(&req).expect("garbage writes");
    eprintln!("garbage writes: status {:?}", out.status);
    assert!(
        api.request(&json!({"request": "info"})).is_ok(),
        "the VMM answers"
    );
    assert!(pf.get_state().is_ok(), "vfsim answers");
    assert!(vm.try_exit_status().unwrap().is_none(), "the VMM runs");
    migration(&mut api, "stop-dirty-tracking").unwrap();
    assert!(!vm.vmm_stderr().contains("panicked"), "{}", vm.vmm_stderr());
    let _ = agent.reboot();
    let status = vm.wait_exit(Duration::from_secs(120)).expect("vmm exits");
    assert_eq!(status.code(), Some(0), "{}", vm.describe());
    drop((vfsim, vfsim2));
}
