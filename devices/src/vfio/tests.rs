//! Tests of the vfio-pci device over the fake backend (and one over real KVM).

use std::sync::{Arc, Mutex};

use crate::persist::Persist;
use resources::memslots::{MappingKind, MemSlots};

use super::testing::{Call, FakeBackend, FakeSlots};
use super::{TrapOwner, VfioPciDevice, VfioPciParams};
use crate::bus::Bus;
use crate::pci::msix::testing::RecordingRoutes;
use crate::pci::PciRoot;

mod intx;
mod io_bars;
mod persist;

struct Rig {
    dev: Arc<VfioPciDevice>,
    fake: Arc<FakeBackend>,
    bus: Arc<Bus>,
    slots: Arc<FakeSlots>,
    memslots: Arc<MemSlots>,
    routes: Arc<RecordingRoutes>,
}

fn rig() -> Rig {
    let slots = Arc::new(FakeSlots::default());
    rig_over(slots.clone(), Arc::new(MemSlots::new(slots.clone())))
}

fn rig_over(slots: Arc<FakeSlots>, memslots: Arc<MemSlots>) -> Rig {
    rig_on(FakeBackend::standard().unwrap(), slots, memslots)
}

/// A device over `fake`, with its own bus and routes (GSIs from 32).
fn rig_on(fake: Arc<FakeBackend>, slots: Arc<FakeSlots>, memslots: Arc<MemSlots>) -> Rig {
    let bus = Arc::new(Bus::new());
    let routes = RecordingRoutes::new(32);
    let dev = VfioPciDevice::new(VfioPciParams {
        name: "vf0".into(),
        backend: fake.clone(),
        bus: bus.clone(),
        memslots: memslots.clone(),
        routes: routes.clone(),
    })
    .unwrap();
    Rig {
        dev,
        fake,
        bus,
        slots,
        memslots,
        routes,
    }
}

fn r32(dev: &VfioPciDevice, off: usize) -> u32 {
    let mut d = [0u8; 4];
    dev.read_config(off, &mut d);
    u32::from_le_bytes(d)
}

fn r16(dev: &VfioPciDevice, off: usize) -> u16 {
    let mut d = [0u8; 2];
    dev.read_config(off, &mut d);
    u16::from_le_bytes(d)
}

fn w32(dev: &VfioPciDevice, off: usize, v: u32) {
    dev.write_config(off, &v.to_le_bytes());
}

fn w16(dev: &VfioPciDevice, off: usize, v: u16) {
    dev.write_config(off, &v.to_le_bytes());
}

/// Places BAR0 (64-bit) at `bar0`, BAR2 at `bar2`, and turns memory decoding on.
fn place(dev: &VfioPciDevice, bar0: u64, bar2: u32) {
    w32(dev, 0x10, bar0 as u32);
    w32(dev, 0x14, (bar0 >> 32) as u32);
    w32(dev, 0x18, bar2);
    w16(dev, 0x04, 0x0006);
}

fn bus_line(bus: &Bus, name: &str) -> Option<(u64, u64, u64, u64)> {
    bus.stats()
        .into_iter()
        .find(|s| s.name == name)
        .map(|s| (s.base, s.len, s.reads, s.writes))
}

#[test]
fn identity_comes_from_the_device_and_intx_is_hidden() {
    let Rig { dev, .. } = rig();
    assert_eq!(r32(&dev, 0x00), 0x1042_1af4);
    assert_eq!(r32(&dev, 0x08), 0x0100_0001);
    assert_eq!(
        (r32(&dev, 0x0c) >> 16) & 0xff,
        0,
        "multi-function bit cleared"
    );
    assert_eq!(r32(&dev, 0x2c), 0x0002_1af4);
    assert_eq!(r32(&dev, 0x30), 0, "no expansion ROM");
    w32(&dev, 0x3c, 0xffff_ffff);
    assert_eq!(r32(&dev, 0x3c) & 0xffff, 0x00ff, "line writable, pin 0");
    let mut b = [0u8; 1];
    dev.read_config(0x3d, &mut b);
    assert_eq!(b[0], 0);
    assert_eq!(r16(&dev, 0x06) & 0x10, 0x10, "capability list");
}

#[test]
fn bar_sizing_returns_size_masks() {
    let Rig { dev, .. } = rig();
    assert_eq!(r32(&dev, 0x10), 0xc, "64-bit prefetchable, address 0");
    for reg in 0..6 {
        w32(&dev, 0x10 + 4 * reg, u32::MAX);
    }
    let got: Vec<u32> = (0..6).map(|r| r32(&dev, 0x10 + 4 * r)).collect();
    assert_eq!(
        got,
        vec![0xffff_000c, 0xffff_ffff, 0xffff_c000, 0, 0xffff_ffe1, 0]
    );
    // Sizing with decoding on must not place anything at the sizing pattern.
    w16(&dev, 0x04, 0x0002);
    assert!(dev.bar_stats().iter().all(|s| s.base.is_none()));
}

#[test]
fn programming_places_bars_on_the_bus_and_in_memslots() {
    let Rig {
        dev,
        fake,
        bus,
        slots,
        memslots,
        ..
    } = rig();
    place(&dev, 0x1_0000_0000, 0xc000_0000);
    assert_eq!(bus_line(&bus, "vf0/bar0").unwrap().0, 0x1_0000_0000);
    assert_eq!(bus_line(&bus, "vf0/bar0").unwrap().1, 0x10000);
    assert_eq!(bus_line(&bus, "vf0/bar2").unwrap().0, 0xc000_0000);
    assert_eq!(dev.mapped_areas(0), vec![(0x1_0000_4000, 0x8000)]);
    // BAR2: everything but the MSI-X table page (0x2000) and PBA page (0x3000).
    assert_eq!(dev.mapped_areas(2), vec![(0xc000_0000, 0x2000)]);
    let live: Vec<_> = slots.live().iter().map(|s| (s.0, s.1)).collect();
    assert_eq!(live, vec![(0xc000_0000, 0x2000), (0x1_0000_4000, 0x8000)]);
    for (_, m) in memslots.mappings() {
        assert_eq!(
            m.kind,
            MappingKind::Device {
                owner: "vf0".into()
            }
        );
    }
    // The command bits reached the device.
    assert_eq!(fake.config()[4] & 0x06, 0x06);
    // Turning decoding off removes everything.
    w16(&dev, 0x04, 0x0004);
    assert!(slots.live().is_empty());
    assert!(bus_line(&bus, "vf0/bar0").is_none());
    assert_eq!(fake.config()[4] & 0x06, 0x04);
}

