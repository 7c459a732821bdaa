//! INTx: offered once wired, set up at the device and in KVM while MSI and MSI-X are off,
//! switched off at the device before either is enabled and back on after, held back by
//! the command register's INTx Disable bit, unmasked after each EOI, saved and restored.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::persist::Persist;
use resources::memslots::MemSlots;
use vmm_sys_util::eventfd::EventFd;

use super::{r16, r32, rig, rig_on, w16, Rig};
use crate::pci::msix::RouteError;
use crate::vfio::backend::{IRQ_INTX, IRQ_MSI, IRQ_MSIX};
use crate::vfio::testing::{Call, FakeBackend, FakeSlots};
use crate::vfio::{IntxRoutes, IntxRouting, VfioPciDevice, VfioPersistError};

/// The UNMASK of INTx the device is sent after an EOI.
const UNMASK: Call = Call::MaskIrqs(IRQ_INTX, 0, 1, false);

/// What the recorder saw.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    /// `enable_level(gsi, trigger fd)`.
    On(u32, i32),
    /// `disable_level(gsi, trigger fd)`.
    Off(u32, i32),
}

/// An [`IntxRoutes`] that records, and keeps the last resample eventfd so a test can play
/// KVM's part on an EOI.
#[derive(Default)]
struct LevelRecorder {
    log: Mutex<Vec<Level>>,
    resample: Mutex<Option<EventFd>>,
}

impl LevelRecorder {
    fn take(&self) -> Vec<Level> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// KVM's part on the guest's EOI: signal the resample eventfd.
    fn eoi(&self) {
        self.resample
            .lock()
            .unwrap()
            .as_ref()
            .expect("a resample eventfd was registered")
            .write(1)
            .unwrap();
    }
}

impl IntxRoutes for LevelRecorder {
    fn enable_level(
        &self,
        gsi: u32,
        trigger: &EventFd,
        resample: &EventFd,
    ) -> Result<(), RouteError> {
        use std::os::fd::AsRawFd;
        self.log
            .lock()
            .unwrap()
            .push(Level::On(gsi, trigger.as_raw_fd()));
        *self.resample.lock().unwrap() = Some(resample.try_clone().unwrap());
        Ok(())
    }

    fn disable_level(&self, gsi: u32, trigger: &EventFd) -> Result<(), RouteError> {
        use std::os::fd::AsRawFd;
        self.log
            .lock()
            .unwrap()
            .push(Level::Off(gsi, trigger.as_raw_fd()));
        Ok(())
    }
}

/// A standard device with INTx wired to GSI 17; the calls of the wiring are taken.
fn wired() -> (Rig, Arc<LevelRecorder>, i32) {
    let r = rig();
    let rec = Arc::new(LevelRecorder::default());
    let routing = r.dev.wire_intx(17, rec.clone()).unwrap();
    assert_eq!(routing, Some(IntxRouting { pin: 1, gsi: 17 }));
    let trigger = match &r.fake.take_calls()[..] {
        [Call::SetIrqs(0, 0, fds), Call::IntxUnmaskFd(_, false), UNMASK] => fds[0].unwrap(),
        calls => panic!("unexpected wiring: {calls:?}"),
    };
    assert_eq!(rec.take(), vec![Level::On(17, trigger)]);
    (r, rec, trigger)
}

/// Waits up to 5 s for the fake to record `call`; returns whether it did.
fn wait_for(fake: &FakeBackend, call: &Call) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if fake.take_calls().contains(call) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn wiring_offers_the_device_pin_and_sets_intx_up_at_once() {
    let r = rig();
    assert_eq!(r.dev.intx_pin(), Some(1), "INTA in the fake's config");
    assert_eq!(r32(&r.dev, 0x3c) & 0xff00, 0, "no pin until wired");
    let (r, _rec, _) = wired();
    assert_eq!(r32(&r.dev, 0x3c) & 0xffff, 0x0111, "INTA, line 17");
    r.dev.write_config(0x3c, &[0x0b]);
    assert_eq!(
        r32(&r.dev, 0x3c) & 0xffff,
        0x010b,
        "the line is the guest's"
    );
    r.dev.write_config(0x3d, &[0x03]);
    assert_eq!(r32(&r.dev, 0x3c) & 0xff00, 0x0100, "the pin is read only");
    assert_eq!(r.dev.intx_live(), Some((true, true)));
    assert!(r.fake.has_eventfd(IRQ_INTX, 0));
}

