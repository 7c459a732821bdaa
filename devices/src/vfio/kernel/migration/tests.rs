//! [`KernelVfioMigration`] against the fake kernel.

use std::mem::{offset_of, size_of};

use vfio_bindings::bindings::vfio::{
    vfio_device_feature, vfio_device_feature_dma_logging_control,
    vfio_device_feature_dma_logging_report, vfio_device_feature_mig_state,
    vfio_device_feature_migration,
};

use super::fake::{encode, ArcFailure, FakeKernel};
use super::*;
use KernelState::{
    Error as KE, PreCopy as KPC, PreCopyP2p as KPCP, Resuming as KRS, Running as KR,
    RunningP2p as KRP, Stop as KS, StopCopy as KSC,
};
use MigrationState::Error as ME;

const ALL_STATES: [MigrationState; 6] = [Running, PreCopy, StopCopy, Stopped, Resuming, ME];
const BASIC: u64 = FLAG_STOP_COPY;
const P2P: u64 = FLAG_STOP_COPY | FLAG_P2P;
const PRE: u64 = FLAG_STOP_COPY | FLAG_PRE_COPY;
const FULL: u64 = FLAG_STOP_COPY | FLAG_P2P | FLAG_PRE_COPY;

fn blob(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

fn open(flags: u64, data: &[u8]) -> (FakeKernel, KernelVfioMigration) {
    let fake = FakeKernel::new(Some(flags), data);
    let m = KernelVfioMigration::probe(Box::new(fake.clone()))
        .unwrap()
        .expect("the fake has migration");
    (fake, m)
}

/// The states the accepted SETs went to.
fn walked(fake: &FakeKernel) -> Vec<KernelState> {
    fake.take_sets()
        .into_iter()
        .map(|(from, to, ok)| {
            assert!(ok, "the fake refused {from} -> {to}: not a direct arc");
            to
        })
        .collect()
}

/// Brings a fresh device (Running) to `s` through the interface.
fn reach(m: &KernelVfioMigration, s: MigrationState) {
    if s != Running {
        m.set_state(s).unwrap();
    }
}

#[test]
fn payload_layouts_match_vfio_bindings() {
    assert_eq!(HEADER_SIZE, size_of::<vfio_device_feature>());
    assert_eq!(HEADER_SIZE, 8);
    assert_eq!(
        layout::MIGRATION_SIZE,
        size_of::<vfio_device_feature_migration>()
    );
    assert_eq!(
        layout::MIG_STATE_SIZE,
        size_of::<vfio_device_feature_mig_state>()
    );
    assert_eq!(
        layout::MIG_STATE_DATA_FD,
        offset_of!(vfio_device_feature_mig_state, data_fd)
    );
    assert_eq!(
        layout::LOGGING_CONTROL_SIZE,
        size_of::<vfio_device_feature_dma_logging_control>()
    );
    assert_eq!(
        layout::LOGGING_CONTROL_NUM_RANGES,
        offset_of!(vfio_device_feature_dma_logging_control, num_ranges)
    );
    assert_eq!(
        layout::LOGGING_CONTROL_RANGES,
        offset_of!(vfio_device_feature_dma_logging_control, ranges)
    );
    assert_eq!(
        layout::LOGGING_REPORT_SIZE,
        size_of::<vfio_device_feature_dma_logging_report>()
    );
    assert_eq!(
        layout::LOGGING_REPORT_PAGE_SIZE,
        offset_of!(vfio_device_feature_dma_logging_report, page_size)
    );
    assert_eq!(
        layout::LOGGING_REPORT_BITMAP,
        offset_of!(vfio_device_feature_dma_logging_report, bitmap)
    );
    let mut b = FeatureBuf::new(0x2_0002, 8);
    assert_eq!((b.argsz(), b.flags()), (16, 0x2_0002));
    assert_eq!(b.as_mut_ptr() as usize % 8, 0);
    for s in KernelState::ALL {
        assert_eq!(KernelState::from_raw(s.raw()), Some(s));
    }
    assert_eq!(KernelState::from_raw(8), None);
}

#[test]
fn probing() {
    let none = FakeKernel::new(None, b"");
    assert!(KernelVfioMigration::probe(Box::new(none))
        .unwrap()
        .is_none());

    for flags in [BASIC, P2P, PRE, FULL] {
        let (_, m) = open(flags, b"x");
        assert_eq!(m.flags(), flags);
        assert!(m.dma_logging_supported());
    }
    let fake = FakeKernel::new(Some(PRE), b"");
    fake.st().dma_logging = false;
    let m = KernelVfioMigration::probe(Box::new(fake)).unwrap().unwrap();
    assert!(!m.dma_logging_supported());

    let bad = FakeKernel::new(Some(FLAG_PRE_COPY), b"");
    let e = KernelVfioMigration::probe(Box::new(bad))
        .err()
        .expect("flags without STOP_COPY are refused");
    assert!(e.to_string().contains("VFIO_MIGRATION_STOP_COPY"), "{e}");
}

/// The kernel arcs each interface transition walks, per flag set.
fn expected(flags: u64, from: MigrationState, to: MigrationState) -> Vec<KernelState> {
    let p2p = flags & FLAG_P2P != 0;
    let pre = flags & FLAG_PRE_COPY != 0;
    // RUNNING -> STOP, and back, through RUNNING_P2P when there is one.
    let stop: &[KernelState] = if p2p { &[KRP, KS] } else { &[KS] };
    let run: &[KernelState] = if p2p { &[KRP, KR] } else { &[KR] };
    let cat = |a: &[KernelState], b: &[KernelState]| [a, b].concat();
    match (from, to) {
        (Running, PreCopy) if pre => vec![KPC],
        (Running, PreCopy) => vec![],
        (Running, StopCopy) => cat(stop, &[KSC]),
        (Running, Stopped) => stop.to_vec(),
        (Running, Resuming) => cat(stop, &[KRS]),
        (PreCopy, StopCopy) if pre && p2p => vec![KPCP, KSC],
        (PreCopy, StopCopy) if pre => vec![KSC],
        (PreCopy, StopCopy) => cat(stop, &[KSC]),
        (PreCopy, Running) if pre => vec![KR],
        (PreCopy, Running) => vec![],
        (StopCopy, Stopped) => vec![KS],
        (StopCopy, Running) => cat(&[KS], run),
        (Stopped, Running) => run.to_vec(),
        (Stopped, StopCopy) => vec![KSC],
        (Stopped, Resuming) => vec![KRS],
        (Resuming, Running) => cat(&[KS], run),
        (Resuming, Stopped) => vec![KS],
        _ => unreachable!("{from} -> {to} is not legal"),
    }
}

#[test]
fn the_transitions_are_the_migration_regions() {
    use crate::vfio::region_migration::layout;
    assert_eq!(TRANSITIONS.len(), layout::TRANSITIONS.len());
    for tr in TRANSITIONS {
        assert!(
            layout::transition(tr.from, tr.to).is_some(),
            "{} -> {}",
            tr.from,
            tr.to
        );
    }
}

#[test]
fn every_transition_walks_the_right_arcs() {
    for flags in [BASIC, P2P, PRE, FULL] {
        for tr in TRANSITIONS {
            let data = blob(100, 1);
            let (fake, m) = open(flags, &data);
            reach(&m, tr.from);
            if tr.from == Resuming && tr.to != Resuming {
                m.restore_chunk(&encode(&data)).unwrap();
            }
            fake.take_sets();
            m.set_state(tr.to)
                .unwrap_or_else(|e| panic!("flags {flags:#x}: {} -> {}: {e}", tr.from, tr.to));
            assert_eq!(
                walked(&fake),
                expected(flags, tr.from, tr.to),
                "flags {flags:#x}: {} -> {} ({})",
                tr.from,
                tr.to,
                tr.why
            );
            assert_eq!(m.state().unwrap(), tr.to);
            // Asking for the state it is in changes nothing.
            m.set_state(tr.to).unwrap();
            assert!(fake.take_sets().is_empty());
        }
    }
}

#[test]
fn paths_are_the_kernels_own_combination_walks() {
    // For every pair of supported states, the path walked here is the one the kernel's
    // vfio_mig_get_next_state() would take, and made of arcs the fake accepts.
    for flags in [BASIC, P2P, PRE, FULL] {
        for from in KernelState::ALL.into_iter().filter(|s| s.supported(flags)) {
            for to in KernelState::ALL.into_iter().filter(|s| s.supported(flags)) {
                let ours = path(from, to, flags);
                if from == KE || to == KE || (from == KSC && matches!(to, KPC | KPCP)) {
                    assert!(ours.is_none() || from == to, "{from} -> {to}");
                    continue;
                }
                let ours = ours.unwrap_or_else(|| panic!("no path {from} -> {to} ({flags:#x})"));
                let mut left_session = !from.saving();
                for a in &ours {
                    assert!(direct(a.from, a.to, flags).is_some());
                    assert!(
                        !(left_session && a.from.saving() && a.from != from),
                        "{from} -> {to} re-enters the saving group at {}",
                        a.from
                    );
                    left_session |= !a.to.saving();
                }
                let states: Vec<KernelState> = ours.iter().map(|a| a.to).collect();
                assert_eq!(states, fake_kernel_walk(from, to, flags), "{from} -> {to}");
            }
        }
    }
}

/// What the kernel walks for a combination transition: `vfio_mig_get_next_state()` until
/// it arrives (through the fake's transcription of the kernel's table).
fn fake_kernel_walk(from: KernelState, to: KernelState, flags: u64) -> Vec<KernelState> {
    let mut out = Vec::new();
    let mut cur = from;
    while cur != to {
        cur = super::fake::next_state(cur, to, flags);
        assert_ne!(cur, KE, "the kernel has no way from {from} to {to}");
        out.push(cur);
    }
    out
}

#[test]
fn illegal_transitions_are_refused_before_any_set() {
    for flags in [BASIC, FULL] {
        for from in ALL_STATES.into_iter().filter(|&s| s != ME) {
            for to in ALL_STATES {
                if from == to || legal(from, to) {
                    continue;
                }
                let (fake, m) = open(flags, b"state");
                reach(&m, from);
                fake.take_sets();
                let e = m.set_state(to).unwrap_err();
                assert!(
                    matches!(e, MigrationError::IllegalTransition { from: f, to: t } if f == from && t == to),
                    "{from} -> {to}: {e}"
                );
                assert!(
                    fake.take_sets().is_empty(),
                    "{from} -> {to} reached the kernel"
                );
                assert_eq!(m.state().unwrap(), from);
            }
        }
    }
    // Out of ERROR only a reset helps.
    let (fake, m) = open(FULL, b"");
    fake.st().state = KE;
    assert_eq!(m.state().unwrap(), ME);
    let e = m.set_state(Running).unwrap_err();
    assert!(
        matches!(
            e,
            MigrationError::IllegalTransition {
                from: ME,
                to: Running
            }
        ),
        "{e}"
    );
    assert!(fake.take_sets().is_empty());
}

/// Saves like the VMM: pre-copy passes, then stop-copy until nothing is pending.
#[test]
fn save_round_trip_is_byte_exact() {
    let data = blob(10_000, 3);
    let stream = encode(&data);
    let (fake, m) = open(PRE, &data);
    {
        let mut st = fake.st();
        st.precopy_initial = 3000;
        st.max_io = 1000;
    }
    let mut saved = Vec::new();
    m.set_state(PreCopy).unwrap();
    assert_eq!(m.pending_bytes().unwrap(), 3000, "initial_bytes");
    while let Some(c) = m.save_chunk().unwrap() {
        assert!(c.len() <= 1000);
        saved.extend(c);
    }
    assert_eq!(
        saved.len(),
        3000,
        "pre-copy stops at the temporary end (ENOMSG)"
    );
    assert_eq!(m.pending_bytes().unwrap(), 0);

    // The device runs on and dirties more of its state.
    fake.device_runs(2500);
    assert_eq!(m.pending_bytes().unwrap(), 2500, "dirty_bytes");
    fake.st().max_io = 700;
    while let Some(c) = m.save_chunk().unwrap() {
        saved.extend(c);
    }
    assert_eq!(saved.len(), 5500);
    // The driver is still producing: a non-blocking read says so and save_chunk waits.
    fake.st().producing = true;
    assert_eq!(m.save_chunk().unwrap(), None);
    fake.st().producing = false;
    assert!(fake.st().nonblocking_reads.iter().all(|&nb| nb));
    fake.st().nonblocking_reads.clear();

    fake.take_sets();
    m.set_state(StopCopy).unwrap();
    assert_eq!(walked(&fake), vec![KSC]);
    let rest = (stream.len() - 5500) as u64;
    assert_eq!(m.pending_bytes().unwrap(), rest, "exact in stop-copy");
    assert_eq!(
        m.pending_bytes().unwrap(),
        rest,
        "asking again reads nothing more"
    );
    let mut chunks = 0;
    while m.pending_bytes().unwrap() > 0 {
        if let Some(c) = m.save_chunk().unwrap() {
            saved.extend(c);
            chunks += 1;
        }
    }
    assert!(chunks >= 1);
    assert_eq!(m.save_chunk().unwrap(), None);
    assert!(
        fake.st().nonblocking_reads.iter().all(|&nb| !nb),
        "stop-copy reads block"
    );
    m.set_state(Stopped).unwrap();
    assert_eq!(saved, stream, "reassembled byte for byte");

    // Restore into another device, in pieces of another size.
    let (dst, d) = open(PRE, &blob(50, 9));
    dst.st().max_io = 333;
    d.set_state(Resuming).unwrap();
    for piece in saved.chunks(4096) {
        d.restore_chunk(piece).unwrap();
    }
    d.set_state(Running).unwrap();
    assert_eq!(walked(&dst), vec![KS, KRS, KS, KR]);
    assert_eq!(dst.st().blob, data);
}

#[test]
fn stop_copy_without_read_ahead_and_snapshot_without_pre_copy() {
    let data = blob(3000, 5);
    let (fake, m) = open(BASIC, &data);
    fake.st().max_io = 512;
    // No PRE_COPY: pre-copy has nothing to give and the kernel stays RUNNING.
    m.set_state(PreCopy).unwrap();
    assert_eq!(m.state().unwrap(), PreCopy);
    assert_eq!(m.pending_bytes().unwrap(), 0);
    assert_eq!(m.save_chunk().unwrap(), None);
    assert_eq!(fake.st().state, KR);
    m.set_state(StopCopy).unwrap();
    // save_chunk straight away (no pending_bytes first) reads from the fd.
    let mut saved = Vec::new();
    while let Some(c) = m.save_chunk().unwrap() {
        saved.extend(c);
    }
    assert_eq!(saved, encode(&data));
    assert_eq!(m.pending_bytes().unwrap(), 0);
}

#[test]
fn wrong_states_for_data() {
    let (_, m) = open(PRE, b"abc");
    let e = m.save_chunk().unwrap_err();
    assert!(
        matches!(e, MigrationError::WrongState { state: Running, .. }),
        "{e}"
    );
    let e = m.restore_chunk(b"x").unwrap_err();
    assert!(
        matches!(e, MigrationError::WrongState { state: Running, .. }),
        "{e}"
    );
    assert_eq!(m.pending_bytes().unwrap(), 0);
    m.set_state(Resuming).unwrap();
    let e = m.save_chunk().unwrap_err();
    assert!(
        matches!(
            e,
            MigrationError::WrongState {
                state: Resuming,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn kernel_errors_on_arcs() {
    // EIO on STOP -> STOP_COPY, the device ends in ERROR.
    let (fake, m) = open(BASIC, b"state");
    fake.st().fail_arc = Some(ArcFailure {
        from: KS,
        to: KSC,
        errno: libc::EIO,
        then: KE,
    });
    let e = m.set_state(StopCopy).unwrap_err();
    match &e {
        MigrationError::TransitionFailed {
            from: Running,
            to: StopCopy,
            now: ME,
            reason,
        } => {
            assert!(
                reason.contains("arc STOP -> STOP_COPY (step 2 of 2"),
                "{reason}"
            );
            assert!(reason.contains("EIO"), "{reason}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(m.state().unwrap(), ME);
    assert!(matches!(
        m.set_state(Running).unwrap_err(),
        MigrationError::IllegalTransition { from: ME, .. }
    ));

    // EINVAL on RUNNING -> RUNNING_P2P; the device stays RUNNING and can go on.
    let (fake, m) = open(FULL, b"state");
    fake.st().fail_arc = Some(ArcFailure {
        from: KR,
        to: KRP,
        errno: libc::EINVAL,
        then: KR,
    });
    let e = m.set_state(Stopped).unwrap_err();
    assert!(
        matches!(&e, MigrationError::TransitionFailed { now: Running, reason, .. }
            if reason.contains("RUNNING -> RUNNING_P2P (step 1 of 2") && reason.contains("EINVAL")),
        "{e}"
    );
    fake.st().fail_arc = None;
    m.set_state(Stopped).unwrap();

    // Failing half-way leaves RUNNING_P2P, which reads as Running; asking for Running
    // completes the way back.
    let (fake, m) = open(FULL, b"state");
    fake.st().fail_arc = Some(ArcFailure {
        from: KRP,
        to: KS,
        errno: libc::EIO,
        then: KRP,
    });
    let e = m.set_state(Stopped).unwrap_err();
    assert!(
        matches!(&e, MigrationError::TransitionFailed { now: Running, .. }),
        "{e}"
    );
    fake.take_sets();
    m.set_state(Running).unwrap();
    assert_eq!(walked(&fake), vec![KR]);

    // A failed arc inside the saving group keeps the session: pre-copy goes on.
    let (fake, m) = open(FULL, b"state");
    fake.st().precopy_initial = 6;
    m.set_state(PreCopy).unwrap();
    fake.st().fail_arc = Some(ArcFailure {
        from: KPC,
        to: KPCP,
        errno: libc::EIO,
        then: KPC,
    });
    let e = m.set_state(StopCopy).unwrap_err();
    assert!(
        matches!(&e, MigrationError::TransitionFailed { now: PreCopy, .. }),
        "{e}"
    );
    assert_eq!(m.save_chunk().unwrap().as_deref(), Some(&b"FAKE\x05\0"[..]));
    m.set_state(Running).unwrap();
}

#[test]
fn truncated_and_broken_streams() {
    // The source's stream ends early (EOF in stop-copy): the destination's driver finds
    // the state incomplete when loading ends.
    let data = blob(5000, 7);
    let (fake, m) = open(BASIC, &data);
    fake.st().truncate_at = Some(4000);
    m.set_state(StopCopy).unwrap();
    let mut saved = Vec::new();
    while m.pending_bytes().unwrap() > 0 {
        saved.extend(m.save_chunk().unwrap().unwrap_or_default());
    }
    assert_eq!(saved.len(), 4000);
    let (dst, d) = open(BASIC, b"");
    d.set_state(Resuming).unwrap();
    d.restore_chunk(&saved).unwrap();
    let e = d.set_state(Running).unwrap_err();
    assert!(
        matches!(&e, MigrationError::TransitionFailed { from: Resuming, to: Running, now: ME, reason }
            if reason.contains("RESUMING -> STOP") && reason.contains("EINVAL")),
        "{e}"
    );
    assert_eq!(dst.st().state, KE);

    // A read of 0 bytes at pre-copy's temporary end (Linux's mtty) is "nothing now", not
    // the end: the rest comes in stop-copy and the state is whole.
    let (fake, m) = open(PRE, &data);
    fake.st().precopy_initial = 100;
    fake.st().precopy_eof = true;
    m.set_state(PreCopy).unwrap();
    let mut saved = Vec::new();
    while let Some(c) = m.save_chunk().unwrap() {
        saved.extend(c);
    }
    assert_eq!(
        saved.len(),
        100,
        "the initial bytes, then the temporary end"
    );
    m.set_state(StopCopy).unwrap();
    while let Some(c) = m.save_chunk().unwrap() {
        saved.extend(c);
    }
    let (dst, d) = open(PRE, b"");
    d.set_state(Resuming).unwrap();
    d.restore_chunk(&saved).unwrap();
    d.set_state(Running).unwrap();
    assert_eq!(
        dst.st().blob,
        data,
        "pre-copy and stop-copy together are the whole state"
    );

    // The data fd fails (the driver tore the session down).
    let (fake, m) = open(BASIC, &data);
    m.set_state(StopCopy).unwrap();
    fake.st().fail_read = Some(libc::ENODEV);
    let e = m.pending_bytes().unwrap_err();
    assert!(
        matches!(&e, MigrationError::Device { reason, .. } if reason.contains("ENODEV")),
        "{e}"
    );

    // Writes on a session an arc ended answer ENODEV... which the interface never does:
    // leaving RESUMING drops the fd. A device reset behind our back shows as Running.
    let (fake, m) = open(BASIC, &data);
    m.set_state(Resuming).unwrap();
    fake.st().state = KR;
    let e = m.restore_chunk(b"late").unwrap_err();
    assert!(
        matches!(e, MigrationError::WrongState { state: Running, .. }),
        "{e}"
    );
}

#[test]
fn dma_logging_reports_pages() {
    let (fake, m) = open(PRE, b"");
    // Not started / no ranges.
    assert!(m.take_dirty_pages().is_err());
    let e = m.start_dirty_tracking().unwrap_err();
    assert!(e.to_string().contains("no IOVA ranges"), "{e}");
    // Bad ranges.
    let bad = [IovaRange {
        iova: 0x1001,
        length: 0x1000,
    }];
    assert!(m.set_dma_ranges(&bad).is_err());
    let overlap = [
        IovaRange {
            iova: 0x0,
            length: 0x3000,
        },
        IovaRange {
            iova: 0x2000,
            length: 0x1000,
        },
    ];
    assert!(m
        .set_dma_ranges(&overlap)
        .unwrap_err()
        .to_string()
        .contains("overlap"));

    // Low RAM not starting at 0, and 100 pages above 4 GiB (the bitmap's last word has
    // 28 bits past the range, which the fake fills with garbage).
    let low = IovaRange {
        iova: 0x10_0000,
        length: 0x40_0000,
    };
    let high = IovaRange {
        iova: 0x1_0000_0000,
        length: 100 * 4096,
    };
    m.set_dma_ranges(&[high, low]).unwrap();
    fake.st().dma_page_size = 8192; // the device picks its own granularity
    m.start_dirty_tracking().unwrap();
    assert!(fake.st().logging);
    assert_eq!(
        fake.st().logged_ranges,
        vec![(low.iova, low.length), (high.iova, high.length)]
    );
    assert!(m.set_dma_ranges(&[low]).is_err(), "not while logging");
    fake.st().sloppy_tail = true;
    fake.dma_write(0x10_0000, 8); // first page of low
    fake.dma_write(0x10_0010, 8); // same page
    fake.dma_write(0x10_2ff0, 0x20); // spans two pages
    fake.dma_write(0x4f_f000, 4); // last page of low
    fake.dma_write(0x1_0000_0000 + 99 * 4096, 1); // last page of high
    fake.dma_write(0x1_0000_0000 + 64 * 4096, 4096); // first bit of the last word
    assert_eq!(
        m.take_dirty_pages().unwrap(),
        vec![
            0x10_0000,
            0x10_2000,
            0x10_3000,
            0x4f_f000,
            0x1_0000_0000 + 64 * 4096,
            0x1_0000_0000 + 99 * 4096,
        ]
    );
    // The report cleared the log; only the garbage tail would come again, and is ignored.
    assert_eq!(m.take_dirty_pages().unwrap(), Vec::<u64>::new());
    m.stop_dirty_tracking().unwrap();
    assert!(!fake.st().logging);
    m.stop_dirty_tracking().unwrap();
    assert!(m.take_dirty_pages().is_err());

    // A device without DMA logging says so.
    let fake = FakeKernel::new(Some(PRE), b"");
    fake.st().dma_logging = false;
    let m = KernelVfioMigration::probe(Box::new(fake)).unwrap().unwrap();
    m.set_dma_ranges(&[low]).unwrap();
    let e = m.start_dirty_tracking().unwrap_err();
    assert!(
        e.to_string().contains("does not support DMA logging"),
        "{e}"
    );
}