#[test]
fn relocation_moves_bus_range_and_memslots() {
    let Rig {
        dev, bus, slots, ..
    } = rig();
    place(&dev, 0x1_0000_0000, 0xc000_0000);
    // The guest moves BAR0 with decoding on: low dword first, then high.
    w32(&dev, 0x10, 0x0002_0000);
    w32(&dev, 0x14, 0x2);
    assert_eq!(bus_line(&bus, "vf0/bar0").unwrap().0, 0x2_0002_0000);
    assert_eq!(dev.mapped_areas(0), vec![(0x2_0002_4000, 0x8000)]);
    let live: Vec<_> = slots.live().iter().map(|s| (s.0, s.1)).collect();
    assert_eq!(live, vec![(0xc000_0000, 0x2000), (0x2_0002_4000, 0x8000)]);
    // And BAR2 with a byte write to its second byte.
    dev.write_config(0x19, &[0x40]);
    assert_eq!(dev.mapped_areas(2), vec![(0xc000_4000, 0x2000)]);
    assert_eq!(
        bus.stats()
            .iter()
            .filter(|s| s.name.starts_with("vf0/"))
            .count(),
        2
    );
    // Re-applying a BAR's slots keeps the same set.
    dev.remap_bar(0).unwrap();
    assert_eq!(dev.mapped_areas(0), vec![(0x2_0002_4000, 0x8000)]);
    assert!(dev.remap_bar(1).is_err());
    // A BAR moved onto another one's range stays off the bus; the other is untouched.
    w32(&dev, 0x18, 0x0);
    w32(&dev, 0x14, 0);
    w32(&dev, 0x10, 0xc000_0000);
    w32(&dev, 0x18, 0xc000_8000);
    assert_eq!(bus_line(&bus, "vf0/bar0").unwrap().0, 0xc000_0000);
    assert!(bus_line(&bus, "vf0/bar2").is_none());
    assert!(dev.mapped_areas(2).is_empty());
    assert_eq!(dev.mapped_areas(0), vec![(0xc000_4000, 0x8000)]);
    // Moving it away again places it.
    w32(&dev, 0x18, 0xc001_0000);
    assert_eq!(bus_line(&bus, "vf0/bar2").unwrap().0, 0xc001_0000);
}

#[test]
fn firmware_style_programming() {
    let Rig { dev, bus, .. } = rig();
    dev.program_bar(0, 0x1_0000_0000).unwrap();
    dev.program_bar(2, 0xc000_0000).unwrap();
    assert!(dev.program_bar(2, 0xc000_1000).is_err(), "misaligned");
    assert!(
        dev.program_bar(4, 0x1_0000).is_err(),
        "I/O BAR beyond the port space"
    );
    dev.program_bar(4, 0xc000).unwrap();
    assert!(
        dev.program_bar(2, 0x1_0000_0000).is_err(),
        "32-bit BAR above 4 GiB"
    );
    assert!(bus_line(&bus, "vf0/bar0").is_none(), "decoding still off");
    dev.enable_memory_and_bus_master();
    assert_eq!(r16(&dev, 0x04), 0x0006);
    assert_eq!(bus_line(&bus, "vf0/bar0").unwrap().0, 0x1_0000_0000);
    assert_eq!(r32(&dev, 0x10), 0xc);
    assert_eq!(r32(&dev, 0x14), 1);
    assert!(
        bus_line(&bus, "vf0/bar4").is_none(),
        "I/O decoding still off"
    );
    dev.enable_io_decoding();
    assert_eq!(r16(&dev, 0x04), 0x0007);
    assert_eq!(bus_line(&bus, "vf0/bar4").unwrap().0, 0xc000);
    assert_eq!(r32(&dev, 0x20), 0xc001);
}

#[test]
fn command_and_status() {
    let Rig { dev, fake, .. } = rig();
    w16(&dev, 0x04, 0xffff);
    assert_eq!(r16(&dev, 0x04), 0x0407);
    let command = fake.config()[4..6].to_vec();
    assert_eq!(command, [0x07, 0x04]);
    fake.take_calls();
    w32(&dev, 0x04, 0xf900_0407);
    assert_eq!(fake.take_calls(), vec![Call::Write(7, 6, vec![0x00, 0xf9])]);
    dev.write_config(0x06, &[0x10]); // cap-list bit: read only, nothing forwarded
    assert!(fake.take_calls().is_empty());
}

#[test]
fn capability_list_is_walked_and_filtered() {
    let Rig { dev, fake, .. } = rig();
    let mut chain = Vec::new();
    let mut ptr = r32(&dev, 0x34) as usize & 0xfc;
    while ptr != 0 && chain.len() < 10 {
        let head = r16(&dev, ptr);
        chain.push((ptr, head as u8));
        ptr = usize::from(head >> 8);
    }
    assert_eq!(
        chain,
        vec![
            (0x40, 0x01),
            (0x50, 0x11),
            (0x60, 0x09),
            (0x80, 0x05),
            (0xa0, 0x10)
        ]
    );
    // Vendor capability body: live from the device; writes dropped.
    assert_eq!(r32(&dev, 0x64), 0xddcc_bbaa);
    fake.take_calls();
    w32(&dev, 0x64, 0);
    w32(&dev, 0x40, 0);
    assert!(fake.take_calls().is_empty());
    assert_eq!(r32(&dev, 0x64), 0xddcc_bbaa);
    // Device-specific bytes read live.
    assert_eq!(r32(&dev, 0xc0), 0xc3c2_c1c0);
    // MSI-X capability: size 8, table in BAR2 at 0x2000, PBA at 0x3000.
    assert_eq!(r32(&dev, 0x50), 0x0007_6011);
    assert_eq!(r32(&dev, 0x54), 0x2002);
    assert_eq!(r32(&dev, 0x58), 0x3002);
    // MSI: 64-bit, per-vector mask, 4 vectors capable.
    assert_eq!(r32(&dev, 0x80), 0x0184_a005);
}

