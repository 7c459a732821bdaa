//! The guest's network stack (issue 14), before any NIC: the 6.1 guest kernel has IPv4 and
//! TCP, busybox's `ip` and `ping` work, and the agent's `net_*` ops stream checked records
//! over the guest's loopback to the traffic peer run inside the guest (`/init --net-peer`,
//! the same program as the host's `net-peer`).

use std::time::{Duration, Instant};

use vmm_tests::agent::netstream::DuplexReport;
use vmm_tests::harness::{run, Agent, NetClient, NetStreamStartRequest, Vm, DEFAULT_BOOT_TIMEOUT};

const SEED: u64 = 0x6e6574;
const PORT: u16 = 7100;

/// Polls `cat path` until it prints something or `timeout` passes.
fn wait_for_file(agent: &mut Agent, path: &str, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let out = run(agent, &["cat", path]);
        if out.success() && out.stdout.contains(needle) {
            return out.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "{path} has no {needle:?} after {timeout:?}: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn loopback_ping_and_a_checked_stream_inside_the_guest() {
    let vm = Vm::builder()
        .memory("256M")
        .golden(&[])
        .boot()
        .expect("start the guest");
    let mut agent = vm
        .agent(DEFAULT_BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest did not come up: {e}\n{}", vm.describe()));

    let ifaces = agent.net_ifaces().expect("net_ifaces");
    let lo = ifaces
        .ifaces
        .iter()
        .find(|i| i.loopback)
        .unwrap_or_else(|| panic!("no loopback: {ifaces:?}"))
        .clone();
    assert_eq!(lo.name, "lo");
    let lo = agent
        .net_config(&lo.name, Some("127.0.0.1/8"), None)
        .expect("net_config lo");
    assert!(lo.up && lo.running, "{lo:?}");
    assert!(lo.addrs.iter().any(|a| a == "127.0.0.1/8"), "{lo:?}");

    let link = run(&mut agent, &["ip", "link", "show", "lo"]);
    assert!(link.success() && link.stdout.contains("UP"), "{link:?}");
    let ping = run(&mut agent, &["ping", "-c", "1", "-W", "10", "127.0.0.1"]);
    assert!(ping.success(), "{ping:?}");
    assert!(ping.stdout.contains("1 packets received"), "{ping:?}");

    // The peer, in the background inside the guest, writing its report to a file.
    let peer = format!(
        "/init --net-peer --listen 127.0.0.1:{PORT} --seed {SEED} --send-bytes 100000 \
         --accept-timeout-ms 120000 >/tmp/peer.json 2>/tmp/peer.err &"
    );
    let started = run(&mut agent, &["sh", "-c", &peer]);
    assert!(started.success(), "{started:?}");
    wait_for_file(
        &mut agent,
        "/tmp/peer.err",
        "listening on",
        Duration::from_secs(60),
    );

    let handle = agent
        .net_stream_start(&NetStreamStartRequest {
            send_bytes: Some(100_000),
            ..NetStreamStartRequest::new(format!("127.0.0.1:{PORT}"), SEED)
        })
        .expect("net_stream_start");
    let status = agent.net_stream_status(handle).expect("net_stream_status");
    assert_eq!(status.handle, handle);
    let done = agent
        .net_stream_finish(handle, 180_000)
        .expect("net_stream_finish");
    assert!(
        done.report.is_ok(),
        "guest side: {:?}\n{:?}",
        done.report.problem(),
        done.report
    );
    let received = done.report.received.as_ref().unwrap();
    assert!(received.bytes >= 100_000, "{received:?}");

    let line = wait_for_file(&mut agent, "/tmp/peer.json", "}", Duration::from_secs(60));
    let theirs: DuplexReport = serde_json::from_str(line.trim()).expect("peer report");
    assert!(theirs.is_ok(), "peer side: {:?}", theirs.problem());
    assert_eq!(theirs.received.unwrap().bytes, done.report.sent.bytes);
    assert_eq!(received.bytes, theirs.sent.bytes);
    eprintln!(
        "guest loopback stream: {} bytes each way in {} ms",
        done.report.sent.bytes, done.elapsed_ms
    );
}
