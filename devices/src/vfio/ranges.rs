//! A set of byte ranges, kept as sorted, disjoint, non-adjacent `[start, end)` intervals.
//! Holds the ranges of a BAR that a mediator has trapped.

/// Sorted, disjoint, merged intervals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    /// Adds `[start, end)`, merging with what it touches.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        self.ranges.retain(|&(a, b)| {
            if b < s || a > e {
                return true;
            }
            s = s.min(a);
            e = e.max(b);
            false
        });
        let at = self.ranges.partition_point(|&(a, _)| a < s);
        self.ranges.insert(at, (s, e));
    }

    /// Removes `[start, end)`, splitting intervals it cuts.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        for &(a, b) in &self.ranges {
            if b <= start || a >= end {
                out.push((a, b));
                continue;
            }
            if a < start {
                out.push((a, start));
            }
            if b > end {
                out.push((end, b));
            }
        }
        self.ranges = out;
    }

    /// The intervals as `(offset, size)`, in order.
    pub fn as_offset_size(&self) -> Vec<(u64, u64)> {
        self.ranges.iter().map(|&(a, b)| (a, b - a)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_merges_and_remove_splits() {
        let mut s = RangeSet::default();
        s.insert(0x3000, 0x4000);
        s.insert(0x1000, 0x2000);
        s.insert(0x2000, 0x3000);
        assert_eq!(s.as_offset_size(), vec![(0x1000, 0x3000)]);
        s.insert(0x6000, 0x7000);
        s.remove(0x2000, 0x3000);
        assert_eq!(
            s.as_offset_size(),
            vec![(0x1000, 0x1000), (0x3000, 0x1000), (0x6000, 0x1000)]
        );
        s.remove(0, 0x10000);
        assert!(s.as_offset_size().is_empty());
        s.insert(5, 5);
        assert!(s.as_offset_size().is_empty());
    }

    #[test]
    fn matches_a_page_bitmap_under_random_operations() {
        let mut set = RangeSet::default();
        let mut pages = [false; 64];
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let a = (x % 64) as usize;
            let b = ((x >> 8) % 65) as usize;
            let (a, b) = (a.min(b), a.max(b));
            if x & (1 << 40) != 0 {
                set.insert(a as u64, b as u64);
                pages[a..b].fill(true);
            } else {
                set.remove(a as u64, b as u64);
                pages[a..b].fill(false);
            }
            let mut expect = RangeSet::default();
            for (i, _) in pages.iter().enumerate().filter(|(_, &p)| p) {
                expect.insert(i as u64, i as u64 + 1);
            }
            assert_eq!(set, expect);
        }
    }
}
