//! A checked address-range allocator on top of `vm_allocator::AddressAllocator`.
//!
//! vm-allocator 0.1.4 does the placement (first fit, last fit, exact), but it
//! trusts its caller more than we want to:
//! - `AllocPolicy::ExactMatch` only checks that the requested range lies inside
//!   *some* node of its interval tree, not that the node is free, so an exact
//!   request inside an existing allocation succeeds, splits it, and hands out
//!   overlapping memory;
//! - `free` of a range that is already free succeeds when the range has no
//!   free neighbour to merge with, so double frees go unnoticed.
//!
//!
//! It also refuses an exact one-byte request for the last byte of a free
//! area (it looks for a node holding `[addr, addr + 1]`); that one surfaces
//! here as [`AddressAllocError::Inconsistent`] rather than a wrong answer.
//!
//! [`AddressAllocator`] therefore keeps its own record of what it handed out
//! and checks every request against it before vm-allocator sees it.

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;
use vm_allocator::{AllocPolicy, RangeInclusive};

/// A range of addresses `[start, start + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    /// First address of the range.
    pub start: u64,
    /// Number of addresses in the range.
    pub len: u64,
}

impl Range {
    /// The range of `len` addresses starting at `start`.
    pub fn new(start: u64, len: u64) -> Self {
        Range { start, len }
    }

    /// Last address inside the range (`start` for an empty range).
    pub fn last(&self) -> u64 {
        self.start.saturating_add(self.len.saturating_sub(1))
    }

    /// Whether the two ranges share at least one address.
    pub fn overlaps(&self, other: &Range) -> bool {
        self.len > 0 && other.len > 0 && self.start <= other.last() && other.start <= self.last()
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.len == 0 {
            write!(f, "empty range at {:#x}", self.start)
        } else {
            write!(f, "[{:#x}, {:#x}]", self.start, self.last())
        }
    }
}

/// Where [`AddressAllocator::allocate`] places a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// The lowest suitable free address.
    FirstFit,
    /// The highest suitable free address.
    LastFit,
    /// Exactly this start address, or fail.
    Exact(u64),
}

/// Why an [`AddressAllocator`] operation failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AddressAllocError {
    /// The managed space given to `new` is empty or wraps around.
    #[error("cannot manage {size:#x} bytes at {base:#x}: {source}")]
    InvalidSpace {
        /// Requested base.
        base: u64,
        /// Requested size.
        size: u64,
        /// What vm-allocator objected to.
        source: vm_allocator::Error,
    },
    /// A zero-length allocation was requested.
    #[error("cannot allocate 0 bytes: a range must be at least one byte long")]
    ZeroSize,
    /// The alignment is zero or not a power of two.
    #[error("cannot allocate {size:#x} bytes: alignment {align:#x} is not a power of two")]
    InvalidAlignment {
        /// Requested size.
        size: u64,
        /// Requested alignment.
        align: u64,
    },
    /// An exact start address does not honour the requested alignment.
    #[error(
        "cannot allocate {size:#x} bytes at {addr:#x}: the address is not aligned to {align:#x}"
    )]
    UnalignedExact {
        /// Requested start address.
        addr: u64,
        /// Requested size.
        size: u64,
        /// Requested alignment.
        align: u64,
    },
    /// An exact range does not lie inside the managed space.
    #[error("cannot allocate {size:#x} bytes at {addr:#x}: the range is not inside the managed space {space}")]
    OutsideSpace {
        /// Requested start address.
        addr: u64,
        /// Requested size.
        size: u64,
        /// The space this allocator manages.
        space: Range,
    },
    /// An exact range overlaps something already handed out.
    #[error("cannot allocate {requested}: it overlaps {existing}, which is already allocated")]
    Overlap {
        /// The range asked for.
        requested: Range,
        /// The allocation it collides with.
        existing: Range,
    },
    /// No free range is large enough.
    #[error("cannot allocate {size:#x} bytes aligned to {align:#x} ({policy:?}): no free part of {space} is large enough")]
    Exhausted {
        /// Requested size.
        size: u64,
        /// Requested alignment.
        align: u64,
        /// Requested placement.
        policy: Policy,
        /// The space this allocator manages.
        space: Range,
    },
    /// The range was handed out once but has been freed since.
    #[error("cannot free {0}: it was already freed")]
    DoubleFree(Range),
    /// The range was never handed out by this allocator.
    #[error("cannot free {0}: it was never allocated")]
    NeverAllocated(Range),
    /// An allocation starts at that address, but with a different length.
    #[error("cannot free {requested}: the allocation starting there is {allocated}")]
    LengthMismatch {
        /// The range passed to `free`.
        requested: Range,
        /// The allocation that starts at the same address.
        allocated: Range,
    },
    /// vm-allocator disagreed with the checked record (a bug in one of them).
    #[error("vm-allocator failed to {op} {range} although the checked record allows it: {source}")]
    Inconsistent {
        /// `"allocate"` or `"free"`.
        op: &'static str,
        /// The range involved.
        range: Range,
        /// What vm-allocator returned.
        source: vm_allocator::Error,
    },
}

