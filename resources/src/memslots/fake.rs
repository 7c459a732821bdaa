//! A fake KVM for unit tests: records every call and asserts, on every
//! call, the rules KVM enforces (a panic stands for KVM's EEXIST/EINVAL).

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;

use super::SlotBackend;
use crate::layout::PAGE_SIZE;

/// One accepted `KVM_SET_USER_MEMORY_REGION` call, classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Call {
    /// A new slot.
    Create {
        slot: u32,
        gpa: u64,
        size: u64,
        host: u64,
        flags: u32,
    },
    /// A slot deleted (size 0).
    Delete { slot: u32 },
    /// Only the flags of a live slot changed.
    Flags { slot: u32, flags: u32 },
}

#[derive(Default)]
struct State {
    live: BTreeMap<u32, kvm_userspace_memory_region>,
    calls: Vec<Call>,
    /// Outcomes of the next calls: `true` fails the call with EIO.
    script: VecDeque<bool>,
}

/// The fake backend.
pub(super) struct FakeKvm {
    max: u32,
    state: Mutex<State>,
}

impl FakeKvm {
    /// A fake VM with `max` slots.
    pub(super) fn new(max: u32) -> Arc<Self> {
        Arc::new(FakeKvm {
            max,
            state: Mutex::default(),
        })
    }

    /// The calls accepted since the last `take_calls`.
    pub(super) fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.state.lock().unwrap().calls)
    }

    /// Makes the next calls succeed (`false`) or fail with EIO (`true`).
    pub(super) fn script(&self, outcomes: &[bool]) {
        self.state.lock().unwrap().script = outcomes.iter().copied().collect();
    }

    /// Live slots as `(slot, gpa, size, host, flags)`, sorted by gpa.
    pub(super) fn live(&self) -> Vec<(u32, u64, u64, u64, u32)> {
        let state = self.state.lock().unwrap();
        let mut live: Vec<_> = state
            .live
            .values()
            .map(|r| {
                (
                    r.slot,
                    r.guest_phys_addr,
                    r.memory_size,
                    r.userspace_addr,
                    r.flags,
                )
            })
            .collect();
        live.sort_by_key(|&(_, gpa, ..)| gpa);
        live
    }
}

impl SlotBackend for FakeKvm {
    unsafe fn set_user_memory_region(&self, r: kvm_userspace_memory_region) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        if state.script.pop_front() == Some(true) {
            return Err(io::Error::from_raw_os_error(5));
        }
        assert!(r.slot < self.max, "EINVAL: slot {} >= {}", r.slot, self.max);
        for value in [r.guest_phys_addr, r.memory_size, r.userspace_addr] {
            assert_eq!(value % PAGE_SIZE, 0, "EINVAL: unaligned {r:?}");
        }
        let call = if r.memory_size == 0 {
            assert!(
                state.live.remove(&r.slot).is_some(),
                "EINVAL: deleting slot {} which does not exist",
                r.slot
            );
            Call::Delete { slot: r.slot }
        } else if let Some(old) = state.live.get_mut(&r.slot) {
            let same = old.guest_phys_addr == r.guest_phys_addr
                && old.memory_size == r.memory_size
                && old.userspace_addr == r.userspace_addr;
            assert!(
                same,
                "EINVAL: slot {} moved or resized: {old:?} -> {r:?}",
                r.slot
            );
            old.flags = r.flags;
            Call::Flags {
                slot: r.slot,
                flags: r.flags,
            }
        } else {
            let end = r.guest_phys_addr + r.memory_size;
            for other in state.live.values() {
                let other_end = other.guest_phys_addr + other.memory_size;
                assert!(
                    end <= other.guest_phys_addr || other_end <= r.guest_phys_addr,
                    "EEXIST: {r:?} overlaps live {other:?}"
                );
            }
            state.live.insert(r.slot, r);
            Call::Create {
                slot: r.slot,
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                host: r.userspace_addr,
                flags: r.flags,
            }
        };
        state.calls.push(call);
        Ok(())
    }

    fn max_slots(&self) -> u32 {
        self.max
    }
}