#[test]
fn a_function_without_intx_is_not_wired() {
    let mut fake = FakeBackend::standard().unwrap();
    Arc::get_mut(&mut fake).unwrap().irq_counts[IRQ_INTX as usize] = 0;
    let slots = Arc::new(FakeSlots::default());
    let r = rig_on(fake, slots.clone(), Arc::new(MemSlots::new(slots)));
    assert_eq!(r.dev.intx_pin(), None);
    let rec = Arc::new(LevelRecorder::default());
    assert_eq!(r.dev.wire_intx(17, rec.clone()).unwrap(), None);
    assert_eq!(r32(&r.dev, 0x3c) & 0xff00, 0);
    assert!(rec.take().is_empty());
    assert!(!r
        .fake
        .take_calls()
        .iter()
        .any(|c| matches!(c, Call::SetIrqs(0, ..))));
}

#[test]
fn msix_takes_intx_off_the_device_first_and_gives_it_back_when_disabled() {
    let (r, rec, trigger) = wired();
    w16(&r.dev, 0x52, 0x8000);
    let calls = r.fake.take_calls();
    let off = calls.iter().position(|c| *c == Call::DisableIrqs(IRQ_INTX));
    let on = calls
        .iter()
        .position(|c| matches!(c, Call::SetIrqs(i, 0, _) if *i == IRQ_MSIX));
    assert!(
        matches!((off, on), (Some(a), Some(b)) if a < b),
        "INTx off before MSI-X on: {calls:?}"
    );
    assert_eq!(rec.take(), vec![Level::Off(17, trigger)]);
    assert_eq!(r.dev.intx_live(), Some((false, false)));
    assert!(!r.fake.has_eventfd(IRQ_INTX, 0));

    w16(&r.dev, 0x52, 0x0000);
    let calls = r.fake.take_calls();
    let off = calls.iter().position(|c| *c == Call::DisableIrqs(IRQ_MSIX));
    let on = calls
        .iter()
        .position(|c| matches!(c, Call::SetIrqs(i, 0, _) if *i == IRQ_INTX));
    assert!(
        matches!((off, on), (Some(a), Some(b)) if a < b),
        "MSI-X off before INTx on: {calls:?}"
    );
    assert_eq!(calls.last(), Some(&UNMASK));
    assert_eq!(rec.take(), vec![Level::On(17, trigger)]);
    assert_eq!(r.dev.intx_live(), Some((true, true)));
}

#[test]
fn msi_takes_intx_off_the_device_first_and_gives_it_back_when_disabled() {
    let (r, rec, trigger) = wired();
    // MSI control at 0x82: enable (bit 0).
    w16(&r.dev, 0x82, 0x0001);
    let calls = r.fake.take_calls();
    let off = calls.iter().position(|c| *c == Call::DisableIrqs(IRQ_INTX));
    let on = calls
        .iter()
        .position(|c| matches!(c, Call::SetIrqs(i, 0, _) if *i == IRQ_MSI));
    assert!(
        matches!((off, on), (Some(a), Some(b)) if a < b),
        "INTx off before MSI on: {calls:?}"
    );
    assert_eq!(rec.take(), vec![Level::Off(17, trigger)]);
    // A write to the MSI capability that leaves it enabled changes nothing for INTx.
    r.dev.write_config(0x84, &0xfee0_0000u32.to_le_bytes());
    assert!(!r
        .fake
        .take_calls()
        .iter()
        .any(|c| matches!(c, Call::SetIrqs(0, ..) | Call::DisableIrqs(0))));
    w16(&r.dev, 0x82, 0x0000);
    let calls = r.fake.take_calls();
    let off = calls.iter().position(|c| *c == Call::DisableIrqs(IRQ_MSI));
    let on = calls
        .iter()
        .position(|c| matches!(c, Call::SetIrqs(i, 0, _) if *i == IRQ_INTX));
    assert!(
        matches!((off, on), (Some(a), Some(b)) if a < b),
        "MSI off before INTx on: {calls:?}"
    );
    assert_eq!(rec.take(), vec![Level::On(17, trigger)]);
}

