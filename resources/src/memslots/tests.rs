//! Unit tests of [`MemSlots`] against the fake backend.

use std::sync::Arc;

use super::fake::{Call, FakeKvm};
use super::*;

const HOST: u64 = 0x7f00_0000_0000;
const PAGE: u64 = PAGE_SIZE;

fn setup(max: u32) -> (Arc<FakeKvm>, MemSlots) {
    let fake = FakeKvm::new(max);
    let slots = MemSlots::new(fake.clone());
    (fake, slots)
}

fn ram(gpa: u64, size: u64, host: u64) -> Mapping {
    Mapping {
        gpa,
        size,
        host_addr: host,
        flags: MapFlags::default(),
        kind: MappingKind::Ram,
    }
}

fn create(slot: u32, gpa: u64, size: u64, host: u64) -> Call {
    Call::Create {
        slot,
        gpa,
        size,
        host,
        flags: 0,
    }
}

fn map(slots: &MemSlots, gpa: u64, size: u64, host: u64) -> Result<SlotId> {
    // SAFETY: the fake backend never touches the host memory.
    unsafe { slots.map(gpa, size, host, MapFlags::default(), MappingKind::Ram) }
}

fn fill(slots: &MemSlots, gpa: u64, size: u64, host: u64) -> Result<SlotId> {
    // SAFETY: the fake backend never touches the host memory.
    unsafe { slots.fill(gpa, size, host, MapFlags::default(), MappingKind::Ram) }
}

/// The record and the fake KVM agree on what is mapped.
fn assert_consistent(fake: &FakeKvm, slots: &MemSlots) {
    let recorded: Vec<_> = slots
        .mappings()
        .into_iter()
        .map(|(slot, m)| (slot.0, m.gpa, m.size, m.host_addr, m.flags.kvm_flags()))
        .collect();
    assert_eq!(recorded, fake.live());
}

#[test]
fn map_installs_a_slot_and_records_it() {
    let (fake, slots) = setup(8);
    assert_eq!(slots.max_slots(), 8);
    assert_eq!(map(&slots, 0, 16 * PAGE, HOST).unwrap(), SlotId(0));
    assert_eq!(
        map(&slots, 0x10_0000, PAGE, HOST + 0x10_0000).unwrap(),
        SlotId(1)
    );
    assert_eq!(
        fake.take_calls(),
        vec![
            create(0, 0, 16 * PAGE, HOST),
            create(1, 0x10_0000, PAGE, HOST + 0x10_0000)
        ]
    );
    assert_eq!(
        slots.lookup(0x5000),
        Some((SlotId(0), ram(0, 16 * PAGE, HOST)))
    );
    assert_eq!(slots.lookup(16 * PAGE), None);
    let gpas: Vec<u64> = slots.mappings().iter().map(|(_, m)| m.gpa).collect();
    assert_eq!(gpas, vec![0, 0x10_0000]);
    assert_consistent(&fake, &slots);
}

#[test]
fn map_rejects_bad_arguments_without_calling_kvm() {
    let (fake, slots) = setup(8);
    let unaligned = |r: Result<SlotId>, expected: &str| match r {
        Err(MemSlotsError::Unaligned { what, .. }) => assert_eq!(what, expected),
        other => panic!("expected Unaligned {expected}, got {other:?}"),
    };
    unaligned(map(&slots, 0x800, PAGE, HOST), "guest address");
    unaligned(map(&slots, 0, 0x800, HOST), "size");
    unaligned(map(&slots, 0, PAGE, HOST + 8), "host address");
    assert!(matches!(
        map(&slots, 0, 0, HOST),
        Err(MemSlotsError::ZeroSize { .. })
    ));
    assert!(matches!(
        map(&slots, u64::MAX - PAGE + 1, PAGE, HOST),
        Err(MemSlotsError::Wraps { what: "guest", .. })
    ));
    assert!(matches!(
        map(&slots, 0, PAGE, u64::MAX - PAGE + 1),
        Err(MemSlotsError::Wraps { what: "host", .. })
    ));
    let msg = map(&slots, 0x800, PAGE, HOST).unwrap_err().to_string();
    assert_eq!(
        msg,
        "cannot map 0x1000 bytes at 0x800: the guest address 0x800 is not 4 KiB aligned"
    );
    assert!(fake.take_calls().is_empty());
    assert!(slots.mappings().is_empty());
}

