//! Deterministic data patterns and the checksum shared by the guest agent and the host.
//!
//! A block of the pattern is a pure function of `(seed, index, size)`: its first 16 bytes are the
//! seed and the block index in little-endian (so a mismatching block read back from a disk says
//! where it came from), the rest is a splitmix64 stream seeded from both. The checksum is 64-bit
//! FNV-1a.

/// Size of the block header: the seed then the index, each a little-endian `u64`.
pub const HEADER_LEN: usize = 16;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Returns block `index` of the pattern for `seed`, `size` bytes long.
pub fn block(seed: u64, index: u64, size: usize) -> Vec<u8> {
    let mut buf = vec![0u8; size];
    fill_block(seed, index, &mut buf);
    buf
}

/// Fills `buf` with block `index` of the pattern for `seed` (the block size is `buf.len()`).
///
/// A buffer shorter than [`HEADER_LEN`] gets a truncated header.
pub fn fill_block(seed: u64, index: u64, buf: &mut [u8]) {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&seed.to_le_bytes());
    header[8..].copy_from_slice(&index.to_le_bytes());
    let head = buf.len().min(HEADER_LEN);
    buf[..head].copy_from_slice(&header[..head]);

    let mut state = splitmix64(seed ^ splitmix64(index ^ 0x5bd1_e995_9e37_79b9));
    let body = &mut buf[head..];
    let mut chunks = body.chunks_exact_mut(8);
    for chunk in &mut chunks {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        chunk.copy_from_slice(&splitmix64(state).to_le_bytes());
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let word = splitmix64(state).to_le_bytes();
        rest.copy_from_slice(&word[..rest.len()]);
    }
}

/// Reads the `(seed, index)` header of a pattern block, or `None` if `buf` is too short.
pub fn header(buf: &[u8]) -> Option<(u64, u64)> {
    let seed = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?);
    let index = u64::from_le_bytes(buf.get(8..HEADER_LEN)?.try_into().ok()?);
    Some((seed, index))
}

/// 64-bit FNV-1a of `data`.
pub fn checksum(data: &[u8]) -> u64 {
    let mut hasher = Fnv64::new();
    hasher.update(data);
    hasher.finish()
}

/// Incremental 64-bit FNV-1a, for data that arrives in pieces.
#[derive(Debug, Clone, Copy)]
pub struct Fnv64(u64);

impl Fnv64 {
    /// A hasher over no data yet.
    pub fn new() -> Self {
        Fnv64(FNV_OFFSET)
    }

    /// Feeds `data` into the hash.
    pub fn update(&mut self, data: &[u8]) {
        let mut hash = self.0;
        for &byte in data {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(FNV_PRIME);
        }
        self.0 = hash;
    }

    /// The hash of everything fed so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

/// The splitmix64 finalizer: a well-mixed 64-bit function of `x`.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic() {
        assert_eq!(block(7, 3, 4096), block(7, 3, 4096));
        let mut buf = vec![0u8; 4096];
        fill_block(7, 3, &mut buf);
        assert_eq!(buf, block(7, 3, 4096));
    }

    #[test]
    fn seeds_and_indices_differ() {
        let base = block(1, 0, 512);
        assert_ne!(base[HEADER_LEN..], block(2, 0, 512)[HEADER_LEN..]);
        assert_ne!(base[HEADER_LEN..], block(1, 1, 512)[HEADER_LEN..]);
        // Swapping seed and index must not give the same body.
        assert_ne!(
            block(1, 2, 512)[HEADER_LEN..],
            block(2, 1, 512)[HEADER_LEN..]
        );
    }

    #[test]
    fn header_layout() {
        let b = block(0x0102_0304_0506_0708, 0x1122_3344_5566_7788, 64);
        assert_eq!(&b[..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[8..16], &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        assert_eq!(
            header(&b),
            Some((0x0102_0304_0506_0708, 0x1122_3344_5566_7788))
        );
        assert_eq!(header(&b[..15]), None);
    }

    #[test]
    fn odd_sizes() {
        assert!(block(1, 1, 0).is_empty());
        assert_eq!(block(1, 1, 5), 1u64.to_le_bytes()[..5].to_vec());
        let b = block(9, 9, 16 + 13);
        assert_eq!(b.len(), 29);
        // A longer block starts with the shorter one (the stream does not depend on size).
        assert_eq!(block(9, 9, 64)[..29], b[..]);
    }

    #[test]
    fn body_is_not_trivial() {
        let b = block(0, 0, 4096);
        let zeros = b[HEADER_LEN..].iter().filter(|&&x| x == 0).count();
        assert!(zeros < 64, "too many zero bytes: {zeros}");
    }

    #[test]
    fn fnv1a_known_values() {
        assert_eq!(checksum(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(checksum(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(checksum(b"foobar"), 0x8594_4171_f739_67e8);
        let mut h = Fnv64::new();
        h.update(b"foo");
        h.update(b"bar");
        assert_eq!(h.finish(), checksum(b"foobar"));
    }
}
