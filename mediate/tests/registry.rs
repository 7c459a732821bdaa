//! The registry, the mediated backend and the `trace` mediator over a real vfio-pci device
//! (with the fake backend and fake memory slots from `devices::vfio::testing`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use devices::bus::Bus;
use devices::pci::msix::testing::RecordingRoutes;
use devices::vfio::testing::{Call, FakeBackend, FakeSlots};
use devices::vfio::{BackendError, RegionInfo, VfioBackend, VfioPciDevice, VfioPciParams};
use mediate::{
    Access, AttachContext, BarRange, DeviceIdentity, GuestMemory, MediateError, MediatedDevice,
    Mediator, MediatorOptions, Probe, Registry, Selector, TrapHandle,
};
use resources::memslots::MemSlots;
use serde_json::json;

struct NoMemory;
impl GuestMemory for NoMemory {
    fn read(&self, _gpa: u64, _buf: &mut [u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("no guest memory in this test"))
    }
}

/// A mediator that takes devices of one vendor, hides BAR 0's mmap, handles reads at
/// BAR 0 + 0 itself, and adds one region.
struct Picky {
    vendor: u16,
    released: Arc<AtomicBool>,
}

struct PickyDevice {
    released: Arc<AtomicBool>,
}

impl Mediator for Picky {
    fn name(&self) -> &str {
        "picky"
    }
    fn description(&self) -> &str {
        "test mediator"
    }
    fn probe(
        &self,
        identity: &DeviceIdentity,
        _options: &MediatorOptions,
        _backend: &Arc<dyn VfioBackend>,
    ) -> mediate::Result<Probe> {
        if identity.vendor != self.vendor {
            return Ok(Probe::Decline(format!("wants vendor {:04x}", self.vendor)));
        }
        Ok(Probe::Accept(Box::new(PickyDevice {
            released: self.released.clone(),
        })))
    }
}

impl MediatedDevice for PickyDevice {
    fn mmap_areas(&self, index: u32, areas: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
        if index == 0 {
            Vec::new()
        } else {
            areas
        }
    }
    fn extra_regions(&self) -> Vec<RegionInfo> {
        vec![RegionInfo {
            size: 0x1000,
            ..Default::default()
        }]
    }
    fn read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<Access, BackendError> {
        if index == 0 && offset == 0 {
            data.fill(0x5a);
            return Ok(Access::Handled);
        }
        Ok(Access::PassThrough)
    }
    fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
    }
}

fn device_over(backend: Arc<dyn VfioBackend>) -> (Arc<VfioPciDevice>, Arc<FakeSlots>) {
    let slots = Arc::new(FakeSlots::default());
    let dev = VfioPciDevice::new(VfioPciParams {
        name: "vf0".into(),
        backend,
        bus: Arc::new(Bus::new()),
        memslots: Arc::new(MemSlots::new(slots.clone())),
        routes: RecordingRoutes::new(32),
    })
    .unwrap();
    (dev, slots)
}

#[test]
fn named_auto_and_unknown_selection() {
    let fake = FakeBackend::standard().unwrap();
    let released = Arc::new(AtomicBool::new(false));
    let reg = Registry::with_bundled();
    reg.register(Arc::new(Picky {
        vendor: 0x8086,
        released: released.clone(),
    }))
    .unwrap();
    let opts = MediatorOptions::default();
    // Nobody takes a 1af4 device under auto: trace declines auto, picky wants 8086.
    let e = reg
        .open(&Selector::Auto, "vfio-user:/x", &opts, fake.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no mediator accepts device 1af4:1042"), "{e}");
    assert!(e.contains("picky: wants vendor 8086"), "{e}");
    assert!(
        e.contains("virtio-blk-vf: needs the VF's PF-side control socket: add pf=PATH"),
        "{e}"
    );
    assert!(
        e.contains("trace: trace takes only devices it is named for"),
        "{e}"
    );
    // Named and declining.
    let e = reg
        .open(
            &"picky".parse().unwrap(),
            "vfio-user:/x",
            &opts,
            fake.clone(),
        )
        .err()
        .unwrap();
    assert!(matches!(e, MediateError::Declined { .. }), "{e}");
    // Unknown names list the known ones.
    let e = reg
        .open(
            &"nope".parse().unwrap(),
            "vfio-user:/x",
            &opts,
            fake.clone(),
        )
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(
            "no mediator is named \"nope\"; registered mediators: virtio-blk-vf, virtio-net-vf, trace, picky"
        ),
        "{e}"
    );
    // Auto picks picky for an 8086 device.
    fake.config()[0..2].copy_from_slice(&0x8086u16.to_le_bytes());
    let b = reg
        .open(&Selector::Auto, "vfio-user:/x", &opts, fake.clone())
        .unwrap();
    assert_eq!(b.mediator_name(), "picky");
    assert!(matches!(
        reg.register(Arc::new(Picky {
            vendor: 1,
            released: released.clone()
        })),
        Err(MediateError::Duplicate(_))
    ));
    // In use: cannot unregister; released and unregistrable once the device closes.
    assert!(matches!(
        reg.unregister("picky"),
        Err(MediateError::InUse { users: 1, .. })
    ));
    let users = |name: &str| reg.list().into_iter().find(|m| m.0 == name).unwrap().2;
    assert_eq!(users("picky"), 1);
    drop(b);
    assert!(released.load(Ordering::SeqCst));
    reg.unregister("picky").unwrap();
    assert_eq!(reg.list().len(), 3);
}

