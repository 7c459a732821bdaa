//! The VMM's side ([`RegionMigration`]) driving a [`MigrationRegion`] through the
//! `VfioBackend` region path, as region 9 of a fake device: save from one, restore into
//! another.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use devices::vfio::backend::{DeviceInfo, DmaMapping, IrqInfo, RegionInfo, Result};
use devices::vfio::migration::{DeviceMigration, MigrationError, MigrationState::*};
use devices::vfio::region_migration::RegionMigration;
use devices::vfio::testing::FakeBackend;
use devices::vfio::VfioBackend;
use mediate::migration::testing::FakeOps;
use mediate::migration::MigrationRegion;
use vmm_sys_util::eventfd::EventFd;

const MIGRATION_REGION: u32 = 9;

/// A fake device with a mediator's migration region as region 9.
struct Mediated {
    inner: Arc<FakeBackend>,
    region: Arc<MigrationRegion<FakeOps>>,
}

impl VfioBackend for Mediated {
    fn device_info(&self) -> Result<DeviceInfo> {
        let mut info = self.inner.device_info()?;
        info.num_regions = MIGRATION_REGION + 1;
        Ok(info)
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        match index {
            MIGRATION_REGION => Ok(self.region.region_info()),
            _ => self.inner.region_info(index),
        }
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        match index {
            MIGRATION_REGION => {
                self.inner.region_info(0)?; // dies with the fake
                self.region
                    .read(offset, data)
                    .map_err(|e| e.into_backend_error(index))
            }
            _ => self.inner.region_read(index, offset, data),
        }
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        match index {
            MIGRATION_REGION => {
                self.inner.region_info(0)?;
                self.region
                    .write(offset, data)
                    .map_err(|e| e.into_backend_error(index))
            }
            _ => self.inner.region_write(index, offset, data),
        }
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.inner.irq_info(index)
    }

    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<&EventFd>]) -> Result<()> {
        self.inner.set_irq_eventfds(index, start, fds)
    }

    fn disable_irqs(&self, index: u32) -> Result<()> {
        self.inner.disable_irqs(index)
    }

    fn mask_irqs(&self, index: u32, start: u32, count: u32, masked: bool) -> Result<()> {
        self.inner.mask_irqs(index, start, count, masked)
    }

    unsafe fn dma_map(&self, mapping: &DmaMapping<'_>) -> Result<()> {
        // SAFETY: forwarded unchanged; the caller's guarantees carry over.
        unsafe { self.inner.dma_map(mapping) }
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        self.inner.dma_unmap(iova, size)
    }

    fn reset(&self) -> Result<()> {
        self.region.reset();
        self.inner.reset()
    }
}

struct Device {
    fake: Arc<FakeBackend>,
    ops: FakeOps,
    mig: RegionMigration,
}