#[test]
fn guest_flr_resets_the_device_and_the_function_state() {
    let Rig { dev, fake, .. } = rig();
    place(&dev, 0xe000_0000, 0xd000_0000);
    w16(&dev, 0x04, 0x0006);
    w16(&dev, 0x52, 0x8000); // MSI-X on
    fake.take_calls();
    // Other Device Control bits: dropped, nothing reset.
    w16(&dev, 0xa8, 0x0010);
    assert!(fake.take_calls().is_empty());
    // Initiate FLR (bit 15): MSI-X off at the device, command cleared, then the reset.
    w16(&dev, 0xa8, 0x8000);
    let calls = fake.take_calls();
    assert_eq!(calls.last(), Some(&Call::Reset), "{calls:?}");
    assert!(
        calls.contains(&Call::DisableIrqs(2)),
        "MSI-X (index 2) off: {calls:?}"
    );
    assert_eq!(r16(&dev, 0x04), 0, "command register after FLR");
    assert_eq!(r16(&dev, 0x52) & 0x8000, 0, "MSI-X enable after FLR");
    // A byte write to the upper half of Device Control initiates it too.
    dev.write_config(0xa9, &[0x80]);
    assert_eq!(fake.take_calls().last(), Some(&Call::Reset));
}

/// The eventfds of the one MSI-X enable among `calls`.
fn msix_fds(calls: &[Call]) -> Vec<i32> {
    let enables: Vec<&Vec<Option<i32>>> = calls
        .iter()
        .filter_map(|c| match c {
            Call::SetIrqs(2, 0, fds) => Some(fds),
            _ => None,
        })
        .collect();
    match enables[..] {
        [fds] => fds.iter().map(|f| f.unwrap()).collect(),
        _ => panic!("expected one MSI-X enable: {calls:?}"),
    }
}

/// Writes MSI-X table entry `i` through the bus at BAR2 placed at 0xc000_0000.
fn msix_entry(bus: &Bus, i: u64, addr: u64, data: u32, masked: bool) {
    let base = 0xc000_2000 + 16 * i;
    assert!(bus.mmio_write(base, &addr.to_le_bytes()));
    assert!(bus.mmio_write(base + 8, &data.to_le_bytes()));
    assert!(bus.mmio_write(base + 12, &u32::from(masked).to_le_bytes()));
}

#[test]
fn msix_table_writes_program_routes_and_eventfds() {
    let Rig {
        dev,
        fake,
        bus,
        routes,
        ..
    } = rig();
    place(&dev, 0x1_0000_0000, 0xc000_0000);
    assert_eq!(dev.gsis(), (32..40).collect::<Vec<_>>());
    msix_entry(&bus, 0, 0xfee0_0000, 0x4041, false);
    msix_entry(&bus, 1, 0xfee0_1000, 0x4042, true);
    fake.take_calls();
    w16(&dev, 0x52, 0x8007); // enable
    let calls = fake.take_calls();
    let fds = msix_fds(&calls);
    assert_eq!(fds.len(), 8);
    {
        let s = routes.lock();
        assert_eq!(s.routes[&32].addr, 0xfee0_0000);
        assert_eq!(s.routes[&32].data, 0x4041);
        assert_eq!(s.enabled.keys().copied().collect::<Vec<_>>(), vec![32]);
    }
    assert_eq!(r16(&dev, 0x52), 0x8007);
    // The table reads back from the emulation, not from the device's BAR.
    let mut d = [0u8; 4];
    assert!(bus.mmio_read(0xc000_2008, &mut d));
    assert_eq!(u32::from_le_bytes(d), 0x4041);
    assert!(fake.take_calls().is_empty());
    // Unmask vector 1, mask vector 0.
    assert!(bus.mmio_write(0xc000_201c, &0u32.to_le_bytes()));
    assert!(bus.mmio_write(0xc000_200c, &1u32.to_le_bytes()));
    assert_eq!(
        routes.lock().enabled.keys().copied().collect::<Vec<_>>(),
        vec![33]
    );
    fake.take_calls();
    // Vector 0 fires while masked: pending in the PBA (the device signals its eventfd).
    dev.bar_read(2, 0x3000, &mut d);
    assert_eq!(d, [0; 4]);
    let one = 1u64.to_ne_bytes();
    // SAFETY: `fds[0]` is the device's live eventfd for vector 0; writing 8 bytes from a
    // valid buffer only adds to its counter.
    let n = unsafe { libc::write(fds[0], one.as_ptr().cast(), one.len()) };
    assert_eq!(n, 8);
    dev.bar_read(2, 0x3000, &mut d);
    assert_eq!(d, [1, 0, 0, 0]);
    // Function mask stops everything; disable tells the device.
    w16(&dev, 0x52, 0xc007);
    assert!(routes.lock().enabled.is_empty());
    fake.take_calls();
    w16(&dev, 0x52, 0x0007);
    assert_eq!(
        fake.take_calls(),
        vec![Call::Write(7, 0x52, vec![0x07, 0x00]), Call::DisableIrqs(2)]
    );
    // The BAR2 counters saw the trapped table accesses.
    let bar2 = dev.bar_stats().into_iter().find(|s| s.index == 2).unwrap();
    assert_eq!((bar2.reads, bar2.writes), (3, 8));
}

