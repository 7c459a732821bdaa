//! seccomp on a real VMM process: every thread runs filtered, and a forbidden call on a
//! vCPU thread stops the VMM with the thread and the call named. The guest only starts
//! booting; nothing here waits for it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_tests::harness::TestDir;

/// Starts a VMM serving its API at `dir/NAME.sock`.
fn start(
    dir: &TestDir,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Child, std::path::PathBuf) {
    let bin = vmm_tests::harness::vmm_binary().unwrap();
    let kernel = std::env::var("VMM_TEST_VMLINUX").expect("VMM_TEST_VMLINUX");
    let api = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(bin);
    cmd // The guest command line this KVM needs (see the harness): with another one the
        // guest stops at its first XRSTOR, and the VMM with it.
        .args(["--kernel", &kernel, "--serial", "off", "--cmdline"])
        .arg(vmm_tests::harness::guest_cmdline())
        .arg("--api-socket")
        .arg(&api)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    (cmd.spawn().unwrap(), api)
}

/// The `Seccomp:` mode of every thread of `pid`, by thread name.
fn thread_modes(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or("")
                .trim()
                .to_string()
        };
        // A thread that ended while being read (an API client) has no status left.
        if !status.is_empty() {
            out.push((field("Name:"), field("Seccomp:")));
        }
    }
    out.sort();
    out
}

fn wait_for(path: &std::path::Path) {
    let until = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < until, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    // One answered request: the API's threads are up.
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    use std::io::{BufRead, Write};
    s.write_all(b"{\"request\":\"info\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered() {
    let dir = TestDir::new("seccomp-threads").unwrap();
    let (mut vmm, api) = start(&dir, "on", &["--seccomp", "on"], &[]);
    wait_for(&api);
    let modes = thread_modes(vmm.id());
    let _ = vmm.kill();
    let _ = vmm.wait();
    eprintln!("threads: {modes:?}");
    assert!(modes.iter().any(|(n, _)| n == "vcpu0"), "{modes:?}");
    assert!(modes.iter().any(|(n, _)| n == "api"), "{modes:?}");
    for (name, mode) in &modes {
        assert_eq!(mode, "2", "thread {name} is not filtered: {modes:?}");
    }

    // And with --seccomp off none is: the check above can fail.
    let (mut vmm, api) = start(&dir, "off", &["--seccomp", "off"], &[]);
    wait_for(&api);
    let modes = thread_modes(vmm.id());
    let _ = vmm.kill();
    let _ = vmm.wait();
    assert!(modes.iter().all(|(_, m)| m == "0"), "{modes:?}");
}

#[test]
fn a_forbidden_call_on_a_vcpu_thread_is_caught_and_named() {
    let dir = TestDir::new("seccomp-forbidden").unwrap();
    let (vmm, _) = start(
        &dir,
        "on",
        &["--seccomp", "on"],
        &[("VMM_TEST_FORBIDDEN_SYSCALL", "vcpu")],
    );
    let out = vmm.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(159), "{stderr}");
    assert!(
        stderr.contains("thread 'vcpu0' made the forbidden system call socket (41)"),
        "{stderr}"
    );

    // In log mode the same call is allowed: the VMM runs on.
    let (mut vmm, api) = start(
        &dir,
        "log",
        &["--seccomp", "log"],
        &[("VMM_TEST_FORBIDDEN_SYSCALL", "vcpu")],
    );
    wait_for(&api);
    assert!(
        vmm.try_wait().unwrap().is_none(),
        "the VMM stopped in log mode"
    );
    let _ = vmm.kill();
    let _ = vmm.wait();
}
