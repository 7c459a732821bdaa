//! A live migration of a guest whose network is a NIC VF, with TCP flowing both ways, as
//! the NIC migration tests (`tests/net_migrate.rs`) and benchmark (`tests/net_bench.rs`) run
//! it: hosts A and B and a traffic peer on one LAN ([`Lan`]), vfsim's virtio-net VF in each
//! host wired to that host's tap; the guest streams checked records to the peer and the peer
//! to the guest over one TCP connection while the guest moves from A to B.

use std::time::{Duration, Instant};

use serde_json::json;

use super::lan::{Host, Lan};
use super::migration::{start_destination, start_source};
use super::net_peer::{PeerArgs, RunningPeer};
use super::netns::Side;
use super::{run, Agent, Device, NetClient, NetStreamStartRequest, TestDir, Vfsim, Vm};
use crate::agent::netstream::DuplexReport;
use crate::agent::protocol::{NetIface, NetStreamStatus};

/// The VF's MAC (locally administered).
pub const MAC: &str = "52:54:00:4e:49:43";
/// The destination's migration port on B.
pub const PORT: u16 = 4444;
/// The peer's port.
pub const PEER_PORT: u16 = 7000;
/// The guest's seed (the peer's records use its reverse).
pub const SEED: u64 = 0x6d69_6772;

/// The traffic a migration runs under, and how it migrates.
#[derive(Debug, Clone)]
pub struct Traffic {
    /// The guest's sending pace, bytes/s (`None`: as fast as it can).
    pub guest_pace: Option<u64>,
    /// How long the guest sends.
    pub guest_ms: u64,
    /// The peer's sending pace.
    pub peer_pace: Option<u64>,
    /// How long the peer sends.
    pub peer_ms: u64,
    /// The guest reads nothing for this long from the migration's start (data waits in its
    /// kernel's receive queue, acknowledged to the peer).
    pub hold_ms: Option<u64>,
    /// `net.ipv4.tcp_rmem` in the guest (min, default, max), if set.
    pub rmem: Option<&'static str>,
    /// Pre-copy's bandwidth cap, MB/s.
    pub bandwidth_mb_s: u64,
}

/// The LAN, the test directory and the VF kind.
pub struct NetHosts {
    /// Hosts A and B, the peer and the bridge.
    pub lan: Lan,
    /// Sockets and logs.
    pub dir: TestDir,
    /// vfsim migrates itself (vfio-user) instead of behind `virtio-net-vf`.
    pub native: bool,
    /// The `net-peer` binary.
    net_peer: std::path::PathBuf,
    n: u32,
}

impl NetHosts {
    /// A new LAN and directory named after `label`.
    pub fn new(label: &str, native: bool, net_peer: &str) -> NetHosts {
        NetHosts {
            net_peer: net_peer.into(),
            lan: Lan::create(label).expect("the LAN"),
            dir: TestDir::new(label).expect("test dir"),
            native,
            n: 0,
        }
    }

    /// The NIC VF as the guest has it: behind virtio-net-vf, or migrating by itself.
    pub fn device(&self) -> Device {
        if self.native {
            Device::native_net("vf0", MAC)
        } else {
            Device::mediated_net("vf0", MAC)
        }
    }

    /// A vfsim on `side`, its tap on that host's bridge; its --device option.
    pub fn vf(&mut self, side: Side) -> (Vfsim, String) {
        self.n += 1;
        let (vf, dev) = self.device().start_vfsim(
            &self.dir,
            &format!("vf{}", self.n),
            Some(self.lan.name(side.into())),
            None,
        );
        let tap = vf.tap.clone().expect("a net VF has a tap");
        self.lan.attach_tap(side, &tap).expect("tap on the bridge");
        (vf, dev)
    }

    /// The destination's URL.
    pub fn url(&self) -> String {
        format!("tcp:{}:{PORT}", self.lan.migration_addr(Side::B))
    }
}

