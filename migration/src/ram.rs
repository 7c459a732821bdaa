//! The RAM pages payload: runs of contiguous guest pages, data or all-zero.

use std::fmt;

use crate::section::Cursor;
use crate::{Error, Result, SectionType, MAX_SECTION_LEN, PAGE_SIZE};

/// Bytes of a run header: gpa (u64), page count (u32), kind (u8).
const RUN_HEADER_LEN: usize = 13;
const KIND_DATA: u8 = 0;
const KIND_ZERO: u8 = 1;

/// The run being extended by the builder.
#[derive(Debug, Clone, Copy)]
struct OpenRun {
    /// Offset of the run's header in the payload.
    header: usize,
    /// The address a page must have to extend this run.
    next_gpa: u64,
    zero: bool,
    count: u32,
}

/// Builds a [`crate::SectionType::RamPages`] payload page by page, merging contiguous pages
/// into runs and all-zero pages into zero runs. Flush it with
/// [`crate::StreamWriter::write_ram_pages`] whenever [`RamPagesBuilder::payload_len`] passes
/// the chunk size you want on the wire (a few MiB keeps the receiver's buffer small).
#[derive(Debug, Default, Clone)]
pub struct RamPagesBuilder {
    buf: Vec<u8>,
    open: Option<OpenRun>,
    pages: u64,
}

/// Whether every byte of `page` is zero. Word-wise, since this runs over all of guest RAM
/// on each full pass.
fn is_zero(page: &[u8]) -> bool {
    let (words, rest) = page.split_at(page.len() - page.len() % 8);
    words
        .chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && rest.iter().all(|&b| b == 0)
}

impl RamPagesBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the page at guest physical address `gpa` (page aligned) with contents `page`
    /// (exactly [`PAGE_SIZE`] bytes). An all-zero page is sent as a zero run.
    pub fn push_page(&mut self, gpa: u64, page: &[u8]) -> Result<()> {
        if page.len() != PAGE_SIZE {
            return Err(Error::BadPage {
                gpa,
                what: format!("{} bytes, a page is {PAGE_SIZE}", page.len()),
            });
        }
        let zero = is_zero(page);
        self.push(gpa, 1, if zero { None } else { Some(page) })
    }

    /// Adds the pages in `data` (a whole number of pages) starting at `gpa`.
    pub fn push_pages(&mut self, gpa: u64, data: &[u8]) -> Result<()> {
        if !data.len().is_multiple_of(PAGE_SIZE) {
            return Err(Error::BadPage {
                gpa,
                what: format!("{} bytes is not a whole number of pages", data.len()),
            });
        }
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let at = gpa
                .checked_add((i * PAGE_SIZE) as u64)
                .ok_or_else(|| Error::BadPage {
                    gpa,
                    what: "pages run past the top of the address space".into(),
                })?;
            self.push_page(at, page)?;
        }
        Ok(())
    }

    /// Adds `count` pages of zeros starting at `gpa`, without looking at them (e.g. guest
    /// RAM never touched since boot).
    pub fn push_zero_pages(&mut self, gpa: u64, count: u32) -> Result<()> {
        for i in 0..count {
            let at = gpa
                .checked_add(u64::from(i) * PAGE_SIZE as u64)
                .ok_or_else(|| Error::BadPage {
                    gpa,
                    what: "pages run past the top of the address space".into(),
                })?;
            self.push(at, 1, None)?;
        }
        Ok(())
    }

    fn push(&mut self, gpa: u64, count: u32, data: Option<&[u8]>) -> Result<()> {
        if !gpa.is_multiple_of(PAGE_SIZE as u64) {
            return Err(Error::BadPage {
                gpa,
                what: "not page aligned".into(),
            });
        }
        let end = run_end(gpa, count).ok_or_else(|| Error::BadPage {
            gpa,
            what: "pages run past the top of the address space".into(),
        })?;
        let zero = data.is_none();
        let data = data.unwrap_or(&[]);
        let extend = matches!(self.open, Some(r) if r.next_gpa == gpa && r.zero == zero && r.count.checked_add(count).is_some());
        let added = data.len() + if extend { 0 } else { RUN_HEADER_LEN };
        if (self.buf.len() + added) as u64 > MAX_SECTION_LEN {
            return Err(Error::TooLarge {
                ty: SectionType::RamPages,
                what: format!(
                    "payload would exceed the maximum section length {MAX_SECTION_LEN}; flush it"
                ),
            });
        }
        match &mut self.open {
            Some(r) if extend => {
                r.count += count;
                r.next_gpa = end;
                let at = r.header + 8;
                self.buf[at..at + 4].copy_from_slice(&r.count.to_le_bytes());
            }
            _ => {
                let header = self.buf.len();
                self.buf.extend_from_slice(&gpa.to_le_bytes());
                self.buf.extend_from_slice(&count.to_le_bytes());
                self.buf.push(if zero { KIND_ZERO } else { KIND_DATA });
                self.open = Some(OpenRun {
                    header,
                    next_gpa: end,
                    zero,
                    count,
                });
            }
        }
        self.buf.extend_from_slice(data);
        self.pages += u64::from(count);
        Ok(())
    }

    /// Bytes of payload so far.
    pub fn payload_len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no page has been added since the last clear.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Pages added since the last clear.
    pub fn page_count(&self) -> u64 {
        self.pages
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.buf
    }

    /// Empties the builder, keeping its buffer for the next chunk.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.open = None;
        self.pages = 0;
    }
}

