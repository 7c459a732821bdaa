//! The `mem_fill` and `mem_check` ops: a pattern-filled buffer kept in the agent, to check that
//! guest memory survives whatever the test does in between (e.g. snapshots or migration).

use std::time::Instant;

use thiserror::Error;

use super::pattern;
use super::protocol::{MemCheckReply, MemFillReply, MemFillRequest};
use super::sys;

/// Bytes per pattern block in the buffer (one page).
const BLOCK: usize = 4096;
/// Memory left alone when checking the request against MemAvailable.
const HEADROOM: u64 = 16 << 20;

/// Why `mem_fill` or `mem_check` failed.
#[derive(Debug, Error)]
pub enum MemError {
    /// The request asks for more memory than the system has available.
    #[error("mem_fill: {mib} MiB requested but only {available_mib} MiB available (keeping {} MiB spare)", HEADROOM >> 20)]
    TooLarge {
        /// Requested size.
        mib: u64,
        /// MemAvailable.
        available_mib: u64,
    },
    /// The allocation failed.
    #[error("mem_fill: cannot allocate {mib} MiB")]
    NoMemory {
        /// Requested size.
        mib: u64,
    },
    /// `mem_check` before any `mem_fill`.
    #[error("mem_check: no buffer; send mem_fill first")]
    NoBuffer,
}

/// A filled buffer and the checksum it had when filled.
pub struct MemBuffer {
    data: Vec<u8>,
    expected: u64,
}

fn elapsed_us(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Fills a buffer of `req.mib` MiB with the pattern. `previous` is reused when it has the same
/// size (its pages are already faulted in, which is slow in the test guest) and freed first
/// otherwise, so that its memory counts as available.
pub fn mem_fill(
    req: &MemFillRequest,
    previous: Option<MemBuffer>,
) -> Result<(MemBuffer, MemFillReply), MemError> {
    let bytes = req.mib.saturating_mul(1 << 20);
    let reusable = previous.filter(|p| p.data.len() as u64 == bytes);
    let start = Instant::now();
    let mut data = match reusable {
        Some(previous) => previous.data,
        None => allocate(req.mib, bytes)?,
    };
    for (i, chunk) in data.chunks_mut(BLOCK).enumerate() {
        pattern::fill_block(req.seed, i as u64, chunk);
    }
    let crc = pattern::checksum(&data);
    let reply = MemFillReply {
        bytes,
        crc,
        elapsed_us: elapsed_us(start),
    };
    Ok((
        MemBuffer {
            data,
            expected: crc,
        },
        reply,
    ))
}

/// A zeroed buffer of `bytes` bytes, if MemAvailable allows it.
fn allocate(mib: u64, bytes: u64) -> Result<Vec<u8>, MemError> {
    if let Some(available) = sys::mem_available() {
        if bytes.saturating_add(HEADROOM) > available {
            return Err(MemError::TooLarge {
                mib,
                available_mib: available >> 20,
            });
        }
    }
    let len = usize::try_from(bytes).map_err(|_| MemError::NoMemory { mib })?;
    let mut data = Vec::new();
    data.try_reserve_exact(len)
        .map_err(|_| MemError::NoMemory { mib })?;
    data.resize(len, 0);
    Ok(data)
}

/// Recomputes the checksum of the kept buffer.
pub fn mem_check(buffer: Option<&MemBuffer>) -> Result<MemCheckReply, MemError> {
    let buffer = buffer.ok_or(MemError::NoBuffer)?;
    let start = Instant::now();
    let crc = pattern::checksum(&buffer.data);
    Ok(MemCheckReply {
        crc,
        expected: buffer.expected,
        intact: crc == buffer.expected,
        elapsed_us: elapsed_us(start),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check() {
        let (mut buf, fill) = mem_fill(&MemFillRequest { mib: 2, seed: 5 }, None).unwrap();
        assert_eq!(fill.bytes, 2 << 20);
        let (_, again) = mem_fill(&MemFillRequest { mib: 2, seed: 5 }, None).unwrap();
        assert_eq!(fill.crc, again.crc);
        let check = mem_check(Some(&buf)).unwrap();
        assert!(check.intact);
        assert_eq!(check.crc, fill.crc);
        buf.data[12345] ^= 1;
        let check = mem_check(Some(&buf)).unwrap();
        assert!(!check.intact);
        assert_eq!(check.expected, fill.crc);
        // Refilling reuses a buffer of the same size and overwrites the damage.
        let ptr = buf.data.as_ptr();
        let (buf, refill) = mem_fill(&MemFillRequest { mib: 2, seed: 5 }, Some(buf)).unwrap();
        assert_eq!(buf.data.as_ptr(), ptr);
        assert_eq!(refill.crc, fill.crc);
        let (buf, other) = mem_fill(&MemFillRequest { mib: 1, seed: 5 }, Some(buf)).unwrap();
        assert_eq!(buf.data.len(), 1 << 20);
        assert_ne!(other.crc, fill.crc);
    }

    #[test]
    fn refuses_absurd_sizes() {
        assert!(matches!(
            mem_fill(
                &MemFillRequest {
                    mib: u64::MAX,
                    seed: 0
                },
                None
            ),
            Err(MemError::TooLarge { .. })
        ));
        assert!(matches!(
            mem_fill(
                &MemFillRequest {
                    mib: 1 << 40,
                    seed: 0
                },
                None
            ),
            Err(MemError::TooLarge { .. })
        ));
        assert!(matches!(mem_check(None), Err(MemError::NoBuffer)));
    }
}