#[test]
fn mediated_backend_routes_info_accesses_and_extra_regions() {
    let fake = FakeBackend::standard().unwrap();
    let reg = Registry::new();
    reg.register(Arc::new(Picky {
        vendor: 0x1af4,
        released: Arc::new(AtomicBool::new(false)),
    }))
    .unwrap();
    let b = reg
        .open(
            &"picky".parse().unwrap(),
            "vfio-user:/x",
            &MediatorOptions::default(),
            fake.clone(),
        )
        .unwrap();
    let own = fake.device_info().unwrap().num_regions;
    assert_eq!(b.device_info().unwrap().num_regions, own + 1);
    assert_eq!(b.region_info(own).unwrap().size, 0x1000);
    // BAR 0 loses its mmap areas; BAR 2 keeps them.
    let bar0 = b.region_info(0).unwrap();
    assert!(bar0.mappable_areas().is_empty());
    assert!(!b.region_info(2).unwrap().mappable_areas().is_empty());
    // Handled reads never reach the device; others do.
    fake.take_calls();
    let mut d = [0u8; 4];
    b.region_read(0, 0, &mut d).unwrap();
    assert_eq!(d, [0x5a; 4]);
    b.region_read(0, 4, &mut d).unwrap();
    assert_eq!(fake.take_calls(), vec![Call::Read(0, 4, 4)]);
    // An extra region the mediator does not handle is an error, not a device access.
    let e = b.region_read(own, 0, &mut d).unwrap_err().to_string();
    assert!(e.contains("belongs to mediator picky"), "{e}");
    // Over the vfio-pci device: BAR 0 has no memory slot now.
    let (dev, slots) = device_over(b.clone());
    dev.program_bar(0, 0x1_0000_0000).unwrap();
    dev.enable_memory_and_bus_master();
    assert!(dev.mapped_areas(0).is_empty());
    assert!(slots.live().iter().all(|s| s.0 < 0x1_0000_0000));
}

#[test]
fn trace_traps_counts_and_untraps() {
    let fake = FakeBackend::standard().unwrap();
    let reg = Registry::with_bundled();
    let opts = MediatorOptions {
        trap: vec![BarRange {
            bar: 0,
            offset: 0x5000,
            size: 0x1000,
        }],
        ..Default::default()
    };
    let b = reg
        .open(
            &"trace".parse().unwrap(),
            "vfio-user:/x",
            &opts,
            fake.clone(),
        )
        .unwrap();
    let (dev, _slots) = device_over(b.clone());
    let h = b.handle();
    assert!(matches!(
        h.control("trap", &json!({"bar": 0, "offset": 0x6000, "size": 0x1000})),
        Err(MediateError::NotAttached(_))
    ));
    h.attach(AttachContext {
        traps: TrapHandle::new(&dev),
        memory: Arc::new(NoMemory),
    });
    let base = 0x1_0000_0000;
    dev.program_bar(0, base).unwrap();
    dev.enable_memory_and_bus_master();
    assert_eq!(
        dev.mapped_areas(0),
        vec![(base + 0x4000, 0x1000), (base + 0x6000, 0x6000)]
    );
    let r = h
        .control("trap", &json!({"bar": 0, "offset": 0x6000, "size": 0x1000}))
        .unwrap();
    assert_eq!(
        r["trapped"],
        json!([{"bar": 0, "offset": 0x5000, "size": 0x2000}])
    );
    assert!(r["latency_us"].as_f64().unwrap() >= 0.0);
    dev.bar_write(0, 0x6000, &[1, 2, 3, 4]);
    let mut d = [0u8; 2];
    dev.bar_read(0, 0x5002, &mut d);
    let s = h.stats();
    assert_eq!(s["bar_writes"][0], 1);
    assert_eq!(s["bar_reads"][0], 1);
    h.control("untrap", &json!({"bar": 0, "offset": 0, "size": 0x10000}))
        .unwrap();
    assert_eq!(dev.mapped_areas(0), vec![(base + 0x4000, 0x8000)]);
    // Bad requests say what is wrong.
    let e = h
        .control("trap", &json!({"bar": 0}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"offset\" is missing"), "{e}");
    let e = h
        .control("trap", &json!({"bar": 0, "offset": 1, "size": 0x1000}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not page-aligned"), "{e}");
    let e = h.control("frobnicate", &json!({})).unwrap_err().to_string();
    assert!(e.contains("trap, untrap, trapped and stats"), "{e}");
    // After the device is gone the handle says so.
    drop(dev);
    let e = h
        .control("trap", &json!({"bar": 0, "offset": 0x6000, "size": 0x1000}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is closed"), "{e}");
}