#[test]
fn map_rejects_overlap_and_names_both_ranges() {
    let (fake, slots) = setup(8);
    map(&slots, 0x10000, 0x10000, HOST).unwrap();
    fake.take_calls();
    for (gpa, size) in [
        (0x1f000, 0x2000),  // tail
        (0xf000, 0x2000),   // head
        (0x12000, 0x1000),  // inside
        (0x0, 0x40000),     // around
        (0x10000, 0x10000), // identical
    ] {
        let err = map(&slots, gpa, size, HOST).unwrap_err();
        assert!(matches!(err, MemSlotsError::Overlap { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("[{gpa:#x}, {:#x})", gpa + size)),
            "{msg}"
        );
        assert!(
            msg.contains("[0x10000, 0x20000), already mapped in slot 0"),
            "{msg}"
        );
    }
    // Touching ranges are fine.
    map(&slots, 0xf000, PAGE, HOST).unwrap();
    map(&slots, 0x20000, PAGE, HOST).unwrap();
    assert_eq!(fake.take_calls().len(), 2);
    assert_consistent(&fake, &slots);
}

#[test]
fn slot_numbers_are_reused_and_exhaustion_is_reported() {
    let (fake, slots) = setup(2);
    map(&slots, 0, PAGE, HOST).unwrap();
    map(&slots, PAGE, PAGE, HOST + PAGE).unwrap();
    let err = map(&slots, 2 * PAGE, PAGE, HOST).unwrap_err();
    assert!(
        matches!(err, MemSlotsError::NoFreeSlot { max: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("all 2 are in use"));
    assert_eq!(slots.unmap(0).unwrap(), ram(0, PAGE, HOST));
    assert_eq!(map(&slots, 2 * PAGE, PAGE, HOST).unwrap(), SlotId(0));
    assert_eq!(
        fake.take_calls(),
        vec![
            create(0, 0, PAGE, HOST),
            create(1, PAGE, PAGE, HOST + PAGE),
            Call::Delete { slot: 0 },
            create(0, 2 * PAGE, PAGE, HOST),
        ]
    );
    assert_consistent(&fake, &slots);
}

#[test]
fn backend_without_slots_refuses_every_mapping() {
    let (fake, slots) = setup(0);
    let err = map(&slots, 0, PAGE, HOST).unwrap_err();
    assert!(
        matches!(err, MemSlotsError::NoFreeSlot { max: 0, .. }),
        "{err}"
    );
    assert!(fake.take_calls().is_empty());
}

#[test]
fn unmap_needs_the_start_of_a_mapping() {
    let (fake, slots) = setup(8);
    map(&slots, 0, 4 * PAGE, HOST).unwrap();
    fake.take_calls();
    for gpa in [PAGE, 4 * PAGE, 0x1234_5000] {
        let err = slots.unmap(gpa).unwrap_err();
        assert!(matches!(err, MemSlotsError::NotMapped { .. }), "{err}");
    }
    assert_eq!(
        slots.unmap(PAGE).unwrap_err().to_string(),
        "cannot unmap at 0x1000: no mapping starts there"
    );
    assert!(fake.take_calls().is_empty());
    slots.unmap(0).unwrap();
    assert_eq!(fake.take_calls(), vec![Call::Delete { slot: 0 }]);
    assert!(slots.mappings().is_empty());
}

#[test]
fn punch_deletes_then_recreates_both_fragments() {
    let (fake, slots) = setup(8);
    map(&slots, 0, 16 * PAGE, HOST).unwrap();
    fake.take_calls();
    let fragments = slots.punch(4 * PAGE, 2 * PAGE).unwrap();
    assert_eq!(
        fragments,
        vec![
            (SlotId(0), ram(0, 4 * PAGE, HOST)),
            (SlotId(1), ram(6 * PAGE, 10 * PAGE, HOST + 6 * PAGE)),
        ]
    );
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Delete { slot: 0 },
            create(0, 0, 4 * PAGE, HOST),
            create(1, 6 * PAGE, 10 * PAGE, HOST + 6 * PAGE),
        ]
    );
    assert_eq!(slots.lookup(5 * PAGE), None);
    assert_consistent(&fake, &slots);
}

#[test]
fn punch_at_the_edges_and_of_a_whole_mapping() {
    let (fake, slots) = setup(8);
    map(&slots, 0x10000, 8 * PAGE, HOST).unwrap();
    fake.take_calls();

    let head = slots.punch(0x10000, PAGE).unwrap();
    assert_eq!(head, vec![(SlotId(0), ram(0x11000, 7 * PAGE, HOST + PAGE))]);
    let tail = slots.punch(0x17000, PAGE).unwrap();
    assert_eq!(tail, vec![(SlotId(0), ram(0x11000, 6 * PAGE, HOST + PAGE))]);
    let whole = slots.punch(0x11000, 6 * PAGE).unwrap();
    assert!(whole.is_empty());
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Delete { slot: 0 },
            create(0, 0x11000, 7 * PAGE, HOST + PAGE),
            Call::Delete { slot: 0 },
            create(0, 0x11000, 6 * PAGE, HOST + PAGE),
            Call::Delete { slot: 0 },
        ]
    );
    assert!(slots.mappings().is_empty());
}