/// The MSI-X state the guest programs reaches the device: the control word (enable,
/// function mask) in its configuration space after the eventfds, each mask change of a
/// vector in its table's vector-control word and as a SET_IRQS mask/unmask of that one
/// vector; address and data stay the VMM's.
#[test]
fn msix_enable_function_mask_and_vector_masks_reach_the_device() {
    let Rig { dev, fake, bus, .. } = rig();
    place(&dev, 0x1_0000_0000, 0xc000_0000);
    fake.take_calls();
    msix_entry(&bus, 0, 0xfee0_0000, 0x4041, false);
    msix_entry(&bus, 1, 0xfee0_1000, 0x4042, true);
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Write(2, 0x200c, vec![0; 4]),
            Call::MaskIrqs(2, 0, 1, false)
        ],
        "only vector 0's unmask, even with MSI-X off; vector 1 was masked already"
    );
    w16(&dev, 0x52, 0xc007); // enable, function masked
    let calls = fake.take_calls();
    assert_eq!(msix_fds(&calls).len(), 8);
    assert_eq!(
        calls.last(),
        Some(&Call::Write(7, 0x52, vec![0x07, 0xc0])),
        "the control word follows the eventfds: {calls:?}"
    );
    assert_eq!(fake.config()[0x52..0x54], [0x07, 0xc0]);
    w16(&dev, 0x52, 0x8007); // function mask off
    assert_eq!(
        fake.take_calls(),
        vec![Call::Write(7, 0x52, vec![0x07, 0x80])]
    );
    assert_eq!(fake.config()[0x52..0x54], [0x07, 0x80]);
    // A byte write of the enable half alone still sends the whole control word.
    dev.write_config(0x53, &[0x80]);
    assert_eq!(
        fake.take_calls(),
        vec![Call::Write(7, 0x52, vec![0x07, 0x80])]
    );
    // Writes of the capability's read-only registers are not passed on.
    w32(&dev, 0x54, 0xdead_beef);
    assert!(fake.take_calls().is_empty());
    // Unmask vector 1 with a qword write of data and vector control.
    let qword = 0x4042u64; // data 0x4042, vector control 0 in the high half
    assert!(bus.mmio_write(0xc000_2018, &qword.to_le_bytes()));
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Write(2, 0x201c, vec![0; 4]),
            Call::MaskIrqs(2, 1, 1, false)
        ]
    );
    // Mask it with a byte write; the same mask again changes nothing.
    assert!(bus.mmio_write(0xc000_201c, &[1]));
    assert!(bus.mmio_write(0xc000_201c, &[1]));
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Write(2, 0x201c, vec![1, 0, 0, 0]),
            Call::MaskIrqs(2, 1, 1, true)
        ]
    );
    // The device's table holds the masks, not the addresses.
    let mut dev_table = [0u8; 32];
    std::os::unix::fs::FileExt::read_exact_at(&fake.regions[2].file, &mut dev_table, 0x2000)
        .unwrap();
    assert_eq!(
        dev_table[0..12],
        [0; 12],
        "address and data stay in the VMM"
    );
    assert_eq!((dev_table[12], dev_table[28]), (0, 1));
}

/// A device whose interrupt info does not say MSI-X is maskable (libvfio-user, kernel
/// VFIO) gets the mask changes through its table only, never as SET_IRQS.
#[test]
fn without_maskable_irq_info_masks_go_to_the_table_only() {
    let slots = Arc::new(FakeSlots::default());
    let Rig { dev, fake, bus, .. } = rig_on(
        FakeBackend::not_maskable().unwrap(),
        slots.clone(),
        Arc::new(MemSlots::new(slots)),
    );
    place(&dev, 0x1_0000_0000, 0xc000_0000);
    w16(&dev, 0x52, 0x8007);
    fake.take_calls();
    msix_entry(&bus, 3, 0xfee0_0000, 0x4041, false);
    assert!(bus.mmio_write(0xc000_203c, &[1]));
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Write(2, 0x203c, vec![0; 4]),
            Call::Write(2, 0x203c, vec![1, 0, 0, 0])
        ]
    );
    // MSI's mask bits reach the device in its capability only.
    w16(&dev, 0x52, 0x0007);
    w32(&dev, 0x90, 0b10);
    let calls = fake.take_calls();
    assert!(
        !calls.iter().any(|c| matches!(c, Call::MaskIrqs(..))),
        "{calls:?}"
    );
    assert!(
        calls.contains(&Call::Write(7, 0x90, vec![2, 0, 0, 0])),
        "{calls:?}"
    );
}

/// The test-only switch: with forwarding off, nothing of the guest's MSI-X state reaches
/// the device (only the eventfds and the disable, as before it was passed on).
#[test]
fn the_forwarding_switch_keeps_the_msix_state_in_the_vmm() {
    let Rig { dev, fake, bus, .. } = rig();
    place(&dev, 0x1_0000_0000, 0xc000_0000);
    dev.set_irq_forwarding(false);
    fake.take_calls();
    msix_entry(&bus, 0, 0xfee0_0000, 0x4041, false);
    w16(&dev, 0x52, 0x8007);
    let calls = fake.take_calls();
    assert!(matches!(&calls[..], [Call::SetIrqs(2, 0, _)]), "{calls:?}");
    assert_eq!(fake.config()[0x52..0x54], [0x07, 0x00], "never enabled");
    dev.set_irq_forwarding(true);
    assert!(bus.mmio_write(0xc000_201c, &[0]));
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Write(2, 0x201c, vec![0; 4]),
            Call::MaskIrqs(2, 1, 1, false)
        ]
    );
}

