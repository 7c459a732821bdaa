//! Save/restore of the vfio-pci device's configuration state, from one device into a
//! second one over a second fake backend (another VF on another host).

use std::sync::Arc;

use crate::persist::Persist;
use resources::memslots::MemSlots;

use super::{bus_line, msix_entry, place, r16, r32, w16, w32, Rig};
use crate::vfio::testing::{Call, FakeBackend, FakeSlots};
use crate::vfio::TrapOwner;
use crate::vfio::{VfioPciDevice, VfioPciState, VfioPersistError};

/// A device over `fake`, with its own bus, memory slots and routes (GSIs from 32).
fn rig_with(fake: Arc<FakeBackend>) -> Rig {
    let slots = Arc::new(FakeSlots::default());
    super::rig_on(fake, slots.clone(), Arc::new(MemSlots::new(slots)))
}

fn json(s: &VfioPciState) -> VfioPciState {
    let text = serde_json::to_string(s).unwrap();
    let back: VfioPciState = serde_json::from_str(&text).unwrap();
    assert_eq!(&back, s, "{text}");
    back
}

/// Signals the device's eventfd `fd` (as the device does for an interrupt).
fn signal(fd: i32) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: `fd` is a live eventfd owned by the device under test; writing 8 bytes from a
    // valid buffer only adds to its counter.
    let n = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    assert_eq!(n, 8);
}

fn config_image(dev: &VfioPciDevice) -> Vec<u32> {
    (0..256).step_by(4).map(|o| r32(dev, o)).collect()
}

fn table(dev: &VfioPciDevice) -> Vec<u8> {
    let mut t = vec![0u8; 8 * 16];
    for (i, chunk) in t.chunks_mut(4).enumerate() {
        dev.bar_read(2, 0x2000 + 4 * i as u64, chunk);
    }
    t
}

/// The source: BARs placed, header registers written, MSI-X on with vectors 0 and 3
/// unmasked and vector 1 masked and pending, a run-time trap in BAR0.
fn programmed_source() -> Rig {
    let a = super::rig();
    place(&a.dev, 0x1_0000_0000, 0xc000_0000);
    a.dev.write_config(0x0c, &[0x10, 0x40]);
    a.dev.write_config(0x3c, &[0x0b]);
    msix_entry(&a.bus, 0, 0xfee0_0000, 0x4041, false);
    msix_entry(&a.bus, 1, 0xfee0_1000, 0x4042, true);
    msix_entry(&a.bus, 3, 0xfee0_3000, 0x4044, false);
    a.fake.take_calls();
    w16(&a.dev, 0x52, 0x8007);
    let fds = super::msix_fds(&a.fake.take_calls());
    signal(fds[1]);
    a.dev.trap(0, 0x6000, 0x1000, TrapOwner::Device).unwrap();
    a
}