/// Result of [`AddressAllocator`] operations.
pub type Result<T> = std::result::Result<T, AddressAllocError>;

/// Hands out non-overlapping ranges of an address space and takes them back,
/// refusing overlaps, double frees and frees of ranges it never handed out.
#[derive(Debug)]
pub struct AddressAllocator {
    inner: vm_allocator::AddressAllocator,
    space: Range,
    /// Live allocations, start -> len. Never overlapping.
    allocated: BTreeMap<u64, u64>,
    /// Ranges freed and not handed out again since, start -> len; only used to
    /// tell a double free from a free of something never allocated.
    freed: BTreeMap<u64, u64>,
}

impl AddressAllocator {
    /// An allocator for the `size` addresses starting at `base`.
    pub fn new(base: u64, size: u64) -> Result<Self> {
        let inner = vm_allocator::AddressAllocator::new(base, size)
            .map_err(|source| AddressAllocError::InvalidSpace { base, size, source })?;
        Ok(AddressAllocator {
            inner,
            space: Range::new(base, size),
            allocated: BTreeMap::new(),
            freed: BTreeMap::new(),
        })
    }

    /// The space this allocator manages.
    pub fn space(&self) -> Range {
        self.space
    }

    /// The live allocations, sorted by start address.
    pub fn allocations(&self) -> impl Iterator<Item = Range> + '_ {
        self.allocated
            .iter()
            .map(|(&start, &len)| Range::new(start, len))
    }

    /// Reserves `size` addresses aligned to `align` (a power of two) as
    /// placed by `policy`.
    pub fn allocate(&mut self, size: u64, align: u64, policy: Policy) -> Result<Range> {
        if size == 0 {
            return Err(AddressAllocError::ZeroSize);
        }
        if !align.is_power_of_two() {
            return Err(AddressAllocError::InvalidAlignment { size, align });
        }
        let inner_policy = match policy {
            Policy::FirstFit => AllocPolicy::FirstMatch,
            Policy::LastFit => AllocPolicy::LastMatch,
            Policy::Exact(addr) => {
                self.check_exact(addr, size, align)?;
                AllocPolicy::ExactMatch(addr)
            }
        };
        let range = match self.inner.allocate(size, align, inner_policy) {
            Ok(r) => to_range(r),
            Err(vm_allocator::Error::ResourceNotAvailable)
                if !matches!(policy, Policy::Exact(_)) =>
            {
                return Err(AddressAllocError::Exhausted {
                    size,
                    align,
                    policy,
                    space: self.space,
                })
            }
            Err(source) => {
                let range = Range::new(exact_or(policy, self.space.start), size);
                return Err(AddressAllocError::Inconsistent {
                    op: "allocate",
                    range,
                    source,
                });
            }
        };
        // vm-allocator placed a first/last fit range; make sure it agrees
        // with the record before handing it out.
        if let Some(existing) = overlapping(&self.allocated, range).next() {
            return Err(AddressAllocError::Overlap {
                requested: range,
                existing,
            });
        }
        let stale: Vec<u64> = overlapping(&self.freed, range).map(|r| r.start).collect();
        for start in stale {
            self.freed.remove(&start);
        }
        self.allocated.insert(range.start, range.len);
        Ok(range)
    }

    /// Returns `range`, exactly as [`allocate`](Self::allocate) handed it out.
    pub fn free(&mut self, range: Range) -> Result<()> {
        match self.allocated.get(&range.start) {
            Some(&len) if len == range.len => {}
            Some(&len) => {
                return Err(AddressAllocError::LengthMismatch {
                    requested: range,
                    allocated: Range::new(range.start, len),
                })
            }
            None if self.freed.get(&range.start) == Some(&range.len) => {
                return Err(AddressAllocError::DoubleFree(range))
            }
            None => return Err(AddressAllocError::NeverAllocated(range)),
        }
        let key = RangeInclusive::new(range.start, range.last()).map_err(|source| {
            AddressAllocError::Inconsistent {
                op: "free",
                range,
                source,
            }
        })?;
        self.inner
            .free(&key)
            .map_err(|source| AddressAllocError::Inconsistent {
                op: "free",
                range,
                source,
            })?;
        self.allocated.remove(&range.start);
        self.freed.insert(range.start, range.len);
        Ok(())
    }

    /// Checks an exact request against the space and the record; this is
    /// the check vm-allocator's `ExactMatch` is missing.
    fn check_exact(&self, addr: u64, size: u64, align: u64) -> Result<()> {
        // `align` is a power of two (checked by `allocate`).
        if addr & (align - 1) != 0 {
            return Err(AddressAllocError::UnalignedExact { addr, size, align });
        }
        let inside = addr >= self.space.start
            && addr
                .checked_add(size - 1)
                .is_some_and(|last| last <= self.space.last());
        if !inside {
            return Err(AddressAllocError::OutsideSpace {
                addr,
                size,
                space: self.space,
            });
        }
        let requested = Range::new(addr, size);
        match overlapping(&self.allocated, requested).next() {
            Some(existing) => Err(AddressAllocError::Overlap {
                requested,
                existing,
            }),
            None => Ok(()),
        }
    }
}

