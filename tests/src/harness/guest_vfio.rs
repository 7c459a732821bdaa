//! The 6.12 guest kernel and the guest-side VFIO steps tests build on.
//!
//! `tests/guest/build.sh --kernel 6.12` builds a guest kernel with VFIO (group and container
//! interface, no-IOMMU mode), vfio-pci, mediated devices and the kernel's `mtty` sample (an
//! emulated serial-port mdev) built in. `scripts/lib/common.sh`'s `guest_image` exports it as
//! `$VMM_TEST_VMLINUX_612`, with its initramfs (the usual one plus `/bin/guest-vfio`) as
//! `$VMM_TEST_INITRAMFS_612`.
//!
//! Each step is one busybox `sh -c` in the guest (spawning a guest process costs about a
//! second here) and fails with a [`GuestVfioError`] carrying the guest's output.

use std::env;
use std::path::PathBuf;

use thiserror::Error;

use super::client::Agent;
use super::guest_run::run;
use super::image::GuestImage;
use super::vm::{Vm, VmBuilder};
use crate::agent::protocol::RunOutput;

/// Environment variable naming the 6.12 guest kernel (an ELF vmlinux).
pub const VMLINUX_612_ENV: &str = "VMM_TEST_VMLINUX_612";
/// Environment variable naming the 6.12 guest's initramfs (the agent, busybox and
/// `guest-vfio`; `tests/guest/build.sh --kernel 6.12`).
pub const INITRAMFS_612_ENV: &str = "VMM_TEST_INITRAMFS_612";
/// Kernel argument that lets vfio-pci bind a device without an IOMMU (the guest has none).
pub const NOIOMMU_ARG: &str = "vfio.enable_unsafe_noiommu_mode=1";
/// The mtty parent device's directory in the guest.
pub const MTTY_PARENT: &str = "/sys/class/mdev_bus/mtty";
/// The VFIO container device in the guest.
pub const VFIO_CONTAINER: &str = "/dev/vfio/vfio";

/// A guest-side VFIO step failed.
#[derive(Debug, Error)]
pub enum GuestVfioError {
    /// The step's shell script failed or printed something unexpected.
    #[error("guest step {step:?} failed ({why}): {output:?}")]
    Step {
        /// What was attempted.
        step: String,
        /// What was wrong with its result.
        why: String,
        /// The script's output.
        output: RunOutput,
    },
}

/// The 6.12 guest: `$VMM_TEST_VMLINUX_612` and the initramfs of [`GuestImage::get`]. Panics
/// with instructions when the variable is unset or the image is missing: a test that needs
/// this kernel fails rather than skipping.
pub fn image_612() -> GuestImage {
    let get = |var: &str| -> PathBuf {
        let path = env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
            panic!(
                "${var} is not set: build the 6.12 guest with `tests/guest/build.sh --kernel 6.12` \
                 and export its VMLINUX= and INITRAMFS= paths as {VMLINUX_612_ENV} and \
                 {INITRAMFS_612_ENV} (scripts/lib/common.sh's guest_image does both)"
            )
        });
        assert!(path.is_file(), "${var}={} is not a file", path.display());
        path
    };
    GuestImage {
        vmlinux: get(VMLINUX_612_ENV),
        initramfs: get(INITRAMFS_612_ENV),
    }
}

/// A [`Vm`] builder for the 6.12 guest with no-IOMMU mode on ([`NOIOMMU_ARG`]).
pub fn vm_612() -> VmBuilder {
    Vm::builder().image(image_612()).extra_args(&[NOIOMMU_ARG])
}

/// An mtty mdev type: how many serial ports an instance has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MttyType {
    /// One port (`mtty-1`).
    OnePort,
    /// Two ports (`mtty-2`).
    TwoPorts,
}

impl MttyType {
    /// The type's directory name under `mdev_supported_types`.
    pub fn name(self) -> &'static str {
        match self {
            MttyType::OnePort => "mtty-1",
            MttyType::TwoPorts => "mtty-2",
        }
    }

    /// The type's directory in the guest.
    pub fn sysfs_dir(self) -> String {
        format!("{MTTY_PARENT}/mdev_supported_types/{}", self.name())
    }
}

/// A mediated device created in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mdev {
    /// Its UUID (also its name under `/sys/bus/mdev/devices`).
    pub uuid: String,
    /// Its IOMMU group (an emulated one: mdevs need no IOMMU).
    pub iommu_group: u32,
}

impl Mdev {
    /// Its sysfs directory in the guest.
    pub fn sysfs_dir(&self) -> String {
        format!("/sys/bus/mdev/devices/{}", self.uuid)
    }

    /// Its VFIO group device in the guest.
    pub fn group_dev(&self) -> String {
        format!("/dev/vfio/{}", self.iommu_group)
    }
}

/// A made-up UUID for the `n`th mdev of a test (the kernel only checks the format).
pub fn test_uuid(n: u16) -> String {
    format!("6d7a7479-0000-4000-8000-{n:012x}")
}