/// MSI: the guest's capability writes reach the device as written, after the eventfds
/// on enable; mask-bit changes are SET_IRQS mask/unmask of each vector; the pending bits
/// read include the device's own (within the enabled vectors' bits).
#[test]
fn msi_writes_masks_and_pending_bits_reach_the_device() {
    let Rig { dev, fake, .. } = rig();
    w32(&dev, 0x84, 0xfee0_0000);
    w16(&dev, 0x8c, 0x30);
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Write(7, 0x84, 0xfee0_0000u32.to_le_bytes().to_vec()),
            Call::Write(7, 0x8c, vec![0x30, 0])
        ]
    );
    w16(&dev, 0x82, 0x0184 | 0x21); // enable, 4 vectors
    let calls = fake.take_calls();
    assert!(
        matches!(&calls[..], [Call::SetIrqs(1, 0, fds), Call::Write(7, 0x82, w)]
            if fds.len() == 4 && w == &vec![0xa5, 0x01]),
        "{calls:?}"
    );
    w32(&dev, 0x90, 0b0110); // mask vectors 1 and 2
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Write(7, 0x90, vec![6, 0, 0, 0]),
            Call::MaskIrqs(1, 1, 1, true),
            Call::MaskIrqs(1, 2, 1, true)
        ]
    );
    w32(&dev, 0x90, 0b0100); // unmask vector 1
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Write(7, 0x90, vec![4, 0, 0, 0]),
            Call::MaskIrqs(1, 1, 1, false)
        ]
    );
    // The device holds vector 2 pending (and garbage past its 4 vectors).
    fake.config()[0x94] = 0xf4;
    assert_eq!(r32(&dev, 0x94), 0b0100);
    // Disabling reaches the device before its eventfds go.
    w16(&dev, 0x82, 0x01a4);
    assert_eq!(
        fake.take_calls(),
        vec![Call::Write(7, 0x82, vec![0xa4, 0x01]), Call::DisableIrqs(1)]
    );
}

/// The PBA the guest reads has a vector pending if the VMM saw its eventfd while it was
/// masked or the device holds it pending in its own PBA.
#[test]
fn pba_reads_include_the_devices_pending_bits() {
    use std::os::unix::fs::FileExt;
    let Rig { dev, fake, bus, .. } = rig();
    place(&dev, 0x1_0000_0000, 0xc000_0000);
    w16(&dev, 0x52, 0x8007);
    let fds = msix_fds(&fake.take_calls());
    // The device pends vector 2 (and a bit past its 8 vectors, which must not show).
    fake.regions[2]
        .file
        .write_all_at(&[0b100, 0b1], 0x3000)
        .unwrap();
    let mut q = [0u8; 8];
    assert!(bus.mmio_read(0xc000_3000, &mut q));
    assert_eq!(u64::from_le_bytes(q), 0b100);
    assert_eq!(fake.take_calls(), vec![Call::Read(2, 0x3000, 8)]);
    // Vector 0 signalled while masked: pending on the VMM's side; both show.
    let one = 1u64.to_ne_bytes();
    // SAFETY: `fds[0]` is the device's live eventfd for vector 0; writing 8 bytes from a
    // valid buffer only adds to its counter.
    assert_eq!(unsafe { libc::write(fds[0], one.as_ptr().cast(), 8) }, 8);
    let mut b = [0u8; 1];
    assert!(bus.mmio_read(0xc000_3000, &mut b));
    assert_eq!(b[0], 0b101);
    // A device that cannot be read leaves the VMM's own bits.
    fake.dead.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(bus.mmio_read(0xc000_3000, &mut b));
    assert_eq!(b[0], 0b001);
}

#[test]
fn msi_and_msix_exclude_each_other() {
    let Rig {
        dev, fake, routes, ..
    } = rig();
    w32(&dev, 0x84, 0xfee0_0000);
    w16(&dev, 0x8c, 0x30);
    fake.take_calls();
    w16(&dev, 0x82, 0x0184 | 0x21); // enable, 4 vectors
    let calls = fake.take_calls();
    assert!(
        matches!(&calls[..], [Call::SetIrqs(1, 0, fds), Call::Write(7, 0x82, _)] if fds.len() == 4),
        "{calls:?}"
    );
    assert_eq!(routes.lock().enabled.len(), 4);
    assert_eq!(routes.lock().routes[&35].data, 0x33);
    w16(&dev, 0x52, 0x8007); // MSI-X on: MSI goes off, in the device too
    let calls = fake.take_calls();
    assert_eq!(
        calls[0],
        Call::Write(7, 0x82, 0x01a4u16.to_le_bytes().to_vec())
    );
    assert_eq!(calls[1], Call::DisableIrqs(1));
    assert!(matches!(&calls[2], Call::SetIrqs(2, 0, _)));
    assert_eq!(calls[3], Call::Write(7, 0x52, vec![0x07, 0x80]));
    assert_eq!(r16(&dev, 0x82) & 1, 0);
    assert!(
        routes.lock().enabled.is_empty(),
        "every MSI-X vector starts masked"
    );
}

#[test]
fn trapped_accesses_reach_the_backend_with_offsets_and_counts() {
    let Rig { dev, fake, bus, .. } = rig();
    fake.regions[0].file.set_len(0x10000).unwrap();
    use std::os::unix::fs::FileExt;
    fake.regions[0]
        .file
        .write_all_at(&0x1122_3344u32.to_le_bytes(), 0x10)
        .unwrap();
    place(&dev, 0x1_0000_0000, 0xc000_0000);
    fake.take_calls();
    let mut d = [0u8; 4];
    assert!(bus.mmio_read(0x1_0000_0010, &mut d));
    assert_eq!(u32::from_le_bytes(d), 0x1122_3344);
    assert!(bus.mmio_write(0x1_0000_c000, &[1, 2]));
    // BAR2 outside the table and PBA but in a trapped page.
    assert!(bus.mmio_write(0xc000_2800, &[9]));
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Read(0, 0x10, 4),
            Call::Write(0, 0xc000, vec![1, 2]),
            Call::Write(2, 0x2800, vec![9]),
        ]
    );
    let stats = dev.bar_stats();
    let bar0 = stats.iter().find(|s| s.index == 0).unwrap();
    assert_eq!(
        (bar0.base, bar0.reads, bar0.writes),
        (Some(0x1_0000_0000), 1, 1)
    );
    assert_eq!(bus_line(&bus, "vf0/bar0").unwrap().2, 1);
    // Through DeviceMmio by base, as a bus holding the device itself would call it.
    use vm_device::bus::MmioAddress;
    use vm_device::DeviceMmio;
    dev.mmio_read(MmioAddress(0x1_0000_0000), 0x10, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x1122_3344);
    dev.mmio_read(MmioAddress(0x5000), 0, &mut d);
    assert_eq!(d, [0xff; 4]);
}

