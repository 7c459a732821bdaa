//! A checked allocator of small integer ids (GSIs, PCI slots, memory slots).
//!
//! This is not a wrapper of `vm_allocator::IdAllocator`: that one cannot
//! reserve a particular id (legacy IRQs and fixed PCI slots need that), and it
//! records "handed out" as a high-water mark plus a set of freed ids, which
//! cannot describe ids reserved out of order. A set of live ids is simpler
//! and makes every check direct.

use std::collections::BTreeSet;

use thiserror::Error;

/// Why an [`IdAllocator`] operation failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IdAllocError {
    /// `new` was given an empty range.
    #[error("cannot manage ids {first}..={last}: the first id is greater than the last")]
    InvalidRange {
        /// Requested first id.
        first: u32,
        /// Requested last id.
        last: u32,
    },
    /// Every id of the range is in use.
    #[error("cannot allocate an id: all ids {first}..={last} are in use")]
    Exhausted {
        /// First managed id.
        first: u32,
        /// Last managed id.
        last: u32,
    },
    /// The id is not managed by this allocator.
    #[error("id {id} is outside the managed range {first}..={last}")]
    OutOfRange {
        /// The id asked for.
        id: u32,
        /// First managed id.
        first: u32,
        /// Last managed id.
        last: u32,
    },
    /// `allocate_exact` asked for an id that is already handed out.
    #[error("cannot allocate id {0}: it is already in use")]
    InUse(u32),
    /// The id was handed out once but has been freed since.
    #[error("cannot free id {0}: it was already freed")]
    DoubleFree(u32),
    /// The id was never handed out.
    #[error("cannot free id {0}: it was never allocated")]
    NeverAllocated(u32),
}

/// Result of [`IdAllocator`] operations.
pub type Result<T> = std::result::Result<T, IdAllocError>;

/// Hands out the ids of `first..=last`, lowest free id first.
#[derive(Debug, Clone)]
pub struct IdAllocator {
    first: u32,
    last: u32,
    /// Ids currently handed out.
    allocated: BTreeSet<u32>,
    /// Ids freed and not handed out since; tells a double free from a free
    /// of an id never allocated.
    freed: BTreeSet<u32>,
}

impl IdAllocator {
    /// An allocator for the ids `first..=last`.
    pub fn new(first: u32, last: u32) -> Result<Self> {
        if first > last {
            return Err(IdAllocError::InvalidRange { first, last });
        }
        Ok(IdAllocator {
            first,
            last,
            allocated: BTreeSet::new(),
            freed: BTreeSet::new(),
        })
    }

    /// Hands out the lowest free id.
    ///
    /// Cost is linear in the number of live ids below the result, which is
    /// fine for the small ranges (GSIs, PCI slots, memory slots) this serves.
    pub fn allocate(&mut self) -> Result<u32> {
        let mut candidate = self.first;
        for &id in &self.allocated {
            if id != candidate {
                break;
            }
            if candidate == self.last {
                return Err(IdAllocError::Exhausted {
                    first: self.first,
                    last: self.last,
                });
            }
            candidate += 1;
        }
        self.take(candidate);
        Ok(candidate)
    }

    /// Hands out exactly `id`.
    pub fn allocate_exact(&mut self, id: u32) -> Result<()> {
        self.check_range(id)?;
        if self.allocated.contains(&id) {
            return Err(IdAllocError::InUse(id));
        }
        self.take(id);
        Ok(())
    }

    /// Takes back `id`.
    pub fn free(&mut self, id: u32) -> Result<()> {
        self.check_range(id)?;
        if !self.allocated.remove(&id) {
            return Err(if self.freed.contains(&id) {
                IdAllocError::DoubleFree(id)
            } else {
                IdAllocError::NeverAllocated(id)
            });
        }
        self.freed.insert(id);
        Ok(())
    }

    /// Whether `id` is currently handed out.
    pub fn is_allocated(&self, id: u32) -> bool {
        self.allocated.contains(&id)
    }

    /// Number of ids currently handed out.
    pub fn in_use(&self) -> usize {
        self.allocated.len()
    }

    /// Number of ids still free.
    pub fn available(&self) -> u64 {
        u64::from(self.last - self.first) + 1 - self.allocated.len() as u64
    }

    fn take(&mut self, id: u32) {
        self.freed.remove(&id);
        self.allocated.insert(id);
    }

    fn check_range(&self, id: u32) -> Result<()> {
        if id < self.first || id > self.last {
            return Err(IdAllocError::OutOfRange {
                id,
                first: self.first,
                last: self.last,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_free_and_reuses() {
        let mut ids = IdAllocator::new(5, 8).unwrap();
        assert_eq!(ids.allocate(), Ok(5));
        assert_eq!(ids.allocate(), Ok(6));
        ids.allocate_exact(8).unwrap();
        assert_eq!(ids.allocate(), Ok(7));
        assert_eq!(ids.available(), 0);
        ids.free(6).unwrap();
        assert!(!ids.is_allocated(6));
        assert_eq!(ids.allocate(), Ok(6));
        assert_eq!(ids.in_use(), 4);
    }

    #[test]
    fn invalid_range_is_refused() {
        assert_eq!(
            IdAllocator::new(9, 3).unwrap_err(),
            IdAllocError::InvalidRange { first: 9, last: 3 }
        );
    }

    #[test]
    fn exhaustion_is_reported() {
        let mut ids = IdAllocator::new(u32::MAX - 1, u32::MAX).unwrap();
        assert_eq!(ids.allocate(), Ok(u32::MAX - 1));
        assert_eq!(ids.allocate(), Ok(u32::MAX));
        let err = ids.allocate().unwrap_err();
        assert_eq!(
            err,
            IdAllocError::Exhausted {
                first: u32::MAX - 1,
                last: u32::MAX
            }
        );
        assert!(err.to_string().contains("are in use"));
    }

    #[test]
    fn exact_allocation_of_used_or_foreign_id_is_refused() {
        let mut ids = IdAllocator::new(0, 31).unwrap();
        ids.allocate_exact(3).unwrap();
        assert_eq!(ids.allocate_exact(3), Err(IdAllocError::InUse(3)));
        assert_eq!(
            ids.allocate_exact(32),
            Err(IdAllocError::OutOfRange {
                id: 32,
                first: 0,
                last: 31
            })
        );
        assert_eq!(ids.allocate(), Ok(0));
    }

    #[test]
    fn double_free_is_refused() {
        let mut ids = IdAllocator::new(0, 3).unwrap();
        let id = ids.allocate().unwrap();
        ids.free(id).unwrap();
        assert_eq!(ids.free(id), Err(IdAllocError::DoubleFree(id)));
    }

    #[test]
    fn free_of_never_allocated_or_foreign_id_is_refused() {
        let mut ids = IdAllocator::new(10, 20).unwrap();
        assert_eq!(ids.free(12), Err(IdAllocError::NeverAllocated(12)));
        assert_eq!(
            ids.free(21),
            Err(IdAllocError::OutOfRange {
                id: 21,
                first: 10,
                last: 20
            })
        );
    }
}