/// The guest's NIC: the interface its stock `virtio_net` driver bound, which must have MAC
/// `mac`, up with address `cidr`, and a ping through it to `peer`. Returns the interface.
pub fn guest_network(agent: &mut Agent, mac: &str, cidr: &str, peer: &str) -> NetIface {
    let ifaces = agent.net_ifaces().expect("net_ifaces");
    let nic = ifaces
        .virtio_net()
        .unwrap_or_else(|| panic!("no virtio-net interface in the guest: {ifaces:?}"))
        .clone();
    assert_eq!(nic.driver.as_deref(), Some("virtio_net"), "{ifaces:?}");
    assert_eq!(nic.mac, mac, "{nic:?}");
    let nic = agent
        .net_config(&nic.name, Some(cidr), None)
        .expect("net_config");
    assert!(nic.up, "{nic:?}");
    let ping = run(agent, &["ping", "-c", "3", "-W", "10", peer]);
    assert!(ping.success(), "the guest reaches {peer}: {ping:?}");
    nic
}

/// Waits (30 s at most) until the guest's stream `handle` has sent more than `sent` bytes and
/// received more than `received`, and returns its status then; panics if the stream ends
/// (with the guest's report) or stalls before.
pub fn wait_both_ways(agent: &mut Agent, handle: u64, sent: u64, received: u64) -> NetStreamStatus {
    let started = Instant::now();
    loop {
        let s = agent.net_stream_status(handle).expect("status");
        if s.sent_bytes > sent && s.received_bytes > received {
            return s;
        }
        if !s.running && s.connected {
            let report = agent
                .net_stream_finish(handle, 10_000)
                .map(|f| describe(&f.report));
            panic!(
                "the stream ended before sending {sent} and receiving {received} bytes: \
                 {s:?}; the guest's report: {report:?}"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not {sent} bytes sent and {received} received within 30 s: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One line on a stream end's report.
pub fn describe(r: &DuplexReport) -> String {
    let rx = r.received.as_ref();
    format!(
        "sent {} records ({} bytes); received {} records ({} bytes), longest gap {} ms at {} ms; {}",
        r.sent.records,
        r.sent.bytes,
        rx.map_or(0, |x| x.records),
        rx.map_or(0, |x| x.bytes),
        rx.map_or(0, |x| x.max_gap_ms),
        rx.map_or(0, |x| x.max_gap_at_ms),
        r.problem().unwrap_or_else(|| "clean".into())
    )
}

/// What one migration under traffic showed.
pub struct Outcome {
    /// The guest's report (or why there is none).
    pub guest: Result<DuplexReport, String>,
    /// The peer's report: its receiver's gap is on the host clock.
    pub peer: Result<DuplexReport, String>,
    /// RARP announcements B's vfsim sent.
    pub announcements: u64,
    /// Where the LAN bridge has the guest's MAC afterwards.
    pub mac_on: Option<Host>,
    /// The source's summary line (downtime, total time, bytes, iterations).
    pub summary: String,
}

/// Streams between the guest on A and the peer, migrates A -> B mid-stream, and collects
/// both ends' reports. `rx_tracking: false` takes the receive queue out of the mediator's
/// dirty tracking (the test-only switch).
pub fn migrate_under_traffic(h: &mut NetHosts, t: &Traffic, rx_tracking: bool) -> Outcome {
    let (vf_a, dev) = h.vf(Side::A);
    let builder = Vm::builder()
        .netns(h.lan.name(Host::A))
        .golden(&[h.device()]);
    let (src, mut api, mut agent) = start_source(builder, &dev, &h.dir.join("api-src.sock"));
    let cidr = format!("{}/24", h.lan.guest_addr());
    guest_network(&mut agent, MAC, &cidr, &h.lan.peer_addr().to_string());
    if let Some(rmem) = t.rmem {
        let out = run(
            &mut agent,
            &[
                "sh",
                "-c",
                &format!("echo {rmem} > /proc/sys/net/ipv4/tcp_rmem"),
            ],
        );
        assert!(out.success(), "{out:?}");
    }

    let mut args = PeerArgs::new((h.lan.peer_addr(), PEER_PORT).into(), SEED);
    args.duration_ms = Some(t.peer_ms);
    args.pace_bytes_per_s = t.peer_pace;
    let peer = RunningPeer::spawn(
        h.lan.command(Host::Peer, &h.net_peer),
        &args,
        Duration::from_secs(10),
    )
    .expect("net-peer");
    let handle = agent
        .net_stream_start(&NetStreamStartRequest {
            duration_ms: Some(t.guest_ms),
            pace_bytes_per_s: t.guest_pace,
            ..NetStreamStartRequest::new(format!("{}:{PEER_PORT}", h.lan.peer_addr()), SEED)
        })
        .expect("net_stream_start");
    // Traffic both ways before the migration starts.
    let s = wait_both_ways(&mut agent, handle, 32 * 1024, 32 * 1024);
    eprintln!("before the migration: {s:?}");
    if !rx_tracking {
        api.mediator("vf0", "skip-queue", json!({"queue": 0, "on": true}))
            .unwrap();
    }

    let (vf_b, dev_b) = h.vf(Side::B);
    let dst_api = h.dir.join("api-dst.sock");
    let dst = start_destination(
        Vm::builder().netns(h.lan.name(Host::B)),
        &h.url(),
        &dev_b,
        &dst_api,
    );
    if let Some(ms) = t.hold_ms {
        agent.net_stream_hold(handle, ms).expect("hold");
    }
    let pf_a = vf_a.pf_client();
    let rx_before = pf_a.stats().expect("A's vfsim stats").rx_frames;
    let bandwidth = t.bandwidth_mb_s.to_string();
    let out = api.ctl_migrate(
        &h.url(),
        &["--downtime-ms", "1", "--max-bandwidth-mb-s", &bandwidth],
    );
    eprintln!("vmm ctl migrate: exit {:?}\n{}", out.code, out.stderr);
    let completed = out.code == Some(0);
    let rx_during = pf_a.stats().map(|s| s.rx_frames - rx_before);
    eprintln!("frames received on A during the migration: {rx_during:?}");
    drop(agent);
    let summary = src
        .vmm_stderr()
        .lines()
        .find(|l| l.contains("guest resumed there; downtime"))
        .map(|l| l.split("INFO ").last().unwrap_or(l).to_owned())
        .unwrap_or_default();
    eprintln!("source: {summary}");
    assert!(
        completed,
        "the migration completed: {out:?}\n{}",
        src.describe()
    );
    let st = src
        .wait_exit(Duration::from_secs(30))
        .expect("source exits");
    assert_eq!(st.code(), Some(0), "{}", src.describe());
    drop(vf_a);

    let mut agent = dst
        .agent(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("guest does not answer on B: {e}\n{}", dst.describe()));
    let tcp = run(&mut agent, &["cat", "/proc/net/tcp"]);
    eprintln!(
        "bytes waiting in the guest's receive queue on B: {:?}",
        receive_queue(&tcp.stdout, PEER_PORT)
    );
    let guest = agent
        .net_stream_finish(handle, t.guest_ms.max(t.peer_ms) + 60_000)
        .map(|f| f.report)
        .map_err(|e| e.to_string());
    let peer = peer
        .wait(Duration::from_secs(90))
        .map(|(r, _)| r)
        .map_err(|e| e.to_string());
    let stats = vf_b.pf_client().stats().expect("B's vfsim stats");
    let mac_on = h.lan.bridge_fdb(MAC).expect("the LAN bridge's table");
    drop(dst);
    Outcome {
        guest,
        peer,
        announcements: stats.announcements,
        mac_on,
        summary,
    }
}

/// The receive-queue bytes of the connection to remote port `port` in `/proc/net/tcp`.
fn receive_queue(proc_net_tcp: &str, port: u16) -> Option<u64> {
    let remote = format!(":{port:04X}");
    proc_net_tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2)?.ends_with(&remote))
            .then(|| u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok())
            .flatten()
    })
}
