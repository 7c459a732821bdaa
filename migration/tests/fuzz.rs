//! Seeded fuzzing of the reader: random garbage, mutated valid streams, and random payloads
//! behind valid CRCs (so the payload decoders are reached, which garbage almost never
//! does). Nothing may panic, and no input may make the reader allocate much more than the
//! bytes it was given.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::{read_all, sample_stream, Rng};
use migration::{Section, SectionType, StreamReader, FORMAT_VERSION, MAGIC, MAX_SECTION_LEN};

/// Records the largest single allocation while armed, to show that a lying length field
/// costs nothing.
struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Only one test arms the counter; the others run on other threads meanwhile, so it may
/// also see their allocations (all small).
const ALLOC_LIMIT: usize = 1 << 20;

fn header(flags: u32) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    let crc = migration::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

fn section(ty: u32, payload: &[u8]) -> Vec<u8> {
    let mut s = ty.to_le_bytes().to_vec();
    s.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    s.extend_from_slice(payload);
    let crc = migration::crc32c(&s);
    s.extend_from_slice(&crc.to_le_bytes());
    s
}

/// Reads until an error or the end, returning how many sections decoded.
fn drain(bytes: &[u8]) -> usize {
    let Ok(mut r) = StreamReader::read_header(bytes) else {
        return 0;
    };
    let mut n = 0;
    while let Ok(s) = r.next_section() {
        n += 1;
        if s == Section::End {
            break;
        }
    }
    n
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = Rng(0x5eed_0001);
    for i in 0..20_000 {
        let len = rng.below(200) as usize;
        let mut b = rng.bytes(len);
        // Half the inputs get a valid header, so the section reader sees the garbage.
        if i % 2 == 0 {
            let mut h = header(0);
            h.append(&mut b);
            b = h;
        }
        drain(&b);
    }
}

#[test]
fn mutated_streams_never_panic_and_never_decode_silently_wrong() {
    let good = sample_stream();
    let expect = read_all(&good).unwrap();
    let mut rng = Rng(0x5eed_0002);
    for _ in 0..3_000 {
        let mut b = good.clone();
        for _ in 0..=rng.below(4) {
            match rng.below(4) {
                0 => {
                    let i = rng.below(b.len() as u64) as usize;
                    b[i] ^= 1 << rng.below(8);
                }
                1 => {
                    let i = rng.below(b.len() as u64) as usize;
                    b[i] = rng.next() as u8;
                }
                2 => {
                    let i = rng.below(b.len() as u64 + 1) as usize;
                    b.insert(i, rng.next() as u8);
                }
                _ => {
                    if !b.is_empty() {
                        let i = rng.below(b.len() as u64) as usize;
                        b.remove(i);
                    }
                }
            }
        }
        if b == good {
            continue;
        }
        if let Ok(got) = read_all(&b) {
            // Only possible if the mutations cancelled out into the same stream.
            assert_eq!(got, expect, "a mutated stream decoded to something else");
        }
    }
}

#[test]
fn random_payloads_behind_valid_crcs_never_panic() {
    let mut rng = Rng(0x5eed_0003);
    for _ in 0..20_000 {
        let ty = SectionType::ALL[rng.below(SectionType::ALL.len() as u64) as usize];
        let len = rng.below(64) as usize;
        let mut payload = rng.bytes(len);
        // Bias some fields towards the values that matter, so the decoders go deep.
        match ty {
            SectionType::Control if len >= 4 => {
                payload[..4].copy_from_slice(&(1 + rng.below(8) as u32).to_le_bytes())
            }
            SectionType::Device if len >= 2 => {
                payload[..2].copy_from_slice(&(rng.below(len as u64) as u16).to_le_bytes())
            }
            SectionType::RamPages if len >= 13 => {
                payload[..8].copy_from_slice(&(rng.below(1 << 20) * 4096).to_le_bytes());
                payload[8..12].copy_from_slice(&(rng.below(3) as u32).to_le_bytes());
                payload[12] = rng.below(3) as u8;
            }
            _ => {}
        }
        let mut b = header(0);
        b.extend_from_slice(&section(ty as u32, &payload));
        b.extend_from_slice(&section(SectionType::End as u32, &1u64.to_le_bytes()));
        if let Ok(secs) = read_all(&b) {
            assert_eq!(secs.len(), 2);
            assert_eq!(secs[0].section_type(), ty);
            if let Section::RamPages(r) = &secs[0] {
                // Iterating a validated payload yields every page it counted.
                let n: u64 = r.runs().map(|run| u64::from(run.pages)).sum();
                assert_eq!(n, r.page_count());
            }
        }
    }
}

#[test]
fn lying_lengths_do_not_allocate_the_length() {
    let mut rng = Rng(0x5eed_0004);
    let mut inputs = Vec::new();
    for i in 0..200 {
        let mut b = header(0);
        let ty = 1 + rng.below(9) as u32;
        b.extend_from_slice(&ty.to_le_bytes());
        let len = match i % 3 {
            0 => MAX_SECTION_LEN,
            1 => MAX_SECTION_LEN - rng.below(1 << 20),
            _ => rng.next(),
        };
        b.extend_from_slice(&len.to_le_bytes());
        let tail = rng.below(4096) as usize;
        b.extend_from_slice(&rng.bytes(tail));
        inputs.push(b);
    }
    LARGEST.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    for b in &inputs {
        assert_eq!(drain(b), 0);
    }
    ARMED.store(false, Ordering::Relaxed);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= ALLOC_LIMIT,
        "largest allocation {largest} bytes for inputs under 5 KiB"
    );
}