#[test]
fn punch_refuses_ranges_not_inside_one_mapping() {
    let (fake, slots) = setup(8);
    map(&slots, 0, 4 * PAGE, HOST).unwrap();
    map(&slots, 4 * PAGE, 4 * PAGE, HOST + 4 * PAGE).unwrap();
    map(&slots, 16 * PAGE, 4 * PAGE, HOST).unwrap();
    fake.take_calls();

    let why = |gpa, size| match slots.punch(gpa, size) {
        Err(MemSlotsError::NotCovered { why, .. }) => why,
        other => panic!("expected NotCovered, got {other:?}"),
    };
    assert_eq!(
        why(3 * PAGE, 2 * PAGE),
        "it runs past the end of [0x0, 0x4000), mapped in slot 0"
    );
    assert_eq!(why(10 * PAGE, PAGE), "nothing is mapped there");
    assert_eq!(
        why(15 * PAGE, 2 * PAGE),
        "it starts in unmapped space before [0x10000, 0x14000), mapped in slot 2"
    );
    assert!(matches!(
        slots.punch(0x800, PAGE),
        Err(MemSlotsError::Unaligned { .. })
    ));
    assert!(matches!(
        slots.punch(0, 0),
        Err(MemSlotsError::ZeroSize { .. })
    ));
    let msg = slots.punch(10 * PAGE, PAGE).unwrap_err().to_string();
    assert_eq!(
        msg,
        "cannot punch [0xa000, 0xb000): nothing is mapped there"
    );
    assert!(fake.take_calls().is_empty());
    assert_consistent(&fake, &slots);
}

#[test]
fn punch_needs_a_spare_slot_to_split() {
    let (fake, slots) = setup(1);
    map(&slots, 0, 4 * PAGE, HOST).unwrap();
    fake.take_calls();
    let err = slots.punch(PAGE, PAGE).unwrap_err();
    assert!(
        matches!(err, MemSlotsError::NoFreeSlot { needed: 1, .. }),
        "{err}"
    );
    assert!(fake.take_calls().is_empty());
    // Cutting off an edge needs no extra slot.
    slots.punch(0, PAGE).unwrap();
    assert_consistent(&fake, &slots);
}

