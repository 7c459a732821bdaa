//! I/O BARs: sizing, placement on the port-I/O bus with I/O decoding, forwarding of every
//! access to the device's region, the refusal of BARs larger than PCI allows, and
//! save/restore of their address.

use std::sync::Arc;

use crate::persist::Persist;
use resources::memslots::MemSlots;

use super::{bus_line, r16, r32, rig, rig_on, w16, w32, Rig};
use crate::vfio::testing::{Call, FakeBackend, FakeSlots};

/// A device over `fake` with its own bus and memory slots.
fn rig_with(fake: Arc<FakeBackend>) -> Rig {
    let slots = Arc::new(FakeSlots::default());
    rig_on(fake, slots.clone(), Arc::new(MemSlots::new(slots)))
}

const COMMAND_IO: u16 = 0x1;
const COMMAND_MEMORY: u16 = 0x2;

#[test]
fn sizing_an_io_bar_reads_its_size_mask_with_the_io_bit() {
    let Rig { dev, .. } = rig();
    assert_eq!(r32(&dev, 0x20), 0x1, "I/O space, address 0");
    w32(&dev, 0x20, u32::MAX);
    assert_eq!(
        r32(&dev, 0x20),
        0xffff_ffe1,
        "32 bytes, bit 0 set, bit 1 clear"
    );
    // The guest restores the address it read before sizing.
    w32(&dev, 0x20, 0);
    assert_eq!(r32(&dev, 0x20), 0x1);
}

#[test]
fn an_io_bar_is_on_the_port_bus_while_io_decoding_is_on_and_moves_with_its_register() {
    let Rig { dev, bus, .. } = rig();
    w32(&dev, 0x20, 0xc020);
    assert!(bus_line(&bus, "vf0/bar4").is_none(), "decoding off");
    w16(&dev, 0x04, COMMAND_MEMORY);
    assert!(
        bus_line(&bus, "vf0/bar4").is_none(),
        "memory decoding does not place an I/O BAR"
    );
    w16(&dev, 0x04, COMMAND_IO);
    assert_eq!(bus_line(&bus, "vf0/bar4"), Some((0xc020, 0x20, 0, 0)));
    assert!(
        bus_line(&bus, "vf0/bar0").is_none(),
        "I/O decoding does not place a memory BAR"
    );
    // The guest moves it while decoding: the old ports are unclaimed again.
    w32(&dev, 0x20, 0xd000);
    assert_eq!(bus_line(&bus, "vf0/bar4").unwrap().0, 0xd000);
    let mut b = [0u8; 4];
    assert!(!bus.pio_read(0xc020, &mut b), "nothing at the old ports");
    assert_eq!(b, [0xff; 4]);
    // Sizing while decoding takes it off the bus (all ones is not an address).
    w32(&dev, 0x20, u32::MAX);
    assert!(bus_line(&bus, "vf0/bar4").is_none());
    w32(&dev, 0x20, 0xd000);
    assert!(bus_line(&bus, "vf0/bar4").is_some());
    w16(&dev, 0x04, 0);
    assert!(bus_line(&bus, "vf0/bar4").is_none(), "decoding off again");
    // An address whose BAR would run past port 0xffff is not placed.
    w32(&dev, 0x20, 0x1_0000);
    w16(&dev, 0x04, COMMAND_IO);
    assert!(bus_line(&bus, "vf0/bar4").is_none());
}

#[test]
fn every_io_bar_access_is_forwarded_to_the_device_region() {
    let Rig { dev, bus, fake, .. } = rig();
    w32(&dev, 0x20, 0xc000);
    w16(&dev, 0x04, COMMAND_IO);
    fake.take_calls();
    assert!(bus.pio_write(0xc004, &0x1234_5678u32.to_le_bytes()));
    assert!(bus.pio_write(0xc01f, &[0xab]));
    let mut w = [0u8; 4];
    assert!(bus.pio_read(0xc004, &mut w));
    assert_eq!(u32::from_le_bytes(w), 0x1234_5678);
    let mut h = [0u8; 2];
    assert!(bus.pio_read(0xc006, &mut h));
    assert_eq!(u16::from_le_bytes(h), 0x1234);
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Write(4, 4, 0x1234_5678u32.to_le_bytes().to_vec()),
            Call::Write(4, 0x1f, vec![0xab]),
            Call::Read(4, 4, 4),
            Call::Read(4, 6, 2),
        ]
    );
    let stats = dev.bar_stats();
    let bar4 = stats.iter().find(|s| s.index == 4).unwrap();
    assert_eq!(
        (bar4.size, bar4.base, bar4.reads, bar4.writes),
        (0x20, Some(0xc000), 2, 2)
    );
    // Ports next to the BAR are nobody's: reads are all ones and reach no device.
    assert!(!bus.pio_read(0xc020, &mut w));
    assert_eq!(w, [0xff; 4]);
    assert!(
        !bus.pio_read(0xc01e, &mut w),
        "an access straddling the end"
    );
    assert!(fake.take_calls().is_empty());
    // A dead device reads all ones and does not take the VMM down.
    fake.dead.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(bus.pio_read(0xc000, &mut w));
    assert_eq!(w, [0xff; 4]);
    assert!(dev.backend_errors() > 0);
}

