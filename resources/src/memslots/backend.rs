//! The one KVM call [`MemSlots`](super::MemSlots) needs, as a trait.

use std::io;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, VmFd};

/// Slot count assumed when KVM does not report `KVM_CAP_NR_MEMSLOTS`.
const DEFAULT_MAX_SLOTS: u32 = 32;

/// Something that installs KVM memory slots: a VM, or a fake in tests.
pub trait SlotBackend: Send + Sync {
    /// Creates, changes the flags of, or (with `memory_size == 0`) deletes a
    /// memory slot, as `KVM_SET_USER_MEMORY_REGION` does.
    ///
    /// # Safety
    ///
    /// The same as KVM's: unless it deletes the slot, `region` must not
    /// overlap another slot, and `[userspace_addr, userspace_addr +
    /// memory_size)` must be memory of this process that the guest may read
    /// and write at any time behind the back of Rust code (typically an mmap
    /// no Rust reference points into), and that stays mapped until the slot
    /// is deleted or the VM is destroyed.
    unsafe fn set_user_memory_region(&self, region: kvm_userspace_memory_region) -> io::Result<()>;

    /// How many slots (numbered from 0) this backend supports.
    fn max_slots(&self) -> u32;

    /// `KVM_GET_DIRTY_LOG` of slot `slot` of `memory_size` bytes: one bit per page written
    /// since the last call (or since logging was turned on), which the call clears.
    fn get_dirty_log(&self, slot: u32, memory_size: u64) -> io::Result<Vec<u64>> {
        let _ = (slot, memory_size);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this slot backend keeps no dirty log",
        ))
    }
}

impl SlotBackend for VmFd {
    unsafe fn set_user_memory_region(&self, region: kvm_userspace_memory_region) -> io::Result<()> {
        // SAFETY: this method's caller guarantees exactly what the ioctl
        // needs: no overlap with other slots, and host memory that is valid
        // for guest access until the slot is deleted or the VM destroyed.
        unsafe { VmFd::set_user_memory_region(self, region) }.map_err(io::Error::from)
    }

    fn max_slots(&self) -> u32 {
        match u32::try_from(self.check_extension_int(Cap::NrMemslots)) {
            Ok(n) if n > 0 => n,
            _ => DEFAULT_MAX_SLOTS,
        }
    }

    fn get_dirty_log(&self, slot: u32, memory_size: u64) -> io::Result<Vec<u64>> {
        let size = usize::try_from(memory_size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "slot too large"))?;
        VmFd::get_dirty_log(self, slot, size).map_err(io::Error::from)
    }
}
