//! A KVM-only test of the device set-up: a VM without vCPUs, a fake vfio-user device on a
//! socket, and the function built, placed and DMA-mapped as at start-up.

use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::pci::PciRoot;
use devices::Bus;
use resources::memslots::MemSlots;
use vfio_bindings::bindings::vfio::{VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE};
use vfio_user::{Device, DeviceResult, Errno, IrqData, ServerConfig};

use super::*;
use crate::config::device::{DeviceKind, DeviceSpec};

/// `(iova, size, file offset, had an fd)` of each DMA map.
type Maps = Arc<Mutex<Vec<(u64, u64, u64, bool)>>>;

/// An endpoint 1234:5678 with one 32-bit 64 KiB memory BAR and no interrupts.
struct Endpoint {
    config: [u8; 256],
    maps: Maps,
}

impl Device for Endpoint {
    fn device_info(&mut self) -> vfio_user::DeviceInfo {
        vfio_user::DeviceInfo {
            flags: 2,
            num_regions: 9,
            num_irqs: 5,
        }
    }
    fn region_info(&mut self, index: u32) -> DeviceResult<vfio_user::RegionInfo> {
        let size = match index {
            0 => 0x1_0000,
            7 => 256,
            1..=8 => 0,
            _ => return Err(Errno(libc::EINVAL)),
        };
        Ok(vfio_user::RegionInfo {
            index,
            flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
            size,
            offset: 0,
            sparse_areas: vec![],
            fd: None,
        })
    }
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> DeviceResult<()> {
        let o = offset as usize;
        match (index, self.config.get(o..o + data.len())) {
            (7, Some(src)) => data.copy_from_slice(src),
            _ => data.fill(0),
        }
        Ok(())
    }
    fn region_write(&mut self, _index: u32, _offset: u64, _data: &[u8]) -> DeviceResult<()> {
        Ok(())
    }
    fn dma_map(&mut self, m: vfio_user::DmaMapping) -> DeviceResult<()> {
        let entry = (m.iova, m.size, m.file_offset, m.fd.is_some());
        self.maps.lock().unwrap().push(entry);
        Ok(())
    }
    fn dma_unmap(&mut self, _iova: u64, _size: u64) -> DeviceResult<()> {
        Ok(())
    }
    fn irq_info(&mut self, index: u32) -> DeviceResult<vfio_user::IrqInfo> {
        Ok(vfio_user::IrqInfo {
            index,
            flags: 0,
            count: 0,
        })
    }
    fn set_irqs(&mut self, _: u32, _: u32, _: u32, _: u32, _: IrqData) -> DeviceResult<()> {
        Ok(())
    }
    fn reset(&mut self) -> DeviceResult<()> {
        Ok(())
    }
}

