//! The virtio-net personality against a real tap in a fresh network namespace: the
//! identity and configuration a driver sees, frames both ways, receive waiting for
//! buffers, drops, quiesce/resume, the state moving to a fresh process (which then
//! announces its MAC), refused states, and the DMA log of received frames.
//! Needs root (network namespaces, taps).

mod common;

use std::time::{Duration, Instant};

use common::net::*;
use common::process::Scratch;
use common::{wait_eventfd, Bar, GUEST_BASE};
use pf_protocol::proto::ErrorKind;
use pf_protocol::PfError;
use vfio_bindings::bindings::vfio::{VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX};
use vfsim::common_cfg::STATUS_NEEDS_RESET;
use vfsim::layout::{CAP_MSIX, DEVICE_CFG_OFFSET};

const FEATURES: u64 = (1 << 32) | (1 << 5) | (1 << 15) | (1 << 16);
const QUIET: Duration = Duration::from_millis(300);

/// Waits (1 s at most) until `count` says three announcements were sent.
fn wait_announcements(count: impl Fn() -> u64) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while count() < 3 {
        assert!(Instant::now() < deadline, "announcements: {}", count());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(count(), 3);
}

fn config_dword(d: &NetDriver, at: u64) -> u32 {
    let mut b = [0u8; 4];
    d.client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, at, &mut b)
        .unwrap();
    u32::from_le_bytes(b)
}

/// A running net vfsim in its namespace, a packet socket on its tap, and a driver that
/// initialised it. Dropped driver first, the namespace and directory last.
struct Rig {
    d: NetDriver,
    pf: pf_protocol::PfClient,
    sock: std::os::fd::OwnedFd,
    _vf: common::process::Vfsim,
    ns: NetNs,
    _dir: Scratch,
}

impl Rig {
    fn start(name: &str) -> Rig {
        let dir = Scratch::new(name);
        let ns = NetNs::new();
        let vf = start_net(&ns, &dir.0, "a", &[]);
        let pf = vf.pf();
        let sock = ns.packet_socket();
        let mut d = NetDriver::connect(&vf.socket);
        d.init(FEATURES);
        Rig {
            d,
            pf,
            sock,
            _vf: vf,
            ns,
            _dir: dir,
        }
    }
}

/// The received header: all zero but num_buffers = 1.
fn rx_header() -> Vec<u8> {
    let mut h = vec![0u8; 12];
    h[10] = 1;
    h
}

