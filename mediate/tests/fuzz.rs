//! Random register and window accesses from a seeded PRNG: the region never panics, never
//! reports an invalid state, agrees with the device behind it, and leaves its state alone
//! on every rejected access. Set `MIGRATION_FUZZ_SEED` / `MIGRATION_FUZZ_ITERS` to explore
//! further; a failure prints the seed and step that reproduce it.

use std::sync::Arc;

use devices::vfio::migration::{MigrationState, DIRTY_PAGE_SIZE};
use devices::vfio::region_migration::layout::{
    decode_state, DATA_SIZE, DATA_WINDOW_OFFSET, DEVICE_STATE, STATE_RESUMING, STATE_RUNNING,
    STATE_SAVING,
};
use devices::vfio::region_migration::DirtyTracker;
use mediate::migration::testing::FakeOps;
use mediate::migration::{MigrationRegion, RegionError};

const WINDOW: u64 = 4096;
const HOOKS: [&str; 12] = [
    "stop_device",
    "resume_device",
    "begin_save",
    "end_save",
    "pending_bytes",
    "save_chunk",
    "begin_restore",
    "restore_chunk",
    "end_restore",
    "start_dirty_tracking",
    "stop_dirty_tracking",
    "take_dirty_pages",
];

/// xorshift64*: tiny, seeded, good enough to pick accesses.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An access: mostly well-formed (a whole register, a piece of the window), often not.
fn access(rng: &mut Rng, size: u64) -> (u64, usize) {
    match rng.below(16) {
        0..=6 => rng.pick(&[(0, 4), (4, 4), (8, 8), (16, 8), (24, 8), (0, 4), (24, 8)]),
        7..=10 => {
            let at = rng.below(WINDOW);
            let len = rng.below(WINDOW - at) + 1;
            (DATA_WINDOW_OFFSET + at, len as usize)
        }
        11 => (DATA_WINDOW_OFFSET, rng.below(WINDOW + 1) as usize),
        12 => {
            let off = rng.pick(&[1, 2, 12, 20, 28, 31, 32, 0x800, DATA_WINDOW_OFFSET - 1]);
            (off, length(rng))
        }
        13 => (size - rng.below(16), length(rng)),
        14 => (DATA_WINDOW_OFFSET + rng.below(WINDOW), length(rng)),
        _ => (rng.next() | rng.pick(&[0, 1 << 63]), length(rng)),
    }
}

fn length(rng: &mut Rng) -> usize {
    match rng.below(8) {
        0..=4 => rng.pick(&[0usize, 1, 2, 3, 4, 8, 8, 4, 16]),
        _ => rng.below(WINDOW + 64) as usize,
    }
}

/// The bytes to write: a state value or a data_size worth exercising, or noise.
fn payload(rng: &mut Rng, offset: u64, len: usize) -> Vec<u8> {
    let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    if offset == DEVICE_STATE && len == 4 && rng.below(8) != 0 {
        data.copy_from_slice(&(rng.below(9) as u32).to_le_bytes());
    }
    if offset == DATA_SIZE && len == 8 && rng.below(4) != 0 {
        data.copy_from_slice(&rng.below(WINDOW + 8).to_le_bytes());
    }
    data
}

/// The state as the registers tell it, checked against the region and the device.
fn check(region: &MigrationRegion<FakeOps>, ops: &FakeOps, ctx: &str) -> MigrationState {
    let mut b = [0u8; 4];
    region
        .read(DEVICE_STATE, &mut b)
        .unwrap_or_else(|e| panic!("{ctx}: device_state unreadable: {e}"));
    let value = u32::from_le_bytes(b);
    let state = decode_state(value).unwrap_or_else(|e| panic!("{ctx}: state {value:#x}: {e}"));
    assert_ne!(state, MigrationState::Error, "{ctx}");
    assert_eq!(state, region.state(), "{ctx}");
    let d = ops.dev();
    assert_eq!(d.running, value & STATE_RUNNING != 0, "{ctx}: running");
    assert_eq!(
        d.saving.is_some(),
        value & STATE_SAVING != 0,
        "{ctx}: saving"
    );
    assert_eq!(d.resuming, value & STATE_RESUMING != 0, "{ctx}: resuming");
    drop(d);
    let mut s = [0u8; 8];
    region
        .read(DATA_SIZE, &mut s)
        .unwrap_or_else(|e| panic!("{ctx}: data_size unreadable: {e}"));
    assert!(u64::from_le_bytes(s) <= WINDOW, "{ctx}: data_size");
    state
}

