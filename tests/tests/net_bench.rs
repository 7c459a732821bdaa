//! The measurement behind `benches/net.sh` (ignored in the normal test run: a benchmark,
//! not a test). Guest TCP through the NIC VF (vfsim's virtio-net behind `virtio-net-vf`,
//! its tap in a network namespace whose end is the peer), each direction for a while:
//! (a) doorbells mapped (the mediator idle), (b) while saving (doorbells trapped, rings
//! walked, dirty pages collected), (c) doorbells trapped (`mmap=off`: every BAR access
//! exits), side by side in one run. Prints throughput, the ratio to (a), and KVM exits per
//! frame (the frames vfsim moved, both ways). The traffic gap of a live migration under
//! load is measured by `net_migrate_bench` below.

use std::time::{Duration, Instant};

use serde_json::json;
use vmm_tests::agent::netstream::DuplexReport;
use vmm_tests::harness::net_migration::{guest_network, MAC};
use vmm_tests::harness::net_peer::{PeerArgs, RunningPeer};
use vmm_tests::harness::netns::{NetnsPair, Side};
use vmm_tests::harness::{
    golden_with_api, Agent, ApiClient, Device, NetClient, NetStreamStartRequest, TestDir,
};

const HOST_IP: &str = "10.78.0.1";
const GUEST_IP: &str = "10.78.0.2";
const SEED: u64 = 0xbe4c;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn exits(api: &mut ApiClient) -> u64 {
    api.request(&json!({"request": "device-stats"})).unwrap()["total_exits"]
        .as_u64()
        .unwrap()
}

/// One stream of `secs` seconds, guest to peer (`upload`) or peer to guest: bytes/s, KVM
/// exits and frames moved by the VF.
fn stream(
    pair: &NetnsPair,
    agent: &mut Agent,
    api: &mut ApiClient,
    pf: &pf_protocol::PfClient,
    upload: bool,
    secs: u64,
    port: u16,
) -> (f64, u64, u64) {
    let mut args = PeerArgs::new(
        (HOST_IP.parse::<std::net::Ipv4Addr>().unwrap(), port).into(),
        SEED,
    );
    args.receive = upload;
    if !upload {
        args.duration_ms = Some(secs * 1000);
    }
    let peer = RunningPeer::spawn(
        pair.command(Side::A, env!("CARGO_BIN_EXE_net-peer")),
        &args,
        Duration::from_secs(10),
    )
    .expect("net-peer");
    let s0 = pf.stats().unwrap();
    let e0 = exits(api);
    let t = Instant::now();
    let handle = agent
        .net_stream_start(&NetStreamStartRequest {
            duration_ms: upload.then_some(secs * 1000),
            receive: !upload,
            ..NetStreamStartRequest::new(format!("{HOST_IP}:{port}"), SEED)
        })
        .expect("stream");
    let guest = agent
        .net_stream_finish(handle, secs * 1000 + 60_000)
        .expect("finish")
        .report;
    let secs = t.elapsed().as_secs_f64();
    let (peer, _) = peer.wait(Duration::from_secs(60)).expect("peer report");
    let e1 = exits(api);
    let s1 = pf.stats().unwrap();
    let check = |r: &DuplexReport, who: &str| assert!(r.is_ok(), "{who}: {:?}", r.problem());
    check(&guest, "guest");
    check(&peer, "peer");
    let bytes = if upload {
        peer.received.as_ref().map_or(0, |r| r.bytes)
    } else {
        guest.received.as_ref().map_or(0, |r| r.bytes)
    };
    let frames = (s1.rx_frames + s1.tx_frames) - (s0.rx_frames + s0.tx_frames);
    (bytes as f64 / secs, e1 - e0, frames)
}

/// A guest restored with the NIC VF (`extra` appended to its --device option), its network
/// up: the namespace pair (A holds the tap), the test dir, vfsim, the VMM, agent and API.
fn guest(
    label: &str,
    extra: &str,
) -> (
    NetnsPair,
    TestDir,
    vmm_tests::harness::Vfsim,
    vmm_tests::harness::Vm,
    Agent,
    ApiClient,
) {
    let pair = NetnsPair::create(label).expect("namespaces");
    let dir = TestDir::new(label).expect("test dir");
    let spec = Device::mediated_net("vf0", MAC);
    let (vfsim, device) = spec.start_vfsim(&dir, "vf0", Some(pair.name(Side::A)), None);
    let tap = vfsim.tap.clone().unwrap();
    let ip = pair
        .command(Side::A, "ip")
        .args(["addr", "add", &format!("{HOST_IP}/24"), "dev", &tap])
        .status()
        .unwrap();
    assert!(ip.success());
    let (vm, mut agent, api) = golden_with_api(&dir, &spec, &format!("{device}{extra}"));
    guest_network(&mut agent, MAC, &format!("{GUEST_IP}/24"), HOST_IP);
    (pair, dir, vfsim, vm, agent, api)
}