#[test]
fn dead_backend_reads_all_ones() {
    let Rig { dev, fake, bus, .. } = rig();
    place(&dev, 0x1_0000_0000, 0xc000_0000);
    fake.dead.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut d = [0u8; 4];
    assert!(bus.mmio_read(0x1_0000_0010, &mut d));
    assert_eq!(d, [0xff; 4]);
    assert_eq!(r32(&dev, 0xc0), u32::MAX);
    assert_eq!(r32(&dev, 0x00), 0x1042_1af4, "identity is kept");
    w16(&dev, 0x04, 0);
    assert!(dev.backend_errors() >= 3);
}

#[test]
fn pci_root_reaches_the_device() {
    let Rig { dev, .. } = rig();
    let root = PciRoot::new();
    root.add(3, 0, Arc::new(Mutex::new(dev.clone()))).unwrap();
    use vm_device::bus::PioAddress;
    use vm_device::DevicePio;
    root.pio_write(
        PioAddress(0xcf8),
        0,
        &(0x8000_0000u32 | 3 << 11).to_le_bytes(),
    );
    let mut d = [0u8; 4];
    root.pio_read(PioAddress(0xcf8), 4, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x1042_1af4);
}

/// xorshift64*: deterministic pseudo-random numbers.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn garbage_config_writes_and_bar_accesses_never_panic() {
    let Rig {
        dev,
        bus,
        routes,
        fake,
        ..
    } = rig();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut route_calls, mut irq_calls, mut placed) = (0, 0, 0);
    let sizes = [0usize, 1, 2, 3, 4, 8];
    for n in 0..300_000u32 {
        let r = rng.next();
        let len = sizes[(r % 6) as usize];
        // Mostly inside config space, some past it.
        let offset = ((r >> 8) % 0x110) as usize;
        let data = (rng.next()).to_le_bytes();
        dev.write_config(offset, &data[..len]);
        if n % 4 == 0 {
            let mut d = [0u8; 8];
            dev.read_config(offset, &mut d[..len]);
        }
        if n % 8 == 0 {
            let bar = ((r >> 20) % 7) as usize;
            let off = (r >> 24) % 0x11000;
            let mut d = [0u8; 8];
            if r & 1 == 0 {
                dev.bar_read(bar, off, &mut d[..len]);
            } else {
                dev.bar_write(bar, off, &data[..len]);
            }
            let _ = bus.mmio_read(0xc000_0000 + (r >> 40) % 0x4000, &mut d[..len]);
        }
        if n % 1000 == 0 {
            let mut r = routes.lock();
            route_calls += r.log.len();
            r.log.clear();
            irq_calls += fake
                .take_calls()
                .iter()
                .filter(|c| matches!(c, Call::SetIrqs(..)))
                .count();
            placed += dev.bar_stats().iter().filter(|s| s.base.is_some()).count();
        }
    }
    eprintln!(
        "sweep: {route_calls} route calls, {irq_calls} irq enables, {placed} BARs seen placed"
    );
    assert!(
        route_calls > 0 && irq_calls > 0 && placed > 0,
        "the sweep reached the device"
    );
    assert_eq!(r32(&dev, 0x00), 0x1042_1af4);
    assert_eq!(r32(&dev, 0x08), 0x0100_0001);
    assert_eq!(r32(&dev, 0x2c), 0x0002_1af4);
    assert_eq!(r32(&dev, 0x0c) >> 16 & 0xff, 0);
    assert_eq!(r32(&dev, 0x10) & 0xf, 0xc, "BAR0 type unchanged");
}

#[test]
fn dropping_the_device_releases_bus_and_memslots() {
    let Rig {
        dev,
        bus,
        slots,
        memslots,
        fake,
        ..
    } = rig();
    place(&dev, 0x1_0000_0000, 0xc000_0000);
    w16(&dev, 0x52, 0x8007);
    fake.take_calls();
    drop(dev);
    assert!(slots.live().is_empty());
    assert!(memslots.mappings().is_empty());
    assert!(bus.stats().iter().all(|s| !s.name.starts_with("vf0")));
    assert_eq!(
        fake.take_calls(),
        vec![Call::Write(7, 0x52, vec![0x07, 0x00]), Call::DisableIrqs(2)]
    );
}