/// One random step; returns a description for failure messages. `solo`: no other thread
/// uses the region, so a rejected access can be checked to have changed nothing (and a
/// reset, which the fake's bookkeeping follows outside the region's lock, is safe).
fn step(rng: &mut Rng, region: &MigrationRegion<FakeOps>, ops: &FakeOps, solo: bool) -> String {
    let size = region.size();
    match rng.below(100) {
        0..=3 => {
            let hook = rng.pick(&HOOKS);
            ops.dev().fail = Some(hook);
            format!("fail {hook}")
        }
        4 if !solo => "no reset while shared".into(),
        4 => {
            region.reset();
            let mut d = ops.dev();
            d.running = true;
            d.saving = None;
            d.resuming = false;
            "reset".into()
        }
        5 => {
            let grow = rng.below(3000) as usize;
            ops.dev().state.extend((0..grow).map(|i| i as u8));
            format!("grow state by {grow}")
        }
        6..=7 => {
            let what = rng.below(4);
            let r = match what {
                0 => region.start_dirty_tracking().map(|_| Vec::new()),
                1 => region.stop_dirty_tracking().map(|_| Vec::new()),
                2 => {
                    ops.mark_dirty(rng.below(1 << 40));
                    Ok(Vec::new())
                }
                _ => region.take_dirty_pages(),
            };
            if let Ok(pages) = r {
                assert!(pages.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
                assert!(pages.iter().all(|p| p % DIRTY_PAGE_SIZE == 0), "aligned");
            }
            format!("dirty op {what}")
        }
        _ => {
            let (off, len) = access(rng, size);
            let before = region.state();
            let write = rng.below(2) == 0;
            let result = if write {
                let data = payload(rng, off, len);
                region.write(off, &data)
            } else {
                let mut data = vec![0u8; len];
                region.read(off, &mut data)
            };
            let desc = format!(
                "{} {len} bytes at {off:#x} in {before}: {result:?}",
                if write { "write" } else { "read" }
            );
            match result {
                _ if !solo => {}
                Err(RegionError::TransitionFailed { now, .. }) => {
                    assert_eq!(region.state(), now, "{desc}")
                }
                Err(_) => assert_eq!(region.state(), before, "{desc}: state changed"),
                Ok(()) => {
                    if !(write && off == DEVICE_STATE) {
                        assert_eq!(region.state(), before, "{desc}: state changed");
                    }
                }
            }
            desc
        }
    }
}

#[test]
fn random_accesses_keep_the_region_consistent() {
    let seed = env_u64("MIGRATION_FUZZ_SEED", 0x5eed_1234_abcd_0001);
    let iters = env_u64("MIGRATION_FUZZ_ITERS", 100_000);
    let mut rng = Rng(seed | 1);
    let ops = FakeOps::new((0..20_000).map(|i| i as u8).collect());
    let region = MigrationRegion::with_window_size(ops.clone(), WINDOW).expect("window");
    let mut seen = std::collections::HashSet::new();
    for i in 0..iters {
        let desc = step(&mut rng, &region, &ops, true);
        let ctx = format!("seed {seed:#x} step {i}: {desc}");
        seen.insert(check(&region, &ops, &ctx));
        // Keep the journal from growing without bound.
        if i % 1024 == 0 {
            ops.dev().journal.clear();
        }
    }
    // The walk is only useful if it went everywhere.
    assert_eq!(seen.len(), 5, "states visited: {seen:?}");
}

#[test]
fn concurrent_random_accesses_leave_a_consistent_region() {
    let seed = env_u64("MIGRATION_FUZZ_SEED", 0x5eed_1234_abcd_0002);
    let iters = env_u64("MIGRATION_FUZZ_ITERS", 100_000) / 5;
    let ops = FakeOps::new((0..20_000).map(|i| (i * 3) as u8).collect());
    let region = Arc::new(MigrationRegion::with_window_size(ops.clone(), WINDOW).expect("window"));
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let region = region.clone();
            let ops = ops.clone();
            std::thread::spawn(move || {
                let mut rng = Rng((seed ^ (t << 32)) | 1);
                for i in 0..iters {
                    step(&mut rng, &region, &ops, false);
                    if i % 1024 == 0 {
                        ops.dev().journal.clear();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("no panic in a worker");
    }
    check(&region, &ops, &format!("seed {seed:#x} after the threads"));
}
