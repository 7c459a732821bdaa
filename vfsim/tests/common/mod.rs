//! A tiny virtio-blk driver for the tests: it starts a `vfsim` server on a real Unix
//! socket, connects with the project's vfio-user client and drives one queue in a memfd
//! acting as guest memory.

#![allow(dead_code)]

pub mod net;
pub mod process;

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_user::Client;
use vfsim::common_cfg::*;
use vfsim::layout::*;
use vfsim::mmap::{memfd, Mapping};
use vfsim::{serve, PersonalityConfig, SimConfig, VfSim};

/// MSI-X control word: enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// MSI-X control word: function mask.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;

/// Guest memory: DMA address and size.
pub const GUEST_BASE: u64 = 0x4000_0000;
pub const GUEST_SIZE: u64 = 0x10_0000;
/// Offsets in guest memory.
pub const DESC: u64 = 0x0000;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const HEADER: u64 = 0x3000;
pub const STATUS: u64 = 0x3800;
pub const DATA: u64 = 0x1_0000;
pub const QSIZE: u16 = 16;
pub const DISK_SIZE: u64 = 1 << 20;

/// Offset of the 4 KiB data page of request slot `slot` (see [`Driver::post`]).
pub fn slot_data(slot: u16) -> u64 {
    DATA + 0x1000 * u64::from(slot)
}

/// A server running in a thread, with its socket and disk image.
pub struct Server {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub disk: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a server in a thread (it runs until the test process ends).
pub fn start_server() -> Server {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vfsim-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; DISK_SIZE as usize]).unwrap();
    let socket = dir.join("vfsim.sock");
    let mut device = VfSim::new(&SimConfig {
        personality: PersonalityConfig::Blk { disk: disk.clone() },
        queue_size: 256,
        native_migration: false,
    })
    .unwrap();
    let listener = serve::bind(&socket).unwrap();
    std::thread::spawn(move || serve::serve_clients(&listener, &mut device));
    Server { dir, socket, disk }
}

/// An eventfd.
pub fn eventfd() -> OwnedFd {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd failed");
    // SAFETY: a new descriptor nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Waits up to `timeout` for `fd` to be signalled; returns the count read.
pub fn wait_eventfd(fd: &OwnedFd, timeout: Duration) -> Option<u64> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd array of one.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    if n != 1 {
        return None;
    }
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into `v`.
    let r = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    (r == 8).then_some(v)
}

/// Connects to `socket`, maps `mem_fd` as guest memory (DMA at [`GUEST_BASE`]) and
/// gives the device `vectors` MSI-X eventfds; MSI-X stays as the device has it.
pub fn attach(socket: &Path, mem_fd: &OwnedFd, vectors: u32) -> (Client, Mapping, Vec<OwnedFd>) {
    let client = Client::connect(socket, Duration::from_secs(5)).unwrap();
    let mem = Mapping::new(mem_fd.as_fd(), 0, GUEST_SIZE, true).unwrap();
    client
        .dma_map(GUEST_BASE, GUEST_SIZE, mem_fd.as_fd(), 0, true, true)
        .unwrap();
    let irqs: Vec<OwnedFd> = (0..vectors).map(|_| eventfd()).collect();
    let fds: Vec<_> = irqs.iter().map(|f| f.as_fd()).collect();
    client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            vectors,
            &fds,
        )
        .unwrap();
    (client, mem, irqs)
}

/// Writes the MSI-X control word in configuration space.
pub fn msix_control(client: &Client, control: u16) {
    client
        .region_write(
            VFIO_PCI_CONFIG_REGION_INDEX,
            CAP_MSIX as u64 + 2,
            &control.to_le_bytes(),
        )
        .unwrap();
}

/// `SET_IRQS` mask or unmask of MSI-X vectors `start..start + count`.
pub fn mask_vectors(client: &Client, start: u32, count: u32, masked: bool) {
    let action = if masked {
        VFIO_IRQ_SET_ACTION_MASK
    } else {
        VFIO_IRQ_SET_ACTION_UNMASK
    };
    client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_NONE | action,
            start,
            count,
            &[],
        )
        .unwrap();
}

/// A trapped write of BAR 0.
pub fn bar_write(client: &Client, offset: u64, data: &[u8]) {
    client.region_write(0, offset, data).unwrap();
}

/// A trapped read of `len` (at most 8) bytes of BAR 0.
pub fn bar_read(client: &Client, offset: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    client.region_read(0, offset, &mut b[..len]).unwrap();
    u64::from_le_bytes(b)
}

/// Writes a split-virtqueue descriptor at offset `at` of guest memory.
pub fn write_desc(mem: &Mapping, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write(at, &d).unwrap();
}

/// BAR 0 accesses of a test driver, over its client.
pub trait Bar {
    /// The vfio-user client.
    fn client(&self) -> &Client;

    fn bar_write(&self, offset: u64, data: &[u8]) {
        bar_write(self.client(), offset, data);
    }

