//! The kernel VFIO backend against the real Linux VFIO, inside a 6.12 guest: the program
//! `guest-vfio` (tests/guest-vfio, built on the `devices` crate: the very backend and
//! migration code the VMM runs) is shipped in the 6.12 initramfs and run through the agent.
//!
//! - vfsim's VF, which the guest sees as a virtio-blk function, is moved from virtio-pci to
//!   vfio-pci in no-IOMMU mode and driven as a user-space driver: info, regions, config
//!   space, the notify page mapped, MSI-X through eventfds, one write request by DMA (the
//!   data then read from vfsim's image here), reset;
//! - two mtty mdevs in one type1 container: MAP_DMA, every migration v2 arc mtty has, PRE_COPY
//!   info, a state with bytes in the FIFO moved from one to the other, DMA logging, and wrong
//!   moves mapped to the interface's typed errors.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use serde_json::Value;
use vmm_tests::harness::guest_vfio::{self, MttyType};
use vmm_tests::harness::{Agent, RunRequest, TestDir, Vfsim};

const DISK_SIZE: u64 = 16 << 20;
const SECTOR: u64 = 100;
/// A 6.12 boot with the larger initramfs takes longer than the 6.1 default.
const BOOT_TIMEOUT: Duration = Duration::from_secs(400);

/// Runs `guest-vfio` with `args`; returns its steps by name (the program prints one JSON
/// object per step and a `done` step on success).
fn guest_vfio_steps(agent: &mut Agent, args: &[&str]) -> HashMap<String, Value> {
    let mut argv = vec!["/bin/guest-vfio"];
    argv.extend_from_slice(args);
    let mut req = RunRequest::new(&argv);
    req.timeout_ms = Some(120_000);
    let out = agent
        .run_request(&req)
        .unwrap_or_else(|e| panic!("run {argv:?}: {e}"));
    let steps: HashMap<String, Value> = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v.get("step")?.as_str()?.to_string(), v)))
        .collect();
    assert!(
        out.success() && steps.contains_key("done"),
        "guest-vfio {args:?} failed: {out:?}"
    );
    steps
}

