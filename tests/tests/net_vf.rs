//! Guest tests of the NIC VF: vfsim's virtio-net function passed through behind the
//! `virtio-net-vf` mediator, its wire a tap in a network namespace ("the host's LAN").

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use vmm_tests::harness::net_migration::{guest_network, MAC};
use vmm_tests::harness::netns::{NetnsPair, Side};
use vmm_tests::harness::{golden_with_api, ApiClient, Device, TestDir};

/// The host end of the tap, and the guest, on their own /24.
const HOST_IP: &str = "10.78.0.1";
const GUEST_IP: &str = "10.78.0.2";

/// Runs `cmd` and panics with its output unless it succeeds.
fn must(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends `count` UDP datagrams of 1200 bytes from the host side of the tap to the guest's
/// discard port, 10 ms apart: frames the device writes into the guest's receive buffers
/// unasked, as a NIC's traffic arrives.
fn send_to_guest(pair: &NetnsPair, count: u32) {
    pair.within(Side::A, || {
        let sock = std::net::UdpSocket::bind((HOST_IP, 0)).expect("UDP socket on the tap");
        let payload = [0x5a_u8; 1200];
        for _ in 0..count {
            sock.send_to(&payload, (GUEST_IP, 9))
                .expect("send to the guest");
            std::thread::sleep(Duration::from_millis(10));
        }
    })
    .expect("in the host namespace");
}

/// Waits (10 s at most) until the VF has received `frames` frames in all.
fn wait_rx(pf: &pf_protocol::PfClient, frames: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rx = pf.stats().expect("vfsim stats").rx_frames;
        if rx >= frames {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the VF received {rx} frames, not {frames}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `virtio-net-vf` mediator over a vfsim NIC VF:
/// - the guest's own virtio-net driver brings the VF up and pings the host through it;
/// - nothing is trapped while the VM runs, the doorbells while tracking;
/// - dirty tracking under traffic is complete: every page vfsim wrote by DMA (its own log,
///   ground truth: receive buffers and used rings) is in the mediator's dirty set, with
///   frames arriving unasked (datagrams from the host) while tracking;
/// - with the receive queue taken out of tracking (the test-only switch `skip-queue 0`),
///   the same check finds pages missing, so it can fail.
#[test]
fn virtio_net_vf_tracks_receive_buffers_under_traffic() {
    let pair = NetnsPair::create("netvf").expect("network namespaces");
    let dir = TestDir::new("net-vf").expect("test dir");
    let spec = Device::mediated_net("vf0", MAC);
    let (vfsim, device) = spec.start_vfsim(&dir, "vf0", Some(pair.name(Side::A)), None);
    let tap = vfsim.tap.clone().expect("a net VF has a tap");
    must(
        pair.command(Side::A, "ip")
            .args(["addr", "add", &format!("{HOST_IP}/24"), "dev", &tap]),
    );
    let (_vm, mut agent, mut api) = golden_with_api(&dir, &spec, &device);
    let info = api.request(&json!({"request": "info"})).unwrap();
    assert_eq!(info["devices"][0]["mediator"], "virtio-net-vf", "{info}");

    // The guest's driver: the MAC it read, the interface up, a ping through the VF.
    guest_network(&mut agent, MAC, &format!("{GUEST_IP}/24"), HOST_IP);

    let trapped =
        |api: &mut ApiClient| api.device_stats("vf0").unwrap()["bars"][0]["trapped"].clone();
    assert_eq!(
        trapped(&mut api),
        json!([]),
        "nothing trapped while running"
    );

    let pf = vfsim.pf_client();
    api.device_migration("vf0", "start-dirty-tracking")
        .expect("start tracking");
    assert_eq!(
        trapped(&mut api),
        json!([[0x1000, 0x1000]]),
        "the doorbells are trapped while tracking"
    );
    pf.dma_log_start().expect("dma log");
    api.dirty_pages("vf0").unwrap();
    let rx_before = pf.stats().expect("stats").rx_frames;
    send_to_guest(&pair, 100);
    wait_rx(&pf, rx_before + 100);
    let truth = pf.dma_log_take().unwrap();
    let dirty = api.dirty_pages("vf0").unwrap();
    let rx = pf.stats().unwrap().rx_frames - rx_before;
    let missing: Vec<_> = truth.iter().filter(|p| !dirty.contains(p)).collect();
    eprintln!(
        "dirty tracking: {rx} frames received, vfsim wrote {} pages by DMA, the mediator \
         reported {} ({} missing)",
        truth.len(),
        dirty.len(),
        missing.len()
    );
    assert!(
        rx >= 100,
        "the host's datagrams reached the guest: {rx} frames"
    );
    assert!(
        truth.len() > 2,
        "the device wrote receive buffers: {truth:x?}"
    );
    assert!(
        missing.is_empty(),
        "pages written by DMA but not reported: {missing:x?}"
    );

    // The same check catches a mediator that does not track the receive queue.
    api.mediator("vf0", "skip-queue", json!({"queue": 0, "on": true}))
        .unwrap();
    api.dirty_pages("vf0").unwrap();
    pf.dma_log_take().unwrap();
    let rx = pf.stats().unwrap().rx_frames;
    send_to_guest(&pair, 50);
    wait_rx(&pf, rx + 50);
    let truth = pf.dma_log_take().unwrap();
    let dirty = api.dirty_pages("vf0").unwrap();
    let missed = truth.iter().filter(|p| !dirty.contains(p)).count();
    eprintln!(
        "with the receive queue untracked: {missed} of {} DMA pages missing",
        truth.len()
    );
    assert!(
        missed > 0,
        "the completeness check must fail when receive buffers are not tracked"
    );
    api.mediator("vf0", "skip-queue", json!({"queue": 0, "on": false}))
        .unwrap();
    api.device_migration("vf0", "stop-dirty-tracking").unwrap();
    pf.dma_log_stop().unwrap();
    assert_eq!(
        trapped(&mut api),
        json!([]),
        "untrapped when tracking stops"
    );
    // Traffic goes on with the doorbells mapped again.
    let rx = pf.stats().unwrap().rx_frames;
    send_to_guest(&pair, 5);
    wait_rx(&pf, rx + 5);
}
