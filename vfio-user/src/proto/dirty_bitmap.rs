//! The bitmap of a DMA logging report (`VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`): bit
//! `n % 64` of word `n / 64` marks the page at `iova + n * page_size` of the reported range.
//! A device builds it from the 4 KiB pages it logged ([`encode`]); the VMM turns it back
//! into 4 KiB pages ([`decode`]). The report's page size may be finer or coarser than
//! 4 KiB: every report page a logged page overlaps is marked, and every 4 KiB page a
//! marked report page overlaps is dirty.

/// The unit both sides log in.
pub const LOG_PAGE_SIZE: u64 = 4096;

/// The bitmap of `iova..iova + length` at `page_size` marking every page that overlaps
/// one of the [`LOG_PAGE_SIZE`] `pages` (addresses outside the range are ignored). The
/// caller checked that the range does not wrap and that `page_size` is a power of two.
pub fn encode(pages: &[u64], iova: u64, length: u64, page_size: u64) -> Vec<u64> {
    let bits = length.div_ceil(page_size);
    let mut map = vec![0u64; bits.div_ceil(64) as usize];
    let end = iova + length;
    for &p in pages {
        let lo = p.max(iova);
        let hi = p.saturating_add(LOG_PAGE_SIZE).min(end);
        if lo >= hi {
            continue;
        }
        for bit in (lo - iova) / page_size..=(hi - 1 - iova) / page_size {
            map[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }
    map
}

/// The [`LOG_PAGE_SIZE`]-aligned pages of `iova..iova + length` that the pages marked in
/// `bitmap` (at `page_size`) overlap, in order. Bits past the range (a device's sloppy
/// tail) mark nothing; nothing here overflows on any input.
pub fn decode(bitmap: &[u64], iova: u64, length: u64, page_size: u64) -> Vec<u64> {
    let end = iova.saturating_add(length);
    let mut out = Vec::new();
    for (w, word) in bitmap.iter().enumerate() {
        let mut bits = *word;
        while bits != 0 {
            let b = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            let start = iova.saturating_add((w as u64 * 64 + b).saturating_mul(page_size));
            let stop = start.saturating_add(page_size).min(end);
            let mut page = start - start % LOG_PAGE_SIZE;
            while page < stop {
                if out.last() != Some(&page) {
                    out.push(page);
                }
                let Some(next) = page.checked_add(LOG_PAGE_SIZE) else {
                    break;
                };
                page = next;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_follows_the_specification() {
        // Bit n of the whole map: word n / 64, bit n % 64.
        let b = encode(&[0x1000, 0x41000], 0, 0x80000, 0x1000);
        assert_eq!(b, vec![1 << 1, 1 << 1]);
        // Coarser pages, and a range starting inside the log.
        assert_eq!(encode(&[0x3000], 0x2000, 0x4000, 0x2000), vec![0b1]);
        // Finer pages: every sub-page of a written page.
        assert_eq!(encode(&[0x1000], 0x1000, 0x1000, 0x400), vec![0b1111]);
        // Pages outside the range are not marked.
        assert_eq!(encode(&[0x0, 0x9000], 0x1000, 0x2000, 0x1000), vec![0]);
        assert_eq!(encode(&[], 0, 1, 4096), vec![0]);
    }

    #[test]
    fn decode_gives_4k_pages_clipped_to_the_range() {
        assert_eq!(
            decode(&[0b101, 1 << 63], 0x10000, 128 * 4096, 4096),
            vec![0x10000, 0x12000, 0x10000 + 127 * 4096]
        );
        // Larger pages cover several 4 KiB pages, clipped to the range.
        assert_eq!(decode(&[0b10], 0, 0x3000, 0x2000), vec![0x2000]);
        assert_eq!(decode(&[0b1], 0, 0x2000, 0x2000), vec![0, 0x1000]);
        assert_eq!(decode(&[0], 0, 0x1000, 0x1000), Vec::<u64>::new());
        // Finer pages: one 4 KiB page once.
        assert_eq!(decode(&[0b1111], 0x1000, 0x1000, 0x400), vec![0x1000]);
        // A garbage bitmap from a device: no overflow, nothing past the range.
        assert!(decode(&[u64::MAX; 4], u64::MAX - 4096, 4096, 1 << 62)
            .iter()
            .all(|&p| p >= u64::MAX - 8192));
    }

    #[test]
    fn decode_undoes_encode_at_every_page_size() {
        let pages = [0x0, 0x5000, 0x6000, 0x3f000, 0x80000];
        for shift in 10..=16 {
            let page_size = 1u64 << shift;
            let map = encode(&pages, 0, 0x81000, page_size);
            let back = decode(&map, 0, 0x81000, page_size);
            // Every logged page comes back; coarser report pages add their neighbours.
            assert!(
                pages.iter().all(|p| back.contains(p)),
                "{page_size}: {back:x?}"
            );
            if page_size <= LOG_PAGE_SIZE {
                assert_eq!(back, pages, "{page_size}");
            }
        }
    }
}