#[test]
fn an_io_bar_is_never_mapped_even_if_the_device_offers_it() {
    let mut fake = FakeBackend::standard().unwrap();
    Arc::get_mut(&mut fake).unwrap().regions[4].flags.mmap = true;
    let r = rig_with(fake);
    assert!(r.fake.region_info(4).unwrap().mmap.is_some(), "offered");
    w32(&r.dev, 0x20, 0xc000);
    w16(&r.dev, 0x04, COMMAND_IO | COMMAND_MEMORY);
    assert!(r.dev.mapped_areas(4).is_empty());
    assert!(r.slots.live().is_empty(), "no memory slot for any BAR at 0");
    let mut b = [0u8; 1];
    assert!(r.bus.pio_read(0xc000, &mut b), "trapped and forwarded");
    assert!(r
        .dev
        .trap(4, 0, 0x1000, crate::vfio::TrapOwner::Device)
        .is_err());
}

use crate::vfio::VfioBackend;

#[test]
fn an_io_bar_over_256_bytes_is_refused_not_truncated() {
    let mut fake = FakeBackend::standard().unwrap();
    Arc::get_mut(&mut fake).unwrap().regions[4].size = 0x200;
    let r = rig_with(fake);
    assert!(
        r.dev.bars().iter().all(|b| b.index != 4),
        "{:?}",
        r.dev.bars()
    );
    w32(&r.dev, 0x20, u32::MAX);
    assert_eq!(r32(&r.dev, 0x20), 0, "the guest sizes it as absent");
    let e = r.dev.program_bar(4, 0xc000).unwrap_err().to_string();
    assert!(e.contains("vf0") && e.contains("BAR 4"), "{e}");
    // The other BARs are unaffected.
    assert_eq!(r.dev.bars().len(), 2);
    // Exactly 256 bytes is allowed.
    let mut fake = FakeBackend::standard().unwrap();
    Arc::get_mut(&mut fake).unwrap().regions[4].size = 0x100;
    let r = rig_with(fake);
    w32(&r.dev, 0x20, u32::MAX);
    assert_eq!(r32(&r.dev, 0x20), 0xffff_ff01);
}

#[test]
fn the_io_bar_address_is_saved_and_placed_again_on_restore() {
    let a = rig();
    w32(&a.dev, 0x20, 0xc040);
    w16(&a.dev, 0x04, COMMAND_IO | COMMAND_MEMORY);
    let text = serde_json::to_string(&a.dev.save()).unwrap();
    let s: crate::vfio::VfioPciState = serde_json::from_str(&text).unwrap();
    assert_eq!(s.bar_regs[4], 0xc041);

    let b = rig();
    b.dev.restore(&s).unwrap();
    assert_eq!(r32(&b.dev, 0x20), 0xc041);
    assert_eq!(r16(&b.dev, 0x04) & 0x3, 0x3);
    assert_eq!(bus_line(&b.bus, "vf0/bar4").unwrap().0, 0xc040);
    b.fake.take_calls();
    let mut w = [0u8; 2];
    assert!(b.bus.pio_read(0xc042, &mut w));
    assert_eq!(b.fake.take_calls(), vec![Call::Read(4, 2, 2)]);
    // The device got the I/O decoding bit.
    assert_eq!(b.fake.config()[4] & 0x1, 0x1);
}

#[test]
fn restoring_an_io_bar_on_a_taken_port_range_fails_naming_it() {
    let a = rig();
    w32(&a.dev, 0x20, 0xc040);
    w16(&a.dev, 0x04, COMMAND_IO);
    let s = a.dev.save();
    let b = rig();
    b.bus
        .register_pio("squatter", 0xc040, 4, Arc::new(Squatter))
        .unwrap();
    let e = b.dev.restore(&s).unwrap_err();
    assert!(
        matches!(
            e,
            crate::vfio::VfioPersistError::NotPlaced {
                index: 4,
                addr: 0xc040,
                ..
            }
        ),
        "{e}"
    );
}

struct Squatter;

impl vm_device::DevicePio for Squatter {
    fn pio_read(
        &self,
        _: vm_device::bus::PioAddress,
        _: vm_device::bus::PioAddressOffset,
        data: &mut [u8],
    ) {
        data.fill(0);
    }
    fn pio_write(
        &self,
        _: vm_device::bus::PioAddress,
        _: vm_device::bus::PioAddressOffset,
        _: &[u8],
    ) {
    }
}
