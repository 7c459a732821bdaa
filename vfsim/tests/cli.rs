//! The `vfsim` binary: argument errors and a clean exit on SIGTERM.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vfsim-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn vfsim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vfsim"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let d = dir("args");
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let sock = d.join("s.sock");
    let (disk, sock) = (disk.to_str().unwrap(), sock.to_str().unwrap());

    let out = vfsim(&["--socket", sock, "--disk", "/nonexistent/disk.img"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("opening the disk image /nonexistent/disk.img failed"),
        "{err}"
    );

    let out = vfsim(&["--socket", "/nonexistent/dir/s.sock", "--disk", disk]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("listening on /nonexistent/dir/s.sock failed"));

    let out = vfsim(&["--socket", sock, "--disk", disk, "--queue-size", "100"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue size 100 is invalid"));

    let out = vfsim(&["--disk", disk]);
    assert!(!out.status.success());

    let out = vfsim(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--pf-socket"), "{help}");
    assert!(help.contains("quiesce"), "{help}");

    let out = vfsim(&[
        "--socket",
        sock,
        "--disk",
        disk,
        "--pf-socket",
        "/nonexistent/dir/pf.sock",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("listening on /nonexistent/dir/pf.sock failed"));
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn sigterm_exits_cleanly() {
    let d = dir("sigterm");
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let sock = d.join("s.sock");
    let pf_sock = d.join("pf.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfsim"))
        .args([
            "--socket",
            sock.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
            "--pf-socket",
            pf_sock.to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = loop {
        match vfio_user::Client::connect(&sock, Duration::from_secs(5)) {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "vfsim did not start listening: {e}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert_eq!(client.device_info().unwrap().num_regions, 9);
    let pf = pf_protocol::PfClient::connect(&pf_sock, Duration::from_secs(5)).unwrap();
    assert_eq!(pf.stats().unwrap().requests_completed, 0);
    // SAFETY: signals the child this test started, by its id.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "socket removed on exit");
    assert!(!pf_sock.exists(), "PF socket removed on exit");
    let _ = std::fs::remove_dir_all(d);
}
