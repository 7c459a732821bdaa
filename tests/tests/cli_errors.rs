//! Bad input to `vmm`: one clear error line on stderr, a non-zero exit, never a panic.

use std::path::PathBuf;
use std::process::{Command, Output};

use vmm_tests::harness::paths::vmm_binary;

fn vmm(args: &[&str]) -> Output {
    let bin = vmm_binary().expect("vmm binary");
    Command::new(bin).args(args).output().expect("run vmm")
}

fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vmm-cli-test-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Asserts exit status `code` and exactly one stderr line that starts with "vmm: error:" and
/// contains every one of `needles`.
fn assert_one_error_line(out: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "status; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one error line, got: {stderr}");
    assert!(lines[0].starts_with("vmm: error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "'{n}' missing from: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn missing_kernel_file() {
    let out = vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert_one_error_line(&out, 1, &["--kernel /nonexistent/vmlinux", "No such file"]);
}

#[test]
fn file_that_is_not_a_kernel() {
    let junk = scratch("junk", b"#!/bin/sh\necho this is not a kernel\n");
    let out = vmm(&["--kernel", junk.to_str().unwrap(), "--serial", "off"]);
    assert_one_error_line(
        &out,
        1,
        &[
            "neither an ELF vmlinux nor a bzImage",
            junk.to_str().unwrap(),
        ],
    );
    let _ = std::fs::remove_file(junk);
}

#[test]
fn zero_memory() {
    let out = vmm(&["--kernel", "/bin/true", "--memory", "0"]);
    assert_one_error_line(&out, 1, &["--memory 0", "cannot be 0"]);
}

#[test]
fn memory_larger_than_the_host() {
    let out = vmm(&["--kernel", "/bin/true", "--memory", "64T"]);
    assert_one_error_line(&out, 1, &["--memory", "more than this host", "MiB"]);
}

#[test]
fn memory_that_is_not_a_size() {
    let out = vmm(&["--kernel", "/bin/true", "--memory", "lots"]);
    assert_one_error_line(&out, 1, &["--memory lots", "not a size"]);
}

#[test]
fn unknown_option() {
    let out = vmm(&["--kernel", "/bin/true", "--frobnicate"]);
    assert_one_error_line(&out, 2, &["--frobnicate", "vmm --help"]);
}

#[test]
fn zero_cpus() {
    let out = vmm(&["--kernel", "/bin/true", "--cpus", "0"]);
    assert_one_error_line(&out, 2, &["--cpus"]);
}

#[test]
fn bad_serial_mode() {
    let out = vmm(&["--kernel", "/bin/true", "--serial", "tty"]);
    assert_one_error_line(
        &out,
        2,
        &["--serial", "stdio, off, file=PATH or socket=PATH"],
    );
}

#[test]
fn help_teaches_the_options() {
    let out = vmm(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--memory",
        "--cpus",
        "--serial",
        "--serial2",
        "--exit-stats",
    ] {
        assert!(help.contains(opt), "--help lacks {opt}");
    }
}

/// No access to /dev/kvm: run as `nobody` (the device is root-only on these machines).
#[test]
fn no_kvm_access() {
    let meta = std::fs::metadata("/dev/kvm");
    let world_accessible = meta
        .as_ref()
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o006 == 0o006);
    if world_accessible.unwrap_or(false) || !nix_is_root() {
        eprintln!(
            "/dev/kvm is open to everyone or we are not root: cannot drop access here; skipping"
        );
        return;
    }
    let kernel = scratch("elf", b"\x7fELF\x02\x01\x01\x00");
    let bin = vmm_binary().unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin)
        .args(["--kernel", kernel.to_str().unwrap(), "--serial", "off"])
        .output()
        .expect("setpriv (util-linux)");
    assert_one_error_line(&out, 1, &["/dev/kvm", "ermission denied"]);
    let _ = std::fs::remove_file(kernel);
}

fn nix_is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

#[test]
fn unknown_mediator_is_named_before_any_device_is_touched() {
    let image = vmm_tests::harness::GuestImage::get().expect("guest image");
    let out = vmm(&[
        "--kernel",
        image.vmlinux.to_str().unwrap(),
        "--log-level",
        "error",
        "--serial",
        "off",
        "--device",
        "vfio-mediated,socket=/nonexistent/vf.sock,mediator=nope,id=vf0",
    ]);
    assert_one_error_line(
        &out,
        1,
        &[
            "device vf0",
            "no mediator is named \"nope\"",
            "registered mediators: virtio-blk-vf, virtio-net-vf, trace",
        ],
    );
    let out = vmm(&[
        "--kernel",
        "/bin/true",
        "--device",
        "vfio-mediated,socket=/x",
    ]);
    assert_one_error_line(&out, 2, &["missing field `mediator`"]);
}

#[test]
fn ctl_errors_say_what_to_do() {
    let out = vmm(&["ctl", "--api-socket", "/nonexistent/api.sock", "info"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("vmm ctl: error: cannot connect to /nonexistent/api.sock")
            && stderr.contains("--api-socket"),
        "{stderr}"
    );
    let out = vmm(&["ctl", "--api-socket", "/x", "fly"]);
    assert_eq!(out.status.code(), Some(2));
    let out = vmm(&[
        "ctl",
        "--api-socket",
        "/x",
        "mediator",
        "vf0",
        "trap",
        "{bad",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("are not JSON"), "{stderr}");
    let out = vmm(&["ctl", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("device-migration") && help.contains("mediator"),
        "{help}"
    );
}