#[test]
fn fill_merges_with_both_neighbours() {
    let (fake, slots) = setup(8);
    map(&slots, 0, 16 * PAGE, HOST).unwrap();
    slots.punch(4 * PAGE, 2 * PAGE).unwrap();
    fake.take_calls();

    let slot = fill(&slots, 4 * PAGE, 2 * PAGE, HOST + 4 * PAGE).unwrap();
    assert_eq!(slot, SlotId(0));
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Delete { slot: 0 },
            Call::Delete { slot: 1 },
            create(0, 0, 16 * PAGE, HOST),
        ]
    );
    assert_eq!(slots.mappings(), vec![(SlotId(0), ram(0, 16 * PAGE, HOST))]);
    assert_consistent(&fake, &slots);
}

#[test]
fn fill_merges_with_one_neighbour() {
    let (fake, slots) = setup(8);
    map(&slots, 0, 4 * PAGE, HOST).unwrap();
    fake.take_calls();
    // Directly after: merges with the mapping before it.
    assert_eq!(
        fill(&slots, 4 * PAGE, PAGE, HOST + 4 * PAGE).unwrap(),
        SlotId(0)
    );
    // Directly before a mapping: merges with the mapping after it.
    map(&slots, 0x10_0000, PAGE, HOST + 0x10_0000).unwrap();
    assert_eq!(
        fill(&slots, 0xff000, PAGE, HOST + 0xff000).unwrap(),
        SlotId(1)
    );
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Delete { slot: 0 },
            create(0, 0, 5 * PAGE, HOST),
            create(1, 0x10_0000, PAGE, HOST + 0x10_0000),
            Call::Delete { slot: 1 },
            create(1, 0xff000, 2 * PAGE, HOST + 0xff000),
        ]
    );
    assert_consistent(&fake, &slots);
}

#[test]
fn fill_keeps_incompatible_neighbours_apart() {
    let (fake, slots) = setup(8);
    map(&slots, 0, 16 * PAGE, HOST).unwrap();
    slots.punch(4 * PAGE, 3 * PAGE).unwrap();
    fake.take_calls();

    // Host memory not contiguous with either neighbour.
    fill(&slots, 4 * PAGE, PAGE, 0x5000_0000).unwrap();
    // A device page, even at the right host address.
    // SAFETY: the fake backend never touches the host memory.
    unsafe {
        slots.fill(
            5 * PAGE,
            PAGE,
            HOST + 5 * PAGE,
            MapFlags::default(),
            MappingKind::Device {
                owner: "bar0".into(),
            },
        )
    }
    .unwrap();
    // Read-only memory next to writable RAM.
    let ro = MapFlags {
        readonly: true,
        log_dirty: false,
    };
    // SAFETY: the fake backend never touches the host memory.
    unsafe { slots.fill(6 * PAGE, PAGE, HOST + 6 * PAGE, ro, MappingKind::Ram) }.unwrap();
    assert_eq!(
        fake.take_calls(),
        vec![
            create(2, 4 * PAGE, PAGE, 0x5000_0000),
            create(3, 5 * PAGE, PAGE, HOST + 5 * PAGE),
            Call::Create {
                slot: 4,
                gpa: 6 * PAGE,
                size: PAGE,
                host: HOST + 6 * PAGE,
                flags: kvm_bindings::KVM_MEM_READONLY,
            },
        ]
    );
    assert_eq!(slots.mappings().len(), 5);
    assert_consistent(&fake, &slots);
}

#[test]
fn fill_refuses_mapped_ranges() {
    let (fake, slots) = setup(8);
    map(&slots, 0, 4 * PAGE, HOST).unwrap();
    fake.take_calls();
    let err = fill(&slots, 3 * PAGE, 2 * PAGE, HOST + 3 * PAGE).unwrap_err();
    assert!(matches!(err, MemSlotsError::Overlap { .. }), "{err}");
    assert!(err.to_string().starts_with("cannot fill [0x3000, 0x5000)"));
    assert!(fake.take_calls().is_empty());
}

