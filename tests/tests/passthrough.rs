//! Guest test of PCI passthrough over vfio-user: `vfsim` (a software virtio-blk VF in its own
//! process) is passed through with `--device vfio-user,socket=...`; the guest's stock
//! virtio-blk driver binds it as /dev/vda, and data written on either side is found byte
//! for byte on the other.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use vmm_tests::agent::pattern;
use vmm_tests::harness::{run, BlkRequest, TestDir, Vfsim, Vm, DEFAULT_BOOT_TIMEOUT};

const DISK_SIZE: u64 = 16 << 20;
/// The second VF's disk (a different size tells the two apart in the guest).
const DISK2_SIZE: u64 = 8 << 20;
/// Single-block guest writes to each VF in the exit comparison.
const COMPARE_WRITES: u64 = 16;
const BLOCK: u64 = 4096;

#[test]
fn guest_virtio_blk_driver_drives_the_passed_through_vf() {
    let dir = TestDir::new("passthrough").expect("test dir");
    let disk = dir.disk("disk.img", DISK_SIZE);
    let vfsim = Vfsim::start(&dir, &disk, "vf0");
    // A second VF whose BAR is trapped whole (mmap=off): its doorbells exit to the VMM.
    let disk2 = dir.disk("disk2.img", DISK2_SIZE);
    let vfsim2 = Vfsim::start(&dir, &disk2, "vf1");

    let device = format!("vfio-user,socket={},id=vf0", vfsim.socket.display());
    let device2 = format!(
        "vfio-user,socket={},id=vf1,mmap=off",
        vfsim2.socket.display()
    );
    let vm = Vm::builder()
        .vmm_args(&[
            "--device",
            device.as_str(),
            "--device",
            device2.as_str(),
            "--exit-stats",
        ])
        .boot()
        .expect("start vmm");
    let mut agent = vm
        .agent(DEFAULT_BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest did not come up: {e}\n{}", vm.describe()));

    // The stock driver bound the VF: /dev/vda has the image's size (in 512-byte sectors).
    let size = run(&mut agent, &["cat", "/sys/block/vda/size"]);
    assert_eq!(
        size.stdout.trim(),
        (DISK_SIZE / 512).to_string(),
        "{size:?}\n{}",
        vm.describe()
    );

    // Guest writes (O_DIRECT) a pseudo-random pattern; the image holds it byte for byte.
    let write = BlkRequest {
        path: "/dev/vda".into(),
        offset: 0,
        block_size: BLOCK,
        blocks: 64,
        seed: 0x5eed,
        direct: true,
    };
    agent.blk_write(&write).expect("guest write");
    let image = std::fs::File::open(&disk).unwrap();
    for i in 0..write.blocks {
        let mut got = vec![0u8; BLOCK as usize];
        image.read_exact_at(&mut got, i * BLOCK).unwrap();
        assert!(
            got == pattern::block(write.seed, i, BLOCK as usize),
            "block {i} differs in the image"
        );
    }

    // The host writes a pattern into the image; the guest reads it back with O_DIRECT.
    let host = BlkRequest {
        path: "/dev/vda".into(),
        offset: 1 << 20,
        block_size: BLOCK,
        blocks: 32,
        seed: 0xfeed,
        direct: true,
    };
    let first = host.offset / BLOCK;
    let rw = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    for i in 0..host.blocks {
        rw.write_all_at(
            &pattern::block(host.seed, first + i, BLOCK as usize),
            (first + i) * BLOCK,
        )
        .unwrap();
    }
    rw.sync_all().unwrap();
    let verify = agent.blk_verify(&host).expect("guest verify");
    assert_eq!(
        verify.mismatches, 0,
        "guest read back the host's pattern: {verify:?}"
    );

    // The same guest write to each VF: doorbells to the mapped notify page cost no exit
    // (vfsim polls the page); to the trapped one, one exit each.
    let size2 = run(&mut agent, &["cat", "/sys/block/vdb/size"]);
    assert_eq!(
        size2.stdout.trim(),
        (DISK2_SIZE / 512).to_string(),
        "vdb is the trapped VF: {size2:?}"
    );
    // One block per agent request (the agent batches blocks of one request into large
    // writes), so each is at least one virtio request and one doorbell, plus a flush.
    for dev in ["/dev/vda", "/dev/vdb"] {
        for i in 0..COMPARE_WRITES {
            let req = BlkRequest {
                path: dev.into(),
                offset: (2 << 20) + i * BLOCK,
                block_size: BLOCK,
                blocks: 1,
                seed: 7,
                direct: true,
            };
            agent
                .blk_write(&req)
                .unwrap_or_else(|e| panic!("write {dev}: {e}"));
        }
        let all = BlkRequest {
            path: dev.into(),
            offset: 2 << 20,
            block_size: BLOCK,
            blocks: COMPARE_WRITES,
            seed: 7,
            direct: true,
        };
        let check = agent
            .blk_verify(&all)
            .unwrap_or_else(|e| panic!("verify {dev}: {e}"));
        assert_eq!(check.mismatches, 0, "{dev}: {check:?}");
    }

    agent.reboot().expect("reboot");
    let status = vm.wait_exit(Duration::from_secs(120)).expect("vmm exits");
    assert_eq!(status.code(), Some(0), "{}", vm.describe());
    let stderr = vm.vmm_stderr();
    let (mapped, trapped) = (bar_exits(&stderr, "vf0"), bar_exits(&stderr, "vf1"));
    eprintln!(
        "BAR exits over the whole run ({COMPARE_WRITES} single-block writes on each VF): \
         notify mapped (vf0) {mapped}, notify trapped (vf1) {trapped}"
    );
    assert!(
        trapped >= mapped + COMPARE_WRITES,
        "trapped doorbells must cost at least one exit per request: mapped {mapped}, trapped {trapped}\n{stderr}"
    );
}

/// Trapped BAR accesses (reads + writes) of device `id`, from `--exit-stats`.
fn bar_exits(stderr: &str, id: &str) -> u64 {
    let prefix = format!("exit-stats: pci {id} ");
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter(|l| l.trim_start().starts_with("bar"))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let count = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|i| words.get(i + 1))
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("no {key} count in: {l}"))
            };
            count("reads") + count("writes")
        })
        .sum()
}
