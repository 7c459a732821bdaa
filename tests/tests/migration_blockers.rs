//! Nothing is lost silently: a VM holding a device that cannot migrate refuses `snapshot`
//! and `migrate` at once (naming the device and why) and runs on untouched, and
//! `--restore` refuses a stream that lacks a device's state instead of running the device
//! reset.
//!
//! None of these needs the guest in user space: the refusals come before anything is
//! paused, and the restore checks come before any vCPU runs. The guest test with a real
//! non-migratable peer (QEMU's vfio-user server) is in `peers.rs`.

use std::path::Path;
use std::time::Duration;

use migration::{RamPagesBuilder, Section, StreamReader, StreamWriter};
use serde_json::json;
use vmm_tests::harness::{ApiClient, TestDir, Vfsim, Vm};

fn start_with_api(dir: &TestDir, device: &str) -> (Vm, ApiClient) {
    let api_path = dir.join("api.sock");
    let vm = Vm::builder()
        .vmm_args(&[
            "--device",
            device,
            "--api-socket",
            &api_path.display().to_string(),
        ])
        .boot()
        .expect("start vmm");
    let api = ApiClient::connect(&api_path, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("api socket: {e}\n{}", vm.describe()));
    (vm, api)
}

#[test]
fn a_device_without_migration_blocks_snapshot_and_migrate() {
    let dir = TestDir::new("blockers").expect("test dir");
    let disk = dir.disk("disk.img", 1 << 20);
    let vfsim = Vfsim::start(&dir, &disk, "vf0");
    // `trace` passes the VF through and has no migration region: the VF cannot migrate.
    let (vm, mut api) = start_with_api(&dir, &vfsim.mediated("trace", "tr0"));

    let snap = dir.join("vm.snap");
    let e = api
        .request(&json!({"request": "snapshot", "path": snap}))
        .expect_err("a snapshot of a VM with a device that cannot migrate");
    assert!(e.contains("device tr0 cannot migrate"), "{e}");
    assert!(e.contains("mediator trace has no migration region"), "{e}");
    assert!(!snap.exists(), "a refused snapshot left a file");
    assert!(
        !dir.join("vm.snap.tmp").exists(),
        "a refused snapshot left a temporary file"
    );

    // Refused at once, before any connection: nothing listens on this port.
    let e = api
        .request(&json!({"request": "migrate", "url": "tcp:127.0.0.1:9"}))
        .expect_err("a migration of a VM with a device that cannot migrate");
    assert!(e.contains("device tr0 cannot migrate"), "{e}");
    let status = api
        .request(&json!({"request": "migration-status"}))
        .unwrap();
    assert_eq!(status["phase"], "none", "{status}");

    // The VM runs on untouched: not paused, still answering, the process alive.
    let info = api.request(&json!({"request": "info"})).unwrap();
    assert_eq!(info["paused"], false, "{info}");
    assert!(vm.try_exit_status().unwrap().is_none(), "{}", vm.describe());
    let e = api
        .request(&json!({"request": "device-migration", "device": "tr0", "op": "state"}))
        .expect_err("device-migration of a device that cannot migrate");
    assert!(e.contains("mediator trace has no migration region"), "{e}");
    drop(vm);
}

/// Copies the snapshot at `from` to `to` without the sections `drop` selects.
fn rewrite_without(from: &Path, to: &Path, drop: impl Fn(&Section) -> bool) {
    let mut r = StreamReader::read_header(std::fs::File::open(from).unwrap()).unwrap();
    let mut w = StreamWriter::write_header(std::fs::File::create(to).unwrap(), 0).unwrap();
    loop {
        let s = r.next_section().unwrap();
        if drop(&s) {
            continue;
        }
        match s {
            Section::End => break,
            Section::VmConfig(c) => w.write_vm_config(&c).unwrap(),
            Section::RamPages(p) => {
                let mut b = RamPagesBuilder::new();
                for run in p.runs() {
                    match run.data {
                        Some(data) => b.push_pages(run.gpa, data).unwrap(),
                        None => b.push_zero_pages(run.gpa, run.pages).unwrap(),
                    }
                }
                w.write_ram_pages(&b).unwrap();
            }
            Section::Vcpu { id, state } => w.write_vcpu(id, &state).unwrap(),
            Section::Irqchip(b) => w.write_irqchip(&b).unwrap(),
            Section::Device(d) => w.write_device(&d.id, d.phase, &d.data).unwrap(),
            other => panic!("unexpected section in a snapshot: {other:?}"),
        }
    }
    w.finish().unwrap();
}

/// Runs `vmm --restore` and expects it to refuse (exit 1) within a minute; a VMM that
/// runs the guest instead is killed and the test fails.
fn restore_fails(snap: &Path, device: &str) -> String {
    let bin = vmm_tests::harness::vmm_binary().unwrap();
    let mut child = std::process::Command::new(bin)
        .args(["--restore", snap.to_str().unwrap(), "--serial", "off"])
        .args(["--device", device])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmm --restore {} ran instead of refusing", snap.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    stderr
}

#[test]
fn restore_refuses_a_stream_without_a_devices_state() {
    let dir = TestDir::new("blockers-restore").expect("test dir");
    let disk = dir.disk("disk.img", 1 << 20);
    let vfsim = Vfsim::start_with_pf(&dir, &disk, "vf0");
    let (vm, mut api) = start_with_api(&dir, &vfsim.mediated("virtio-blk-vf", "vf0"));
    let snap = dir.join("vm.snap");
    api.request(&json!({"request": "snapshot", "path": snap}))
        .unwrap_or_else(|e| panic!("snapshot: {e}\n{}", vm.describe()));
    vm.kill().unwrap();

    // The device's own state (chunks and end marker) removed, its PCI state kept.
    let stripped = dir.join("stripped.snap");
    rewrite_without(
        &snap,
        &stripped,
        |s| matches!(s, Section::Device(d) if d.id == "vf0"),
    );
    let vfsim2 = Vfsim::start_with_pf(&dir, &disk, "vf1");
    let e = restore_fails(&stripped, &vfsim2.mediated("virtio-blk-vf", "vf0"));
    assert!(e.contains("device vf0"), "{e}");
    assert!(e.contains("without the end of its state"), "{e}");

    // Only the end marker removed: the state may be cut short, so it is refused too.
    let unmarked = dir.join("unmarked.snap");
    rewrite_without(
        &snap,
        &unmarked,
        |s| matches!(s, Section::Device(d) if d.id == "vf0" && d.data.is_empty()),
    );
    let e = restore_fails(&unmarked, &vfsim2.mediated("virtio-blk-vf", "vf0"));
    assert!(e.contains("without the end of its state"), "{e}");

    // Its PCI state removed.
    let no_pci = dir.join("no-pci.snap");
    rewrite_without(
        &snap,
        &no_pci,
        |s| matches!(s, Section::Device(d) if d.id == "pci/vf0"),
    );
    let e = restore_fails(&no_pci, &vfsim2.mediated("virtio-blk-vf", "vf0"));
    assert!(e.contains("no PCI configuration"), "{e}");

    // The same id given with a device that cannot take the state here.
    let e = restore_fails(&snap, &vfsim2.mediated("trace", "vf0"));
    assert!(e.contains("device vf0 cannot migrate"), "{e}");
    assert!(e.contains("cannot be loaded here"), "{e}");
}
