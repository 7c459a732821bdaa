//! A `--device` id is the user's: one named like a device of the VMM's own (`serial0`,
//! `i8042`) keeps its state across snapshot and restore, and so do the legacy devices.
//! Before stream format 4 the legacy devices' sections were named `serial0`, `serial1` and
//! `i8042`; a passed-through device with one of those ids had its state taken for the
//! legacy device's, and the restore failed.
//!
//! No guest user space is needed: the snapshot is taken while the guest boots and the
//! restore's checks (every device's state whole, its PCI configuration present) come
//! before any vCPU runs.

use std::path::Path;
use std::time::Duration;

use migration::{Section, StreamReader};
use serde_json::json;
use vmm_tests::harness::{ApiClient, TestDir, Vfsim, Vm};

/// The device section ids of the snapshot at `path`, with each one's total bytes.
fn device_sections(path: &Path) -> Vec<(String, usize)> {
    let f = std::fs::File::open(path).unwrap();
    let mut r = StreamReader::read_header(std::io::BufReader::new(f)).unwrap();
    let mut out: Vec<(String, usize)> = Vec::new();
    loop {
        match r.next_section().unwrap() {
            Section::End => return out,
            Section::Device(d) => match out.iter_mut().find(|(id, _)| *id == d.id) {
                Some((_, n)) => *n += d.data.len(),
                None => out.push((d.id.clone(), d.data.len())),
            },
            _ => {}
        }
    }
}

#[test]
fn devices_named_serial0_and_i8042_keep_their_state_across_snapshot_and_restore() {
    let dir = TestDir::new("device-ids").expect("test dir");
    let disk_a = dir.disk("a.img", 1 << 20);
    let disk_b = dir.disk("b.img", 1 << 20);
    let serial = Vfsim::start_with_pf(&dir, &disk_a, "serial0");
    let i8042 = Vfsim::start_native(&dir, &disk_b, "i8042", None);
    let devices = [
        serial.mediated("virtio-blk-vf", "serial0"),
        format!("vfio-user,socket={},id=i8042", i8042.socket.display()),
    ];
    let api_path = dir.join("api.sock");
    let vm = Vm::builder()
        .vmm_args(&[
            "--device",
            &devices[0],
            "--device",
            &devices[1],
            "--api-socket",
            &api_path.display().to_string(),
        ])
        .boot()
        .expect("start vmm");
    let mut api = ApiClient::connect(&api_path, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("api socket: {e}\n{}", vm.describe()));
    let snap = dir.join("vm.snap");
    api.request(&json!({"request": "snapshot", "path": snap}))
        .unwrap_or_else(|e| panic!("snapshot: {e}\n{}", vm.describe()));
    vm.kill().unwrap();

    // Restored with fresh device processes under the same ids: the VMM takes every state
    // and runs the guest on.
    let serial2 = Vfsim::start_with_pf(&dir, &disk_a, "serial0-b");
    let i8042_2 = Vfsim::start_native(&dir, &disk_b, "i8042-b", None);
    let vm2 = Vm::builder()
        .restore(&snap)
        .vmm_args(&[
            "--device",
            &serial2.mediated("virtio-blk-vf", "serial0"),
            "--device",
            &format!("vfio-user,socket={},id=i8042", i8042_2.socket.display()),
        ])
        .boot()
        .expect("start vmm --restore");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !vm2.vmm_stderr().contains("restored ") {
        if let Some(status) = vm2.try_exit_status().unwrap() {
            panic!(
                "vmm --restore exited ({status}) instead of running:{}",
                vm2.describe()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no restore within 30 s:{}",
            vm2.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        vm2.try_exit_status().unwrap().is_none(),
        "the restored VM stopped:{}",
        vm2.describe()
    );
    assert!(
        !vm2.vmm_stderr().contains("ERROR"),
        "errors after the restore:{}",
        vm2.describe()
    );

    // Each device's own state (with its end marker), its PCI configuration, and the
    // legacy devices' states are separate sections.
    let sections = device_sections(&snap);
    let ids: Vec<&str> = sections.iter().map(|(id, _)| id.as_str()).collect();
    for want in [
        "serial0",
        "i8042",
        "pci/serial0",
        "pci/i8042",
        "legacy/serial0",
        "legacy/serial1",
        "legacy/i8042",
        "legacy/pci-config",
    ] {
        assert!(ids.contains(&want), "no section {want:?} in {ids:?}");
    }
    for (id, bytes) in &sections {
        if id == "serial0" || id == "i8042" {
            assert!(*bytes > 0, "device {id} saved no state");
        }
    }
}