#[test]
fn msix_bars_and_traps_come_back_on_another_device() {
    let a = programmed_source();
    let s = json(&a.dev.save());
    assert_eq!(s.pending_vectors, vec![1]);
    assert_eq!(s.traps.len(), 1);
    assert_eq!(
        (s.cache_line, s.latency, s.interrupt_line),
        (0x10, 0x40, 0x0b)
    );

    let b = rig_with(FakeBackend::standard().unwrap());
    b.dev.restore(&s).unwrap();

    // The same state reads back, and the guest sees the same configuration space.
    assert_eq!(b.dev.save(), s);
    assert_eq!(config_image(&b.dev), config_image(&a.dev));
    // BARs on the bus and in memory slots, with the trap punched out of BAR0's slot.
    for name in ["vf0/bar0", "vf0/bar2"] {
        let (ba, bb) = (bus_line(&a.bus, name), bus_line(&b.bus, name));
        assert_eq!(ba.map(|l| (l.0, l.1)), bb.map(|l| (l.0, l.1)), "{name}");
        assert!(bb.is_some(), "{name} registered");
    }
    let base = 0x1_0000_0000;
    assert_eq!(
        b.dev.mapped_areas(0),
        vec![(base + 0x4000, 0x2000), (base + 0x7000, 0x5000)]
    );
    assert_eq!(b.dev.mapped_areas(2), a.dev.mapped_areas(2));
    assert_eq!(b.slots.live().len(), a.slots.live().len());
    assert_eq!(b.dev.trapped(0), vec![(0x6000, 0x1000)]);
    // MSI-X: table, control, routes and irqfds as on the source; vector 1 still pending.
    assert_eq!(table(&b.dev), table(&a.dev));
    assert_eq!(r16(&b.dev, 0x52), 0x8007);
    {
        let (ra, rb) = (a.routes.lock(), b.routes.lock());
        assert_eq!(ra.routes, rb.routes);
        assert_eq!(rb.enabled.keys().copied().collect::<Vec<_>>(), vec![32, 35]);
        assert_eq!(
            ra.enabled.keys().collect::<Vec<_>>(),
            rb.enabled.keys().collect::<Vec<_>>()
        );
    }
    let mut pba = [0u8; 8];
    b.dev.bar_read(2, 0x3000, &mut pba);
    assert_eq!(pba, [2, 0, 0, 0, 0, 0, 0, 0]);
    // The device got the command register and every vector's eventfd.
    let calls = b.fake.take_calls();
    assert!(
        calls.contains(&Call::Write(7, 0x04, vec![0x06, 0x00])),
        "command forwarded: {calls:?}"
    );
    assert!(
        calls
            .iter()
            .any(|c| matches!(c, Call::SetIrqs(2, 0, fds) if fds.len() == 8)),
        "MSI-X eventfds handed over: {calls:?}"
    );
    // And the MSI-X state: vectors 0 and 3 unmasked in its table and by SET_IRQS, the
    // control word (enable) in its configuration space.
    for v in [0u32, 3] {
        let at = 0x2000 + 16 * u64::from(v) + 12;
        assert!(calls.contains(&Call::Write(2, at, vec![0; 4])), "{calls:?}");
        assert!(calls.contains(&Call::MaskIrqs(2, v, 1, false)), "{calls:?}");
    }
    assert!(
        !calls.iter().any(|c| matches!(c, Call::MaskIrqs(2, 1, ..))),
        "vector 1 stays masked as it started: {calls:?}"
    );
    assert!(
        calls.contains(&Call::Write(7, 0x52, vec![0x07, 0x80])),
        "{calls:?}"
    );
    // The trapped page reaches the backend; the mapped ones are in slots.
    b.dev.bar_write(0, 0x6010, &[9]);
    assert_eq!(b.fake.take_calls(), vec![Call::Write(0, 0x6010, vec![9])]);
}

#[test]
fn msi_comes_back_into_a_device_already_programmed_elsewhere() {
    let a = super::rig();
    place(&a.dev, 0x2_0000_0000, 0xd000_0000);
    w32(&a.dev, 0x84, 0xfee0_0000);
    w32(&a.dev, 0x88, 0);
    w16(&a.dev, 0x8c, 0x30);
    w32(&a.dev, 0x90, 0b0100); // vector 2 masked
    w16(&a.dev, 0x82, 0x0184 | 0x21); // enable, 4 vectors
    let s = json(&a.dev.save());
    assert!(s.msi.is_some() && s.traps.is_empty());

    // The destination's firmware already placed the BARs somewhere else.
    let b = rig_with(FakeBackend::standard().unwrap());
    place(&b.dev, 0x1_0000_0000, 0xc000_0000);
    b.fake.take_calls();
    b.dev.restore(&s).unwrap();
    assert_eq!(b.dev.save(), s);
    assert_eq!(config_image(&b.dev), config_image(&a.dev));
    assert_eq!(b.dev.mapped_areas(0), vec![(0x2_0000_4000, 0x8000)]);
    assert_eq!(b.dev.mapped_areas(2), vec![(0xd000_0000, 0x2000)]);
    assert!(bus_line(&b.bus, "vf0/bar0").is_some_and(|l| l.0 == 0x2_0000_0000));
    assert_eq!(
        b.bus
            .stats()
            .iter()
            .filter(|l| l.name.starts_with("vf0"))
            .count(),
        2
    );
    {
        let (ra, rb) = (a.routes.lock(), b.routes.lock());
        assert_eq!(ra.routes, rb.routes);
        assert_eq!(
            rb.enabled.keys().copied().collect::<Vec<_>>(),
            vec![32, 33, 35]
        );
    }
    let calls = b.fake.take_calls();
    assert!(
        calls
            .iter()
            .any(|c| matches!(c, Call::SetIrqs(1, 0, fds) if fds.len() == 4)),
        "MSI eventfds handed over: {calls:?}"
    );
    // Decoding went off while the BARs moved, then back on: forwarded both times.
    assert!(calls.contains(&Call::Write(7, 0x04, vec![0x04, 0x00])));
    assert_eq!(calls.last(), Some(&Call::Write(7, 0x04, vec![0x06, 0x00])));
}