/// The entries of `map` (start -> len, non-overlapping) that overlap `range`.
fn overlapping(map: &BTreeMap<u64, u64>, range: Range) -> impl Iterator<Item = Range> + '_ {
    map.range(..=range.last())
        .rev()
        .map(|(&start, &len)| Range::new(start, len))
        .take_while(move |r| r.overlaps(&range))
}

fn to_range(r: RangeInclusive) -> Range {
    Range::new(r.start(), r.len())
}

fn exact_or(policy: Policy, default: u64) -> u64 {
    match policy {
        Policy::Exact(addr) => addr,
        _ => default,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> AddressAllocator {
        AddressAllocator::new(0x1000, 0x4000).unwrap()
    }

    #[test]
    fn first_last_and_exact_fit() {
        let mut a = pool();
        assert_eq!(
            a.allocate(0x1000, 0x1000, Policy::FirstFit).unwrap(),
            Range::new(0x1000, 0x1000)
        );
        assert_eq!(
            a.allocate(0x1000, 0x1000, Policy::LastFit).unwrap(),
            Range::new(0x4000, 0x1000)
        );
        assert_eq!(
            a.allocate(0x800, 0x800, Policy::Exact(0x2800)).unwrap(),
            Range::new(0x2800, 0x800)
        );
        let live: Vec<_> = a.allocations().collect();
        assert_eq!(
            live,
            vec![
                Range::new(0x1000, 0x1000),
                Range::new(0x2800, 0x800),
                Range::new(0x4000, 0x1000)
            ]
        );
    }

    #[test]
    fn invalid_space_is_refused() {
        let err = AddressAllocator::new(0x1000, 0).unwrap_err();
        assert!(matches!(err, AddressAllocError::InvalidSpace { .. }));
        let err = AddressAllocator::new(u64::MAX, 0x100).unwrap_err();
        assert!(matches!(err, AddressAllocError::InvalidSpace { .. }));
    }

    #[test]
    fn bad_requests_are_refused() {
        let mut a = pool();
        assert_eq!(
            a.allocate(0, 0x1000, Policy::FirstFit),
            Err(AddressAllocError::ZeroSize)
        );
        assert_eq!(
            a.allocate(0x1000, 0x3000, Policy::FirstFit),
            Err(AddressAllocError::InvalidAlignment {
                size: 0x1000,
                align: 0x3000
            })
        );
        assert_eq!(
            a.allocate(0x1000, 0, Policy::FirstFit),
            Err(AddressAllocError::InvalidAlignment {
                size: 0x1000,
                align: 0
            })
        );
        assert_eq!(
            a.allocate(0x1000, 0x1000, Policy::Exact(0x1800)),
            Err(AddressAllocError::UnalignedExact {
                addr: 0x1800,
                size: 0x1000,
                align: 0x1000
            })
        );
        for addr in [0x0, 0x4800, 0x5000, !0xfff] {
            assert!(
                matches!(
                    a.allocate(0x1000, 0x800, Policy::Exact(addr)),
                    Err(AddressAllocError::OutsideSpace { .. })
                ),
                "exact allocation at {addr:#x} was not refused"
            );
        }
        assert!(a.allocations().next().is_none());
    }

    #[test]
    fn exhaustion_is_reported() {
        let mut a = pool();
        a.allocate(0x3000, 0x1000, Policy::FirstFit).unwrap();
        let err = a.allocate(0x2000, 0x1000, Policy::LastFit).unwrap_err();
        assert!(matches!(err, AddressAllocError::Exhausted { .. }));
        assert!(err.to_string().contains("no free part of [0x1000, 0x4fff]"));
    }

    /// vm-allocator 0.1.4 bug 1: `ExactMatch` inside an allocated range
    /// succeeds and hands out overlapping memory.
    #[test]
    fn upstream_exact_match_overlap_bug_is_caught() {
        let mut raw = vm_allocator::AddressAllocator::new(0x1000, 0x4000).unwrap();
        raw.allocate(0x1000, 0x1000, AllocPolicy::ExactMatch(0x1000))
            .unwrap();
        let overlapping_range = raw.allocate(0x800, 0x800, AllocPolicy::ExactMatch(0x1000));
        assert!(
            overlapping_range.is_ok(),
            "vm-allocator now refuses overlapping exact matches; the extra check may be redundant"
        );

        let mut a = pool();
        a.allocate(0x1000, 0x1000, Policy::Exact(0x1000)).unwrap();
        let err = a.allocate(0x800, 0x800, Policy::Exact(0x1000)).unwrap_err();
        assert_eq!(
            err,
            AddressAllocError::Overlap {
                requested: Range::new(0x1000, 0x800),
                existing: Range::new(0x1000, 0x1000),
            }
        );
        // Partial overlap from below and from above are caught too.
        a.allocate(0x1000, 0x1000, Policy::Exact(0x3000)).unwrap();
        for addr in [0x2800, 0x3800] {
            assert!(matches!(
                a.allocate(0x1000, 0x800, Policy::Exact(addr)),
                Err(AddressAllocError::Overlap { .. })
            ));
        }
        // The free gap between them is still usable.
        a.allocate(0x1000, 0x1000, Policy::Exact(0x2000)).unwrap();
        assert!(err.to_string().contains("overlaps [0x1000, 0x1fff]"));
    }

    /// vm-allocator 0.1.4 bug 2: freeing an already free range succeeds when
    /// no merge with a free neighbour happens.
    #[test]
    fn upstream_double_free_bug_is_caught() {
        let mut raw = vm_allocator::AddressAllocator::new(0x1000, 0x3000).unwrap();
        let mut ranges = Vec::new();
        for _ in 0..3 {
            ranges.push(
                raw.allocate(0x1000, 0x1000, AllocPolicy::FirstMatch)
                    .unwrap(),
            );
        }
        raw.free(&ranges[1]).unwrap();
        assert!(
            raw.free(&ranges[1]).is_ok(),
            "vm-allocator now refuses double frees; the extra check may be redundant"
        );

        let mut a = AddressAllocator::new(0x1000, 0x3000).unwrap();
        let ranges: Vec<_> = (0..3)
            .map(|_| a.allocate(0x1000, 0x1000, Policy::FirstFit).unwrap())
            .collect();
        a.free(ranges[1]).unwrap();
        assert_eq!(
            a.free(ranges[1]),
            Err(AddressAllocError::DoubleFree(ranges[1]))
        );
        // Once handed out again, it can be freed again.
        assert_eq!(
            a.allocate(0x1000, 0x1000, Policy::FirstFit).unwrap(),
            ranges[1]
        );
        a.free(ranges[1]).unwrap();
    }

    /// vm-allocator 0.1.4 quirk: an exact one-byte request for the last
    /// byte of a free area fails; it is reported, not hidden.
    #[test]
    fn upstream_last_byte_quirk_is_reported() {
        let mut a = pool();
        a.allocate(0x1000, 0x1000, Policy::Exact(0x2000)).unwrap();
        let err = a.allocate(1, 1, Policy::Exact(0x1fff)).unwrap_err();
        assert!(matches!(
            err,
            AddressAllocError::Inconsistent { op: "allocate", .. }
        ));
        // The byte is still free for a request vm-allocator can place.
        a.allocate(0x800, 0x800, Policy::Exact(0x1800)).unwrap();
    }

    #[test]
    fn free_of_never_allocated_range_is_refused() {
        let mut a = pool();
        let r = Range::new(0x2000, 0x1000);
        assert_eq!(a.free(r), Err(AddressAllocError::NeverAllocated(r)));
        // A range re-used by a different allocation is no longer "freed".
        let big = a.allocate(0x2000, 0x1000, Policy::Exact(0x2000)).unwrap();
        a.free(big).unwrap();
        a.allocate(0x1000, 0x1000, Policy::Exact(0x3000)).unwrap();
        assert_eq!(a.free(big), Err(AddressAllocError::NeverAllocated(big)));
    }

    #[test]
    fn free_with_wrong_length_is_refused() {
        let mut a = pool();
        let r = a.allocate(0x2000, 0x1000, Policy::FirstFit).unwrap();
        let err = a.free(Range::new(r.start, 0x1000)).unwrap_err();
        assert_eq!(
            err,
            AddressAllocError::LengthMismatch {
                requested: Range::new(r.start, 0x1000),
                allocated: r,
            }
        );
        a.free(r).unwrap();
    }

    #[test]
    fn freed_space_is_reused() {
        let mut a = AddressAllocator::new(0, 0x2000).unwrap();
        let r1 = a.allocate(0x1000, 0x1000, Policy::FirstFit).unwrap();
        let r2 = a.allocate(0x1000, 0x1000, Policy::FirstFit).unwrap();
        a.free(r1).unwrap();
        a.free(r2).unwrap();
        assert_eq!(
            a.allocate(0x2000, 0x1000, Policy::FirstFit).unwrap(),
            Range::new(0, 0x2000)
        );
    }

    #[test]
    fn range_helpers() {
        assert_eq!(Range::new(0x1000, 0x1000).last(), 0x1fff);
        assert!(Range::new(0, 0x10).overlaps(&Range::new(0xf, 1)));
        assert!(!Range::new(0, 0x10).overlaps(&Range::new(0x10, 1)));
        assert!(!Range::new(0, 0).overlaps(&Range::new(0, 1)));
        assert_eq!(Range::new(0x10, 0).to_string(), "empty range at 0x10");
    }
}
