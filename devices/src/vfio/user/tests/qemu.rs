//! The vfio-pci function over this backend and QEMU's own vfio-user server
//! (`x-vfio-user-server` exporting a `virtio-blk-pci`), driven as a guest's driver does,
//! to check what reaches a device model that honours its MSI-X state (QEMU's `msix_notify`
//! pends while MSI-X is off, the function masked or the vector masked).
//!
//! Needs a QEMU built with `--enable-vfio-user-server` (`tests/peers/build.sh`, see
//! `docs/peers.md`): run with `VMM_PEER_QEMU_VFIO_USER=/path/to/qemu-system-x86_64
//! cargo test -p devices qemu_server -- --ignored` (`VMM_PEER_QEMU_ARGS` adds arguments,
//! e.g. `-trace enable=msix*`). libvfio-user does not report MSI-X as maskable, so the
//! function masks and unmasks vectors in the device's MSI-X table only; QEMU's server
//! applies that write (its table memory region) and sends a pending vector on unmask.
//! (Sending SET_IRQS UNMASK instead does not unmask vector 1: QEMU's handler loops over
//! `start..count`.)
//!
//! What else QEMU's server needs, found here:
//! - `virtio-blk-pci` with `disable-legacy=on,iommu_platform=on`: without
//!   `VIRTIO_F_ACCESS_PLATFORM` (which the driver must accept) virtio DMAs into the
//!   remote's system memory, not into the device's address space where libvfio-user puts
//!   the client's DMA mappings, and sees an empty ring;
//! - the BAR addresses in the device's own configuration space: the server reaches a BAR
//!   through its device's memory regions only where the device has the BAR mapped (all
//!   at 0 overlap), and the function keeps BAR registers virtual, so the test writes them
//!   to the device itself.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use resources::memslots::MemSlots;
use vfsim::mmap::{memfd, Mapping};
use vm_memory::GuestMemoryMmap;

use crate::bus::Bus;
use crate::pci::msix::testing::RecordingRoutes;
use crate::vfio::backend::{DmaMapping, CONFIG_REGION};
use crate::vfio::testing::FakeSlots;
use crate::vfio::user::VfioUserBackend;
use crate::vfio::{VfioBackend, VfioPciDevice, VfioPciParams};

const GUEST_BASE: u64 = 0x4000_0000;
const GUEST_SIZE: u64 = 0x10_0000;
const DESC: u64 = 0x0000;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADER: u64 = 0x3000;
const STATUS: u64 = 0x3800;
const DATA: u64 = 0x4000;
const QSIZE: u16 = 16;
const QUEUE_VECTOR: u16 = 1;
const IRQ_WAIT: Duration = Duration::from_secs(5);
const NO_IRQ_WAIT: Duration = Duration::from_millis(500);

