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
