//! Guest test of the 6.12 guest kernel (`tests/guest/build.sh --kernel 6.12`,
//! `$VMM_TEST_VMLINUX_612`): it boots with the usual initramfs, its built-in mtty sample makes
//! mediated devices with VFIO groups, and a passed-through vfsim VF can be moved from
//! virtio-pci to vfio-pci in no-IOMMU mode. The guest-side steps are
//! `vmm_tests::harness::guest_vfio`'s.

use std::time::Duration;

use vmm_tests::harness::guest_vfio::{self, MttyType, MTTY_PARENT, VFIO_CONTAINER};
use vmm_tests::harness::{run, TestDir, Vfsim, DEFAULT_BOOT_TIMEOUT};

const DISK_SIZE: u64 = 8 << 20;
/// vfsim's VF: a modern virtio-blk function.
const VF_VENDOR: u16 = 0x1af4;
const VF_DEVICE: u16 = 0x1042;

#[test]
fn kernel_612_has_mtty_mdevs_and_binds_a_vf_to_vfio_pci() {
    let dir = TestDir::new("kernel612").expect("test dir");
    let disk = dir.disk("disk.img", DISK_SIZE);
    let vfsim = Vfsim::start(&dir, &disk, "vf0");
    let device = format!("vfio-user,socket={},id=vf0", vfsim.socket.display());
    let vm = guest_vfio::vm_612()
        .vmm_args(&["--device", device.as_str()])
        .boot()
        .expect("start vmm");
    let mut agent = vm
        .agent(DEFAULT_BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest did not come up: {e}\n{}", vm.describe()));

    let uname = run(&mut agent, &["uname", "-r"]);
    assert!(
        uname.stdout.starts_with("6.12."),
        "the guest runs the 6.12 kernel: {uname:?}"
    );

    // VFIO's container and the mtty parent with its two types are there.
    let types = format!("{MTTY_PARENT}/mdev_supported_types");
    let ls = run(&mut agent, &["ls", &types, VFIO_CONTAINER]);
    assert!(ls.success(), "{ls:?}\n{}", vm.describe());
    for ty in [MttyType::OnePort, MttyType::TwoPorts] {
        assert!(ls.stdout.contains(ty.name()), "no {}: {ls:?}", ty.name());
    }

    // Two mtty instances, each in its own VFIO group.
    let mdevs: Vec<_> = [MttyType::TwoPorts, MttyType::TwoPorts]
        .iter()
        .enumerate()
        .map(|(i, ty)| {
            guest_vfio::create_mtty(&mut agent, *ty, &guest_vfio::test_uuid(i as u16 + 1))
                .unwrap_or_else(|e| panic!("{e}\n{}", vm.describe()))
        })
        .collect();
    assert_ne!(mdevs[0].iommu_group, mdevs[1].iommu_group, "{mdevs:?}");
    let nodes = run(
        &mut agent,
        &["ls", &mdevs[0].group_dev(), &mdevs[1].group_dev()],
    );
    assert!(nodes.success(), "{mdevs:?}: {nodes:?}");

    // The VF leaves virtio-pci for vfio-pci, in a no-IOMMU group.
    let vfs = guest_vfio::find_pci(&mut agent, VF_VENDOR, VF_DEVICE)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.describe()));
    assert_eq!(vfs.len(), 1, "one {VF_VENDOR:04x}:{VF_DEVICE:04x}: {vfs:?}");
    let driver = run(
        &mut agent,
        &["readlink", &format!("{}/driver", vfs[0].sysfs_dir())],
    );
    assert!(
        driver.stdout.trim_end().ends_with("/virtio-pci"),
        "the VF starts on virtio-pci: {driver:?}"
    );
    let bound = guest_vfio::bind_vfio_pci(&mut agent, &vfs[0])
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.describe()));
    let node = run(&mut agent, &["ls", "-l", &bound.group_dev()]);
    assert!(node.success(), "{bound:?}: {node:?}");
    eprintln!(
        "mtty groups {} and {}; VF {} in {}",
        mdevs[0].iommu_group,
        mdevs[1].iommu_group,
        bound.address.0,
        bound.group_dev()
    );

    agent.reboot().expect("reboot");
    let status = vm.wait_exit(Duration::from_secs(120)).expect("vmm exits");
    assert_eq!(status.code(), Some(0), "{}", vm.describe());
}
