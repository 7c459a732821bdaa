//! The guest's network through a NIC nobody on this project wrote: QEMU's vfio-user server
//! (`x-vfio-user-server`, from Debian's QEMU 10.0 source package, built by
//! `tests/peers/build.sh`) exporting its own modern virtio-net-pci, whose wire is a tap QEMU
//! opens in host A of a [`Lan`] (`-netdev tap`), bridged to the LAN. The VMM in host A boots
//! the guest with the device passed through (no golden snapshot: the device cannot migrate,
//! so it cannot come from one); the guest's stock virtio-net driver binds it and streams
//! checked TCP records to `net-peer` in the peer namespace while receiving the peer's, on one
//! connection. While the streams run, `snapshot` and `migrate` are refused naming the device
//! and the VM runs on; both ends' reports must then be clean and complete each way.

use std::time::Duration;

use serde_json::json;
use vmm_tests::agent::netstream::DuplexReport;
use vmm_tests::harness::net_migration::{describe, guest_network, wait_both_ways};
use vmm_tests::harness::net_peer::{PeerArgs, RunningPeer};
use vmm_tests::harness::peers::Peer;
use vmm_tests::harness::{
    assert_migration_refused, run, start_with_api, virtio_msix_interrupts, Host, Lan, NetClient,
    NetStreamStartRequest, Side, TestDir, Vm,
};

/// The NIC's MAC (locally administered; not the VF's, so the two tests' frames never mix).
const MAC: &str = "52:54:00:51:4e:45";
/// QEMU's tap in host A.
const TAP: &str = "qnet0";
/// The guest's seed (the peer's records use its reverse).
const SEED: u64 = 0x716e_6574;
const PEER_PORT: u16 = 7000;
/// How long each end sends, unpaced.
const STREAM_MS: u64 = 20_000;

/// Bytes per second of a receiver's stream, from its first byte to its end.
fn throughput(r: &DuplexReport) -> f64 {
    let rx = r.received.as_ref().expect("a receiving end");
    let ms = rx.elapsed_ms - rx.first_data_ms.unwrap_or(0);
    rx.bytes as f64 * 1000.0 / ms.max(1) as f64
}

