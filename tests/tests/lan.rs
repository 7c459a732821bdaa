//! The LAN harness without a VM: taps opened here stand in for vfsim's, a raw socket in the
//! peer namespace for the peer. A broadcast from the peer reaches both hosts' taps; a MAC
//! the LAN bridge learned on host A moves to host B after a frame from B's tap (what a
//! migration's announce does); and net-peer in the peer namespace serves a checked stream
//! across the bridge. Needs root and iproute2.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_tests::agent::netstream::{reverse_seed, run_duplex, DuplexConfig, SendConfig};
use vmm_tests::harness::lan::{namespace_exists, BRIDGE, PEER_IFACE};
use vmm_tests::harness::net_peer::{PeerArgs, RunningPeer};
use vmm_tests::harness::{Host, Lan, Side};

const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x02];
const BROADCAST: [u8; 6] = [0xff; 6];

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens tap `name` in the calling thread's namespace, as vfsim does (non-blocking).
fn open_tap(name: &str) -> io::Result<OwnedFd> {
    // SAFETY: open(2) of a constant path; the fd is owned by the result.
    let fd = cvt(unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads the ifreq we pass.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) })?;
    Ok(fd)
}

/// A raw socket on `iface` in the calling thread's namespace.
fn packet_socket(iface: &str) -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2); the fd is owned by the result.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    })?;
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(iface).unwrap();
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: binding to a sockaddr_ll of the size passed.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    })?;
    Ok(fd)
}

fn frame(dst: [u8; 6], src: [u8; 6], tag: &str) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(tag.as_bytes());
    f.resize(f.len().max(60), 0);
    f
}

fn send(fd: &OwnedFd, frame: &[u8]) {
    // SAFETY: writing from a live buffer.
    let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    assert_eq!(n, frame.len() as isize, "{}", io::Error::last_os_error());
}

/// Whether a frame of our ethertype carrying `tag` arrives on `fd` within `timeout` (other
/// traffic, e.g. IPv6 neighbour discovery, is skipped).
fn receives(fd: &OwnedFd, tag: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 50) };
        loop {
            // SAFETY: reading into a live buffer.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let f = &buf[..n as usize];
            if f.len() >= 14 + tag.len()
                && f[12..14] == ETHERTYPE.to_be_bytes()
                && &f[14..14 + tag.len()] == tag.as_bytes()
            {
                return true;
            }
        }
    }
    false
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

#[test]
fn frames_cross_the_lan_and_a_learned_mac_moves() {
    let lan = Lan::create("lan").unwrap();
    let tap_a = lan.within(Host::A, || open_tap("tapa")).unwrap().unwrap();
    let tap_b = lan.within(Host::B, || open_tap("tapb")).unwrap().unwrap();
    lan.attach_tap(Side::A, "tapa").unwrap();
    lan.attach_tap(Side::B, "tapb").unwrap();
    let peer = lan
        .within(Host::Peer, || packet_socket(PEER_IFACE))
        .unwrap()
        .unwrap();
    let peer_mac = {
        let out = lan
            .ip_in(Host::Peer, &["-o", "link", "show", PEER_IFACE])
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let at = text.find("link/ether ").unwrap() + "link/ether ".len();
        let mut mac = [0u8; 6];
        for (i, part) in text[at..at + 17].split(':').enumerate() {
            mac[i] = u8::from_str_radix(part, 16).unwrap();
        }
        mac
    };

    // A broadcast from the peer reaches both taps.
    send(&peer, &frame(BROADCAST, peer_mac, "hello-all"));
    let wait = Duration::from_secs(3);
    assert!(receives(&tap_a, "hello-all", wait), "host A's tap");
    assert!(receives(&tap_b, "hello-all", wait), "host B's tap");

    // The guest speaks from host A: the LAN bridge learns its MAC there.
    let guest = mac_text(GUEST_MAC);
    assert_eq!(lan.bridge_fdb(&guest).unwrap(), None);
    send(&tap_a, &frame(BROADCAST, GUEST_MAC, "from-a"));
    assert!(receives(&peer, "from-a", wait));
    assert_eq!(lan.bridge_fdb(&guest).unwrap(), Some(Host::A));
    send(&peer, &frame(GUEST_MAC, peer_mac, "to-guest-1"));
    assert!(receives(&tap_a, "to-guest-1", wait));
    assert!(!receives(&tap_b, "to-guest-1", Duration::from_millis(300)));

    // ... then from host B (the announce after a migration): the entry moves.
    send(&tap_b, &frame(BROADCAST, GUEST_MAC, "announce"));
    assert!(receives(&peer, "announce", wait));
    assert_eq!(lan.bridge_fdb(&guest).unwrap(), Some(Host::B));
    send(&peer, &frame(GUEST_MAC, peer_mac, "to-guest-2"));
    assert!(receives(&tap_b, "to-guest-2", wait));
    assert!(!receives(&tap_a, "to-guest-2", Duration::from_millis(300)));
    let fdb = lan.fdb(Host::Lan).unwrap();
    assert!(fdb.contains(&guest), "{fdb}");

    let names: Vec<String> = [Host::A, Host::B, Host::Peer, Host::Lan]
        .iter()
        .map(|h| lan.name(*h).to_owned())
        .collect();
    drop((tap_a, tap_b, peer));
    drop(lan);
    for n in names {
        assert!(!namespace_exists(&n), "{n} left behind");
    }
}