/// The exclusive end address of `count` pages at `gpa`; `None` when it does not fit in u64
/// (so the last page of the 64-bit space is never sent; no guest RAM is there). Both sides use this rule, so the writer
/// never produces a run the reader rejects.
fn run_end(gpa: u64, count: u32) -> Option<u64> {
    gpa.checked_add(u64::from(count) * PAGE_SIZE as u64)
}

/// One run of pages from a [`RamPages`] section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRun<'a> {
    /// Guest physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u32,
    /// The pages' contents (`pages * PAGE_SIZE` bytes), or `None` when they are all zeros.
    pub data: Option<&'a [u8]>,
}

/// A received, validated [`crate::SectionType::RamPages`] payload.
#[derive(Clone, PartialEq, Eq)]
pub struct RamPages {
    payload: Vec<u8>,
    pages: u64,
    runs: usize,
}

impl fmt::Debug for RamPages {
    // The payload can be a GiB: show its shape, not its bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamPages")
            .field("bytes", &self.payload.len())
            .field("runs", &self.runs)
            .field("pages", &self.pages)
            .finish()
    }
}

/// Parses one run header and its data; `Ok(None)` at the end of the payload.
fn next_run<'a>(c: &mut Cursor<'a>) -> std::result::Result<Option<RamRun<'a>>, String> {
    if c.remaining() == 0 {
        return Ok(None);
    }
    let at = c.pos();
    let gpa = c.u64("run address")?;
    let pages = c.u32("run page count")?;
    let kind = c.u8("run kind")?;
    if !gpa.is_multiple_of(PAGE_SIZE as u64) {
        return Err(format!(
            "run at offset {at}: address {gpa:#x} is not page aligned"
        ));
    }
    if pages == 0 {
        return Err(format!("run at offset {at}: zero pages"));
    }
    if run_end(gpa, pages).is_none() {
        return Err(format!(
            "run at offset {at}: {pages} pages at {gpa:#x} run past the top of the address space"
        ));
    }
    let data = match kind {
        KIND_DATA => {
            let len = u64::from(pages) * PAGE_SIZE as u64;
            // A 64-bit usize holds any u32 * 4096; on 32-bit an over-long run fails the same
            // way as a short payload.
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            Some(c.take(len, &format!("run at offset {at} ({pages} pages)"))?)
        }
        KIND_ZERO => None,
        k => return Err(format!("run at offset {at}: unknown kind {k}")),
    };
    Ok(Some(RamRun { gpa, pages, data }))
}