/// Against real KVM: the sparse area goes into a real memory slot and follows the BAR.
#[test]
fn real_kvm_memslot_follows_the_bar() {
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let vm = Arc::new(kvm.create_vm().expect("create VM"));
    let memslots = Arc::new(MemSlots::new(vm));
    let Rig { dev, fake, .. } = rig_over(Arc::new(FakeSlots::default()), memslots.clone());
    place(&dev, 0x1_0000_0000, 0xc000_0000);
    let bar0: Vec<_> = memslots
        .mappings()
        .into_iter()
        .filter(|(_, m)| m.gpa >= 0x1_0000_0000)
        .collect();
    assert_eq!(bar0.len(), 1);
    let (_, m) = &bar0[0];
    assert_eq!((m.gpa, m.size), (0x1_0000_4000, 0x8000));
    // The slot's host memory is the device's: a write through it is in the region file.
    // SAFETY: `host_addr` points at the live 0x8000-byte shared mapping of BAR0's sparse
    // area; a volatile write of 4 bytes inside it is valid.
    unsafe { std::ptr::write_volatile((m.host_addr + 0x100) as *mut u32, 0xfeed_beef) };
    let mut d = [0u8; 4];
    use std::os::unix::fs::FileExt;
    fake.regions[0].file.read_exact_at(&mut d, 0x4100).unwrap();
    assert_eq!(u32::from_le_bytes(d), 0xfeed_beef);
    // Move the BAR: the slot moves with it.
    w32(&dev, 0x14, 0x3);
    let gpas: Vec<_> = memslots
        .mappings()
        .iter()
        .map(|(_, m)| (m.gpa, m.size))
        .collect();
    assert_eq!(gpas, vec![(0xc000_0000, 0x2000), (0x3_0000_4000, 0x8000)]);
    drop(dev);
    assert!(memslots.mappings().is_empty());
}

/// A guest programming a BAR through 0xCF8/0xCFC: the configuration write arrives while the
/// vCPU is inside `Bus::pio_write`, and placing the BAR registers it on the same bus.
/// Ignored: `Bus` (devices/src/bus.rs) holds its lock while it calls the device, so
/// `register_mmio` from inside a dispatch never gets the write lock. Un-ignore once `Bus`
/// releases the lock before calling devices.
#[test]
fn bar_programming_through_the_bus() {
    use vm_device::bus::PioAddress;
    let Rig { dev, bus, .. } = rig();
    let root = Arc::new(PciRoot::new());
    root.add(3, 0, Arc::new(Mutex::new(dev.clone()))).unwrap();
    bus.register_pio("pci", 0xcf8, 8, root).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let b = bus.clone();
    std::thread::spawn(move || {
        let cfg = |reg: u32, v: u32| {
            b.pio_write(0xcf8, &(0x8000_0000u32 | 3 << 11 | reg).to_le_bytes());
            b.pio_write(0xcfc, &v.to_le_bytes());
        };
        cfg(0x18, 0xc000_0000);
        cfg(0x04, 0x0006);
        let _ = PioAddress(0);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(std::time::Duration::from_secs(5))
        .expect("BAR placement from a config write through the bus deadlocked");
    assert_eq!(dev.mapped_areas(2), vec![(0xc000_0000, 0x2000)]);
}

/// Each owner lifts only its own traps: a page trapped by both stays trapped until both
/// have untrapped it, and the device's state carries only the device's traps.
#[test]
fn device_and_local_traps_are_lifted_by_their_owner_and_only_device_traps_are_saved() {
    let Rig { dev, .. } = rig();
    let b = 0x1_0000_0000;
    place(&dev, b, 0xc000_0000);
    dev.trap(0, 0x6000, 0x2000, TrapOwner::Device).unwrap();
    dev.trap(0, 0x7000, 0x2000, TrapOwner::Local).unwrap();
    assert_eq!(dev.trapped(0), vec![(0x6000, 0x3000)]);
    assert_eq!(
        dev.mapped_areas(0),
        vec![(b + 0x4000, 0x2000), (b + 0x9000, 0x3000)]
    );
    let saved = dev.save();
    assert_eq!(saved.traps.len(), 1);
    assert_eq!(saved.traps[0].ranges, vec![(0x6000, 0x2000)]);
    // The device's untrap leaves the local trap's pages trapped.
    dev.untrap(0, 0x6000, 0x2000, TrapOwner::Device).unwrap();
    assert_eq!(dev.trapped(0), vec![(0x7000, 0x2000)]);
    assert_eq!(
        dev.mapped_areas(0),
        vec![(b + 0x4000, 0x3000), (b + 0x9000, 0x3000)]
    );
    assert!(dev.save().traps.is_empty(), "a local trap is not saved");
    dev.untrap(0, 0x7000, 0x2000, TrapOwner::Local).unwrap();
    assert!(dev.trapped(0).is_empty());
    assert_eq!(dev.mapped_areas(0), vec![(b + 0x4000, 0x8000)]);
}

/// Run-time trap and untrap change only the slots covering the range, and the trapped pages
/// reach the backend.
#[test]
fn trap_punches_and_untrap_merges_slots() {
    let Rig {
        dev, fake, slots, ..
    } = rig();
    let b = 0x1_0000_0000;
    place(&dev, b, 0xc000_0000);
    assert_eq!(dev.mapped_areas(0), vec![(b + 0x4000, 0x8000)]);
    dev.trap(0, 0x6000, 0x1000, TrapOwner::Device).unwrap();
    assert_eq!(
        dev.mapped_areas(0),
        vec![(b + 0x4000, 0x2000), (b + 0x7000, 0x5000)]
    );
    assert_eq!(dev.trapped(0), vec![(0x6000, 0x1000)]);
    fake.take_calls();
    dev.bar_write(0, 0x6008, &[1, 2, 3, 4]);
    assert_eq!(
        fake.take_calls(),
        vec![Call::Write(0, 0x6008, vec![1, 2, 3, 4])]
    );
    // Trapping pages that are not mappable (or already trapped) changes no slot.
    dev.trap(0, 0, 0x2000, TrapOwner::Device).unwrap();
    dev.trap(0, 0x6000, 0x1000, TrapOwner::Device).unwrap();
    assert_eq!(dev.mapped_areas(0).len(), 2);
    // Untrapping merges back into one slot; BAR2's slots were never touched.
    dev.untrap(0, 0, 0x10000, TrapOwner::Device).unwrap();
    assert_eq!(dev.mapped_areas(0), vec![(b + 0x4000, 0x8000)]);
    assert!(dev.trapped(0).is_empty());
    assert_eq!(dev.mapped_areas(2), vec![(0xc000_0000, 0x2000)]);
    // The MSI-X pages stay trapped whatever a mediator untraps.
    dev.untrap(2, 0, 0x4000, TrapOwner::Device).unwrap();
    assert_eq!(dev.mapped_areas(2), vec![(0xc000_0000, 0x2000)]);
    // Bad ranges are refused with the reason.
    for (bar, off, size) in [(0, 0x10, 0x1000), (0, 0x1000, 0x10), (0, 0xf000, 0x2000)] {
        let e = dev
            .trap(bar, off, size, TrapOwner::Device)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not page-aligned inside BAR 0"), "{e}");
    }
    assert!(dev.trap(1, 0, 0x1000, TrapOwner::Device).is_err());
    assert!(dev.trap(0, 0, 0, TrapOwner::Device).is_err());
    // Traps survive relocation and decoding off/on.
    dev.trap(0, 0x5000, 0x1000, TrapOwner::Device).unwrap();
    w32(&dev, 0x14, 0x2);
    let b2 = 0x2_0000_0000;
    assert_eq!(
        dev.mapped_areas(0),
        vec![(b2 + 0x4000, 0x1000), (b2 + 0x6000, 0x6000)]
    );
    w16(&dev, 0x04, 0x0004);
    assert!(slots.live().is_empty());
    w16(&dev, 0x04, 0x0006);
    assert_eq!(
        dev.mapped_areas(0),
        vec![(b2 + 0x4000, 0x1000), (b2 + 0x6000, 0x6000)]
    );
}

/// Random trap/untrap sequences: the slots always equal the mappable pages minus the
/// trapped ones, merged, and never overlap.
#[test]
fn random_trap_untrap_keeps_slots_exact() {
    let Rig { dev, slots, .. } = rig();
    let b = 0x1_0000_0000;
    place(&dev, b, 0xc000_0000);
    let mut trapped = [false; 16];
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _ in 0..500 {
        let first = (rng.next() % 16) as usize;
        let n = 1 + (rng.next() % (16 - first as u64)) as usize;
        let (off, size) = (first as u64 * 0x1000, n as u64 * 0x1000);
        if rng.next().is_multiple_of(2) {
            dev.trap(0, off, size, TrapOwner::Device).unwrap();
            trapped[first..first + n].fill(true);
        } else {
            dev.untrap(0, off, size, TrapOwner::Device).unwrap();
            trapped[first..first + n].fill(false);
        }
        // Mappable: pages 4..12 (the fake's sparse area).
        let mut expect: Vec<(u64, u64)> = Vec::new();
        for page in 4..12u64 {
            if trapped[page as usize] {
                continue;
            }
            match expect.last_mut() {
                Some((gpa, len)) if *gpa + *len == b + page * 0x1000 => *len += 0x1000,
                _ => expect.push((b + page * 0x1000, 0x1000)),
            }
        }
        assert_eq!(dev.mapped_areas(0), expect);
        let live = slots.live();
        for w in live.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "overlapping slots {live:x?}");
        }
    }
}

