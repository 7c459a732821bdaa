//! For the virtio-net tests: a fresh network namespace, a `vfsim --net-tap` process in
//! it, raw `AF_PACKET` sockets on its tap (the other end of the NIC's wire), and a tiny
//! virtio-net driver over the vfio-user client (receiveq and transmitq in a memfd acting
//! as guest memory).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vfio_user::Client;
use vfsim::common_cfg::*;
use vfsim::layout::*;
use vfsim::mmap::{memfd, Mapping};

use super::process::Vfsim;
use super::{
    attach, mask_vectors, msix_control, write_desc, Bar, GUEST_BASE, GUEST_SIZE, MSIX_ENABLE,
};

/// The tap's name inside the namespace.
pub const TAP: &str = "vtap0";
/// Queue size the driver uses.
pub const NQ: u16 = 16;
/// Guest-memory offsets of each queue's rings: (descriptors, available, used).
pub const RINGS: [(u64, u64, u64); 2] = [(0x0000, 0x1000, 0x2000), (0x3000, 0x4000, 0x5000)];
/// Receive buffers: slot `i` at `RX_BUF + i * 0x1000`.
pub const RX_BUF: u64 = 0x1_0000;
/// Transmit buffers: slot `i` at `TX_BUF + i * 0x1000`.
pub const TX_BUF: u64 = 0x3_0000;
/// Ethertype of the tests' frames (IEEE local experimental).
pub const ETH_TEST: u16 = 0x88b5;

/// A network namespace, deleted (with its tap) on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// A fresh namespace with IPv6 off (so the kernel sends nothing on its own on the
    /// tap) and loopback up.
    pub fn new() -> NetNs {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vfsim-t{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        for key in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            ns.exec("sysctl", &["-qw", key]);
        }
        ns
    }

    /// Runs `cmd args` in the namespace; panics if it fails.
    pub fn exec(&self, cmd: &str, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, cmd];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// A raw packet socket bound to `TAP` in the namespace (created from a thread that
    /// enters it; the socket stays in the namespace). Receives every frame on the tap.
    pub fn packet_socket(&self) -> OwnedFd {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on a namespace fd this thread opened; only this thread moves.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain syscall; the result is checked.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(proto),
                )
            };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: a new descriptor nothing else owns.
            let sock = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = std::ffi::CString::new(TAP).unwrap();
            // SAFETY: a NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(index, 0, "no {TAP} in the namespace");
            // SAFETY: sockaddr_ll is plain data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = index as i32;
            // SAFETY: binds to a valid sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    sock.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            sock
        })
        .join()
        .unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd).args(args).status().unwrap();
    assert!(st.success(), "{cmd} {args:?} failed: {st}");
}

/// Sends `frame` on the tap (the NIC receives it).
pub fn inject(sock: &OwnedFd, frame: &[u8]) {
    // SAFETY: sends from a valid buffer on a bound socket.
    let n = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(
        n,
        frame.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

/// The next frame the NIC sent on the tap (not one sent from this side), if one comes
/// within `timeout`.
pub fn capture(sock: &OwnedFd, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32 + 1) } != 1 {
            return None;
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: sockaddr_ll is plain data.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: receives into valid buffers of the sizes given.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            continue;
        }
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        buf.truncate(n as usize);
        return Some(buf);
    }
}

/// A test frame: broadcast, from 02:00:00:00:00:01, ethertype [`ETH_TEST`], `payload`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&ETH_TEST.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Starts `vfsim --net-tap` [`TAP`] in `ns` (`ip netns exec` execs it, so the child's
/// pid is vfsim's) with sockets `<name>.sock`/`<name>.pf` in `dir`.
pub fn start_net(ns: &NetNs, dir: &Path, name: &str, extra: &[&str]) -> Vfsim {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_vfsim")])
        .args(["--net-tap", TAP]);
    Vfsim::launch(cmd, dir, name, extra)
}

impl Bar for NetDriver {
    fn client(&self) -> &Client {
        &self.client
    }
}

/// The virtio-net driver: queue 0 (receive) on vector 1, queue 1 (transmit) on vector 2.
pub struct NetDriver {
    pub client: Client,
    pub mem: Mapping,
    pub mem_fd: OwnedFd,
    pub irqs: Vec<OwnedFd>,
    pub avail: [u16; 2],
    pub used: [u16; 2],
}

impl NetDriver {
    /// Connects with fresh guest memory, assigns three MSI-X eventfds, enables MSI-X and
    /// unmasks the vectors.
    pub fn connect(socket: &Path) -> NetDriver {
        Self::connect_with_memory(socket, memfd(c"guest", GUEST_SIZE).unwrap())
    }

    /// Like [`NetDriver::connect`] over `mem_fd` (another driver's memory).
    pub fn connect_with_memory(socket: &Path, mem_fd: OwnedFd) -> NetDriver {
        let (client, mem, irqs) = attach(socket, &mem_fd, 3);
        msix_control(&client, MSIX_ENABLE);
        mask_vectors(&client, 0, 3, false);
        NetDriver {
            client,
            mem,
            mem_fd,
            irqs,
            avail: [0; 2],
            used: [0; 2],
        }
    }

