//! The control API of a real VMM process against clients that misbehave: one that sends
//! and never reads cannot delay SIGTERM, and a 2 GiB line does not grow the VMM's memory.
//! The guest only starts booting; nothing here waits for it.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_tests::harness::TestDir;

fn start(dir: &TestDir, name: &str) -> (Child, std::path::PathBuf) {
    let bin = vmm_tests::harness::vmm_binary().unwrap();
    let kernel = std::env::var("VMM_TEST_VMLINUX").expect("VMM_TEST_VMLINUX");
    let api = dir.join(format!("{name}.sock"));
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let vmm = Command::new(bin)
        // The guest command line this KVM needs (see the harness): with another one the
        // guest stops at its first XRSTOR, and the VMM with it.
        .args(["--kernel", &kernel, "--serial", "off", "--cmdline"])
        .arg(vmm_tests::harness::guest_cmdline())
        .args(["--api-socket"])
        .arg(&api)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&api).is_err() {
        assert!(Instant::now() < until, "the API never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    (vmm, api)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn sigterm_ends_the_vmm_within_two_seconds_whatever_a_client_does() {
    let dir = TestDir::new("api-sigterm").unwrap();
    let (mut vmm, api) = start(&dir, "api");
    // A client that sends requests whose answers it never reads, until the socket is full.
    let mut c = UnixStream::connect(&api).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let line = b"{\"request\":\"device-stats\"}\n".repeat(1000);
    for _ in 0..100 {
        if c.write_all(&line).is_err() {
            break;
        }
    }
    // And one that connects and says nothing.
    let _idle = UnixStream::connect(&api).unwrap();
    let t = Instant::now();
    // SAFETY: plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(vmm.id() as i32, libc::SIGTERM) }, 0);
    loop {
        if let Some(status) = vmm.try_wait().unwrap() {
            eprintln!("exited {status} {:?} after SIGTERM", t.elapsed());
            let log = std::fs::read_to_string(dir.join("api.log")).unwrap();
            assert_eq!(status.code(), Some(0), "{log}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the VMM still runs 2 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_two_gib_line_is_refused_without_growing_the_vmm() {
    let dir = TestDir::new("api-long-line").unwrap();
    let (mut vmm, api) = start(&dir, "api");
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_kib(vmm.id());
    let mut c = UnixStream::connect(&api).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0u64;
    let mut peak = before;
    while sent < 2 << 30 {
        if c.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len() as u64;
        peak = peak.max(rss_kib(vmm.id()));
    }
    peak = peak.max(rss_kib(vmm.id()));
    let _ = vmm.kill();
    let _ = vmm.wait();
    eprintln!(
        "sent {} MiB before the VMM closed the connection; RSS {before} -> peak {peak} KiB",
        sent >> 20
    );
    assert!(sent < 2 << 30, "the VMM read a whole 2 GiB line");
    assert!(
        peak.saturating_sub(before) < 64 * 1024,
        "RSS grew by {} KiB",
        peak - before
    );
}