#[test]
fn fill_without_merge_needs_a_free_slot() {
    let (fake, slots) = setup(1);
    map(&slots, 0, PAGE, HOST).unwrap();
    let err = fill(&slots, 4 * PAGE, PAGE, HOST).unwrap_err();
    assert!(matches!(err, MemSlotsError::NoFreeSlot { .. }), "{err}");
    // Merging frees the neighbour's slot first, so it works with none spare.
    fill(&slots, PAGE, PAGE, HOST + PAGE).unwrap();
    assert_consistent(&fake, &slots);
}

#[test]
fn dirty_logging_reissues_the_region_with_new_flags() {
    let (fake, slots) = setup(8);
    let ro = MapFlags {
        readonly: true,
        log_dirty: false,
    };
    // SAFETY: the fake backend never touches the host memory.
    unsafe { slots.map(0, 4 * PAGE, HOST, ro, MappingKind::Ram) }.unwrap();
    fake.take_calls();

    slots.set_dirty_logging(0, true).unwrap();
    slots.set_dirty_logging(0, true).unwrap();
    assert!(slots.lookup(0).unwrap().1.flags.log_dirty);
    slots.set_dirty_logging(0, false).unwrap();
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Flags {
                slot: 0,
                flags: kvm_bindings::KVM_MEM_READONLY | kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
            },
            Call::Flags {
                slot: 0,
                flags: kvm_bindings::KVM_MEM_READONLY,
            },
        ]
    );
    assert!(matches!(
        slots.set_dirty_logging(PAGE, true),
        Err(MemSlotsError::NotMapped { .. })
    ));
    assert_consistent(&fake, &slots);
}

#[test]
fn dirty_logging_survives_punch_and_fill() {
    let (fake, slots) = setup(8);
    map(&slots, 0, 4 * PAGE, HOST).unwrap();
    slots.set_dirty_logging(0, true).unwrap();
    let fragments = slots.punch(PAGE, PAGE).unwrap();
    assert!(fragments.iter().all(|(_, m)| m.flags.log_dirty));
    let logging = MapFlags {
        readonly: false,
        log_dirty: true,
    };
    // SAFETY: the fake backend never touches the host memory.
    unsafe { slots.fill(PAGE, PAGE, HOST + PAGE, logging, MappingKind::Ram) }.unwrap();
    assert_eq!(slots.mappings().len(), 1);
    assert_consistent(&fake, &slots);
}

#[test]
fn failed_map_leaves_nothing_behind() {
    let (fake, slots) = setup(8);
    fake.script(&[true]);
    let err = map(&slots, 0, PAGE, HOST).unwrap_err();
    assert!(
        matches!(err, MemSlotsError::Kvm { op: "create", .. }),
        "{err}"
    );
    assert!(err
        .to_string()
        .starts_with("KVM failed to create slot 0 for [0x0, 0x1000): "));
    assert!(slots.mappings().is_empty());
    assert_eq!(map(&slots, 0, PAGE, HOST).unwrap(), SlotId(0));
    assert_consistent(&fake, &slots);
}

#[test]
fn failed_punch_is_rolled_back() {
    let (fake, slots) = setup(8);
    map(&slots, 0, 16 * PAGE, HOST).unwrap();
    fake.take_calls();
    // Delete and first fragment succeed, the second fragment fails.
    fake.script(&[false, false, true]);
    let err = slots.punch(4 * PAGE, PAGE).unwrap_err();
    assert!(
        matches!(err, MemSlotsError::Kvm { op: "create", .. }),
        "{err}"
    );
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Delete { slot: 0 },
            create(0, 0, 4 * PAGE, HOST),
            Call::Delete { slot: 0 },
            create(0, 0, 16 * PAGE, HOST),
        ]
    );
    assert_eq!(slots.mappings(), vec![(SlotId(0), ram(0, 16 * PAGE, HOST))]);
    assert_consistent(&fake, &slots);
}