/// Against real KVM: trap and untrap 100 times; the slot set is exact each time and the
/// memory behind the slot stays the device's.
#[test]
fn real_kvm_trap_untrap() {
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let vm = Arc::new(kvm.create_vm().expect("create VM"));
    let memslots = Arc::new(MemSlots::new(vm));
    let Rig { dev, .. } = rig_over(Arc::new(FakeSlots::default()), memslots.clone());
    let b = 0x1_0000_0000;
    place(&dev, b, 0xc000_0000);
    let host = memslots.lookup(b + 0x4000).unwrap().1.host_addr;
    for _ in 0..100 {
        dev.trap(0, 0x8000, 0x1000, TrapOwner::Device).unwrap();
        assert_eq!(
            dev.mapped_areas(0),
            vec![(b + 0x4000, 0x4000), (b + 0x9000, 0x3000)]
        );
        dev.untrap(0, 0x8000, 0x1000, TrapOwner::Device).unwrap();
        assert_eq!(dev.mapped_areas(0), vec![(b + 0x4000, 0x8000)]);
    }
    // The merged slot maps the same device memory as before.
    let (_, m) = memslots.lookup(b + 0x8000).unwrap();
    assert_eq!((m.gpa, m.host_addr), (b + 0x4000, host));
}

#[test]
fn bar_registers_are_written_through_to_the_device() {
    let Rig { dev, fake, .. } = rig();
    fake.take_calls();
    // The guest's sizing write and its address both reach the device, as the register
    // reads here (QEMU's server answers BAR accesses only at the address it was told).
    w32(&dev, 0x18, 0xffff_ffff);
    let sized = u32::from_le_bytes(dev_config(&dev, 0x18));
    assert_eq!(
        fake.take_calls(),
        vec![Call::Write(7, 0x18, sized.to_le_bytes().to_vec())]
    );
    w32(&dev, 0x18, 0xc000_0000);
    assert_eq!(
        fake.take_calls(),
        vec![Call::Write(7, 0x18, 0xc000_0000u32.to_le_bytes().to_vec())]
    );
    assert_eq!(fake.config()[0x18..0x1c], 0xc000_0000u32.to_le_bytes());
    // Addresses the VMM assigns go through too, both halves of a 64-bit BAR.
    dev.program_bar(0, 0x2_0000_0000).unwrap();
    let calls = fake.take_calls();
    assert!(
        // BAR0 is a 64-bit prefetchable memory BAR: type bits 0xc.
        calls.contains(&Call::Write(7, 0x10, 0x0000_000cu32.to_le_bytes().to_vec()))
            && calls.contains(&Call::Write(7, 0x14, 2u32.to_le_bytes().to_vec())),
        "{calls:?}"
    );
}

fn dev_config(dev: &VfioPciDevice, off: usize) -> [u8; 4] {
    let mut b = [0u8; 4];
    dev.read_config(off, &mut b);
    b
}
