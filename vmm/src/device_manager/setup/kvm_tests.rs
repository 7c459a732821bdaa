//! A KVM-only test of the device set-up: a VM without vCPUs, a fake vfio-user device
//! (`vfio_user::testing`) on a socket, and the function built, placed and DMA-mapped as
//! at start-up.

use std::sync::Arc;
use std::time::Duration;

use devices::pci::PciRoot;
use devices::Bus;
use resources::memslots::MemSlots;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::testing::{FakeDevice, FakeDeviceBuilder, FakeServer, Region};

use super::*;
use crate::config::device::{DeviceKind, DeviceSpec};

/// Regions 1-8 readable, writable and empty, as the fake endpoints' other regions are.
fn empty_regions(builder: FakeDeviceBuilder) -> FakeDeviceBuilder {
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    (1..=8).fold(builder, |b, i| b.region(i, Region::new(0).flags(rw)))
}

/// An endpoint 1234:5678 with one 32-bit 64 KiB memory BAR and no interrupts.
fn endpoint() -> FakeDevice {
    let mut config = [0u8; 256];
    config[0..4].copy_from_slice(&[0x34, 0x12, 0x78, 0x56]);
    empty_regions(FakeDevice::builder().info(2, 9, 5))
        .region(0, Region::new(0x1_0000))
        .region(7, Region::new(256).contents(0, &config))
        .build()
        .unwrap()
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
    let server = FakeServer::builder(endpoint()).listen(&socket).unwrap();

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
    let maps: Vec<_> = server
        .probe()
        .lock()
        .dma_maps
        .iter()
        .map(|m| (m.iova, m.size, m.file_offset, m.had_fd))
        .collect();
    assert_eq!(maps, vec![(0, mem_size, 0, true)]);

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
    server.finish(Duration::from_secs(5)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An endpoint 494f:0dc8 as libvfio-user's `gpio-pci-idio-16` sample presents itself:
/// BAR2 an I/O BAR of 0x100 bytes (no MEM flag, so I/O space) reading 0x5a, INTA with
/// one INTx vector, no MSI; plus BAR0, an I/O region of 0x3000 bytes (as the `server`
/// sample's BAR1), which is more than an I/O BAR may have. Writes to both are recorded.
fn intx_endpoint() -> FakeDevice {
    let mut config = [0u8; 256];
    config[0..4].copy_from_slice(&[0x4f, 0x49, 0xc8, 0x0d]);
    config[0x10] = 0x1; // BAR0: I/O
    config[0x18] = 0x1; // BAR2: I/O
    config[0x3d] = 1; // INTA
                      // As libvfio-user answers: eventfd signalling, neither maskable nor automasked.
    let irqs = (0..5).fold(FakeDevice::builder().info(2, 9, 5), |b, i| {
        b.irq(i, VFIO_IRQ_INFO_EVENTFD, u32::from(i == 0))
    });
    empty_regions(irqs)
        .region(0, Region::new(0x3000).record_writes())
        .region(2, Region::new(0x100).fill(0x5a).record_writes())
        .region(7, Region::new(256).contents(0, &config))
        .build()
        .unwrap()
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
    let server = FakeServer::builder(intx_endpoint())
        .listen(&socket)
        .unwrap();
    let probe = server.probe().clone();

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
    let io: Vec<_> = probe
        .lock()
        .region_writes
        .iter()
        .map(|w| (w.index, w.offset, w.data.clone()))
        .collect();
    assert_eq!(io, vec![(2, 4, vec![0xa5])]);

    // INTx: the trigger eventfd, and no UNMASK: like libvfio-user's, this INTx does not
    // mask itself (no VFIO_IRQ_INFO_AUTOMASKED).
    let calls: Vec<_> = probe
        .lock()
        .set_irqs
        .iter()
        .map(|c| (c.index, c.flags, c.start, c.count, c.fds))
        .collect();
    let trigger = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    assert_eq!(calls, vec![(0, trigger, 0, 1, 1)]);
    // The server's signal (on the trigger eventfd the VMM gave it) asserts IOAPIC pin 17
    // and holds it (level).
    probe.raise(0, 0).expect("a trigger eventfd");
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
    server.finish(Duration::from_secs(5)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