#[test]
fn identity_features_and_device_config() {
    let dir = Scratch::new("net-id");
    let ns = NetNs::new();
    let vf = start_net(&ns, &dir.0, "a", &["--mac", "02:11:22:33:44:55"]);
    let d = NetDriver::connect(&vf.socket);
    assert_eq!(config_dword(&d, 0), 0x1041_1af4, "virtio-net, modern");
    assert_eq!(config_dword(&d, 8) >> 8, 0x02_00_00, "network controller");
    assert_eq!(
        config_dword(&d, 0x2c),
        0x0001_1af4,
        "subsystem: device type 1"
    );
    assert_eq!(
        (config_dword(&d, CAP_MSIX as u64) >> 16) & 0x7ff,
        2,
        "three MSI-X vectors"
    );
    assert_eq!(d.client.irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap().count, 3);
    assert_eq!(d.device_features(), FEATURES);
    let mac: Vec<u8> = (0..6)
        .map(|i| d.bar_read(DEVICE_CFG_OFFSET + i, 1) as u8)
        .collect();
    assert_eq!(mac, [0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
    assert_eq!(d.bar_read(DEVICE_CFG_OFFSET + 6, 2), 1, "link up");
    assert_eq!(
        d.bar_read(COMMON_NUM_QUEUES, 2),
        2,
        "receiveq and transmitq"
    );
    let state = vf.pf().get_state().unwrap();
    let net = state.net.expect("a net section");
    assert_eq!((net.mac.as_str(), net.status), ("02:11:22:33:44:55", 1));
    assert_eq!(state.msix_table.len(), 3);
}

/// `num_queues` in the common configuration.
const COMMON_NUM_QUEUES: u64 = 0x12;

#[test]
fn frames_go_both_ways_and_receive_waits_for_buffers() {
    let mut rig = Rig::start("net-io");
    let Rig {
        d,
        pf,
        sock,
        ns: rig_ns,
        ..
    } = &mut rig;

    // Transmit: header and frame in two descriptors; the frame alone reaches the tap.
    let out = frame(b"from the guest");
    d.post_tx(0, &out);
    assert_eq!(d.wait_used(1), (0, 0));
    assert!(
        wait_eventfd(&d.irqs[2], Duration::from_secs(5)).is_some(),
        "tx vector"
    );
    assert_eq!(
        capture(sock, Duration::from_secs(5)).as_deref(),
        Some(&out[..])
    );

    // Receive: with no buffer posted, the frame waits in the tap (nothing dropped).
    let inbound = frame(&[0x5a; 100]);
    inject(sock, &inbound);
    assert_eq!(d.try_used(0, QUIET), None);
    let s = pf.stats().unwrap();
    assert_eq!((s.rx_frames, s.rx_dropped, s.tx_frames), (0, 0, 1));
    // Once a buffer is posted it is delivered, header first.
    let posted = Instant::now();
    d.post_rx(0, 2048);
    let (head, len) = d.wait_used(0);
    eprintln!(
        "delivered {:?} after the buffer was posted",
        posted.elapsed()
    );
    assert_eq!((head, len), (0, 12 + inbound.len() as u32));
    assert!(
        wait_eventfd(&d.irqs[1], Duration::from_secs(5)).is_some(),
        "rx vector"
    );
    let got = d.rx_data(0, 12 + inbound.len() + 1);
    assert_eq!(&got[..12], &rx_header()[..]);
    assert_eq!(&got[12..12 + inbound.len()], &inbound[..]);
    assert_eq!(
        got[12 + inbound.len()],
        0xee,
        "nothing written past the frame"
    );

    // A frame arriving while a buffer waits is taken promptly (no 1 ms idle sleep).
    d.post_rx(1, 2048);
    std::thread::sleep(Duration::from_millis(50));
    let sent = Instant::now();
    inject(sock, &frame(b"prompt"));
    assert_eq!(d.wait_used(0).0, 1);
    eprintln!("received {:?} after it was sent", sent.elapsed());

    // A buffer too short for header and frame: the frame is dropped and counted, the
    // buffer returned empty and not written.
    d.post_rx(2, 20);
    inject(sock, &frame(&[1; 60]));
    assert_eq!(d.wait_used(0), (2, 0));
    assert!(d.rx_data(2, 20).iter().all(|b| *b == 0xee));
    let s = pf.stats().unwrap();
    assert_eq!((s.rx_frames, s.rx_dropped, s.tx_frames), (2, 1, 1));

    // A frame the tap does not take (its link down: EIO) is dropped and counted, and its
    // chain completed, as a NIC's frames on a dead wire.
    rig_ns.exec("ip", &["link", "set", "dev", common::net::TAP, "down"]);
    d.post_tx(1, &frame(b"into a tap that is down"));
    assert_eq!(d.wait_used(1), (2, 0));
    let s = pf.stats().unwrap();
    assert_eq!((s.tx_frames, s.tx_dropped), (1, 1));
    rig_ns.exec("ip", &["link", "set", "dev", common::net::TAP, "up"]);

    // A transmit chain with a device-writable buffer is malformed: DEVICE_NEEDS_RESET.
    d.desc(1, 4, GUEST_BASE + TX_BUF, 64, 2, 0);
    d.publish(1, 4);
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.status() & STATUS_NEEDS_RESET == 0 {
        assert!(Instant::now() < deadline, "no DEVICE_NEEDS_RESET");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn quiesce_holds_both_directions_and_resume_continues() {
    let mut rig = Rig::start("net-quiesce");
    let Rig { d, pf, sock, .. } = &mut rig;
    d.post_rx(0, 2048);
    let report = pf.quiesce().unwrap();
    assert_eq!(report.in_flight, 0);
    let inbound = frame(b"while quiesced");
    inject(sock, &inbound);
    let out = frame(b"queued while quiesced");
    d.post_tx(0, &out);
    assert_eq!(d.try_used(0, QUIET), None, "no receive while quiesced");
    assert_eq!(
        d.try_used(1, Duration::ZERO),
        None,
        "no transmit while quiesced"
    );
    assert_eq!(capture(sock, Duration::ZERO), None);
    pf.resume().unwrap();
    assert_eq!(d.wait_used(0), (0, 12 + inbound.len() as u32));
    assert_eq!(d.wait_used(1), (0, 0));
    assert_eq!(
        capture(sock, Duration::from_secs(5)).as_deref(),
        Some(&out[..])
    );
    assert_eq!(
        pf.stats().unwrap().announcements,
        0,
        "no move, no announcement"
    );
}

#[test]
fn the_state_moves_to_a_fresh_process_which_announces() {
    let dir = Scratch::new("net-move");
    let ns = NetNs::new();
    let a = start_net(&ns, &dir.0, "a", &[]);
    let mut d = NetDriver::connect(&a.socket);
    d.init(FEATURES);
    {
        let sock = ns.packet_socket();
        d.post_tx(0, &frame(b"before"));
        d.wait_used(1);
        d.post_rx(0, 2048);
        inject(&sock, &frame(b"before"));
        d.wait_used(0);
    }
    let pf = a.pf();
    pf.quiesce().unwrap();
    let state = pf.get_state().unwrap();
    assert_eq!((state.queues[0].used_idx, state.queues[1].used_idx), (1, 1));
    let mem_fd = d.mem_fd.try_clone().unwrap();
    let (avail, used) = (d.avail, d.used);
    drop(pf);
    drop(d);
    drop(a);

    let b = start_net(&ns, &dir.0, "b", &[]);
    let pf = b.pf();
    let sock = ns.packet_socket();
    // Another personality's state, and another MAC's, are refused.
    let mut blk = state.clone();
    blk.net = None;
    blk.capacity_sectors = 2048;
    let mut other_mac = state.clone();
    other_mac.net.as_mut().unwrap().mac = "02:00:00:00:00:99".into();
    for (s, needle) in [(blk, "virtio-blk"), (other_mac, "02:00:00:00:00:99")] {
        match pf.set_state(&s) {
            Err(PfError::Device {
                kind: ErrorKind::InvalidState,
                message,
                ..
            }) => assert!(message.contains(needle), "{message}"),
            other => panic!("{other:?}"),
        }
    }
    let mut d = NetDriver::connect_with_memory(&b.socket, mem_fd);
    (d.avail, d.used) = (avail, used);
    pf.set_state(&state).unwrap();
    assert_eq!(pf.stats().unwrap().announcements, 0, "not before resume");
    pf.resume().unwrap();

    // Three gratuitous RARP frames with the MAC, as QEMU's self-announce sends.
    let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let start = Instant::now();
    for i in 0..3 {
        let f = capture(&sock, Duration::from_secs(2))
            .unwrap_or_else(|| panic!("announcement {i} missing"));
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35], "RARP");
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3], "reverse request");
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &mac);
        assert_eq!(&f[38..42], &[0; 4]);
    }
    assert!(start.elapsed() >= Duration::from_millis(140), "spread out");
    // The counter goes up once a frame is written: the capture may see it first.
    wait_announcements(|| pf.stats().unwrap().announcements);

    // The driver goes on where it was: the next entries of both rings.
    let inbound = frame(b"after");
    d.post_rx(1, 2048);
    inject(&sock, &inbound);
    assert_eq!(d.wait_used(0), (1, 12 + inbound.len() as u32));
    assert_eq!(d.used[0], 2);
    let out = frame(b"after, from the guest");
    d.post_tx(1, &out);
    assert_eq!(d.wait_used(1), (2, 0));
    assert_eq!(
        capture(&sock, Duration::from_secs(5)).as_deref(),
        Some(&out[..])
    );
    // Quiesce and resume without a new state: no more announcements.
    pf.quiesce().unwrap();
    pf.resume().unwrap();
    assert_eq!(capture(&sock, QUIET), None);
    assert_eq!(pf.stats().unwrap().announcements, 3);
}

