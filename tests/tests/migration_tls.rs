//! Migration over mutual TLS, and destinations that outlive bad connections.
//!
//! - `a_tcp_destination_outlives_scans_garbage_and_silence`: no guest; a `tcp:`
//!   destination meets a port scan, garbage, a stream of another format version, streams
//!   whose first section is not the VM config or a config of a GiB, and a client that
//!   sends nothing, logs each with the peer and why, keeps listening, and
//!   gives up at `--incoming-timeout` with a clear message.
//! - `bad_tls_options_stop_the_destination_at_once`: no guest; missing or mismatched
//!   options and unreadable files end `vmm --incoming` with status 1 naming the problem.
//! - `a_tls_destination_refuses_strangers_then_takes_the_source`: a guest; a `tls:`
//!   destination refuses a clear-text migration, a source whose certificate another CA
//!   signed, a raw plain TCP stream; a source that does not trust the destination's CA (or
//!   expects another name) refuses it; then the real source migrates over TLS and the
//!   guest runs on the destination.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use vmm_tests::harness::ports::free_port;
use vmm_tests::harness::tls::Ca;
use vmm_tests::harness::{ApiClient, TestDir, Vm, DEFAULT_BOOT_TIMEOUT};

/// Waits until the VMM's log has `n` lines containing `what`.
fn wait_log(vm: &Vm, what: &str, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while vm.vmm_stderr().matches(what).count() < n {
        assert!(
            Instant::now() < deadline,
            "no {n}x {what:?} in the log\n{}",
            vm.describe()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn destination(url: &str, args: &[&str]) -> Vm {
    let vm = Vm::builder()
        .incoming(url)
        .vmm_args(args)
        .boot()
        .expect("start the destination");
    wait_log(&vm, "waiting for a migration", 1, Duration::from_secs(20));
    vm
}

/// A stream header of format version `version` (the current one patched).
fn header_of_version(version: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    migration::StreamWriter::write_header(&mut bytes, migration::FLAG_LIVE).unwrap();
    bytes[8..12].copy_from_slice(&version.to_le_bytes());
    bytes
}

#[test]
fn a_tcp_destination_outlives_scans_garbage_and_silence() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dst = destination(&format!("tcp:{addr}"), &["--incoming-timeout", "14"]);
    assert!(
        dst.vmm_stderr().contains("clear text and unauthenticated"),
        "no warning for tcp:\n{}",
        dst.vmm_stderr()
    );
    let started = Instant::now();
    // A client that says nothing: it must not hold the others up.
    let silent = TcpStream::connect(&addr).unwrap();
    // A port scan.
    drop(TcpStream::connect(&addr).unwrap());
    wait_log(
        &dst,
        "closed without sending anything",
        1,
        Duration::from_secs(5),
    );
    // Garbage (at least a header's length: a shorter one waits for the rest).
    let mut g = TcpStream::connect(&addr).unwrap();
    g.write_all(b"GET / HTTP/1.0\r\nHost: example\r\n\r\n")
        .unwrap();
    wait_log(
        &dst,
        "not the start of a migration stream",
        1,
        Duration::from_secs(5),
    );
    // The refusal is also told to the peer (a source of another version learns why).
    let mut answer = Vec::new();
    g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = g.read_to_end(&mut answer);
    // Another format version.
    let mut v = TcpStream::connect(&addr).unwrap();
    v.write_all(&header_of_version(99)).unwrap();
    wait_log(&dst, "version 99", 1, Duration::from_secs(5));
    // A good header, then a section that is not the VM config, or a config claiming a GiB:
    // refused from the section header, before any of the payload is taken in (an
    // unauthenticated peer cannot make the destination hold a GiB).
    for (ty, what) in [
        (
            migration::SectionType::RamPages,
            "where the stream must have its vm-config section",
        ),
        (
            migration::SectionType::VmConfig,
            "exceeds the maximum 65536",
        ),
    ] {
        let mut c = TcpStream::connect(&addr).unwrap();
        let mut bytes = header_of_version(migration::FORMAT_VERSION);
        bytes.extend_from_slice(&(ty as u32).to_le_bytes());
        bytes.extend_from_slice(&(1u64 << 30).to_le_bytes());
        bytes.extend_from_slice(&vec![0u8; 4 << 20][..]);
        // The destination may refuse (and close) before it has all of it.
        let _ = c.write_all(&bytes);
        wait_log(&dst, what, 1, Duration::from_secs(5));
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the silent client held the others up"
    );
    assert!(
        dst.try_exit_status().unwrap().is_none(),
        "{}",
        dst.describe()
    );
    // The silent one is dropped after its 10 s.
    wait_log(&dst, "within 10 s", 1, Duration::from_secs(15));
    drop(silent);
    let log = dst.vmm_stderr();
    assert_eq!(
        log.matches("migration connection from 127.0.0.1:").count(),
        6,
        "each refusal names the peer\n{log}"
    );
    // No source came: --incoming-timeout ends it, saying so.
    let st = dst.wait_exit(Duration::from_secs(30)).expect("exits");
    assert_eq!(st.code(), Some(1), "{}", dst.describe());
    let log = dst.vmm_stderr();
    assert!(
        log.contains("no migration source arrived within 14 s (6 connection(s) refused"),
        "{log}"
    );
}

/// Runs `vmm ARGS` and expects it to fail at once (status 1); its stderr.
fn vmm_fails(args: &[&str]) -> String {
    let out = std::process::Command::new(vmm_tests::harness::vmm_binary().unwrap())
        .args(args)
        .args(["--serial", "off"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    stderr
}

#[test]
fn bad_tls_options_stop_the_destination_at_once() {
    let dir = TestDir::new("tls-opts").unwrap();
    let ca = Ca::new(&dir, "ca1").unwrap();
    let a = ca.issue("a", &["IP:127.0.0.1"]).unwrap();
    let b = ca.issue("b", &["IP:127.0.0.1"]).unwrap();
    let url = format!("tls:127.0.0.1:{}", free_port());
    let e = vmm_fails(&["--incoming", &url]);
    assert!(
        e.contains("needs this VMM's certificate, key and the CA"),
        "{e}"
    );
    let e = vmm_fails(&[
        "--incoming",
        &format!("tcp:127.0.0.1:{}", free_port()),
        "--migration-tls",
        &a.option(&ca),
    ]);
    assert!(e.contains("is clear text; use --incoming tls:"), "{e}");
    let missing = dir.join("missing.pem");
    let opt = format!(
        "cert={},key={},ca={}",
        missing.display(),
        a.key.display(),
        ca.id.cert.display()
    );
    let e = vmm_fails(&["--incoming", &url, "--migration-tls", &opt]);
    assert!(
        e.contains(&format!("TLS cert file {}", missing.display())) && e.contains("No such file"),
        "{e}"
    );
    let opt = format!(
        "cert={},key={},ca={}",
        a.cert.display(),
        b.key.display(),
        ca.id.cert.display()
    );
    let e = vmm_fails(&["--incoming", &url, "--migration-tls", &opt]);
    assert!(e.contains("does not match the certificate"), "{e}");
    let out = std::process::Command::new(vmm_tests::harness::vmm_binary().unwrap())
        .args(["--incoming", &url, "--migration-tls", "cert=/a,key=/b"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(e.contains("missing field `ca`"), "{e}");
}

#[test]
fn a_tls_destination_refuses_strangers_then_takes_the_source() {
    let dir = TestDir::new("tls-mig").unwrap();
    let ca1 = Ca::new(&dir, "ca1").unwrap();
    let ca2 = Ca::new(&dir, "ca2").unwrap();
    let dst_id = ca1
        .issue("dst", &["IP:127.0.0.1", "DNS:localhost"])
        .unwrap();
    let src_id = ca1.issue("src", &[]).unwrap();
    let rogue = ca2.issue("rogue", &["IP:127.0.0.1"]).unwrap();

    let api_path = dir.join("api-src.sock");
    let src = Vm::builder()
        .vmm_args(&["--api-socket", &api_path.display().to_string()])
        .golden(&[])
        .boot()
        .expect("start the source");
    let mut agent = src
        .agent(DEFAULT_BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest: {e}\n{}", src.describe()));
    let marker = agent.ping().expect("ping").uptime_ms;
    drop(agent);
    let mut api = ApiClient::connect(&api_path, Duration::from_secs(10)).unwrap();

    let port = free_port();
    let tls_url = format!("tls:127.0.0.1:{port}");
    let dst_api = dir.join("api-dst.sock");
    let dst = destination(
        &tls_url,
        &[
            "--migration-tls",
            &dst_id.option(&ca1),
            "--api-socket",
            &dst_api.display().to_string(),
        ],
    );
    assert!(
        dst.vmm_stderr().contains("mutual TLS"),
        "{}",
        dst.vmm_stderr()
    );
    let mut refusals = 0;
    let mut refused = |what: &str, dst_says: &str| {
        refusals += 1;
        wait_log(&dst, "refused", refusals, Duration::from_secs(15));
        let log = dst.vmm_stderr();
        let line = log
            .lines()
            .filter(|l| l.contains("migration connection from 127.0.0.1:"))
            .nth(refusals - 1)
            .unwrap_or_else(|| panic!("{what}: no refusal line naming the peer\n{log}"));
        assert!(line.contains(dst_says), "{what}: {line}");
        eprintln!("{what}: destination: {line}");
        assert!(
            dst.try_exit_status().unwrap().is_none(),
            "{what}: {}",
            dst.describe()
        );
    };
    let failed = |api: &mut ApiClient, url: &str, tls: Option<String>, says: &str| {
        let mut args = vec![];
        if let Some(t) = &tls {
            args = vec!["--tls", t.as_str()];
        }
        let out = api.ctl_migrate(url, &args);
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(out.stderr.contains(says), "{says}: {}", out.stderr);
        eprintln!("source: {}", out.stderr.lines().last().unwrap_or(""));
        let info = api.request(&json!({"request": "info"})).unwrap();
        assert_eq!(info["paused"], false, "the source runs on: {info}");
    };

    // 1. An unauthenticated (clear-text) migration stream sent to the tls: port.
    failed(
        &mut api,
        &format!("tcp:127.0.0.1:{port}"),
        None,
        "migration failed",
    );
    refused("clear-text source", "TLS handshake failed");
    // 2. A source whose certificate another CA signed.
    failed(
        &mut api,
        &tls_url,
        Some(rogue.option(&ca1)),
        "migration failed",
    );
    refused("source of CA2", "UnknownIssuer");
    // 3. A plain TCP client writing a stream header.
    let mut plain = TcpStream::connect(("127.0.0.1", port)).unwrap();
    plain
        .write_all(&header_of_version(migration::FORMAT_VERSION))
        .unwrap();
    refused("plain TCP client", "TLS handshake failed");
    drop(plain);
    // 4. The source does not trust the destination (it trusts CA2 only), or expects
    //    another name: it refuses before sending anything.
    failed(
        &mut api,
        &tls_url,
        Some(src_id.option(&ca2)),
        "TLS handshake with",
    );
    refusals += 1; // the destination sees the source hang up in the handshake
    wait_log(&dst, "refused", refusals, Duration::from_secs(15));
    failed(
        &mut api,
        &tls_url,
        Some(format!("{},server-name=other.example", src_id.option(&ca1))),
        "not valid for name",
    );
    refusals += 1;
    wait_log(&dst, "refused", refusals, Duration::from_secs(15));

    // The real source, over TLS.
    let out = api.ctl_migrate(&tls_url, &["--tls", &src_id.option(&ca1)]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", dst.describe());
    assert_eq!(out.status["phase"], "completed", "{out:?}");
    let st = src
        .wait_exit(Duration::from_secs(30))
        .expect("source exits");
    assert_eq!(st.code(), Some(0), "{}", src.describe());
    assert!(
        dst.vmm_stderr().contains("(TLS, its certificate verified)"),
        "{}",
        dst.vmm_stderr()
    );
    let mut agent = dst.agent(Duration::from_secs(60)).unwrap_or_else(|e| {
        panic!(
            "guest does not answer on the destination: {e}\n{}",
            dst.describe()
        )
    });
    let after = agent.ping().expect("ping on the destination").uptime_ms;
    assert!(
        after >= marker,
        "the same guest runs on: uptime {marker} -> {after}"
    );
    agent.reboot().expect("reboot");
    let st = dst
        .wait_exit(Duration::from_secs(120))
        .expect("destination exits");
    assert_eq!(st.code(), Some(0), "{}", dst.describe());
}
