//! Guest test of PCI passthrough over vfio-user: `vfsim` (a software virtio-blk VF in its own
//! process) is passed through with `--device vfio-user,socket=...`; the guest's stock
//! virtio-blk driver binds it as /dev/vda, and data written on either side is found byte
//! for byte on the other.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_tests::agent::pattern;
use vmm_tests::harness::{vmm_binary, BlkRequest, TestDir, Vm, DEFAULT_BOOT_TIMEOUT};

const DISK_SIZE: u64 = 16 << 20;
const BLOCK: u64 = 4096;

/// A running vfsim, killed on drop.
struct Vfsim {
    child: Child,
    socket: PathBuf,
}

impl Vfsim {
    fn start(dir: &TestDir, disk: &std::path::Path) -> Vfsim {
        let bin = vmm_binary().expect("vmm binary").with_file_name("vfsim");
        assert!(
            bin.is_file(),
            "vfsim is built beside vmm: {}",
            bin.display()
        );
        let socket = dir.join("vfsim.sock");
        let log = std::fs::File::create(dir.join("vfsim.log")).unwrap();
        let child = Command::new(&bin)
            .arg("--socket")
            .arg(&socket)
            .arg("--disk")
            .arg(disk)
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start vfsim");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "vfsim did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Vfsim { child, socket }
    }
}

impl Drop for Vfsim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn guest_virtio_blk_driver_drives_the_passed_through_vf() {
    let dir = TestDir::new("passthrough").expect("test dir");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(DISK_SIZE)
        .unwrap();
    let vfsim = Vfsim::start(&dir, &disk);

    let device = format!("vfio-user,socket={},id=vf0", vfsim.socket.display());
    let vm = Vm::builder()
        .vmm_args(&["--device", device.as_str(), "--exit-stats"])
        .boot()
        .expect("start vmm");
    let mut agent = vm
        .agent(DEFAULT_BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest did not come up: {e}\n{}", vm.describe()));

    // The stock driver bound the VF: /dev/vda has the image's size (in 512-byte sectors).
    let size = agent
        .run(&["cat", "/sys/block/vda/size"])
        .expect("read vda size");
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

    agent.reboot().expect("reboot");
    let status = vm.wait_exit(Duration::from_secs(120)).expect("vmm exits");
    assert_eq!(status.code(), Some(0), "{}", vm.describe());
    assert!(
        vm.vmm_stderr().contains("exit-stats: pci vf0"),
        "{}",
        vm.vmm_stderr()
    );
}
