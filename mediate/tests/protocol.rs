//! The migration region's register protocol, driven byte by byte as a VMM would, over the
//! fake mediator.

use devices::vfio::migration::MigrationState::{self, *};
use devices::vfio::region_migration::layout::{
    encode_state, transition, DATA_OFFSET, DATA_SIZE, DATA_WINDOW_OFFSET, DEFAULT_WINDOW_SIZE,
    DEVICE_STATE, PENDING_BYTES, RESERVED, TRANSITIONS,
};
use devices::vfio::region_migration::DirtyTracker;
use mediate::migration::testing::FakeOps;
use mediate::migration::{MigrationRegion, RegionError};

const WINDOW: u64 = 4096;
const STATES: [MigrationState; 5] = [Running, PreCopy, StopCopy, Stopped, Resuming];

fn region(state: Vec<u8>) -> (MigrationRegion<FakeOps>, FakeOps) {
    let ops = FakeOps::new(state);
    let r = MigrationRegion::with_window_size(ops.clone(), WINDOW).expect("valid window");
    (r, ops)
}

fn rd32(r: &MigrationRegion<FakeOps>, off: u64) -> Result<u32, RegionError> {
    let mut b = [0u8; 4];
    r.read(off, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn rd64(r: &MigrationRegion<FakeOps>, off: u64) -> Result<u64, RegionError> {
    let mut b = [0u8; 8];
    r.read(off, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn wr64(r: &MigrationRegion<FakeOps>, off: u64, v: u64) -> Result<(), RegionError> {
    r.write(off, &v.to_le_bytes())
}

fn set_raw(r: &MigrationRegion<FakeOps>, v: u32) -> Result<(), RegionError> {
    r.write(DEVICE_STATE, &v.to_le_bytes())
}

fn set(r: &MigrationRegion<FakeOps>, s: MigrationState) -> Result<(), RegionError> {
    set_raw(r, encode_state(s))
}

/// Brings a fresh (running) region to `s` by a legal path.
fn reach(r: &MigrationRegion<FakeOps>, s: MigrationState) {
    if s != Running {
        set(r, s).expect("legal from running");
    }
    assert_eq!(r.state(), s);
}

/// One save iteration as the v1 sequence has it: pending, data_offset, data_size, data.
fn save_one(r: &MigrationRegion<FakeOps>) -> Option<Vec<u8>> {
    if rd64(r, PENDING_BYTES).expect("pending_bytes") == 0 {
        return None;
    }
    let off = rd64(r, DATA_OFFSET).expect("data_offset");
    let size = rd64(r, DATA_SIZE).expect("data_size");
    assert_eq!(off, DATA_WINDOW_OFFSET);
    let mut chunk = vec![0u8; size as usize];
    if size > 0 {
        r.read(off, &mut chunk).expect("chunk");
    }
    Some(chunk)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn every_pair_of_states_is_legal_by_the_table_or_rejected_unchanged() {
    for from in STATES {
        for to in STATES {
            let (r, ops) = region(pattern(100));
            reach(&r, from);
            ops.dev().journal.clear();
            let result = set(&r, to);
            let journal = std::mem::take(&mut ops.dev().journal);
            if from == to {
                result.expect("rewriting the state is a no-op");
                assert!(journal.is_empty(), "{from}->{to}: {journal:?}");
            } else if let Some(t) = transition(from, to) {
                result.unwrap_or_else(|e| panic!("{from}->{to}: {e}"));
                assert_eq!(r.state(), to);
                let steps: Vec<_> = t.steps.iter().map(|s| s.name()).collect();
                assert_eq!(journal, steps, "{from}->{to}");
            } else {
                let e = result.expect_err("illegal");
                assert!(
                    matches!(e, RegionError::IllegalTransition { from: f, to: t } if f == from && t == to),
                    "{e}"
                );
                let msg = e.to_string();
                assert!(
                    msg.contains(&from.to_string()) && msg.contains(&to.to_string()),
                    "{msg}"
                );
                assert_eq!(r.state(), from);
                assert_eq!(rd32(&r, DEVICE_STATE).expect("state"), encode_state(from));
                assert!(journal.is_empty(), "{from}->{to} called {journal:?}");
            }
        }
    }
    // The fake device agrees with the register after every legal transition.
    for t in TRANSITIONS {
        let (r, ops) = region(vec![]);
        reach(&r, t.from);
        set(&r, t.to).expect("legal");
        let d = ops.dev();
        let bits = encode_state(t.to);
        assert_eq!(d.running, bits & 1 != 0, "{t:?}");
        assert_eq!(d.saving.is_some(), bits & 2 != 0, "{t:?}");
        assert_eq!(d.resuming, bits & 4 != 0, "{t:?}");
    }
}

#[test]
fn invalid_state_values_are_rejected_and_change_nothing() {
    for from in STATES {
        for v in [5u32, 6, 7, 8, 9, 0x10 | 1, 0x8000_0000, u32::MAX] {
            let (r, ops) = region(vec![1, 2, 3]);
            reach(&r, from);
            ops.dev().journal.clear();
            let e = set_raw(&r, v).expect_err("invalid");
            assert!(
                matches!(e, RegionError::InvalidState { value, .. } if value == v),
                "{e}"
            );
            assert_eq!(r.state(), from);
            assert!(ops.dev().journal.is_empty());
        }
    }
}

#[test]
fn pre_copy_is_live_and_stop_copy_is_not() {
    let (r, ops) = region(vec![]);
    set(&r, PreCopy).expect("pre-copy");
    assert_eq!(ops.dev().saving, Some(true));
    let (r2, ops2) = region(vec![]);
    set(&r2, StopCopy).expect("stop-copy");
    assert_eq!(ops2.dev().saving, Some(false));
    assert!(!ops2.dev().running);
    drop((r, r2));
}

#[test]
fn a_failed_step_leaves_the_state_the_previous_steps_reached() {
    let cases: &[(MigrationState, MigrationState, &str, MigrationState)] = &[
        (Running, PreCopy, "begin_save", Running),
        (Running, StopCopy, "stop_device", Running),
        (Running, StopCopy, "begin_save", Stopped),
        (StopCopy, Running, "resume_device", Stopped),
        (StopCopy, Running, "end_save", StopCopy),
        // A refused state is dropped: the device is stopped, not left resuming.
        (Resuming, Running, "end_restore", Stopped),
        (Resuming, Stopped, "end_restore", Stopped),
        (Resuming, Running, "resume_device", Stopped),
        (Running, Resuming, "begin_restore", Stopped),
    ];
    for &(from, to, hook, now) in cases {
        let (r, ops) = region(vec![9; 10]);
        reach(&r, from);
        ops.dev().fail = Some(hook);
        let e = set(&r, to).expect_err("injected failure");
        match &e {
            RegionError::TransitionFailed {
                from: f,
                to: t,
                now: n,
                step,
                ..
            } => assert_eq!((*f, *t, *n, *step), (from, to, now, hook), "{e}"),
            other => panic!("{from}->{to} failing {hook}: {other}"),
        }
        assert_eq!(r.state(), now);
        // And the device can go on from there, e.g. back to running.
        if now != Running {
            set(&r, Running).expect("recover");
        }
    }
}

#[test]
fn pre_copy_then_stop_copy_reassembles_the_state_byte_for_byte() {
    // 10_000 bytes through a 4 KiB window, at most 3000 per chunk in pre-copy.
    let (r, ops) = region(pattern(10_000));
    ops.dev().max_chunk = 3000;
    set(&r, PreCopy).expect("pre-copy");
    let mut stream = Vec::new();
    for _ in 0..2 {
        stream.extend(save_one(&r).expect("pending in pre-copy"));
    }
    assert_eq!(stream.len(), 6000);
    assert_eq!(rd64(&r, PENDING_BYTES).expect("pending"), 4000);
    // The running device produces more state: the estimate grows.
    ops.dev().state.extend(pattern(2_000));
    assert_eq!(rd64(&r, PENDING_BYTES).expect("pending"), 6000);
    ops.dev().max_chunk = 0;
    set(&r, StopCopy).expect("stop-copy");
    let mut chunks = 0;
    while let Some(chunk) = save_one(&r) {
        assert!(chunk.len() as u64 <= WINDOW);
        stream.extend(chunk);
        chunks += 1;
    }
    assert_eq!(chunks, 2, "6000 bytes through a 4096-byte window");
    assert_eq!(rd64(&r, PENDING_BYTES).expect("pending"), 0);
    assert_eq!(stream, ops.dev().state);
    set(&r, Stopped).expect("done");
}

#[test]
fn data_offset_reread_returns_the_same_chunk() {
    let (r, ops) = region(pattern(5000));
    set(&r, StopCopy).expect("stop-copy");
    assert_eq!(rd64(&r, PENDING_BYTES).expect("pending"), 5000);
    assert_eq!(rd64(&r, DATA_OFFSET).expect("offset"), DATA_WINDOW_OFFSET);
    assert_eq!(rd64(&r, DATA_SIZE).expect("size"), 4096);
    assert_eq!(rd64(&r, DATA_OFFSET).expect("offset"), DATA_WINDOW_OFFSET);
    assert_eq!(rd64(&r, DATA_SIZE).expect("size"), 4096);
    let saves = ops
        .dev()
        .journal
        .iter()
        .filter(|&&j| j == "save_chunk")
        .count();
    assert_eq!(saves, 1);
    // Acknowledged by pending_bytes: the next data_offset stages the rest.
    assert_eq!(rd64(&r, PENDING_BYTES).expect("pending"), 5000 - 4096);
    assert_eq!(rd64(&r, DATA_OFFSET).expect("offset"), DATA_WINDOW_OFFSET);
    assert_eq!(rd64(&r, DATA_SIZE).expect("size"), 5000 - 4096);
}

#[test]
fn data_offset_with_nothing_pending_stages_nothing() {
    let (r, ops) = region(vec![]);
    set(&r, StopCopy).expect("stop-copy");
    assert_eq!(rd64(&r, PENDING_BYTES).expect("pending"), 0);
    assert_eq!(rd64(&r, DATA_OFFSET).expect("offset"), DATA_WINDOW_OFFSET);
    assert_eq!(rd64(&r, DATA_SIZE).expect("size"), 0);
    assert!(!ops.dev().journal.contains(&"save_chunk"));
    let e = r
        .read(DATA_WINDOW_OFFSET, &mut [0u8; 1])
        .expect_err("no chunk");
    assert!(
        matches!(e, RegionError::OutsideChunk { chunk: 0, .. }),
        "{e}"
    );
    // Outside saving, data_offset is just the window's offset and nothing is asked.
    let (r, ops) = region(pattern(10));
    assert_eq!(rd64(&r, DATA_OFFSET).expect("offset"), DATA_WINDOW_OFFSET);
    assert_eq!(rd64(&r, PENDING_BYTES).expect("pending"), 0);
    assert_eq!(rd64(&r, DATA_SIZE).expect("size"), 0);
    assert!(ops.dev().journal.is_empty());
}

#[test]
fn restore_through_the_window_yields_the_same_state() {
    let src_state = pattern(9_999);
    let (a, _a_ops) = region(src_state.clone());
    set(&a, StopCopy).expect("stop-copy");
    let mut chunks = Vec::new();
    while let Some(c) = save_one(&a) {
        chunks.push(c);
    }
    assert_eq!(chunks.len(), 3);
    set(&a, Stopped).expect("stopped");

    let (b, b_ops) = region(vec![0xee; 4]);
    set(&b, Resuming).expect("resuming");
    for c in &chunks {
        assert_eq!(rd64(&b, DATA_OFFSET).expect("offset"), DATA_WINDOW_OFFSET);
        b.write(DATA_WINDOW_OFFSET, c).expect("window write");
        wr64(&b, DATA_SIZE, c.len() as u64).expect("data_size");
        assert_eq!(
            rd64(&b, DATA_SIZE).expect("data_size reads back"),
            c.len() as u64
        );
    }
    // Writing data_size 0 hands nothing to the device.
    wr64(&b, DATA_SIZE, 0).expect("empty");
    set(&b, Running).expect("running");
    let d = b_ops.dev();
    assert_eq!(d.state, src_state);
    assert_eq!(d.restore_pieces, vec![4096, 4096, 9_999 - 8192]);
    assert!(d.running);
}

#[test]
fn bad_accesses_are_errors_and_change_nothing() {
    let (r, ops) = region(pattern(100));
    let size = r.size();
    assert_eq!(size, DATA_WINDOW_OFFSET + WINDOW);
    set(&r, Resuming).expect("resuming");
    ops.dev().journal.clear();
    let mut b8 = [0u8; 8];
    // Bounds.
    for (off, len) in [
        (size - 4, 8),
        (size, 1),
        (u64::MAX, 1),
        (u64::MAX - 3, 8),
        (0, 0),
    ] {
        let mut buf = vec![0u8; len];
        let e = r.read(off, &mut buf).expect_err("out of bounds");
        assert!(
            matches!(e, RegionError::OutOfBounds { .. }),
            "{off:#x}/{len}: {e}"
        );
        let e = r.write(off, &buf).expect_err("out of bounds");
        assert!(
            matches!(e, RegionError::OutOfBounds { .. }),
            "{off:#x}/{len}: {e}"
        );
    }
    // Registers: whole, with their own size.
    for (off, len) in [
        (0, 8),
        (0, 2),
        (2, 4),
        (8, 4),
        (12, 4),
        (16, 1),
        (20, 8),
        (24, 4),
        (28, 4),
        (31, 1),
    ] {
        let e = r.read(off, &mut b8[..len]).expect_err("not a register");
        assert!(
            matches!(e, RegionError::NotARegister { .. }),
            "{off:#x}/{len}: {e}"
        );
        let e = r.write(off, &b8[..len]).expect_err("not a register");
        assert!(
            matches!(e, RegionError::NotARegister { .. }),
            "{off:#x}/{len}: {e}"
        );
    }
    // The hole, including an access straddling into the window.
    for (off, len) in [(32, 4), (0x800, 8), (DATA_WINDOW_OFFSET - 1, 2)] {
        let e = r.read(off, &mut b8[..len]).expect_err("hole");
        assert!(matches!(e, RegionError::Hole { .. }), "{off:#x}/{len}: {e}");
    }
    // Misaligned window accesses of register-like sizes; odd sizes are byte streams.
    for (off, len) in [(1, 2), (2, 4), (4, 8), (7, 8)] {
        let e = r
            .write(DATA_WINDOW_OFFSET + off, &b8[..len])
            .expect_err("misaligned");
        assert!(
            matches!(e, RegionError::Misaligned { .. }),
            "{off:#x}/{len}: {e}"
        );
    }
    r.write(DATA_WINDOW_OFFSET + 1, &[1, 2, 3])
        .expect("3 bytes anywhere");
    r.write(DATA_WINDOW_OFFSET + WINDOW - 1, &[1])
        .expect("last byte");
    // data_size larger than the window.
    let e = wr64(&r, DATA_SIZE, WINDOW + 1).expect_err("too large");
    assert!(matches!(e, RegionError::DataSizeTooLarge { .. }), "{e}");
    let e = wr64(&r, DATA_SIZE, u64::MAX).expect_err("too large");
    assert!(matches!(e, RegionError::DataSizeTooLarge { .. }), "{e}");
    // Read-only registers; reserved reads 0 and ignores writes.
    for off in [PENDING_BYTES, DATA_OFFSET] {
        let e = wr64(&r, off, 1).expect_err("read-only");
        assert!(matches!(e, RegionError::ReadOnly(_)), "{e}");
    }
    r.write(RESERVED, &[0xff; 4]).expect("ignored");
    assert_eq!(rd32(&r, RESERVED).expect("reserved"), 0);
    assert_eq!(r.state(), Resuming);
    assert!(ops.dev().journal.is_empty(), "{:?}", ops.dev().journal);
    assert!(ops.dev().incoming.is_empty());
}

#[test]
fn the_window_is_open_only_as_the_state_allows() {
    let (r, _ops) = region(pattern(5000));
    let e = r
        .read(DATA_WINDOW_OFFSET, &mut [0u8; 4])
        .expect_err("running");
    assert!(
        matches!(e, RegionError::WrongState { state: Running, .. }),
        "{e}"
    );
    let e = r.write(DATA_WINDOW_OFFSET, &[0u8; 4]).expect_err("running");
    assert!(
        matches!(e, RegionError::WrongState { state: Running, .. }),
        "{e}"
    );
    let e = wr64(&r, DATA_SIZE, 4).expect_err("running");
    assert!(
        matches!(e, RegionError::WrongState { state: Running, .. }),
        "{e}"
    );

    set(&r, StopCopy).expect("stop-copy");
    let e = wr64(&r, DATA_SIZE, 4).expect_err("saving");
    assert!(matches!(e, RegionError::ReadOnly(_)), "{e}");
    let e = r.write(DATA_WINDOW_OFFSET, &[0u8; 4]).expect_err("saving");
    assert!(matches!(e, RegionError::WrongState { .. }), "{e}");
    assert_eq!(rd64(&r, DATA_OFFSET).expect("offset"), DATA_WINDOW_OFFSET);
    let mut chunk = vec![0u8; 4096];
    r.read(DATA_WINDOW_OFFSET, &mut chunk).expect("whole chunk");
    assert_eq!(chunk, pattern(5000)[..4096]);
    // The last chunk is shorter: reads past it fail even within the window.
    assert_eq!(rd64(&r, PENDING_BYTES).expect("pending"), 904);
    assert_eq!(rd64(&r, DATA_OFFSET).expect("offset"), DATA_WINDOW_OFFSET);
    let e = r
        .read(DATA_WINDOW_OFFSET + 896, &mut [0u8; 16])
        .expect_err("past the chunk");
    assert!(
        matches!(e, RegionError::OutsideChunk { chunk: 904, .. }),
        "{e}"
    );
    // Reads within it still work afterwards.
    let mut tail = [0u8; 4];
    r.read(DATA_WINDOW_OFFSET + 900, &mut tail).expect("tail");
    assert_eq!(tail, pattern(5000)[4996..]);
}

#[test]
fn a_restore_starts_from_an_empty_window() {
    let (r, _ops) = region(pattern(100));
    set(&r, StopCopy).expect("stop-copy");
    assert!(save_one(&r).is_some());
    set(&r, Stopped).expect("stopped");
    set(&r, Resuming).expect("resuming");
    let mut b = vec![0xffu8; 100];
    r.read(DATA_WINDOW_OFFSET, &mut b).expect("window");
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn device_failures_are_reported_not_hidden() {
    let (r, ops) = region(pattern(100));
    set(&r, StopCopy).expect("stop-copy");
    ops.dev().fail = Some("save_chunk");
    let e = rd64(&r, DATA_OFFSET).expect_err("save fails");
    assert!(
        matches!(
            e,
            RegionError::Device {
                op: "save a chunk",
                ..
            }
        ),
        "{e}"
    );
    // Nothing was staged; the next try works.
    assert_eq!(rd64(&r, DATA_SIZE).expect("size"), 0);
    assert_eq!(rd64(&r, DATA_OFFSET).expect("offset"), DATA_WINDOW_OFFSET);
    assert_eq!(rd64(&r, DATA_SIZE).expect("size"), 100);

    set(&r, Stopped).expect("stopped");
    set(&r, Resuming).expect("resuming");
    r.write(DATA_WINDOW_OFFSET, &[1, 2, 3]).expect("window");
    ops.dev().fail = Some("restore_chunk");
    let e = wr64(&r, DATA_SIZE, 3).expect_err("restore fails");
    assert!(
        matches!(
            e,
            RegionError::Device {
                op: "restore a chunk",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(rd64(&r, DATA_SIZE).expect("size"), 0, "not consumed");
    assert_eq!(r.state(), Resuming);
}

#[test]
fn dirty_pages_are_aligned_sorted_and_deduplicated() {
    let (r, ops) = region(vec![]);
    ops.mark_dirty(0x9000);
    r.start_dirty_tracking().expect("start");
    for gpa in [0x5123, 0x1000, 0x1fff, 0x5000, 0x3_0000_0000] {
        ops.mark_dirty(gpa);
    }
    assert_eq!(
        r.take_dirty_pages().expect("take"),
        vec![0x1000, 0x5000, 0x3_0000_0000]
    );
    assert!(r.take_dirty_pages().expect("take").is_empty());
    ops.mark_dirty(0x2000);
    r.stop_dirty_tracking().expect("stop");
    ops.mark_dirty(0x4000);
    assert!(r.take_dirty_pages().expect("take").is_empty());
}

#[test]
fn reset_abandons_a_migration() {
    let (r, _ops) = region(pattern(100));
    set(&r, PreCopy).expect("pre-copy");
    assert_eq!(rd64(&r, DATA_OFFSET).expect("offset"), DATA_WINDOW_OFFSET);
    r.reset();
    assert_eq!(r.state(), Running);
    assert_eq!(rd64(&r, DATA_SIZE).expect("size"), 0);
}

#[test]
fn window_sizes_and_region_info() {
    for bad in [0, 100, 4097, 128 * 1024 * 1024] {
        assert!(matches!(
            MigrationRegion::with_window_size(FakeOps::default(), bad),
            Err(RegionError::BadWindowSize(_))
        ));
    }
    let r = MigrationRegion::new(FakeOps::default());
    assert_eq!(r.window_size(), DEFAULT_WINDOW_SIZE);
    let info = r.region_info();
    assert_eq!(info.size, DATA_WINDOW_OFFSET + DEFAULT_WINDOW_SIZE);
    assert!(info.flags.read && info.flags.write && !info.flags.mmap);
    assert!(info.mappable_areas().is_empty());
}
