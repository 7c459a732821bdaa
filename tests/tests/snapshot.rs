//! Snapshot and restore with a mediated VF: the VM is written to a file while the guest
//! runs, the VMM and its vfsim are killed, and a new VMM restores the snapshot with a new
//! vfsim over the same disk image. The guest continues: its memory and data checks pass
//! and its disk I/O through the VF works.

use std::time::Duration;

use serde_json::json;
use vmm_tests::harness::{golden_with_api, BlkRequest, Device, TestDir, Vfsim, Vm};

const DISK_SIZE: u64 = 16 << 20;

fn req(seed: u64, offset: u64) -> BlkRequest {
    BlkRequest {
        path: "/dev/vda".into(),
        offset,
        block_size: 4096,
        blocks: 64,
        seed,
        direct: true,
    }
}

#[test]
fn snapshot_kill_and_restore_with_a_new_vf() {
    let dir = TestDir::new("snapshot").expect("test dir");
    let disk = dir.disk("disk.img", DISK_SIZE);
    let spec = Device::mediated("vf0", "virtio-blk-vf", DISK_SIZE);
    let (mut vfsim, device) = spec.start_vfsim(&dir, "vf0", None, Some(&disk));
    let (vm, mut agent, mut api) = golden_with_api(&dir, &spec, &device);
    agent.blk_write(&req(0xa, 0)).expect("guest write");
    let filled = agent.mem_fill(32, 0x5eed).expect("mem fill");
    eprintln!("guest filled 32 MiB: {filled:?}");

    let timing = "cat /proc/uptime; sleep 1; cat /proc/uptime; grep -c tsc_deadline_timer /proc/cpuinfo; cat /sys/devices/system/clockevents/clockevent0/current_device";
    let before = vmm_tests::harness::run(&mut agent, &["sh", "-c", timing]);
    eprintln!("source guest, sleep 1 timed inside:\n{}", before.stdout);
    // Pause stops the guest (its agent does not answer) until resume.
    api.request(&json!({"request": "pause"})).expect("pause");
    let info = api.request(&json!({"request": "info"})).unwrap();
    assert_eq!(info["paused"], true, "{info}");
    let e = api.request(&json!({"request": "pause"})).unwrap_err();
    assert!(e.contains("already paused"), "{e}");
    let silent = agent.ping_timeout(Duration::from_secs(3));
    assert!(silent.is_err(), "a paused guest answered: {silent:?}");
    api.request(&json!({"request": "resume"})).expect("resume");
    agent.ping().expect("guest answers after resume");

    let snap = dir.join("vm.snap");
    let r = api
        .request(&json!({"request": "snapshot", "path": snap}))
        .unwrap_or_else(|e| panic!("snapshot: {e}\n{}", vm.describe()));
    eprintln!("snapshot: {r}");
    // The source runs on after the snapshot.
    agent.ping().expect("guest alive after the snapshot");
    assert!(agent.mem_check().unwrap().intact);

    // Kill both (a crash, no clean-up), then restore with a new vfsim on the same image.
    vm.kill().expect("kill vmm");
    vfsim.kill().expect("kill vfsim");
    drop(agent);
    let vfsim2 = Vfsim::start_with_pf(&dir, &disk, "vf1");
    let dev2 = vfsim2.mediated("virtio-blk-vf", "vf0");
    let vm2 = Vm::builder()
        .restore(&snap)
        .vmm_args(&["--device", dev2.as_str()])
        .boot()
        .expect("start the restored vmm");
    let mut agent = vm2
        .agent(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("restored guest does not answer: {e}\n{}", vm2.describe()));
    // Time runs in the restored guest: `sleep 1` returns at all only if its timer fires
    // (the durations are printed for diagnosis, not asserted: exec alone takes ~1.5 s).
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let out = vmm_tests::harness::run(&mut agent, &["sleep", "1"]);
        eprintln!("restored guest: `sleep 1` took {:?}", t.elapsed());
        assert!(out.success(), "{out:?}");
    }
    let after = vmm_tests::harness::run(
        &mut agent,
        &["sh", "-c", "cat /proc/uptime; sleep 1; cat /proc/uptime"],
    );
    eprintln!("restored guest, sleep 1 timed inside:\n{}", after.stdout);
    let check = agent.mem_check().expect("mem check");
    assert!(check.intact, "guest memory after restore: {check:?}");
    let v = agent.blk_verify(&req(0xa, 0)).expect("verify");
    assert_eq!(v.mismatches, 0, "data written before the snapshot: {v:?}");
    agent
        .blk_write(&req(0xb, 1 << 20))
        .expect("write after restore");
    let v = agent
        .blk_verify(&req(0xb, 1 << 20))
        .expect("verify after restore");
    assert_eq!(v.mismatches, 0, "{v:?}");
    agent.reboot().expect("reboot");
    let status = vm2.wait_exit(Duration::from_secs(120)).expect("vmm exits");
    assert_eq!(status.code(), Some(0), "{}", vm2.describe());
}

#[test]
fn restore_errors_name_the_cause() {
    let dir = TestDir::new("restore-errors").expect("test dir");
    let bin = vmm_tests::harness::vmm_binary().unwrap();
    let junk = dir.join("junk.snap");
    std::fs::write(&junk, b"this is not a snapshot at all").unwrap();
    let out = std::process::Command::new(&bin)
        .args(["--restore", junk.to_str().unwrap(), "--serial", "off"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("bad magic"), "{stderr}");
    let out = std::process::Command::new(&bin)
        .args(["--restore", "/nonexistent.snap"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--restore /nonexistent.snap"), "{stderr}");
    let out = std::process::Command::new(&bin)
        .args(["--restore", junk.to_str().unwrap(), "--memory", "1G"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