    fn bar_read(&self, offset: u64, len: usize) -> u64 {
        bar_read(self.client(), offset, len)
    }

    /// The virtio device status.
    fn status(&self) -> u8 {
        self.bar_read(COMMON_OFFSET + 0x14, 1) as u8
    }
}

impl Bar for Driver {
    fn client(&self) -> &Client {
        &self.client
    }
}

/// How the doorbell is rung.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Doorbell {
    /// `REGION_WRITE` to the notify offset (the page is trapped).
    Trapped,
    /// A store into the mmap of the notify area's fd.
    Mapped,
}

/// The driver.
pub struct Driver {
    pub client: Client,
    pub mem: Mapping,
    pub mem_fd: OwnedFd,
    pub bar: Option<Mapping>,
    pub irqs: Vec<OwnedFd>,
    pub avail_idx: u16,
    pub used_idx: u16,
}

impl Driver {
    /// Connects, maps guest memory, gives the device its MSI-X eventfds, enables MSI-X
    /// and unmasks both vectors (as a driver's probe does).
    pub fn connect(socket: &Path) -> Driver {
        Self::connect_with_memory(socket, memfd(c"guest", GUEST_SIZE).unwrap())
    }

    /// Like [`Driver::connect`], with `mem_fd` (e.g. another driver's) as guest memory.
    pub fn connect_with_memory(socket: &Path, mem_fd: OwnedFd) -> Driver {
        let d = Self::connect_masked(socket, mem_fd);
        d.msix_control(MSIX_ENABLE);
        d.mask_vectors(0, 2, false);
        d
    }

    /// Like [`Driver::connect_with_memory`], leaving MSI-X as it finds it (disabled and
    /// masked after reset).
    pub fn connect_masked(socket: &Path, mem_fd: OwnedFd) -> Driver {
        let (client, mem, irqs) = attach(socket, &mem_fd, 2);
        Driver {
            client,
            mem,
            mem_fd,
            bar: None,
            irqs,
            avail_idx: 0,
            used_idx: 0,
        }
    }

    /// Writes the MSI-X control word (`MSIX_ENABLE`, `MSIX_FUNCTION_MASK`; the table
    /// size bits are read only).
    pub fn msix_control(&self, control: u16) {
        msix_control(&self.client, control);
    }

    /// `SET_IRQS` mask or unmask of MSI-X vectors `start..start + count`.
    pub fn mask_vectors(&self, start: u32, count: u32, masked: bool) {
        mask_vectors(&self.client, start, count, masked);
    }