impl RamPages {
    /// Validates a payload, so that iterating it later cannot fail.
    pub fn parse(payload: Vec<u8>) -> std::result::Result<RamPages, String> {
        let mut c = Cursor::new(&payload);
        let (mut pages, mut runs) = (0u64, 0usize);
        while let Some(run) = next_run(&mut c)? {
            pages += u64::from(run.pages);
            runs += 1;
        }
        Ok(RamPages {
            payload,
            pages,
            runs,
        })
    }

    /// The runs, in stream order (apply them in that order: a later copy of a page wins).
    pub fn runs(&self) -> impl Iterator<Item = RamRun<'_>> + '_ {
        let mut c = Cursor::new(&self.payload);
        // parse() validated the payload, so next_run cannot fail here; stopping at an error
        // would only be reached if that invariant broke.
        std::iter::from_fn(move || next_run(&mut c).ok().flatten())
    }

    /// Total pages in all runs.
    pub fn page_count(&self) -> u64 {
        self.pages
    }

    /// Number of runs.
    pub fn run_count(&self) -> usize {
        self.runs
    }

    /// The raw payload.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    #[test]
    fn builder_merges_contiguous_pages_and_zero_runs() {
        let mut b = RamPagesBuilder::new();
        b.push_page(0x1000, &page(1)).unwrap();
        b.push_page(0x2000, &page(2)).unwrap();
        b.push_page(0x3000, &page(0)).unwrap();
        b.push_zero_pages(0x4000, 3).unwrap();
        b.push_page(0x9000, &page(3)).unwrap();
        assert_eq!(b.page_count(), 7);
        assert_eq!(b.payload_len(), 3 * RUN_HEADER_LEN + 3 * PAGE_SIZE);
        let r = RamPages::parse(b.payload().to_vec()).unwrap();
        let runs: Vec<_> = r.runs().collect();
        assert_eq!(runs.len(), 3);
        assert_eq!((runs[0].gpa, runs[0].pages), (0x1000, 2));
        assert_eq!(runs[0].data.unwrap()[PAGE_SIZE], 2);
        assert_eq!(
            (runs[1].gpa, runs[1].pages, runs[1].data),
            (0x3000, 4, None)
        );
        assert_eq!((runs[2].gpa, runs[2].pages), (0x9000, 1));
        assert_eq!(r.page_count(), 7);
    }

    #[test]
    fn builder_rejects_bad_pages() {
        let mut b = RamPagesBuilder::new();
        assert!(matches!(
            b.push_page(0x1001, &page(1)),
            Err(Error::BadPage { .. })
        ));
        assert!(matches!(
            b.push_page(0x1000, &[1u8; 100]),
            Err(Error::BadPage { .. })
        ));
        assert!(matches!(
            b.push_pages(0x1000, &[1u8; 5000]),
            Err(Error::BadPage { .. })
        ));
        let top = u64::MAX - (PAGE_SIZE as u64 - 1);
        assert!(b.push_page(top, &page(1)).is_err());
        assert!(b.is_empty());
    }

    #[test]
    fn parse_rejects_malformed_runs() {
        let run = |gpa: u64, n: u32, kind: u8| {
            let mut v = gpa.to_le_bytes().to_vec();
            v.extend_from_slice(&n.to_le_bytes());
            v.push(kind);
            v
        };
        assert!(RamPages::parse(run(0x1001, 1, KIND_ZERO)).is_err());
        assert!(RamPages::parse(run(0x1000, 0, KIND_ZERO)).is_err());
        assert!(RamPages::parse(run(0x1000, 1, 7)).is_err());
        assert!(RamPages::parse(run(0x1000, 1, KIND_DATA)).is_err());
        assert!(RamPages::parse(run(!0xfff, 1, KIND_ZERO)).is_err());
        assert!(RamPages::parse(run(0, u32::MAX, KIND_DATA)).is_err());
        assert!(RamPages::parse(vec![0; 12]).is_err());
        assert_eq!(RamPages::parse(Vec::new()).unwrap().page_count(), 0);
    }
}
