//! Checks `MemSlots` against real KVM: map, punch, fill back, unmap.

use std::sync::Arc;

use kvm_ioctls::Kvm;
use resources::memslots::{MapFlags, MappingKind, MemSlots};
use vm_memory::MmapRegion;

const SIZE: u64 = 0x10000;
const PAGE: u64 = 0x1000;
const GPA: u64 = 0x10_0000;

#[test]
fn map_punch_fill_unmap_on_real_kvm() {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("skipping: cannot open /dev/kvm: {e}");
            return;
        }
    };
    let vm = Arc::new(kvm.create_vm().expect("create a VM"));
    let memory = MmapRegion::<()>::new(SIZE as usize).expect("mmap 64 KiB");
    let host = memory.as_ptr() as u64;
    let slots = MemSlots::new(vm);

    // SAFETY: `memory` is an anonymous mmap no Rust reference points into,
    // and it outlives the VM: `slots` (holding the last VmFd reference) is
    // declared after it, so it is dropped first.
    let slot = unsafe { slots.map(GPA, SIZE, host, MapFlags::default(), MappingKind::Ram) }
        .expect("map 64 KiB");
    assert_eq!(slots.lookup(GPA + SIZE - 1).map(|(s, _)| s), Some(slot));

    let middle = GPA + SIZE / 2;
    let fragments = slots.punch(middle, PAGE).expect("punch the middle page");
    assert_eq!(fragments.len(), 2);
    assert_eq!(fragments[1].1.host_addr, host + SIZE / 2 + PAGE);
    assert!(slots.lookup(middle).is_none());

    // SAFETY: the page is part of `memory`, as above.
    let merged = unsafe {
        slots.fill(
            middle,
            PAGE,
            host + SIZE / 2,
            MapFlags::default(),
            MappingKind::Ram,
        )
    }
    .expect("fill the page back");
    let all = slots.mappings();
    assert_eq!(all.len(), 1);
    assert_eq!(
        (all[0].1.gpa, all[0].1.size, all[0].1.host_addr),
        (GPA, SIZE, host)
    );
    assert_eq!(all[0].0, merged);

    slots
        .set_dirty_logging(GPA, true)
        .expect("turn on dirty logging");
    slots.unmap(GPA).expect("unmap");
    assert!(slots.mappings().is_empty());
    assert!(slots.max_slots() > 0);
}