/// Live memory slots as the fake records them: `(gpa, size, host address, flags)`.
type Slots = Vec<(u64, u64, u64, u32)>;

/// Everything the device exposes to the guest and the host, to check that a refused
/// restore changed nothing.
fn snapshot(r: &Rig) -> (VfioPciState, Vec<u32>, usize, Slots) {
    let lines = r.bus.stats().len();
    (r.dev.save(), config_image(&r.dev), lines, r.slots.live())
}

#[test]
fn a_device_with_another_bar_size_is_refused_unchanged() {
    let s = programmed_source().dev.save();
    let mut fake = FakeBackend::standard().unwrap();
    Arc::get_mut(&mut fake).unwrap().regions[2].size = 0x8000;
    let b = rig_with(fake);
    b.fake.take_calls();
    let before = snapshot(&b);
    let e = b.dev.restore(&s).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, VfioPersistError::Mismatch { .. }), "{text}");
    assert!(
        text.contains(
            "BAR 2 is 32-bit memory of 0x8000 bytes here, 32-bit memory of 0x4000 bytes in the saved state"
        ),
        "{text}"
    );
    assert_eq!(snapshot(&b), before);
    assert!(b.fake.take_calls().is_empty());
    assert!(b.routes.lock().log.is_empty());
}

#[test]
fn other_vector_counts_and_layouts_are_named() {
    let s = programmed_source().dev.save();
    let mut fake = FakeBackend::standard().unwrap();
    Arc::get_mut(&mut fake).unwrap().irq_counts = [1, 2, 8, 0, 0];
    let b = rig_with(fake);
    let text = b.dev.restore(&s).unwrap_err().to_string();
    assert!(
        text.contains("4 MSI vectors in the saved state") || text.contains("and 4 in the saved"),
        "{text}"
    );
    // A state from a device without MSI-X, and another vendor.
    let mut other = s.clone();
    other.layout.msix = None;
    other.layout.vendor_device = 0x1000_8086;
    let b = rig_with(FakeBackend::standard().unwrap());
    let text = b.dev.restore(&other).unwrap_err().to_string();
    assert!(
        text.contains("vendor:device is 1af4:1042 here, 8086:1000"),
        "{text}"
    );
    assert!(text.contains("MSI-X is 8 vectors at 0x50"), "{text}");
}

#[test]
fn inconsistent_states_are_refused_unchanged() {
    let s = programmed_source().dev.save();
    let b = rig_with(FakeBackend::standard().unwrap());
    b.fake.take_calls();
    let before = snapshot(&b);
    let mut bad = s.clone();
    bad.traps[0].ranges.push((0x6800, 0x1000));
    let e = b.dev.restore(&bad).unwrap_err().to_string();
    assert!(e.contains("not page-aligned inside BAR 0"), "{e}");
    let mut bad = s.clone();
    bad.msix.as_mut().unwrap().entries.pop();
    let e = b.dev.restore(&bad).unwrap_err().to_string();
    assert!(e.contains("7 entries for a capability of 8 vectors"), "{e}");
    let mut bad = s.clone();
    bad.pending_vectors = vec![8];
    let e = b.dev.restore(&bad).unwrap_err().to_string();
    assert!(e.contains("vector 8 is pending"), "{e}");
    assert_eq!(snapshot(&b), before);
    assert!(b.fake.take_calls().is_empty());
}

#[test]
fn a_bus_conflict_on_the_destination_is_reported() {
    let s = programmed_source().dev.save();
    let b = rig_with(FakeBackend::standard().unwrap());
    // Something else already sits where BAR2 must go.
    b.bus
        .register_mmio("other", 0xc000_0000, 0x1000, b.dev.clone())
        .unwrap();
    let e = b.dev.restore(&s).unwrap_err().to_string();
    assert!(
        e.contains("BAR 2 could not be placed at its saved address 0xc0000000"),
        "{e}"
    );
}

#[test]
fn a_route_kvm_refuses_is_reported() {
    let s = programmed_source().dev.save();
    let b = rig_with(FakeBackend::standard().unwrap());
    b.routes.lock().fail_route.insert(35);
    let e = b.dev.restore(&s).unwrap_err().to_string();
    assert!(
        e.contains("1 backend or interrupt-routing requests failed"),
        "{e}"
    );
}