/// QEMU serving a virtio-blk-pci over vfio-user; killed (by its pid) on drop.
struct Qemu {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Qemu {
    fn start() -> Qemu {
        let bin = std::env::var_os("VMM_PEER_QEMU_VFIO_USER").expect(
            "VMM_PEER_QEMU_VFIO_USER: a qemu-system-x86_64 with the x-vfio-user-server object",
        );
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmm-qemu-peer-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.img");
        let mut image = vec![0u8; 1 << 20];
        image[..8].copy_from_slice(b"sector 0");
        std::fs::write(&disk, image).unwrap();
        let socket = dir.join("q.sock");
        let log = std::fs::File::create(dir.join("qemu.log")).unwrap();
        let child = Command::new(bin)
            .args(["-machine", "x-remote,vfio-user=on", "-accel", "kvm"])
            .args(["-nographic", "-monitor", "none", "-serial", "none"])
            .args([
                "-device",
                "virtio-blk-pci,id=dev0,drive=drv0,disable-legacy=on,iommu_platform=on",
            ])
            .arg("-drive")
            .arg(format!(
                "id=drv0,file={},format=raw,if=none",
                disk.display()
            ))
            .arg("-object")
            .arg(format!(
                "x-vfio-user-server,id=vfu0,type=unix,path={},device=dev0",
                socket.display()
            ))
            .args(
                std::env::var("VMM_PEER_QEMU_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut qemu = Qemu { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !qemu.socket.exists() {
            let exited = qemu.child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "QEMU made no socket in 20 s (exit: {exited:?})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        qemu
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default();
            eprintln!("QEMU's log:\n{log}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where a virtio structure is: BAR and offset.
#[derive(Clone, Copy, Debug)]
struct At {
    bar: usize,
    offset: u64,
}

struct Rig {
    dev: Arc<VfioPciDevice>,
    routes: Arc<RecordingRoutes>,
    mem: Mapping,
    common: At,
    notify: At,
    notify_multiplier: u32,
    msix_table: At,
    msix_pba: At,
    msix_cap: usize,
    _mem_fd: OwnedFd,
    _qemu: Qemu,
}

impl Rig {
    fn new(forwarding: bool) -> Rig {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("warn")
            .with_test_writer()
            .try_init();
        let qemu = Qemu::start();
        // QEMU sends no DMA_READ/DMA_WRITE messages (it maps the memfd itself).
        let no_dma_messages = GuestMemoryMmap::default();
        let backend = Arc::new(
            VfioUserBackend::connect(&qemu.socket, Duration::from_secs(5), &no_dma_messages)
                .unwrap(),
        );
        let routes = RecordingRoutes::new(32);
        let dev = VfioPciDevice::new(VfioPciParams {
            name: "qemu0".into(),
            backend: backend.clone(),
            bus: Arc::new(Bus::new()),
            memslots: Arc::new(MemSlots::new(Arc::new(FakeSlots::default()))),
            routes: routes.clone(),
        })
        .unwrap();
        dev.set_irq_forwarding(forwarding);
        let mut gpa = 0xe000_0000u64;
        for b in dev.bars().into_iter().filter(|b| b.kind.is_memory()) {
            gpa = gpa.next_multiple_of(b.size.max(0x1000));
            dev.program_bar(b.index, gpa).unwrap();
            // The function keeps BAR registers virtual; QEMU's server reaches a BAR only
            // where its own device has it mapped (its memory_region_find needs the BAR
            // in the remote's address space, not overlapping another one), so the test
            // gives the device the same addresses itself (see the module docs).
            let reg = 0x10 + 4 * b.index as u64;
            backend
                .region_write(CONFIG_REGION, reg, &(gpa as u32).to_le_bytes())
                .unwrap();
            if matches!(b.kind, crate::vfio::BarKind::Mem64 { .. }) {
                let high = ((gpa >> 32) as u32).to_le_bytes();
                backend.region_write(CONFIG_REGION, reg + 4, &high).unwrap();
            }
            gpa += b.size;
        }
        dev.enable_memory_and_bus_master();

        // The capabilities, as a driver finds them.
        let cfg8 = |o: usize| {
            let mut b = [0u8];
            dev.read_config(o, &mut b);
            b[0]
        };
        let cfg32 = |o: usize| {
            let mut b = [0u8; 4];
            dev.read_config(o, &mut b);
            u32::from_le_bytes(b)
        };
        let (mut common, mut notify, mut multiplier, mut msix) = (None, None, 0, None);
        let mut next = usize::from(cfg8(0x34));
        while next != 0 {
            match cfg8(next) {
                0x09 => {
                    let at = At {
                        bar: usize::from(cfg8(next + 4)),
                        offset: u64::from(cfg32(next + 8)),
                    };
                    match cfg8(next + 3) {
                        1 => common = Some(at),
                        2 => {
                            notify = Some(at);
                            multiplier = cfg32(next + 16);
                        }
                        _ => {}
                    }
                }
                0x11 => msix = Some(next),
                _ => {}
            }
            next = usize::from(cfg8(next + 1));
        }
        let msix_cap = msix.expect("QEMU's virtio-blk-pci has MSI-X");
        let (table, pba) = (cfg32(msix_cap + 4), cfg32(msix_cap + 8));
        let mem_fd = memfd(c"guest", GUEST_SIZE).unwrap();
        let mem = Mapping::new(mem_fd.as_fd(), 0, GUEST_SIZE, true).unwrap();
        let mapping = DmaMapping {
            iova: GUEST_BASE,
            size: GUEST_SIZE,
            host_addr: 0,
            file: Some((mem_fd.as_fd(), 0)),
        };
        // SAFETY: the memfd stays open for the whole test (kept in the rig) and is only
        // accessed through mappings.
        unsafe { backend.dma_map(&mapping) }.unwrap();
        Rig {
            dev,
            routes,
            mem,
            common: common.expect("a common configuration capability"),
            notify: notify.expect("a notify capability"),
            notify_multiplier: multiplier,
            msix_table: At {
                bar: (table & 7) as usize,
                offset: u64::from(table & !7),
            },
            msix_pba: At {
                bar: (pba & 7) as usize,
                offset: u64::from(pba & !7),
            },
            msix_cap,
            _mem_fd: mem_fd,
            _qemu: qemu,
        }
    }

    fn write(&self, at: At, offset: u64, data: &[u8]) {
        self.dev.bar_write(at.bar, at.offset + offset, data);
    }

    fn read(&self, at: At, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(at.bar, at.offset + offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn guest_enables_msix(&self, unmask: &[u16]) {
        let control = self.msix_cap + 2;
        self.dev.write_config(control, &0xc000u16.to_le_bytes());
        for v in 0..2u64 {
            let e = 16 * v;
            self.write(
                self.msix_table,
                e,
                &(0xfee0_0000 + 0x1000 * v).to_le_bytes(),
            );
            self.write(self.msix_table, e + 8, &(0x4041 + v as u32).to_le_bytes());
            self.write(self.msix_table, e + 12, &1u32.to_le_bytes());
        }
        self.dev.write_config(control, &0x8000u16.to_le_bytes());
        for &v in unmask {
            self.unmask(v);
        }
    }

    fn unmask(&self, v: u16) {
        self.write(self.msix_table, 16 * u64::from(v) + 12, &0u32.to_le_bytes());
    }

    fn virtio_init(&self) -> u64 {
        let c = self.common;
        self.write(c, 0x14, &[0]);
        self.write(c, 0x14, &[1 | 2]);
        self.write(c, 0x08, &1u32.to_le_bytes());
        // VIRTIO_F_VERSION_1 and VIRTIO_F_ACCESS_PLATFORM (DMA through the device's
        // address space, where the server puts the client's DMA mappings).
        self.write(c, 0x0c, &0b11u32.to_le_bytes());
        self.write(c, 0x14, &[1 | 2 | 8]);
        assert_ne!(self.read(c, 0x14, 1) & 8, 0, "FEATURES_OK");
        self.write(c, 0x10, &0u16.to_le_bytes());
        assert_eq!(self.read(c, 0x10, 2), 0, "config vector taken");
        self.write(c, 0x16, &0u16.to_le_bytes());
        self.write(c, 0x18, &QSIZE.to_le_bytes());
        self.write(c, 0x1a, &QUEUE_VECTOR.to_le_bytes());
        assert_eq!(
            self.read(c, 0x1a, 2),
            u64::from(QUEUE_VECTOR),
            "queue vector taken"
        );
        self.write(c, 0x20, &(GUEST_BASE + DESC).to_le_bytes());
        self.write(c, 0x28, &(GUEST_BASE + AVAIL).to_le_bytes());
        self.write(c, 0x30, &(GUEST_BASE + USED).to_le_bytes());
        let notify_off = self.read(c, 0x1e, 2);
        self.write(c, 0x1c, &1u16.to_le_bytes());
        self.write(c, 0x14, &[1 | 2 | 8 | 4]);
        notify_off * u64::from(self.notify_multiplier)
    }

    /// Reads sector 0 through the queue; returns once the request is used.
    fn read_sector0(&self, doorbell: u64) {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&0u32.to_le_bytes()); // VIRTIO_BLK_T_IN
        self.mem.write(HEADER, &header).unwrap();
        self.mem.write(STATUS, &[0xff]).unwrap();
        self.mem.write(DATA, &[0u8; 512]).unwrap();
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem.write(DESC + 16 * i, &d).unwrap();
        };
        desc(0, GUEST_BASE + HEADER, 16, 1, 1);
        desc(1, GUEST_BASE + DATA, 512, 1 | 2, 2);
        desc(2, GUEST_BASE + STATUS, 1, 2, 0);
        let mut idx = [0u8; 2];
        self.mem.read(AVAIL + 2, &mut idx).unwrap();
        let idx = u16::from_le_bytes(idx);
        let slot = u64::from(idx % QSIZE);
        self.mem
            .write(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes())
            .unwrap();
        let next = idx.wrapping_add(1);
        self.mem.write(AVAIL + 2, &next.to_le_bytes()).unwrap();
        self.write(self.notify, doorbell, &0u16.to_le_bytes());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut used = [0u8; 2];
            self.mem.read(USED + 2, &mut used).unwrap();
            if u16::from_le_bytes(used) == next {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the read was not completed in 5 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut status = [0u8];
        self.mem.read(STATUS, &mut status).unwrap();
        assert_eq!(status[0], 0, "read status");
        let mut data = [0u8; 8];
        self.mem.read(DATA, &mut data).unwrap();
        assert_eq!(&data, b"sector 0");
    }

    fn interrupted(&self, wait: Duration) -> bool {
        let gsi = self.dev.gsis()[usize::from(QUEUE_VECTOR)];
        let deadline = Instant::now() + wait;
        loop {
            let fd = self.routes.lock().enabled.get(&gsi).copied();
            if let Some(fd) = fd {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; poll only writes `revents`.
                if unsafe { libc::poll(&mut pfd, 1, 10) } == 1 {
                    let mut v = 0u64;
                    // SAFETY: the vector's eventfd, owned by the device in `self`; reads
                    // 8 bytes into `v`.
                    return unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) } == 8;
                }
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    fn pba(&self) -> u64 {
        self.read(self.msix_pba, 0, 8)
    }
}

#[test]
#[ignore = "needs QEMU's vfio-user server: VMM_PEER_QEMU_VFIO_USER=path/to/qemu-system-x86_64"]
fn qemu_server_interrupts_once_msix_is_enabled_and_the_vector_unmasked() {
    let rig = Rig::new(true);
    rig.guest_enables_msix(&[0]);
    let doorbell = rig.virtio_init();
    rig.read_sector0(doorbell);
    assert!(!rig.interrupted(NO_IRQ_WAIT), "the queue vector is masked");
    assert_eq!(rig.pba(), 1 << QUEUE_VECTOR, "pending in QEMU's PBA");
    rig.unmask(QUEUE_VECTOR);
    assert!(rig.interrupted(IRQ_WAIT), "sent on unmask");
    assert_eq!(rig.pba(), 0);
    rig.read_sector0(doorbell);
    assert!(rig.interrupted(IRQ_WAIT), "unmasked: at once");
}

#[test]
#[ignore = "needs QEMU's vfio-user server: VMM_PEER_QEMU_VFIO_USER=path/to/qemu-system-x86_64"]
fn qemu_server_never_interrupts_without_the_msix_state() {
    let rig = Rig::new(false);
    rig.guest_enables_msix(&[0, QUEUE_VECTOR]);
    let doorbell = rig.virtio_init();
    rig.read_sector0(doorbell);
    assert!(!rig.interrupted(NO_IRQ_WAIT), "no interrupt ever arrives");
}