#[test]
fn qemu_virtio_net_carries_tcp_both_ways_and_cannot_be_migrated() {
    let lan = Lan::create("qnet").expect("the LAN");
    let dir = TestDir::new("peer-qemu-net").expect("test dir");
    let mut qemu = Peer::qemu_net(&dir, "qemu-net", TAP, MAC, Some(lan.name(Host::A)));
    lan.attach_tap(Side::A, TAP)
        .unwrap_or_else(|e| panic!("QEMU's tap on A's bridge: {e}\n{}", qemu.log_text()));

    let (vm, mut agent, mut api) = start_with_api(
        Vm::builder().netns(lan.name(Host::A)),
        &dir,
        &[qemu.device("qnet0", "")],
        || format!("QEMU: {}", qemu.log_text()),
    );

    // The guest's own virtio-net driver on QEMU's device: its MAC, up, a ping to the peer.
    let cidr = format!("{}/24", lan.guest_addr());
    let nic = guest_network(&mut agent, MAC, &cidr, &lan.peer_addr().to_string());
    eprintln!("the guest's NIC on QEMU's virtio-net-pci: {nic:?}");
    let irqs_before = virtio_msix_interrupts(&mut agent);

    // One TCP connection, a checked stream each way.
    let mut args = PeerArgs::new((lan.peer_addr(), PEER_PORT).into(), SEED);
    args.duration_ms = Some(STREAM_MS);
    let peer = RunningPeer::spawn(
        lan.command(Host::Peer, env!("CARGO_BIN_EXE_net-peer")),
        &args,
        Duration::from_secs(10),
    )
    .expect("net-peer");
    let handle = agent
        .net_stream_start(&NetStreamStartRequest {
            duration_ms: Some(STREAM_MS),
            ..NetStreamStartRequest::new(format!("{}:{PEER_PORT}", lan.peer_addr()), SEED)
        })
        .expect("net_stream_start");
    let before = wait_both_ways(&mut agent, handle, 16 * 1024, 16 * 1024);
    eprintln!("streaming: {before:?}");

    // QEMU's server offers no migration: both refused while the streams run, naming the
    // device, and nothing is paused.
    assert_migration_refused(&mut api, &dir, "qnet0");
    // The streams go on after the refusals, both ways.
    let after = wait_both_ways(
        &mut agent,
        handle,
        before.sent_bytes + 16 * 1024,
        before.received_bytes + 16 * 1024,
    );
    eprintln!("after the refusals: {after:?}");

    let guest = agent
        .net_stream_finish(handle, STREAM_MS + 60_000)
        .unwrap_or_else(|e| panic!("the guest's stream: {e}\n{}", vm.describe()));
    let (theirs, status) = peer.wait(Duration::from_secs(90)).expect("net-peer");
    let ours = guest.report;
    eprintln!("guest: {}", describe(&ours));
    eprintln!("peer:  {}", describe(&theirs));
    assert!(
        ours.is_ok(),
        "guest side: {ours:?}\nQEMU: {}",
        qemu.log_text()
    );
    assert!(
        theirs.is_ok(),
        "peer side: {theirs:?}\nQEMU: {}",
        qemu.log_text()
    );
    assert!(status.success(), "net-peer: {status}");
    let (to_peer, to_guest) = (theirs.received.as_ref(), ours.received.as_ref());
    assert_eq!(
        to_peer.map(|r| r.bytes),
        Some(ours.sent.bytes),
        "guest -> peer: every byte sent arrived"
    );
    assert_eq!(
        to_guest.map(|r| r.bytes),
        Some(theirs.sent.bytes),
        "peer -> guest: every byte sent arrived"
    );
    assert!(
        ours.sent.bytes > 0 && theirs.sent.bytes > 0,
        "{ours:?} {theirs:?}"
    );
    eprintln!(
        "throughput through QEMU's virtio-net: guest -> peer {} bytes, {:.0} bytes/s; \
         peer -> guest {} bytes, {:.0} bytes/s",
        ours.sent.bytes,
        throughput(&theirs),
        theirs.sent.bytes,
        throughput(&ours)
    );

    let irqs_after = virtio_msix_interrupts(&mut agent);
    eprintln!("virtio MSI-X interrupts: {irqs_before} before the streams, {irqs_after} after");
    assert!(
        irqs_after > irqs_before,
        "MSI-X interrupts must rise with traffic: {irqs_before} -> {irqs_after}"
    );
    assert!(qemu.running(), "QEMU's server must live on");

    // For the record: what the driver negotiated, its vectors, and the BARs as the VMM has
    // them (QEMU's server gives no fd for any region: every access is trapped, doorbells
    // included).
    let seen = run(
        &mut agent,
        &[
            "sh",
            "-c",
            "cat /sys/bus/virtio/devices/virtio0/features; grep virtio /proc/interrupts; \
             grep Tcp: /proc/net/snmp",
        ],
    );
    eprintln!(
        "guest: virtio features, interrupts, TCP counters:\n{}",
        seen.stdout
    );
    let tap = lan.ip_in(Host::A, &["-s", "link", "show", TAP]).unwrap();
    eprintln!("QEMU's tap: {}", String::from_utf8_lossy(&tap.stdout));
    let stats = api.device_stats("qnet0").unwrap();
    eprintln!("device-stats: {stats}");
    for bar in stats["bars"].as_array().expect("bars") {
        assert_eq!(
            bar["mapped"],
            json!([]),
            "nothing of QEMU's BARs is mappable: {bar}"
        );
    }

    agent.reboot().expect("reboot");
    let status = vm.wait_exit(Duration::from_secs(120)).expect("vmm exits");
    assert_eq!(status.code(), Some(0), "{}", vm.describe());
}
