//! Guest-side steps for the tests that meet the real Linux VFIO inside a 6.12 guest:
//! the image, mtty instances, and a PCI function moved to vfio-pci (no-IOMMU).

use std::path::PathBuf;

use super::client::Agent;
use super::guest_run::run;
use super::image::GuestImage;

/// The kernel command-line word that lets vfio-pci bind a device with no IOMMU.
pub const NOIOMMU_ARG: &str = "vfio.enable_unsafe_noiommu_mode=1";
/// The 6.12 kernel (`tests/guest/build.sh --kernel 6.12`).
pub const VMLINUX_612_ENV: &str = "VMM_TEST_VMLINUX_612";
/// The 6.12 guest's initramfs (the agent, busybox and `guest-vfio`).
pub const INITRAMFS_612_ENV: &str = "VMM_TEST_INITRAMFS_612";

/// The 6.12 guest image; panics with what to do when scripts/test.sh did not export it.
pub fn image_612() -> GuestImage {
    let get = |var: &str| -> PathBuf {
        std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
            panic!("${var} is not set: run scripts/test.sh, or export it from `tests/guest/build.sh --kernel 6.12`")
        })
    };
    GuestImage {
        vmlinux: get(VMLINUX_612_ENV),
        initramfs: get(INITRAMFS_612_ENV),
    }
}

/// Runs a shell line in the guest and returns its stdout; panics with its output on failure.
fn sh(agent: &mut Agent, line: &str) -> String {
    let out = run(agent, &["sh", "-c", line]);
    assert!(out.success(), "guest `{line}` failed: {out:?}");
    out.stdout.trim().to_string()
}

/// Creates an mtty instance with one port; returns its sysfs path
/// (`/sys/bus/mdev/devices/<uuid>`).
pub fn create_mtty(agent: &mut Agent) -> String {
    let uuid = sh(agent, "cat /proc/sys/kernel/random/uuid");
    sh(
        agent,
        &format!("echo {uuid} > /sys/class/mdev_bus/mtty/mdev_supported_types/mtty-1/create"),
    );
    let path = format!("/sys/bus/mdev/devices/{uuid}");
    sh(agent, &format!("test -e {path}/iommu_group"));
    path
}

/// Moves the guest's virtio-blk function (1af4:1042, vfsim's VF) from virtio-pci to vfio-pci
/// and checks that its no-IOMMU group appeared; returns its sysfs path.
pub fn bind_virtio_blk_to_vfio_pci(agent: &mut Agent) -> String {
    let script = r#"
        for d in /sys/bus/pci/devices/*; do
            if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1042 ]; then
                bdf=${d##*/}
                [ -e $d/driver ] && echo $bdf > $d/driver/unbind
                echo vfio-pci > $d/driver_override
                echo $bdf > /sys/bus/pci/drivers_probe
                g=$(basename $(readlink $d/iommu_group))
                test -e /dev/vfio/noiommu-$g || { echo "no /dev/vfio/noiommu-$g" >&2; exit 1; }
                echo $d
                exit 0
            fi
        done
        echo "no virtio-blk function (1af4:1042)" >&2
        exit 1
    "#;
    sh(agent, script)
}