#[test]
fn intx_disable_holds_the_line_back_and_a_signal_meanwhile_is_delivered_after() {
    let (r, rec, trigger) = wired();
    w16(&r.dev, 0x04, 0x0400);
    assert_eq!(rec.take(), vec![Level::Off(17, trigger)]);
    assert_eq!(
        r.dev.intx_live(),
        Some((true, false)),
        "still set at the device"
    );
    assert_eq!(r16(&r.dev, 0x04), 0x0400);
    assert_eq!(r.fake.config()[5] & 0x04, 0x04, "the device sees the bit");
    assert!(!r.dev.save().intx_pending);
    r.fake.fire(IRQ_INTX, 0).unwrap();
    assert!(r.dev.save().intx_pending, "held in the trigger eventfd");
    r.fake.take_calls();
    w16(&r.dev, 0x04, 0x0000);
    // Registering the irqfd again hands KVM the count (KVM checks the eventfd then).
    assert_eq!(rec.take(), vec![Level::On(17, trigger)]);
    assert_eq!(r.dev.intx_live(), Some((true, true)));
    assert!(r.fake.take_calls().contains(&UNMASK));
}

#[test]
fn each_eoi_unmasks_the_device_through_the_relay() {
    let (r, rec, _) = wired();
    for _ in 0..3 {
        rec.eoi();
        assert!(wait_for(&r.fake, &UNMASK), "no UNMASK after the EOI");
    }
    // While MSI-X is on, INTx is not the device's: an EOI (a late one) is not relayed.
    w16(&r.dev, 0x52, 0x8000);
    r.fake.take_calls();
    rec.eoi();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!r.fake.take_calls().contains(&UNMASK));
}

#[test]
fn a_backend_that_takes_the_unmask_eventfd_gets_the_resample_fd_and_no_relay() {
    let fake = FakeBackend::standard().unwrap();
    fake.takes_unmask_fd
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let slots = Arc::new(FakeSlots::default());
    let r = rig_on(fake, slots.clone(), Arc::new(MemSlots::new(slots)));
    let rec = Arc::new(LevelRecorder::default());
    r.dev.wire_intx(18, rec.clone()).unwrap();
    let calls = r.fake.take_calls();
    assert!(
        matches!(
            &calls[..],
            [Call::SetIrqs(0, 0, _), Call::IntxUnmaskFd(_, true), UNMASK]
        ),
        "{calls:?}"
    );
    rec.eoi();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        r.fake.take_calls().is_empty(),
        "the device unmasks itself: nothing relayed"
    );
}

#[test]
fn dropping_the_device_takes_intx_down_and_releases_the_backend() {
    let (r, rec, trigger) = wired();
    let Rig { dev, fake, .. } = r;
    assert!(
        Arc::strong_count(&fake) > 2,
        "the device and its relay hold it"
    );
    drop(dev);
    assert_eq!(rec.take(), vec![Level::Off(17, trigger)]);
    assert!(fake.take_calls().contains(&Call::DisableIrqs(IRQ_INTX)));
    assert_eq!(
        Arc::strong_count(&fake),
        1,
        "the relay thread let go of the backend"
    );
}

fn wired_on(gsi: u32) -> (Rig, Arc<LevelRecorder>) {
    let r = rig();
    let rec = Arc::new(LevelRecorder::default());
    r.dev.wire_intx(gsi, rec.clone()).unwrap();
    r.fake.take_calls();
    rec.take();
    (r, rec)
}

#[test]
fn the_routing_is_saved_and_a_device_routed_elsewhere_is_refused() {
    let (a, _) = wired_on(17);
    let s = a.dev.save();
    assert_eq!(s.layout.intx, Some(IntxRouting { pin: 1, gsi: 17 }));
    let (b, _) = wired_on(19);
    let e = b.dev.restore(&s).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, VfioPersistError::Mismatch { .. }), "{text}");
    assert!(
        text.contains("INTx is on pin INTA routed to GSI 19 here, on pin INTA routed to GSI 17 in the saved state"),
        "{text}"
    );
    let unwired = rig();
    assert!(unwired.dev.restore(&s).is_err(), "not routed at all here");
}