#[test]
fn the_dma_log_holds_received_buffers_and_the_used_ring() {
    let mut rig = Rig::start("net-dmalog");
    let Rig { d, pf, sock, .. } = &mut rig;
    pf.dma_log_start().unwrap();
    d.post_rx(3, 2048);
    inject(sock, &frame(b"logged"));
    d.wait_used(0);
    let pages = pf.dma_log_take().unwrap();
    let rx_page = GUEST_BASE + RX_BUF + 0x3000;
    let used_page = GUEST_BASE + RINGS[0].2;
    assert!(pages.contains(&rx_page), "{pages:x?}");
    assert!(pages.contains(&used_page), "{pages:x?}");
}

#[test]
fn the_command_line_names_both_personalities() {
    let vfsim = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vfsim"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = vfsim(&["--socket", "/tmp/x.sock"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--disk") && err.contains("--net-tap"), "{err}");
    let out = vfsim(&["--socket", "/tmp/x.sock", "--disk", "d", "--net-tap", "t"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
    let out = vfsim(&[
        "--socket",
        "/tmp/x.sock",
        "--net-tap",
        "t",
        "--mac",
        "52:54:00:12:34",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a MAC address"));
    let out = vfsim(&[
        "--socket",
        "/tmp/x.sock",
        "--net-tap",
        "far-too-long-a-name",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("tap name"));
    let help = String::from_utf8_lossy(&vfsim(&["--help"]).stdout).into_owned();
    for needle in [
        "--net-tap",
        "--mac",
        "CAP_NET_ADMIN",
        "/dev/net/tun",
        "virtio-net",
        "RARP",
    ] {
        assert!(help.contains(needle), "{needle}: {help}");
    }
}

#[test]
fn native_migration_carries_the_net_state_logs_rx_and_announces() {
    use vfio_user::{DmaLoggingRange, MigState};
    let native = &["--native-migration"];
    let dir = Scratch::new("net-native");
    let ns = NetNs::new();
    let a = start_net(&ns, &dir.0, "a", native);
    let mut d = NetDriver::connect(&a.socket);
    d.init(FEATURES);
    {
        let sock = ns.packet_socket();
        let all = [DmaLoggingRange {
            iova: GUEST_BASE,
            length: common::GUEST_SIZE,
        }];
        assert_eq!(d.client.dma_logging_start(4096, &all).unwrap(), 4096);
        d.post_rx(5, 2048);
        inject(&sock, &frame(b"dirty"));
        d.wait_used(0);
        let bitmap = d
            .client
            .dma_logging_report(GUEST_BASE, common::GUEST_SIZE, 4096)
            .unwrap();
        let dirty: Vec<u64> = (0..bitmap.len() as u64 * 64)
            .filter(|n| bitmap[(n / 64) as usize] & (1 << (n % 64)) != 0)
            .map(|n| GUEST_BASE + n * 4096)
            .collect();
        assert!(
            dirty.contains(&(GUEST_BASE + RX_BUF + 0x5000)),
            "{dirty:x?}"
        );
        assert!(dirty.contains(&(GUEST_BASE + RINGS[0].2)), "{dirty:x?}");
        d.client.dma_logging_stop().unwrap();
    }
    d.client.set_mig_state(MigState::StopCopy).unwrap();
    let mut data = Vec::new();
    loop {
        let chunk = d.client.mig_data_read(1000).unwrap();
        if chunk.is_empty() {
            break;
        }
        data.extend(chunk);
    }
    let state: pf_protocol::proto::VfState = serde_json::from_slice(&data).unwrap();
    assert_eq!(state.net.as_ref().unwrap().mac, "52:54:00:12:34:56");
    let mem_fd = d.mem_fd.try_clone().unwrap();
    let (avail, used) = (d.avail, d.used);
    drop(d);
    drop(a);

    let b = start_net(&ns, &dir.0, "b", native);
    let sock = ns.packet_socket();
    let mut d = NetDriver::connect_with_memory(&b.socket, mem_fd);
    (d.avail, d.used) = (avail, used);
    d.client.set_mig_state(MigState::Resuming).unwrap();
    d.client.mig_data_write(&data).unwrap();
    d.client.set_mig_state(MigState::Running).unwrap();
    for i in 0..3 {
        let f = capture(&sock, Duration::from_secs(2))
            .unwrap_or_else(|| panic!("announcement {i} missing"));
        assert_eq!(&f[12..14], &[0x80, 0x35], "RARP");
    }
    wait_announcements(|| b.pf().stats().unwrap().announcements);
    let inbound = frame(b"after the move");
    d.post_rx(6, 2048);
    inject(&sock, &inbound);
    assert_eq!(d.wait_used(0), (6, 12 + inbound.len() as u32));
}
