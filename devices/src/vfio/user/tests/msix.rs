//! The vfio-pci function over this backend and a real vfsim (its device code served over a
//! real Unix socket by a thread of the test): vfsim, like QEMU's device models behind its
//! vfio-user server, signals a vector only while MSI-X is enabled in its configuration
//! space and the function and the vector are unmasked. So the guest's interrupt arrives
//! only if the VMM passes its MSI-X state on; with the test-only switch that keeps it in
//! the VMM's emulation, it never does.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use resources::memslots::MemSlots;
use vfsim::blk::VIRTIO_BLK_T_FLUSH;
use vfsim::common_cfg::{STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK};
use vfsim::layout::{CAP_MSIX, COMMON_OFFSET, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_OFFSET};
use vfsim::mmap::{memfd, Mapping};
use vfsim::{serve, PersonalityConfig, SimConfig, VfSim};
use vm_memory::GuestMemoryMmap;

use crate::bus::Bus;
use crate::pci::msix::testing::RecordingRoutes;
use crate::vfio::backend::DmaMapping;
use crate::vfio::testing::FakeSlots;
use crate::vfio::user::VfioUserBackend;
use crate::vfio::{VfioBackend, VfioPciDevice, VfioPciParams};

/// Guest memory: where the device sees it and how big it is.
const GUEST_BASE: u64 = 0x4000_0000;
const GUEST_SIZE: u64 = 0x10_0000;
/// Offsets in guest memory.
const DESC: u64 = 0x0000;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADER: u64 = 0x3000;
const STATUS: u64 = 0x3800;
const QSIZE: u16 = 16;
/// Where the test's "firmware" puts BAR 0.
const BAR0_GPA: u64 = 0xe000_0000;
/// The queue's MSI-X vector (0 is the configuration vector).
const QUEUE_VECTOR: u64 = 1;
/// A signal that must come comes within this; one that must not is watched this long
/// after the request completed (vfsim signals in the pass that publishes the used entry).
const IRQ_WAIT: Duration = Duration::from_secs(5);
const NO_IRQ_WAIT: Duration = Duration::from_millis(500);

/// A vfsim served from a thread on a socket in a scratch directory (removed on drop;
/// the server thread lives until the test process ends, as in vfsim's own tests).
struct Sim {
    dir: PathBuf,
    socket: PathBuf,
}