#[test]
fn net_peer_serves_a_stream_across_the_lan() {
    let lan = Lan::create("lanp").unwrap();
    // Host A's bridge stands in for a guest: it takes the guest's address.
    let cidr = format!("{}/24", lan.guest_addr());
    lan.ip_in(Host::A, &["addr", "add", &cidr, "dev", BRIDGE])
        .unwrap();
    let seed = 77;
    let listen = SocketAddr::from((lan.peer_addr(), 7100));
    let mut args = PeerArgs::new(listen, seed);
    args.send_bytes = Some(1 << 20);
    args.accept_timeout_ms = 20_000;
    let cmd = lan.command(Host::Peer, env!("CARGO_BIN_EXE_net-peer"));
    let peer = RunningPeer::spawn(cmd, &args, Duration::from_secs(10)).unwrap();
    assert_eq!(peer.addr(), listen);
    let stream = lan
        .within(Host::A, || {
            TcpStream::connect_timeout(&listen, Duration::from_secs(10))
        })
        .unwrap()
        .unwrap();
    let cfg = DuplexConfig {
        send: SendConfig {
            seed,
            bytes: None,
            duration_ms: Some(500),
            pace_bytes_per_s: Some(2_000_000),
        },
        receive_seed: Some(reverse_seed(seed)),
        receive_pace_bytes_per_s: None,
        io_timeout: Duration::from_secs(10),
    };
    let mine = run_duplex(stream, &cfg, &Arc::default());
    let (theirs, status) = peer.wait(Duration::from_secs(20)).unwrap();
    assert!(mine.is_ok(), "{mine:?}");
    assert!(status.success() && theirs.is_ok(), "{status}: {theirs:?}");
    let rx = theirs.received.unwrap();
    assert_eq!(rx.bytes, mine.sent.bytes);
    assert!(rx.bytes > 500_000, "{rx:?}");
    assert_eq!(mine.received.unwrap().bytes, theirs.sent.bytes);
}

#[test]
fn a_persistent_tap_forwards_once_opened() {
    let lan = Lan::create("lant").unwrap();
    lan.create_tap(Side::B, "ptap").unwrap();
    assert_eq!(lan.port_state(Host::B, "ptap").unwrap(), "disabled");
    // vfsim's open of an existing tap, stood in for by ours.
    let tap = lan.within(Host::B, || open_tap("ptap")).unwrap().unwrap();
    lan.wait_forwarding(Host::B, "ptap", Duration::from_secs(10))
        .unwrap();
    drop(tap);
}