#[test]
#[ignore = "benchmark: run by benches/net.sh"]
fn nic_vf_throughput_and_exits() {
    let secs = env_u64("NET_BENCH_SECS", 10);
    let mut rows = Vec::new();
    {
        let (pair, _dir, vfsim, _vm, mut agent, mut api) = guest("netbench", "");
        let pf = vfsim.pf_client();
        for (name, saving) in [("(a) doorbells mapped", false), ("(b) while saving", true)] {
            if saving {
                api.device_migration("vf0", "start-dirty-tracking").unwrap();
            }
            for (upload, port) in [(true, 7001), (false, 7002)] {
                let r = stream(
                    &pair,
                    &mut agent,
                    &mut api,
                    &pf,
                    upload,
                    secs,
                    port + saving as u16 * 10,
                );
                rows.push((name, upload, r));
            }
            if saving {
                let pages = api.dirty_pages("vf0").unwrap().len();
                eprintln!("net: (b) {pages} dirty pages at the end");
                api.device_migration("vf0", "stop-dirty-tracking").unwrap();
            }
        }
    }
    {
        let (pair, _dir, vfsim, _vm, mut agent, mut api) = guest("netbenchtrap", ",mmap=off");
        let pf = vfsim.pf_client();
        for (upload, port) in [(true, 7021), (false, 7022)] {
            let r = stream(&pair, &mut agent, &mut api, &pf, upload, secs, port);
            rows.push(("(c) doorbells trapped", upload, r));
        }
    }
    for upload in [true, false] {
        let base = rows.iter().find(|r| r.1 == upload).map(|r| r.2 .0).unwrap();
        for (name, _, (rate, exits, frames)) in rows.iter().filter(|r| r.1 == upload) {
            println!(
                "net: {:<14} {name:<22} {:>8.1} KB/s  rate/(a) {:>5.2}  exits/frame {:>6.2}  ({frames} frames in {secs} s)",
                if upload { "guest -> peer" } else { "peer -> guest" },
                rate / 1e3,
                rate / base,
                *exits as f64 / (*frames).max(1) as f64,
            );
        }
    }
}

/// The traffic gap of a live migration of the 256 MiB guest streaming both ways as fast as
/// it can (no pacing, pre-copy uncapped), over the two-host LAN, on the mediated and the
/// native vfio-user path: the peer's longest gap between two reads (host clock), the
/// guest's (its clock), and the source's summary (downtime, total).
#[test]
#[ignore = "benchmark: run by benches/net.sh"]
fn net_migrate_bench() {
    use vmm_tests::harness::net_migration::{migrate_under_traffic, NetHosts, Traffic};
    let secs = env_u64("NET_BENCH_SECS", 10);
    let traffic = Traffic {
        guest_pace: None,
        guest_ms: secs * 2000,
        peer_pace: None,
        peer_ms: secs * 2000,
        hold_ms: None,
        rmem: None,
        bandwidth_mb_s: 100_000,
    };
    for (name, native) in [("mediated", false), ("native", true)] {
        let label = if native { "netbmn" } else { "netbmm" };
        let mut h = NetHosts::new(label, native, env!("CARGO_BIN_EXE_net-peer"));
        let o = migrate_under_traffic(&mut h, &traffic, true);
        let guest = o.guest.expect("guest report");
        let peer = o.peer.expect("peer report");
        assert!(
            guest.is_ok() && peer.is_ok(),
            "{:?} / {:?}",
            guest.problem(),
            peer.problem()
        );
        let gap = |r: &DuplexReport| r.received.as_ref().map_or(0, |x| x.max_gap_ms);
        println!(
            "net: migration {name:<9} traffic gap guest->peer {:>5} ms (peer clock), peer->guest {:>5} ms (guest clock); {} KB each way; {}",
            gap(&peer),
            gap(&guest),
            peer.received.as_ref().map_or(0, |x| x.bytes) / 1000,
            o.summary
        );
    }
}