#[test]
fn a_vfio_user_device_is_placed_and_gets_guest_ram() {
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        eprintln!("skipped: no usable /dev/kvm");
        return;
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let mem_size = 64 << 20;
    let (mem, _memfd) = crate::memory::create(mem_size).unwrap();

    let dir = std::env::temp_dir().join(format!("vmm-devsetup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("dev.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap();
    let maps = Maps::default();
    let mut config = [0u8; 256];
    config[0..4].copy_from_slice(&[0x34, 0x12, 0x78, 0x56]);
    let mut dev = Endpoint {
        config,
        maps: maps.clone(),
    };
    let server = std::thread::spawn(move || {
        let _ = vfio_user::accept_and_serve(&listener, &mut dev, &ServerConfig::default());
    });

    let bus = Arc::new(Bus::new());
    let memslots = Arc::new(MemSlots::new(vm.clone()));
    let routes = Arc::new(KvmRoutes::new(vm.clone()).unwrap());
    let pci = PciRoot::new();
    let specs = [DeviceSpec {
        id: "vfio0".into(),
        kind: DeviceKind::VfioUser {
            socket: socket.clone(),
        },
        mmap: true,
        mediation: None,
    }];
    let ctx = DeviceContext {
        vm: &vm,
        bus: &bus,
        memslots: &memslots,
        routes: &routes,
        pci: &pci,
        mem: &mem,
        mem_size,
        timeout: Duration::from_secs(5),
        mediators: &mediate::Registry::new(),
    };
    let built = add_devices(&specs, &ctx).unwrap();
    assert_eq!(built.len(), 1);
    let stats = built[0].stats();
    assert_eq!(stats.id, "vfio0");
    assert_eq!(stats.bars.len(), 1);
    assert_eq!(stats.bars[0].base, Some(PCI_MMIO32_START));
    assert_eq!(stats.bars[0].size, 0x1_0000);
    // The function is at 00:01.0 and its BAR reads back as programmed.
    assert_eq!(pci.free_slot(1), Some(2));
    let mut bar0 = [0u8; 4];
    built[0].device.read_config(0x10, &mut bar0);
    assert_eq!(u32::from_le_bytes(bar0) as u64, PCI_MMIO32_START);
    // The BAR is on the MMIO bus, forwarded to the device.
    let mut word = [0u8; 4];
    assert!(bus.mmio_read(PCI_MMIO32_START, &mut word));
    assert_eq!(built[0].device.bar_stats()[0].reads, 1);
    // Guest RAM (one region here) was shared with its file.
    assert_eq!(maps.lock().unwrap().clone(), vec![(0, mem_size, 0, true)]);

    // A second device on the same (now closed) socket fails with a message naming it.
    let specs = [DeviceSpec {
        id: "nic".into(),
        kind: DeviceKind::VfioUser {
            socket: dir.join("missing.sock"),
        },
        mmap: true,
        mediation: None,
    }];
    let e = add_devices(&specs, &ctx).err().unwrap().to_string();
    assert!(e.starts_with("device nic (vfio-user,socket="), "{e}");
    assert!(e.contains("cannot connect"), "{e}");

    // The PCI root holds the function too; once both are gone the connection closes
    // and the server returns.
    drop(built);
    drop(pci);
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the INTx endpoint saw: `(index, flags, start, count, descriptors)` of each
/// SET_IRQS, and its INTx trigger eventfd.
#[derive(Default)]
struct IntxLog {
    set_irqs: Vec<(u32, u32, u32, u32, usize)>,
    trigger: Option<std::os::fd::OwnedFd>,
    io: Vec<(u32, u64, Vec<u8>)>,
}

/// An endpoint 494f:0dc8 as libvfio-user's `gpio-pci-idio-16` sample presents itself:
/// BAR2 an I/O BAR of 0x100 bytes (no MEM flag, so I/O space), INTA with one INTx vector,
/// no MSI; plus BAR0, an I/O region of 0x3000 bytes (as the `server` sample's BAR1), which
/// is more than an I/O BAR may have.
struct IntxEndpoint {
    config: [u8; 256],
    log: Arc<Mutex<IntxLog>>,
}

impl IntxEndpoint {
    fn new(log: Arc<Mutex<IntxLog>>) -> Self {
        let mut config = [0u8; 256];
        config[0..4].copy_from_slice(&[0x4f, 0x49, 0xc8, 0x0d]);
        config[0x10] = 0x1; // BAR0: I/O
        config[0x18] = 0x1; // BAR2: I/O
        config[0x3d] = 1; // INTA
        IntxEndpoint { config, log }
    }
}

impl Device for IntxEndpoint {
    fn device_info(&mut self) -> vfio_user::DeviceInfo {
        vfio_user::DeviceInfo {
            flags: 2,
            num_regions: 9,
            num_irqs: 5,
        }
    }
    fn region_info(&mut self, index: u32) -> DeviceResult<vfio_user::RegionInfo> {
        let size = match index {
            0 => 0x3000,
            2 => 0x100,
            7 => 256,
            1..=8 => 0,
            _ => return Err(Errno(libc::EINVAL)),
        };
        Ok(vfio_user::RegionInfo {
            index,
            flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
            size,
            offset: 0,
            sparse_areas: vec![],
            fd: None,
        })
    }
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> DeviceResult<()> {
        let o = offset as usize;
        match (index, self.config.get(o..o + data.len())) {
            (7, Some(src)) => data.copy_from_slice(src),
            (2, _) => data.fill(0x5a),
            _ => data.fill(0),
        }
        Ok(())
    }
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> DeviceResult<()> {
        if index != 7 {
            self.log
                .lock()
                .unwrap()
                .io
                .push((index, offset, data.to_vec()));
        }
        Ok(())
    }
    fn dma_map(&mut self, _m: vfio_user::DmaMapping) -> DeviceResult<()> {
        Ok(())
    }
    fn dma_unmap(&mut self, _iova: u64, _size: u64) -> DeviceResult<()> {
        Ok(())
    }
    fn irq_info(&mut self, index: u32) -> DeviceResult<vfio_user::IrqInfo> {
        // As libvfio-user answers: eventfd signalling, neither maskable nor automasked.
        Ok(vfio_user::IrqInfo {
            index,
            flags: vfio_bindings::bindings::vfio::VFIO_IRQ_INFO_EVENTFD,
            count: u32::from(index == 0),
        })
    }
    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> DeviceResult<()> {
        let mut log = self.log.lock().unwrap();
        let fds = match data {
            IrqData::Eventfds(mut fds) => {
                let n = fds.len();
                if index == 0 {
                    log.trigger = fds.pop();
                }
                n
            }
            _ => 0,
        };
        log.set_irqs.push((index, flags, start, count, fds));
        Ok(())
    }
    fn reset(&mut self) -> DeviceResult<()> {
        Ok(())
    }
}

#[test]
fn an_intx_function_gets_ports_an_ioapic_line_and_an_mp_entry() {
    use vfio_bindings::bindings::vfio::{VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD};
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        eprintln!("skipped: no usable /dev/kvm");
        return;
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let mem_size = 64 << 20;
    let (mem, _memfd) = crate::memory::create(mem_size).unwrap();

    let dir = std::env::temp_dir().join(format!("vmm-devsetup-intx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("gpio.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap();
    let log = Arc::new(Mutex::new(IntxLog::default()));
    let mut dev = IntxEndpoint::new(log.clone());
    let server = std::thread::spawn(move || {
        let _ = vfio_user::accept_and_serve(&listener, &mut dev, &ServerConfig::default());
    });

    let bus = Arc::new(Bus::new());
    let memslots = Arc::new(MemSlots::new(vm.clone()));
    let routes = Arc::new(KvmRoutes::new(vm.clone()).unwrap());
    let pci = PciRoot::new();
    let specs = [DeviceSpec {
        id: "gpio".into(),
        kind: DeviceKind::VfioUser {
            socket: socket.clone(),
        },
        mmap: true,
        mediation: None,
    }];
    let ctx = DeviceContext {
        vm: &vm,
        bus: &bus,
        memslots: &memslots,
        routes: &routes,
        pci: &pci,
        mem: &mem,
        mem_size,
        timeout: Duration::from_secs(5),
        mediators: &mediate::Registry::new(),
    };
    let built = add_devices(&specs, &ctx).unwrap();
    let d = &built[0];
    assert_eq!(d.slot, 1);
    let intx = d.intx.expect("INTx wired");
    assert_eq!((intx.pin, intx.gsi), (1, 17));
    assert_eq!(
        mptable_intx(&built),
        vec![crate::boot::mptable::PciIntx {
            slot: 1,
            pin: 1,
            ioapic_pin: 17
        }]
    );
    // The I/O BAR got the first ports of the window; the 0x3000-byte one is not offered.
    let bars = d.device.bars();
    assert_eq!(bars.len(), 1, "{bars:?}");
    let mut reg = [0u8; 4];
    d.device.read_config(0x18, &mut reg);
    assert_eq!(u32::from_le_bytes(reg), 0xc001);
    d.device.read_config(0x10, &mut reg);
    assert_eq!(u32::from_le_bytes(reg), 0, "BAR0 is not offered");
    d.device.read_config(0x04, &mut reg);
    assert_eq!(
        u16::from_le_bytes([reg[0], reg[1]]) & 0x7,
        0x7,
        "I/O, memory, master"
    );
    d.device.read_config(0x3c, &mut reg);
    assert_eq!((reg[0], reg[1]), (17, 1), "line 17, INTA");

    // Port accesses reach the server's region 2.
    assert!(bus.pio_write(0xc004, &[0xa5]));
    let mut b = [0u8; 1];
    assert!(bus.pio_read(0xc000, &mut b));
    assert_eq!(b, [0x5a]);
    assert_eq!(log.lock().unwrap().io, vec![(2, 4, vec![0xa5])]);

    // INTx: the trigger eventfd, and no UNMASK: like libvfio-user's, this INTx does not
    // mask itself (no VFIO_IRQ_INFO_AUTOMASKED).
    let calls = log.lock().unwrap().set_irqs.clone();
    let trigger = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    assert_eq!(calls, vec![(0, trigger, 0, 1, 1)]);
    // The server's signal asserts IOAPIC pin 17 and holds it (level).
    let trigger = log
        .lock()
        .unwrap()
        .trigger
        .take()
        .expect("a trigger eventfd");
    let one = 1u64.to_ne_bytes();
    // SAFETY: `trigger` is an eventfd this test owns (the server's copy of the VMM's);
    // writing 8 bytes from a valid buffer only adds to its counter.
    let n = unsafe {
        libc::write(
            std::os::fd::AsRawFd::as_raw_fd(&trigger),
            one.as_ptr().cast(),
            one.len(),
        )
    };
    assert_eq!(n, 8);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let irr = loop {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).unwrap();
        // SAFETY: KVM filled the `ioapic` member for chip KVM_IRQCHIP_IOAPIC.
        let irr = unsafe { chip.chip.ioapic.irr };
        if irr & 1 << 17 != 0 || std::time::Instant::now() > deadline {
            break irr;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_ne!(irr & 1 << 17, 0, "IOAPIC pin 17 asserted: {irr:#x}");

    drop(built);
    drop(pci);
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