    /// Offered features (both words).
    pub fn device_features(&self) -> u64 {
        let c = COMMON_OFFSET;
        self.bar_write(c, &0u32.to_le_bytes());
        let lo = self.bar_read(c + 4, 4);
        self.bar_write(c, &1u32.to_le_bytes());
        let hi = self.bar_read(c + 4, 4);
        lo | hi << 32
    }

    /// Virtio initialisation accepting `features`, both queues of [`NQ`].
    pub fn init(&mut self, features: u64) {
        let c = COMMON_OFFSET;
        self.bar_write(c + 0x14, &[0]);
        self.bar_write(c + 0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER]);
        for word in 0..2u32 {
            self.bar_write(c + 0x08, &word.to_le_bytes());
            self.bar_write(c + 0x0c, &((features >> (32 * word)) as u32).to_le_bytes());
        }
        self.bar_write(
            c + 0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK],
        );
        assert_ne!(self.status() & STATUS_FEATURES_OK, 0, "features accepted");
        self.bar_write(c + 0x10, &0u16.to_le_bytes());
        for (q, (desc, avail, used)) in RINGS.iter().enumerate() {
            self.bar_write(c + 0x16, &(q as u16).to_le_bytes());
            self.bar_write(c + 0x18, &NQ.to_le_bytes());
            self.bar_write(c + 0x1a, &(q as u16 + 1).to_le_bytes());
            self.bar_write(c + 0x20, &(GUEST_BASE + desc).to_le_bytes());
            self.bar_write(c + 0x28, &(GUEST_BASE + avail).to_le_bytes());
            self.bar_write(c + 0x30, &(GUEST_BASE + used).to_le_bytes());
            self.mem.write(*avail, &[0; 4]).unwrap();
            self.mem.write(*used, &[0; 4]).unwrap();
            self.bar_write(c + 0x1c, &1u16.to_le_bytes());
        }
        self.bar_write(
            c + 0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK],
        );
        self.avail = [0; 2];
        self.used = [0; 2];
    }

    /// Writes descriptor `i` of queue `q`.
    pub fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(
            &self.mem,
            RINGS[q].0 + 16 * u64::from(i),
            addr,
            len,
            flags,
            next,
        );
    }

    /// Publishes `head` on queue `q` and rings its doorbell (trapped).
    pub fn publish(&mut self, q: usize, head: u16) {
        let avail = RINGS[q].1;
        let slot = u64::from(self.avail[q] % NQ);
        self.mem
            .write(avail + 4 + 2 * slot, &head.to_le_bytes())
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem
            .write(avail + 2, &self.avail[q].to_le_bytes())
            .unwrap();
        self.bar_write(
            NOTIFY_OFFSET + u64::from(NOTIFY_OFF_MULTIPLIER) * q as u64,
            &(q as u16).to_le_bytes(),
        );
    }

    /// Posts receive buffer `slot` (one device-writable descriptor of `len` bytes,
    /// filled with 0xee first).
    pub fn post_rx(&mut self, slot: u16, len: u32) {
        let addr = RX_BUF + 0x1000 * u64::from(slot);
        self.mem.write(addr, &vec![0xee; 0x1000]).unwrap();
        self.desc(0, slot, GUEST_BASE + addr, len, 2, 0);
        self.publish(0, slot);
    }

    /// `len` bytes of receive buffer `slot`.
    pub fn rx_data(&self, slot: u16, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read(RX_BUF + 0x1000 * u64::from(slot), &mut v)
            .unwrap();
        v
    }

    /// Sends `frame` from transmit slot `slot`: the header in one descriptor, the frame
    /// in the next.
    pub fn post_tx(&mut self, slot: u16, frame: &[u8]) {
        let hdr = TX_BUF + 0x2000 * u64::from(slot);
        let data = hdr + 0x100;
        self.mem.write(hdr, &[0; 12]).unwrap();
        self.mem.write(data, frame).unwrap();
        let head = 2 * slot;
        self.desc(1, head, GUEST_BASE + hdr, 12, 1, head + 1);
        self.desc(1, head + 1, GUEST_BASE + data, frame.len() as u32, 0, 0);
        self.publish(1, head);
    }

    /// The next used entry of queue `q` within `timeout`: (head, len).
    pub fn try_used(&mut self, q: usize, timeout: Duration) -> Option<(u32, u32)> {
        let used = RINGS[q].2;
        let deadline = Instant::now() + timeout;
        loop {
            let mut b = [0u8; 2];
            self.mem.read(used + 2, &mut b).unwrap();
            if u16::from_le_bytes(b) != self.used[q] {
                break;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let slot = u64::from(self.used[q] % NQ);
        let mut e = [0u8; 8];
        self.mem.read(used + 4 + 8 * slot, &mut e).unwrap();
        self.used[q] = self.used[q].wrapping_add(1);
        Some((
            u32::from_le_bytes(e[0..4].try_into().unwrap()),
            u32::from_le_bytes(e[4..8].try_into().unwrap()),
        ))
    }

    /// Like [`NetDriver::try_used`] with 5 s, panicking without one.
    pub fn wait_used(&mut self, q: usize) -> (u32, u32) {
        self.try_used(q, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no used entry on queue {q} within 5 s"))
    }
}