    /// Virtio initialisation with one queue of `QSIZE` on vector 1.
    pub fn init(&mut self) {
        let c = COMMON_OFFSET;
        self.bar_write(c + 0x14, &[0]);
        self.bar_write(c + 0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER]);
        self.bar_write(c, &1u32.to_le_bytes());
        assert_eq!(self.bar_read(c + 4, 4) & 1, 1, "VERSION_1 offered");
        self.bar_write(c + 0x08, &1u32.to_le_bytes());
        self.bar_write(c + 0x0c, &1u32.to_le_bytes());
        self.bar_write(c + 0x08, &0u32.to_le_bytes());
        self.bar_write(c + 0x0c, &(1u32 << 9).to_le_bytes());
        self.bar_write(
            c + 0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK],
        );
        assert_ne!(self.status() & STATUS_FEATURES_OK, 0, "features accepted");
        self.bar_write(c + 0x10, &0u16.to_le_bytes());
        self.bar_write(c + 0x16, &0u16.to_le_bytes());
        self.bar_write(c + 0x18, &QSIZE.to_le_bytes());
        self.bar_write(c + 0x1a, &1u16.to_le_bytes());
        self.bar_write(c + 0x20, &(GUEST_BASE + DESC).to_le_bytes());
        self.bar_write(c + 0x28, &(GUEST_BASE + AVAIL).to_le_bytes());
        self.bar_write(c + 0x30, &(GUEST_BASE + USED).to_le_bytes());
        self.mem.write(AVAIL, &[0; 4]).unwrap();
        self.mem.write(USED, &[0; 4]).unwrap();
        self.bar_write(c + 0x1c, &1u16.to_le_bytes());
        assert_eq!(self.bar_read(c + 0x1c, 2), 1, "queue enabled");
        self.bar_write(
            c + 0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK],
        );
        self.avail_idx = 0;
        self.used_idx = 0;
    }

    /// Maps the BAR's fd so the doorbell can be rung by a store.
    pub fn map_notify(&mut self) {
        let info = self.client.region_info(0).unwrap();
        let fd = info.fd.expect("BAR 0 comes with an fd");
        let area = info.sparse_areas[0];
        let whole = Mapping::new(fd.as_fd(), info.offset, area.offset + area.size, true).unwrap();
        self.bar = Some(whole);
    }

    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(&self.mem, DESC + 16 * u64::from(i), addr, len, flags, next);
    }

    /// Publishes head 0 and rings the doorbell.
    pub fn kick(&mut self, how: Doorbell) {
        self.publish(0);
        self.ring(how);
    }

    /// Puts `head` into the available ring and publishes it (no doorbell).
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        self.mem
            .write(AVAIL + 4 + 2 * slot, &head.to_le_bytes())
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write(AVAIL + 2, &self.avail_idx.to_le_bytes())
            .unwrap();
    }

    /// The used index in guest memory.
    pub fn used_index(&self) -> u16 {
        let mut b = [0u8; 2];
        self.mem.read(USED + 2, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    /// [`Driver::build`]s request `slot` and publishes it without a doorbell. Returns
    /// its head.
    pub fn post(&mut self, slot: u16, kind: u32, sector: u64, data: Option<(&[u8], bool)>) -> u16 {
        let head = self.build(slot, kind, sector, data);
        self.publish(head);
        head
    }

    /// Builds request `slot` (0..5) in its own descriptors 3*slot.., header, status
    /// byte (set to 0xff) and 4 KiB data page, without publishing it. Returns its head.
    pub fn build(&mut self, slot: u16, kind: u32, sector: u64, data: Option<(&[u8], bool)>) -> u16 {
        assert!(slot < 5);
        let s = u64::from(slot);
        let (header, status, buf) = (HEADER + 32 * s, STATUS + s, slot_data(slot));
        let head = 3 * slot;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(header, &h).unwrap();
        self.mem.write(status, &[0xff]).unwrap();
        self.desc(head, GUEST_BASE + header, 16, 1, head + 1);
        match data {
            Some((bytes, device_writes)) => {
                assert!(bytes.len() <= 4096);
                self.mem.write(buf, bytes).unwrap();
                let flags = 1 | if device_writes { 2 } else { 0 };
                self.desc(
                    head + 1,
                    GUEST_BASE + buf,
                    bytes.len() as u32,
                    flags,
                    head + 2,
                );
                self.desc(head + 2, GUEST_BASE + status, 1, 2, 0);
            }
            None => self.desc(head + 1, GUEST_BASE + status, 1, 2, 0),
        }
        head
    }

    /// The status byte of request `slot` (see [`Driver::post`]).
    pub fn slot_status(&self, slot: u16) -> u8 {
        let mut s = [0u8];
        self.mem.read(STATUS + u64::from(slot), &mut s).unwrap();
        s[0]
    }

    /// Rings the queue's doorbell.
    pub fn ring(&mut self, how: Doorbell) {
        match how {
            Doorbell::Trapped => self.bar_write(NOTIFY_OFFSET, &0u16.to_le_bytes()),
            Doorbell::Mapped => self
                .bar
                .as_ref()
                .expect("notify area mapped")
                .write(NOTIFY_OFFSET, &0u16.to_le_bytes())
                .unwrap(),
        }
    }

    /// Waits for the next used entry; returns (head, len).
    pub fn wait_used(&mut self) -> (u32, u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut b = [0u8; 2];
            self.mem.read(USED + 2, &mut b).unwrap();
            if u16::from_le_bytes(b) != self.used_idx {
                break;
            }
            assert!(Instant::now() < deadline, "no used entry within 5 s");
            std::thread::sleep(Duration::from_micros(100));
        }
        let slot = u64::from(self.used_idx % QSIZE);
        let mut e = [0u8; 8];
        self.mem.read(USED + 4 + 8 * slot, &mut e).unwrap();
        self.used_idx = self.used_idx.wrapping_add(1);
        (
            u32::from_le_bytes(e[0..4].try_into().unwrap()),
            u32::from_le_bytes(e[4..8].try_into().unwrap()),
        )
    }

    /// Runs one request: header, optional data, status. Returns (status, used len).
    pub fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<(&[u8], bool)>,
        how: Doorbell,
    ) -> (u8, u32) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(HEADER, &h).unwrap();
        self.mem.write(STATUS, &[0xff]).unwrap();
        self.desc(0, GUEST_BASE + HEADER, 16, 1, 1);
        match data {
            Some((bytes, device_writes)) => {
                self.mem.write(DATA, bytes).unwrap();
                let flags = 1 | if device_writes { 2 } else { 0 };
                self.desc(1, GUEST_BASE + DATA, bytes.len() as u32, flags, 2);
                self.desc(2, GUEST_BASE + STATUS, 1, 2, 0);
            }
            None => self.desc(1, GUEST_BASE + STATUS, 1, 2, 0),
        }
        self.kick(how);
        let (head, len) = self.wait_used();
        assert_eq!(head, 0);
        let mut s = [0u8];
        self.mem.read(STATUS, &mut s).unwrap();
        (s[0], len)
    }

    /// `len` bytes of request `slot`'s data page.
    pub fn slot_data(&self, slot: u16, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read(slot_data(slot), &mut v).unwrap();
        v
    }

    pub fn read_data(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read(DATA, &mut v).unwrap();
        v
    }
}