#[test]
fn failed_fill_is_rolled_back() {
    let (fake, slots) = setup(8);
    map(&slots, 0, 16 * PAGE, HOST).unwrap();
    slots.punch(4 * PAGE, PAGE).unwrap();
    let before = slots.mappings();
    fake.take_calls();
    // Both neighbours deleted, the merged slot fails.
    fake.script(&[false, false, true]);
    let err = fill(&slots, 4 * PAGE, PAGE, HOST + 4 * PAGE).unwrap_err();
    assert!(matches!(err, MemSlotsError::Kvm { .. }), "{err}");
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Delete { slot: 0 },
            Call::Delete { slot: 1 },
            create(1, 5 * PAGE, 11 * PAGE, HOST + 5 * PAGE),
            create(0, 0, 4 * PAGE, HOST),
        ]
    );
    assert_eq!(slots.mappings(), before);
    assert_consistent(&fake, &slots);
}

#[test]
fn failed_undo_is_reported_and_the_record_stays_truthful() {
    let (fake, slots) = setup(8);
    map(&slots, 0, 16 * PAGE, HOST).unwrap();
    // Delete succeeds, the first fragment fails, re-creating the original
    // fails too.
    fake.script(&[false, true, true]);
    let err = slots.punch(4 * PAGE, PAGE).unwrap_err();
    assert!(matches!(err, MemSlotsError::Partial { .. }), "{err}");
    assert!(err
        .to_string()
        .contains("part of the range may be unmapped"));
    assert!(slots.mappings().is_empty());
    assert_consistent(&fake, &slots);
}

#[test]
fn failed_dirty_logging_keeps_the_old_flags() {
    let (fake, slots) = setup(8);
    map(&slots, 0, PAGE, HOST).unwrap();
    fake.script(&[true]);
    let err = slots.set_dirty_logging(0, true).unwrap_err();
    assert!(err
        .to_string()
        .starts_with("KVM failed to change the flags of slot 0"));
    assert!(!slots.lookup(0).unwrap().1.flags.log_dirty);
    assert_consistent(&fake, &slots);
}

/// Random punches and fills of one mapping: the fake checks every KVM call
/// for overlap, the record must match it after every step, and filling every
/// hole must give back the original single mapping.
#[test]
fn random_punches_and_fills_never_overlap() {
    const PAGES: u64 = 64;
    let (fake, slots) = setup(64);
    map(&slots, 0, PAGES * PAGE, HOST).unwrap();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    };
    for _ in 0..500 {
        let first = next(PAGES);
        let len = 1 + next((PAGES - first).min(8));
        let (gpa, size) = (first * PAGE, len * PAGE);
        let covered = slots
            .lookup(gpa)
            .is_some_and(|(_, m)| gpa + size <= m.end());
        let unmapped = (first..first + len).all(|p| slots.lookup(p * PAGE).is_none());
        if covered {
            slots.punch(gpa, size).unwrap();
        } else if unmapped {
            fill(&slots, gpa, size, HOST + gpa).unwrap();
        }
        assert_consistent(&fake, &slots);
    }
    for page in 0..PAGES {
        if slots.lookup(page * PAGE).is_none() {
            fill(&slots, page * PAGE, PAGE, HOST + page * PAGE).unwrap();
        }
    }
    let all = slots.mappings();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].1, ram(0, PAGES * PAGE, HOST));
    assert_consistent(&fake, &slots);
}

#[test]
fn shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<MemSlots>();

    let (fake, slots) = setup(64);
    let slots = Arc::new(slots);
    let handles: Vec<_> = (0..8u64)
        .map(|i| {
            let slots = Arc::clone(&slots);
            std::thread::spawn(move || {
                let gpa = i * 0x10_0000;
                map(&slots, gpa, 16 * PAGE, HOST + gpa).unwrap();
                slots.punch(gpa + PAGE, PAGE).unwrap();
                fill(&slots, gpa + PAGE, PAGE, HOST + gpa + PAGE).unwrap();
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    assert_eq!(slots.mappings().len(), 8);
    assert_consistent(&fake, &slots);
    assert!(format!("{slots:?}").starts_with("MemSlots { mappings: ["));
}