#[test]
fn kernel_vfio_backend_drives_real_vfio_pci_and_mtty_migration() {
    let dir = TestDir::new("guest-vfio").expect("test dir");
    let disk = dir.disk("disk.img", DISK_SIZE);
    let vfsim = Vfsim::start(&dir, &disk, "vf0");
    let device = format!("vfio-user,socket={},id=vf0", vfsim.socket.display());
    let vm = guest_vfio::vm_612()
        .vmm_args(&["--device", device.as_str()])
        .boot()
        .expect("start vmm");
    let mut agent = vm
        .agent(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest did not come up: {e}\n{}", vm.describe()));

    // vfsim's VF, from virtio-pci to vfio-pci (no-IOMMU), driven by the program.
    let found = guest_vfio::find_pci(&mut agent, 0x1af4, 0x1042).expect("find the VF");
    assert_eq!(found.len(), 1, "one virtio-blk function: {found:?}");
    let vf = guest_vfio::bind_vfio_pci(&mut agent, &found[0])
        .expect("bind the VF to vfio-pci")
        .address
        .sysfs_dir();
    let pci = guest_vfio_steps(&mut agent, &["pci", &vf, &SECTOR.to_string()]);
    let info = &pci["device_info"];
    assert!(info["num_regions"].as_u64().unwrap() >= 9, "{info}");
    assert_eq!(
        info["num_irqs"], 5,
        "vfio-pci has INTx, MSI, MSI-X, ERR, REQ: {info}"
    );
    let regions = pci["regions"]["regions"].as_array().unwrap();
    let bar0 = &regions[0];
    assert_eq!(bar0["size"], 0x4000, "{bar0}");
    assert_eq!(bar0["mmap"], true, "{bar0}");
    let config = &pci["config"];
    assert_eq!(
        (config["vendor"].as_u64(), config["device"].as_u64()),
        (Some(0x1af4), Some(0x1042)),
        "{config}"
    );
    assert_eq!(config["command_after"].as_u64().unwrap() & 6, 6, "{config}");
    assert!(
        pci["msix"]["vectors"].as_u64().unwrap() >= 2,
        "{}",
        pci["msix"]
    );
    assert!(
        pci["interrupt"]["count"].as_u64().unwrap() >= 1,
        "{}",
        pci["interrupt"]
    );
    let request = &pci["request"];
    assert_eq!(
        (request["used_idx"].as_u64(), request["status"].as_u64()),
        (Some(1), Some(0)),
        "{request}"
    );
    // The data reached vfsim's image by the device's DMA from the guest's locked pages.
    let mut image = vec![0u8; 512];
    std::fs::File::open(&disk)
        .unwrap()
        .read_exact_at(&mut image, SECTOR * 512)
        .unwrap();
    let image_hex: String = image.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        request["data"].as_str(),
        Some(image_hex.as_str()),
        "sector {SECTOR} of the image"
    );
    assert!(
        image.iter().any(|&b| b != 0),
        "the image sector is still empty"
    );
    assert_eq!(pci["reset"]["status_after"], 0, "{}", pci["reset"]);

    // Two mtty instances, one type1 container.
    let mdev = |agent: &mut Agent, n| {
        guest_vfio::create_mtty(agent, MttyType::OnePort, &guest_vfio::test_uuid(n))
            .expect("create an mtty instance")
            .sysfs_dir()
    };
    let a = mdev(&mut agent, 1);
    let b = mdev(&mut agent, 2);
    let mtty = guest_vfio_steps(&mut agent, &["mtty", &a, &b]);
    eprintln!("mtty steps: {mtty:#?}");
    let flags = mtty["migration"]["flags"].as_u64().unwrap();
    assert_eq!(
        flags & 7,
        7,
        "mtty offers STOP_COPY, P2P and PRE_COPY: {flags:#x}"
    );
    let walked: Vec<&str> = mtty["arcs"]["walked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for arc in [
        "RUNNING->PRE_COPY",
        "PRE_COPY->PRE_COPY_P2P",
        "PRE_COPY_P2P->STOP_COPY",
        "STOP_COPY->STOP",
        "STOP->RESUMING",
        "RESUMING->STOP",
        "STOP->RUNNING_P2P",
        "RUNNING_P2P->RUNNING",
        "RUNNING->RUNNING_P2P",
        "RUNNING_P2P->STOP",
        "RUNNING_P2P->PRE_COPY_P2P",
        "PRE_COPY_P2P->RUNNING_P2P",
        "PRE_COPY->RUNNING",
        "PRE_COPY_P2P->PRE_COPY",
        "STOP->STOP_COPY",
    ] {
        assert!(walked.contains(&arc), "arc {arc} not walked: {walked:?}");
    }
    let save = &mtty["save"];
    assert!(save["precopy_pending"].as_u64().unwrap() > 0, "{save}");
    assert!(save["bytes"].as_u64().unwrap() > 0, "{save}");
    assert_eq!(mtty["restore"]["fifo"], "mtty-fifo!", "{}", mtty["restore"]);
    assert_eq!(
        mtty["restore"]["regs"], save["regs"],
        "registers carried over"
    );
    assert_eq!(
        mtty["source_after"]["fifo"], "mtty-fifo!",
        "saving does not drain the source"
    );
    // DMA logging: mtty offers it; start, report and stop work (the 6.12 guest has
    // CONFIG_IOMMUFD_DRIVER, so the core's iova_bitmap is real). mtty does no DMA and its
    // log_read_and_clear returns 0 without setting a bit (samples/vfio-mdev/mtty.c): the
    // report over the mapped range has no dirty page, and a raw report leaves a patterned
    // bitmap as it was (the kernel never writes it).
    let logging = &mtty["dma_logging"];
    assert_eq!(
        mtty["migration"]["dma_logging"], true,
        "{}",
        mtty["migration"]
    );
    assert_eq!(
        (logging["started"].as_bool(), logging["stopped"].as_bool()),
        (Some(true), Some(true)),
        "{logging}"
    );
    let report = &logging["report"];
    assert_eq!(
        (report["iova"].as_u64(), report["length"].as_u64()),
        (
            mtty["dma_map"]["iova"].as_u64(),
            mtty["dma_map"]["size"].as_u64()
        ),
        "the report covers the mapped range: {logging}"
    );
    assert_eq!(report["page_size"], 4096, "{logging}");
    assert_eq!(report["dirty_pages"], 0, "{logging}");
    assert_eq!(
        logging["raw_report"]["bitmap_words"].as_u64(),
        mtty["dma_map"]["size"]
            .as_u64()
            .map(|s| (s / 4096).div_ceil(64)),
        "{logging}"
    );
    assert_eq!(logging["raw_report"]["bitmap_untouched"], true, "{logging}");
    let moves = mtty["wrong_moves"]["moves"].as_array().unwrap();
    assert_eq!(moves[0]["kind"], "WrongState", "{}", moves[0]);
    assert_eq!(moves[1]["kind"], "IllegalTransition", "{}", moves[1]);
    assert_eq!(moves[1]["kernel_state_after"], "STOP_COPY", "{}", moves[1]);
    assert_eq!(moves[2]["errno"], libc::EINVAL, "{}", moves[2]);
    let garbage = &moves[3];
    assert_eq!(garbage["write_kind"], "Device", "{garbage}");
    assert_eq!(garbage["end_kind"], "TransitionFailed", "{garbage}");
    assert!(
        mtty["wrong_moves"]["reset_b"]
            .as_str()
            .is_some_and(|e| e.contains("VFIO_DEVICE_FLAGS_RESET")),
        "mtty offers no reset flag, so the backend refuses: {}",
        mtty["wrong_moves"]
    );
    assert!(mtty.contains_key("dma_unmap"));
}