fn device(state: Vec<u8>, window: u64) -> Device {
    let ops = FakeOps::new(state);
    let region = Arc::new(MigrationRegion::with_window_size(ops.clone(), window).expect("window"));
    let fake = FakeBackend::standard().expect("fake backend");
    let backend = Arc::new(Mediated {
        inner: fake.clone(),
        region: region.clone(),
    });
    let mig = RegionMigration::new(backend, MIGRATION_REGION, region).expect("migration region");
    Device { fake, ops, mig }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn live_save_from_one_device_restores_into_another() {
    let src = device(pattern(150_000, 1), 64 * 1024);
    src.ops.dev().max_chunk = 20_000;
    src.mig.start_dirty_tracking().expect("tracking");
    src.mig.set_state(PreCopy).expect("pre-copy");
    assert_eq!(src.mig.state().expect("state"), PreCopy);

    let mut stream: Vec<Vec<u8>> = Vec::new();
    // Two pre-copy rounds, with DMA in between.
    for round in 0..2u64 {
        for _ in 0..3 {
            stream.push(src.mig.save_chunk().expect("chunk").expect("pending"));
        }
        src.ops.mark_dirty(0x10_0000 + round * 0x1000);
        src.ops.mark_dirty(0x10_0800 + round * 0x1000);
        let pages = src.mig.take_dirty_pages().expect("dirty");
        assert_eq!(pages, vec![0x10_0000 + round * 0x1000]);
    }
    assert_eq!(src.mig.pending_bytes().expect("pending"), 150_000 - 120_000);
    // More state appears while running.
    src.ops.dev().state.extend(pattern(5_000, 2));
    assert_eq!(src.mig.pending_bytes().expect("pending"), 35_000);

    src.mig.set_state(StopCopy).expect("stop-copy");
    src.ops.dev().max_chunk = 0;
    while src.mig.pending_bytes().expect("pending") > 0 {
        stream.push(src.mig.save_chunk().expect("chunk").expect("pending"));
    }
    assert!(src.mig.save_chunk().expect("done").is_none());
    src.mig.stop_dirty_tracking().expect("stop tracking");
    src.mig.set_state(Stopped).expect("stopped");

    // The destination has a smaller window: the stream is cut differently there.
    let dst = device(vec![], 8 * 1024);
    dst.mig.set_state(Resuming).expect("resuming");
    for chunk in &stream {
        dst.mig.restore_chunk(chunk).expect("restore");
    }
    dst.mig.set_state(Running).expect("running");
    assert_eq!(dst.ops.dev().state, src.ops.dev().state);
    assert_eq!(dst.ops.dev().state.len(), 155_000);
    assert!(dst.ops.dev().restore_pieces.iter().all(|&n| n <= 8 * 1024));
    assert!(dst.ops.dev().running);
}

#[test]
fn snapshot_of_a_stopped_device_and_cancel_paths() {
    let src = device(pattern(10_000, 3), 4096);
    src.mig.set_state(Stopped).expect("paused");
    src.mig.set_state(StopCopy).expect("snapshot");
    let mut all = Vec::new();
    while let Some(c) = src.mig.save_chunk().expect("chunk") {
        all.extend(c);
    }
    assert_eq!(all, pattern(10_000, 3));
    // The migration failed: the source runs on.
    src.mig.set_state(Running).expect("cancel from stop-copy");
    assert!(src.ops.dev().running && src.ops.dev().saving.is_none());
    src.mig.set_state(PreCopy).expect("again");
    src.mig.set_state(Running).expect("cancel from pre-copy");
}

#[test]
fn misuse_is_reported_with_states() {
    let d = device(pattern(100, 4), 4096);
    let e = d.mig.save_chunk().expect_err("not saving");
    assert!(
        matches!(e, MigrationError::WrongState { state: Running, .. }),
        "{e}"
    );
    let e = d.mig.restore_chunk(&[1, 2, 3]).expect_err("not resuming");
    assert!(
        matches!(e, MigrationError::WrongState { state: Running, .. }),
        "{e}"
    );
    d.mig.set_state(Stopped).expect("stopped");
    let e = d.mig.set_state(PreCopy).expect_err("illegal");
    assert_eq!(
        e.to_string(),
        "illegal device migration transition from stopped to pre-copy"
    );
    let e = d.mig.set_state(Error).expect_err("error is not a target");
    assert!(matches!(e, MigrationError::IllegalTransition { .. }), "{e}");
    assert_eq!(d.mig.state().expect("state"), Stopped);
    assert!(d.mig.restore_chunk(&[]).is_err(), "still not resuming");
}

#[test]
fn a_failing_device_says_where_it_is() {
    let d = device(pattern(100, 5), 4096);
    d.ops.dev().fail = Some("begin_save");
    let e = d.mig.set_state(StopCopy).expect_err("fails");
    match e {
        MigrationError::TransitionFailed {
            from,
            to,
            now,
            reason,
        } => {
            assert_eq!((from, to, now), (Running, StopCopy, Stopped));
            assert!(reason.contains("begin_save failed (injected)"), "{reason}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(d.mig.state().expect("state"), Stopped);
}

#[test]
fn a_device_whose_pending_bytes_never_come_is_caught() {
    let d = device(vec![], 4096);
    d.mig.set_state(PreCopy).expect("pre-copy");
    d.ops.dev().fake_pending = Some(100);
    // Running: the estimate may have been early.
    assert!(d.mig.save_chunk().expect("no chunk yet").is_none());
    d.mig.set_state(StopCopy).expect("stop-copy");
    let e = d.mig.save_chunk().expect_err("lies");
    assert!(matches!(e, MigrationError::Protocol(_)), "{e}");
}

#[test]
fn a_dead_backend_is_a_backend_error() {
    let d = device(pattern(100, 6), 4096);
    d.fake.dead.store(true, Ordering::Relaxed);
    let e = d.mig.state().expect_err("dead");
    assert!(matches!(e, MigrationError::Backend { .. }), "{e}");
}

#[test]
fn a_region_that_cannot_be_a_migration_region_is_refused() {
    let fake = FakeBackend::standard().expect("fake");
    let region = Arc::new(MigrationRegion::new(FakeOps::default()));
    // Region 4 is a 32-byte I/O BAR: too small; region 1 is absent.
    for index in [1, 4] {
        let e = RegionMigration::new(fake.clone(), index, region.clone()).err();
        assert!(
            matches!(e, Some(MigrationError::Protocol(_))),
            "{index}: {e:?}"
        );
    }
}