impl Sim {
    fn start() -> Sim {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmm-msix-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let socket = dir.join("vf.sock");
        let mut device = VfSim::new(&SimConfig {
            personality: PersonalityConfig::Blk { disk },
            queue_size: 256,
            native_migration: false,
        })
        .unwrap();
        let listener = serve::bind(&socket).unwrap();
        std::thread::spawn(move || serve::serve_clients(&listener, &mut device));
        Sim { dir, socket }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The function over vfsim as a guest sees it, with guest memory the device may DMA to.
struct Rig {
    dev: Arc<VfioPciDevice>,
    routes: Arc<RecordingRoutes>,
    mem: Mapping,
    _mem_fd: OwnedFd,
    _sim: Sim,
}

impl Rig {
    /// Opens the function with MSI/MSI-X forwarding `on` or off, places BAR 0 and maps
    /// guest memory for DMA.
    fn new(forwarding: bool) -> Rig {
        let sim = Sim::start();
        // vfsim sends no DMA_READ/DMA_WRITE messages (it maps the memfd itself).
        let no_dma_messages = GuestMemoryMmap::default();
        let backend = Arc::new(
            VfioUserBackend::connect(&sim.socket, Duration::from_secs(5), &no_dma_messages)
                .unwrap(),
        );
        let routes = RecordingRoutes::new(32);
        let dev = VfioPciDevice::new(VfioPciParams {
            name: "vf0".into(),
            backend: backend.clone(),
            bus: Arc::new(Bus::new()),
            memslots: Arc::new(MemSlots::new(Arc::new(FakeSlots::default()))),
            routes: routes.clone(),
        })
        .unwrap();
        dev.set_irq_forwarding(forwarding);
        dev.program_bar(0, BAR0_GPA).unwrap();
        dev.enable_memory_and_bus_master();
        let mem_fd = memfd(c"guest", GUEST_SIZE).unwrap();
        let mem = Mapping::new(mem_fd.as_fd(), 0, GUEST_SIZE, true).unwrap();
        let mapping = DmaMapping {
            iova: GUEST_BASE,
            size: GUEST_SIZE,
            // vfio-user servers map the file themselves; the address is not used.
            host_addr: 0,
            file: Some((mem_fd.as_fd(), 0)),
        };
        // SAFETY: the memfd stays open for the whole test (it is kept in the rig) and is
        // only ever accessed through mappings, so the device writing it behind Rust's
        // back is fine.
        unsafe { backend.dma_map(&mapping) }.unwrap();
        Rig {
            dev,
            routes,
            mem,
            _mem_fd: mem_fd,
            _sim: sim,
        }
    }

    fn cfg16(&self, offset: usize, value: u16) {
        self.dev.write_config(offset, &value.to_le_bytes());
    }

    fn bar(&self, offset: u64, data: &[u8]) {
        self.dev.bar_write(0, offset, data);
    }

    fn bar_read(&self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(0, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// What Linux's MSI-X set-up does: enable with the function masked, program the
    /// entries (masked), clear the function mask; then its request_irq unmasks each
    /// vector in `unmask`.
    fn guest_enables_msix(&self, unmask: &[u64]) {
        let control = CAP_MSIX + 2;
        self.cfg16(control, 0xc000);
        for v in 0..2u64 {
            let entry = MSIX_TABLE_OFFSET + 16 * v;
            self.bar(entry, &(0xfee0_0000u64 + 0x1000 * v).to_le_bytes());
            self.bar(entry + 8, &(0x4041 + v as u32).to_le_bytes());
            self.bar(entry + 12, &1u32.to_le_bytes());
        }
        self.cfg16(control, 0x8000);
        for &v in unmask {
            self.unmask(v);
        }
    }

    fn unmask(&self, v: u64) {
        self.bar(MSIX_TABLE_OFFSET + 16 * v + 12, &0u32.to_le_bytes());
    }

    /// Virtio initialisation with one queue of `QSIZE` on `QUEUE_VECTOR`.
    fn virtio_init(&self) {
        let c = COMMON_OFFSET;
        self.bar(c + 0x14, &[0]);
        self.bar(c + 0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER]);
        self.bar(c + 0x08, &1u32.to_le_bytes());
        self.bar(c + 0x0c, &1u32.to_le_bytes()); // VIRTIO_F_VERSION_1
        let features_ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.bar(c + 0x14, &[features_ok]);
        assert_ne!(self.bar_read(c + 0x14, 1) as u8 & STATUS_FEATURES_OK, 0);
        self.bar(c + 0x10, &0u16.to_le_bytes());
        self.bar(c + 0x16, &0u16.to_le_bytes());
        self.bar(c + 0x18, &QSIZE.to_le_bytes());
        self.bar(c + 0x1a, &(QUEUE_VECTOR as u16).to_le_bytes());
        self.bar(c + 0x20, &(GUEST_BASE + DESC).to_le_bytes());
        self.bar(c + 0x28, &(GUEST_BASE + AVAIL).to_le_bytes());
        self.bar(c + 0x30, &(GUEST_BASE + USED).to_le_bytes());
        self.bar(c + 0x1c, &1u16.to_le_bytes());
        self.bar(c + 0x14, &[features_ok | STATUS_DRIVER_OK]);
    }

    /// Posts a flush request, rings the doorbell and waits for it to be used.
    fn flush(&self) {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
        self.mem.write(HEADER, &header).unwrap();
        self.mem.write(STATUS, &[0xff]).unwrap();
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem.write(DESC + 16 * i, &d).unwrap();
        };
        desc(0, GUEST_BASE + HEADER, 16, 1, 1);
        desc(1, GUEST_BASE + STATUS, 1, 2, 0);
        let mut idx = [0u8; 2];
        self.mem.read(AVAIL + 2, &mut idx).unwrap();
        let idx = u16::from_le_bytes(idx);
        let slot = u64::from(idx % QSIZE);
        self.mem
            .write(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes())
            .unwrap();
        let next = idx.wrapping_add(1);
        self.mem.write(AVAIL + 2, &next.to_le_bytes()).unwrap();
        self.bar(NOTIFY_OFFSET, &0u16.to_le_bytes());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut used = [0u8; 2];
            self.mem.read(USED + 2, &mut used).unwrap();
            if u16::from_le_bytes(used) == next {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the flush was not completed in 5 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut status = [0u8];
        self.mem.read(STATUS, &mut status).unwrap();
        assert_eq!(status[0], 0, "flush status");
    }

    /// Waits up to `wait` for the queue vector's eventfd (the one KVM would inject
    /// from) to be signalled, and consumes the signal.
    fn interrupted(&self, wait: Duration) -> bool {
        let gsi = self.dev.gsis()[QUEUE_VECTOR as usize];
        let deadline = Instant::now() + wait;
        loop {
            let fd = self.routes.lock().enabled.get(&gsi).copied();
            if let Some(fd) = fd {
                if poll_in(fd, 10) {
                    let mut v = 0u64;
                    // SAFETY: `fd` is the vector's eventfd, owned by the device, which
                    // lives in `self`; reads 8 bytes into `v`.
                    let n = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
                    return n == 8;
                }
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// The PBA as the guest reads it.
    fn pba(&self) -> u64 {
        self.bar_read(MSIX_PBA_OFFSET, 8)
    }
}

/// Whether `fd` becomes readable within `ms` milliseconds.
fn poll_in(fd: i32, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd; poll only writes its `revents`.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

/// With the MSI-X state passed on: while the guest keeps the queue vector masked, vfsim
/// holds the interrupt (the guest's PBA shows it, from vfsim's own PBA); once the guest
/// unmasks it, vfsim sends it, and later completions interrupt at once.
#[test]
fn vfsim_interrupts_once_the_vmm_has_enabled_msix_and_unmasked_the_vector() {
    let rig = Rig::new(true);
    rig.guest_enables_msix(&[0]);
    rig.virtio_init();
    rig.flush();
    assert!(!rig.interrupted(NO_IRQ_WAIT), "the queue vector is masked");
    assert_eq!(rig.pba(), 1 << QUEUE_VECTOR, "pending in the device");
    rig.unmask(QUEUE_VECTOR);
    assert!(rig.interrupted(IRQ_WAIT), "sent on unmask");
    assert_eq!(rig.pba(), 0);
    rig.flush();
    assert!(rig.interrupted(IRQ_WAIT), "unmasked: at once");
}

/// The same guest with the test-only switch that keeps the MSI-X state in the VMM (as
/// before it was passed on): vfsim never learns that MSI-X is on or the vector unmasked,
/// so the completion never interrupts, though the VMM's own emulation delivers.
#[test]
fn without_passing_the_msix_state_on_vfsim_never_interrupts() {
    let rig = Rig::new(false);
    rig.guest_enables_msix(&[0, QUEUE_VECTOR]);
    rig.virtio_init();
    let gsi = rig.dev.gsis()[QUEUE_VECTOR as usize];
    assert!(
        rig.routes.lock().enabled.contains_key(&gsi),
        "the VMM routes the vector to KVM"
    );
    rig.flush();
    assert!(!rig.interrupted(NO_IRQ_WAIT), "no interrupt ever arrives");
    assert_eq!(rig.pba(), 1 << QUEUE_VECTOR, "vfsim holds it pending");
}
