//! Streams that lie about sizes are refused before the VMM acts on the lie, and quickly:
//! a memory size larger than the host, and a RAM run far past guest RAM. No guest boots:
//! `vmm --restore` reads the forged file.

use std::process::Command;
use std::time::{Duration, Instant};

use migration::{SectionType, VmConfig};
use vmm_tests::harness::TestDir;

/// Writes a snapshot file of `config` followed by `sections`.
fn forge(path: &std::path::Path, config: &VmConfig, sections: &[(SectionType, Vec<u8>)]) {
    let mut snap = migration::snapshot::create(path, 0).unwrap();
    let w = snap.stream();
    w.write_vm_config(config).unwrap();
    for (ty, payload) in sections {
        w.write_section(*ty, payload).unwrap();
    }
    snap.commit().unwrap();
}

/// Runs `vmm --restore path`: its exit code, stderr and how long it took.
fn restore(path: &std::path::Path) -> (Option<i32>, String, Duration) {
    let bin = vmm_tests::harness::vmm_binary().unwrap();
    let t = Instant::now();
    let out = Command::new(bin)
        .args(["--restore", path.to_str().unwrap(), "--serial", "off"])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t.elapsed(),
    )
}

#[test]
fn a_stream_asking_for_more_memory_than_the_host_has_is_refused() {
    let dir = TestDir::new("hostile-memory").unwrap();
    let path = dir.join("tib.snap");
    let config = VmConfig {
        mem_size: 1 << 40,
        vcpus: 1,
        devices: vec![],
    };
    forge(&path, &config, &[]);
    let (code, stderr, took) = restore(&path);
    eprintln!("1 TiB stream refused in {took:?} (whole process)");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("the stream's memory size"), "{stderr}");
    assert!(stderr.contains("host"), "{stderr}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn a_zero_run_of_four_billion_pages_is_refused_at_once() {
    let dir = TestDir::new("hostile-zero-run").unwrap();
    let path = dir.join("run.snap");
    let config = VmConfig {
        mem_size: 256 << 20,
        vcpus: 1,
        devices: vec![],
    };
    // One 13-byte run: gpa 0, 2^32-1 pages, kind zero.
    let mut run = Vec::new();
    run.extend_from_slice(&0u64.to_le_bytes());
    run.extend_from_slice(&u32::MAX.to_le_bytes());
    run.push(1);
    forge(&path, &config, &[(SectionType::RamPages, run)]);
    let (code, stderr, took) = restore(&path);
    eprintln!("2^32-1-page zero run refused in {took:?} (whole process)");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("does not lie within guest RAM"), "{stderr}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}
