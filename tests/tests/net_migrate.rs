//! Live migration of a guest whose network is a NIC VF, with TCP traffic flowing both ways:
//! hosts A and B and a traffic peer on one LAN (`harness::lan`: a bridge joining both hosts'
//! taps and the peer), vfsim's virtio-net VF in each host wired to that host's tap. The
//! guest streams checked records to the peer and receives the peer's stream over one TCP
//! connection while it moves from A to B (`harness::net_migration`); both ends check every
//! record, and the peer (host clock) measures the traffic gap.

use vmm_tests::harness::lan::Host;
use vmm_tests::harness::net_migration::{describe, migrate_under_traffic, NetHosts, Traffic};

/// The traffic: both ways at 16 KB/s (the emulated guest's network stack takes in about
/// 40 KB/s; the point is a stream that never stops, not its rate). The guest reads nothing
/// for 25 s from the migration's start, as a busy application does: the frames that keep
/// arriving wait in its kernel's receive queue (1 MiB), acknowledged to the peer, in the
/// receive buffers the NIC wrote after pre-copy sent those pages. They must reach B as the
/// NIC left them: acknowledged data is never sent again. Pre-copy is capped at 2 MB/s, so
/// the first pass of the 256 MiB guest (some 31 MB that are not zero) takes about 15 s
/// while frames keep arriving into pages already sent.
fn traffic() -> Traffic {
    Traffic {
        guest_pace: Some(16 * 1024),
        guest_ms: 40_000,
        peer_pace: Some(16 * 1024),
        peer_ms: 50_000,
        hold_ms: Some(25_000),
        rmem: Some("4096 1048576 4194304"),
        bandwidth_mb_s: 2,
    }
}

fn hosts(label: &str, native: bool) -> NetHosts {
    NetHosts::new(label, native, env!("CARGO_BIN_EXE_net-peer"))
}

fn live_migration_with_traffic(native: bool) {
    let mut h = hosts(if native { "netmign" } else { "netmig" }, native);
    let o = migrate_under_traffic(&mut h, &traffic(), true);
    let guest = o.guest.expect("the guest's report");
    let peer = o.peer.expect("the peer's report");
    eprintln!("guest: {}", describe(&guest));
    eprintln!("peer:  {}", describe(&peer));
    assert!(guest.is_ok(), "guest side: {}", describe(&guest));
    assert!(peer.is_ok(), "peer side: {}", describe(&peer));
    // Every byte sent arrived, checked, each way, and the streams ran on after the move.
    let g_rx = guest.received.as_ref().unwrap();
    let p_rx = peer.received.as_ref().unwrap();
    assert_eq!(g_rx.bytes, peer.sent.bytes, "peer -> guest");
    assert_eq!(p_rx.bytes, guest.sent.bytes, "guest -> peer");
    assert!(g_rx.bytes > 64 * 1024 && p_rx.bytes > 64 * 1024);
    eprintln!(
        "traffic gap across the migration (peer, host clock): guest -> peer {} ms",
        p_rx.max_gap_ms
    );
    assert_eq!(o.announcements, 3, "B's VF announced the MAC");
    assert_eq!(o.mac_on, Some(Host::B), "the LAN learned the MAC's move");
}

/// The mediated path: `virtio-net-vf` tracks the receive buffers while saving.
#[test]
fn nic_vf_live_migration_keeps_tcp_streams_intact() {
    live_migration_with_traffic(false);
}

/// The native path: vfsim migrates itself over vfio-user (state and DMA dirty logging).
#[test]
fn nic_vf_live_migration_keeps_tcp_streams_intact_native_vfio_user() {
    live_migration_with_traffic(true);
}

/// "The check can fail": the same migration with the receive queue out of the mediator's
/// tracking. Frames the device wrote into receive buffers after those pages were sent are
/// then stale on B, and the streams see it: a corrupted record or a broken connection.
#[test]
fn nic_vf_migration_without_receive_tracking_is_detected() {
    let mut h = hosts("netmignd", false);
    let o = migrate_under_traffic(&mut h, &traffic(), false);
    let guest = o.guest.clone();
    let peer = o.peer.clone();
    eprintln!(
        "without receive tracking: guest {}; peer {}",
        guest.as_ref().map_or_else(|e| e.clone(), describe),
        peer.as_ref().map_or_else(|e| e.clone(), describe)
    );
    let intact = matches!((&guest, &peer), (Ok(g), Ok(p)) if g.is_ok() && p.is_ok());
    assert!(
        !intact,
        "with the receive queue untracked the migration must show the loss"
    );
}
