//! Guest tests of mediated vfio-pci (`--device vfio-mediated`): run-time trap/untrap of the
//! VF's notify (doorbell) page while the guest does I/O through its stock virtio-blk driver.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_tests::agent::pattern;
use vmm_tests::harness::{ApiClient, BlkRequest, TestDir, Vfsim, Vm, DEFAULT_BOOT_TIMEOUT};

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
    let dir = TestDir::new("mediated-trap").expect("test dir");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(DISK_SIZE)
        .unwrap();
    let vfsim = Vfsim::start(&dir, &disk, "vf0");
    let api_path = dir.join("api.sock");
    let device = format!(
        "vfio-mediated,socket={},mediator=trace,id=vf0",
        vfsim.socket.display()
    );
    let vm = Vm::builder()
        .vmm_args(&[
            "--device",
            device.as_str(),
            "--api-socket",
            api_path.to_str().unwrap(),
        ])
        .boot()
        .expect("start vmm");
    let mut agent = vm
        .agent(DEFAULT_BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest did not come up: {e}\n{}", vm.describe()));
    let mut api = ApiClient::connect(&api_path, Duration::from_secs(10)).expect("api");
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