/// Creates an mtty instance of type `ty` named `uuid` (write to the type's `create`), and
/// checks that it has an IOMMU group whose `/dev/vfio/<group>` exists.
pub fn create_mtty(agent: &mut Agent, ty: MttyType, uuid: &str) -> Result<Mdev, GuestVfioError> {
    let script = format!(
        "set -e; echo {uuid} > {type_dir}/create; \
         g=$(readlink /sys/bus/mdev/devices/{uuid}/iommu_group); g=${{g##*/}}; \
         test -c /dev/vfio/$g; echo group=$g",
        type_dir = ty.sysfs_dir()
    );
    let step = format!("create {} mdev {uuid}", ty.name());
    let out = sh(agent, &script, &step)?;
    let iommu_group = parse_u32(&out, "group=", &step)?;
    Ok(Mdev {
        uuid: uuid.to_owned(),
        iommu_group,
    })
}

/// A PCI function's address in the guest, e.g. `0000:00:03.0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciAddress(pub String);

impl PciAddress {
    /// Its sysfs directory in the guest.
    pub fn sysfs_dir(&self) -> String {
        format!("/sys/bus/pci/devices/{}", self.0)
    }
}

/// The guest's PCI functions with this vendor and device ID, in sysfs order.
pub fn find_pci(
    agent: &mut Agent,
    vendor: u16,
    device: u16,
) -> Result<Vec<PciAddress>, GuestVfioError> {
    let script = format!(
        "for d in /sys/bus/pci/devices/*; do read v < $d/vendor; read i < $d/device; \
         if [ \"$v:$i\" = 0x{vendor:04x}:0x{device:04x} ]; then echo ${{d##*/}}; fi; done"
    );
    let out = sh(
        agent,
        &script,
        &format!("find PCI {vendor:04x}:{device:04x}"),
    )?;
    Ok(out
        .stdout
        .lines()
        .map(|l| PciAddress(l.trim().to_owned()))
        .collect())
}

/// A PCI function bound to vfio-pci in no-IOMMU mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioPciDevice {
    /// Its address.
    pub address: PciAddress,
    /// Its (no-IOMMU) IOMMU group.
    pub iommu_group: u32,
}

impl VfioPciDevice {
    /// Its VFIO group device in the guest: `/dev/vfio/noiommu-<group>`.
    pub fn group_dev(&self) -> String {
        format!("/dev/vfio/noiommu-{}", self.iommu_group)
    }
}

/// Unbinds `address` from its driver (if any), binds it to vfio-pci through `driver_override`
/// and `/sys/bus/pci/drivers_probe`, and checks that vfio-pci took it and that its
/// `/dev/vfio/noiommu-<group>` exists. Needs a guest booted with [`NOIOMMU_ARG`].
pub fn bind_vfio_pci(
    agent: &mut Agent,
    address: &PciAddress,
) -> Result<VfioPciDevice, GuestVfioError> {
    let bdf = &address.0;
    let script = format!(
        "set -e; d={dir}; if [ -e $d/driver ]; then echo {bdf} > $d/driver/unbind; fi; \
         echo vfio-pci > $d/driver_override; echo {bdf} > /sys/bus/pci/drivers_probe; \
         l=$(readlink $d/driver); echo driver=${{l##*/}}; \
         g=$(readlink $d/iommu_group); g=${{g##*/}}; test -c /dev/vfio/noiommu-$g; echo group=$g",
        dir = address.sysfs_dir()
    );
    let step = format!("bind {bdf} to vfio-pci");
    let out = sh(agent, &script, &step)?;
    if !out.stdout.lines().any(|l| l == "driver=vfio-pci") {
        return Err(GuestVfioError::Step {
            step,
            why: "the driver is not vfio-pci".into(),
            output: out,
        });
    }
    let iommu_group = parse_u32(&out, "group=", &step)?;
    Ok(VfioPciDevice {
        address: address.clone(),
        iommu_group,
    })
}

/// Runs `script` with `sh -c`; an error unless it exits 0.
fn sh(agent: &mut Agent, script: &str, step: &str) -> Result<RunOutput, GuestVfioError> {
    let out = run(agent, &["sh", "-c", script]);
    if out.success() {
        Ok(out)
    } else {
        Err(GuestVfioError::Step {
            step: step.to_owned(),
            why: "the script failed".into(),
            output: out,
        })
    }
}

/// The number on the output's `<key><number>` line.
fn parse_u32(out: &RunOutput, key: &str, step: &str) -> Result<u32, GuestVfioError> {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| GuestVfioError::Step {
            step: step.to_owned(),
            why: format!("no {key}<number> line"),
            output: out.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(
            MttyType::TwoPorts.sysfs_dir(),
            "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2"
        );
        assert_eq!(test_uuid(1), "6d7a7479-0000-4000-8000-000000000001");
        let d = VfioPciDevice {
            address: PciAddress("0000:00:03.0".into()),
            iommu_group: 0,
        };
        assert_eq!(d.group_dev(), "/dev/vfio/noiommu-0");
        assert_eq!(d.address.sysfs_dir(), "/sys/bus/pci/devices/0000:00:03.0");
    }
}