#[test]
fn restore_rearms_intx_unmasks_it_and_remakes_a_held_back_signal() {
    let (a, _) = wired_on(17);
    w16(&a.dev, 0x04, 0x0400);
    a.fake.fire(IRQ_INTX, 0).unwrap();
    let s = a.dev.save();
    assert!(s.intx_pending);

    let (b, rec) = wired_on(17);
    b.dev.restore(&s).unwrap();
    assert_eq!(
        b.dev.intx_live(),
        Some((true, false)),
        "INTx Disable came along"
    );
    assert!(b.dev.save().intx_pending, "the held-back signal came along");
    assert!(b.fake.take_calls().contains(&UNMASK));
    w16(&b.dev, 0x04, 0x0000);
    assert!(matches!(&rec.take()[..], [.., Level::On(17, _)]));

    // A source with MSI-X on: the destination's INTx ends off at its device.
    let (c, _) = wired_on(17);
    w16(&c.dev, 0x52, 0x8000);
    let s = c.dev.save();
    let (d, _) = wired_on(17);
    d.dev.restore(&s).unwrap();
    assert_eq!(d.dev.intx_live(), Some((false, false)));
}

#[test]
fn an_unwired_device_behaves_as_before() {
    let Rig { dev, fake, .. } = rig();
    w16(&dev, 0x04, 0x0400);
    w16(&dev, 0x52, 0x8000);
    w16(&dev, 0x52, 0x0000);
    assert!(!fake.take_calls().iter().any(|c| matches!(
        c,
        Call::SetIrqs(0, ..) | Call::DisableIrqs(0) | Call::MaskIrqs(0, ..)
    )));
    assert_eq!(dev.intx_live(), None);
    let _: &VfioPciDevice = &dev;
}

#[test]
fn a_device_that_does_not_mask_itself_is_never_sent_an_unmask() {
    // libvfio-user reports only VFIO_IRQ_INFO_EVENTFD for INTx: it raises it by writing
    // the eventfd, masks nothing, and its `server` sample takes the next message after an
    // INTx for the reply to its own DMA request.
    let mut fake = FakeBackend::standard().unwrap();
    Arc::get_mut(&mut fake).unwrap().irq_flags[IRQ_INTX as usize] =
        vfio_bindings::bindings::vfio::VFIO_IRQ_INFO_EVENTFD;
    let slots = Arc::new(FakeSlots::default());
    let r = rig_on(fake, slots.clone(), Arc::new(MemSlots::new(slots)));
    let rec = Arc::new(LevelRecorder::default());
    r.dev.wire_intx(17, rec.clone()).unwrap();
    let calls = r.fake.take_calls();
    assert!(
        matches!(&calls[..], [Call::SetIrqs(0, 0, _)]),
        "only the trigger eventfd: {calls:?}"
    );
    assert!(matches!(&rec.take()[..], [Level::On(17, _)]));
    rec.eoi();
    w16(&r.dev, 0x04, 0x0400);
    w16(&r.dev, 0x04, 0x0000);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !r.fake.take_calls().contains(&UNMASK),
        "no UNMASK, after an EOI or a re-route"
    );
    let s = r.dev.save();
    let (b, _) = {
        let mut fake = FakeBackend::standard().unwrap();
        Arc::get_mut(&mut fake).unwrap().irq_flags[IRQ_INTX as usize] =
            vfio_bindings::bindings::vfio::VFIO_IRQ_INFO_EVENTFD;
        let slots = Arc::new(FakeSlots::default());
        let b = rig_on(fake, slots.clone(), Arc::new(MemSlots::new(slots)));
        let rec = Arc::new(LevelRecorder::default());
        b.dev.wire_intx(17, rec.clone()).unwrap();
        (b, rec)
    };
    b.fake.take_calls();
    b.dev.restore(&s).unwrap();
    assert!(!b.fake.take_calls().contains(&UNMASK), "nor on restore");
}
