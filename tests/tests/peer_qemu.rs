//! Interop with QEMU's vfio-user server (`x-vfio-user-server`, from Debian's QEMU 10.0
//! source package, built by `tests/peers/build.sh`) exporting its own modern virtio-blk-pci:
//! a device model nobody on this project wrote, which honours its MSI-X state as hardware
//! does. The guest's stock virtio-blk driver binds it (once with its BAR areas mapped,
//! once trapped whole with `mmap=off`), data crosses both ways, MSI-X interrupts arrive,
//! and since QEMU's server offers no migration, `snapshot` and `migrate` are refused
//! naming the device while the guest's I/O goes on.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use vmm_tests::agent::pattern;
use vmm_tests::harness::peers::Peer;
use vmm_tests::harness::{
    assert_migration_refused, run, start_with_api, virtio_msix_interrupts, BlkRequest, TestDir, Vm,
};

const DISK_SIZE: u64 = 16 << 20;
/// The trapped device's disk (a different size tells the two apart in the guest).
const DISK2_SIZE: u64 = 8 << 20;
const BLOCK: u64 = 4096;

fn req(path: &str, offset: u64, blocks: u64, seed: u64) -> BlkRequest {
    BlkRequest {
        path: path.into(),
        offset,
        block_size: BLOCK,
        blocks,
        seed,
        direct: true,
    }
}

#[test]
fn qemu_vfio_user_server_drives_the_guest_and_cannot_be_migrated() {
    let dir = TestDir::new("peer-qemu").expect("test dir");
    let disk = dir.disk("disk.img", DISK_SIZE);
    let disk2 = dir.disk("disk2.img", DISK2_SIZE);
    // The host writes a pattern the guest must read back through the device.
    let host = req("/dev/vda", 1 << 20, 32, 0xfeed);
    let rw = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    for i in 0..host.blocks {
        let index = host.offset / BLOCK + i;
        rw.write_all_at(
            &pattern::block(host.seed, index, BLOCK as usize),
            index * BLOCK,
        )
        .unwrap();
    }
    rw.sync_all().unwrap();

    let mut q0 = Peer::qemu_blk(&dir, "qemu0", &disk);
    let mut q1 = Peer::qemu_blk(&dir, "qemu1", &disk2);
    let (vm, mut agent, mut api) = start_with_api(
        Vm::builder(),
        &dir,
        &[q0.device("qblk0", ""), q1.device("qblk1", "mmap=off")],
        || format!("qemu0: {}", q0.log_text()),
    );

    for (dev, size) in [("vda", DISK_SIZE), ("vdb", DISK2_SIZE)] {
        let got = run(&mut agent, &["cat", &format!("/sys/block/{dev}/size")]);
        assert_eq!(
            got.stdout.trim(),
            (size / 512).to_string(),
            "{dev}: the guest's virtio-blk driver bound QEMU's device: {got:?}\n{}",
            vm.describe()
        );
    }
    let irqs_before = virtio_msix_interrupts(&mut agent);

    // Guest to image, on both devices.
    for (dev, image) in [("/dev/vda", &disk), ("/dev/vdb", &disk2)] {
        let w = req(dev, 0, 64, 0x5eed);
        agent
            .blk_write(&w)
            .unwrap_or_else(|e| panic!("{dev}: guest write: {e}\n{}", vm.describe()));
        let file = std::fs::File::open(image).unwrap();
        for i in 0..w.blocks {
            let mut got = vec![0u8; BLOCK as usize];
            file.read_exact_at(&mut got, i * BLOCK).unwrap();
            assert!(
                got == pattern::block(w.seed, i, BLOCK as usize),
                "{dev}: block {i} differs in the image"
            );
        }
    }
    // Image to guest.
    let v = agent.blk_verify(&host).expect("guest verify");
    assert_eq!(v.mismatches, 0, "the guest read the host's pattern: {v:?}");
    let irqs_after = virtio_msix_interrupts(&mut agent);
    eprintln!("virtio MSI-X interrupts: {irqs_before} after boot, {irqs_after} after the I/O");
    assert!(
        irqs_after > irqs_before,
        "MSI-X interrupts must rise with I/O: {irqs_before} -> {irqs_after}"
    );

    // QEMU's server offers no migration: both refused at once, naming the device.
    assert_migration_refused(&mut api, &dir, "qblk0");

    // The guest's I/O goes on afterwards.
    let w = req("/dev/vda", 4 << 20, 16, 0xabc);
    agent.blk_write(&w).expect("write after the refusals");
    let v = agent.blk_verify(&w).expect("verify after the refusals");
    assert_eq!(v.mismatches, 0, "{v:?}");
    assert!(q0.running() && q1.running(), "QEMU's servers must live on");

    agent.reboot().expect("reboot");
    let status = vm.wait_exit(Duration::from_secs(120)).expect("vmm exits");
    assert_eq!(status.code(), Some(0), "{}", vm.describe());
}
