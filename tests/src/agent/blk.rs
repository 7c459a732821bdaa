//! The `blk_write`, `blk_verify` and `checksum` ops: pattern I/O on files and block devices.
//!
//! I/O is batched (about 1 MiB per system call) because system calls are what is slow in the
//! test guest.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Instant;

use thiserror::Error;

use super::aligned::{AlignedBuf, DIRECT_ALIGN};
use super::pattern::{self, Fnv64};
use super::protocol::{BlkRequest, BlkVerifyReply, BlkWriteReply, ChecksumReply, ChecksumRequest};

/// Bytes moved per system call, at least one block.
const BATCH_BYTES: u64 = 1 << 20;
/// Largest block accepted.
const MAX_BLOCK: u64 = 64 << 20;
/// O_DIRECT offsets and sizes must be multiples of this.
const SECTOR: u64 = 512;

/// Why a block op failed.
#[derive(Debug, Error)]
pub enum BlkError {
    /// The request's numbers do not make sense.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The buffer could not be allocated.
    #[error("cannot allocate a {0}-byte I/O buffer")]
    NoMemory(u64),
    /// open(2) failed.
    #[error("cannot open {path}{direct}: {source}", direct = if *.direct { " with O_DIRECT" } else { "" })]
    Open {
        /// The file.
        path: String,
        /// Whether O_DIRECT was asked for.
        direct: bool,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A read or write failed.
    #[error("{what} {len} bytes at offset {offset} of {path} failed: {source}")]
    Io {
        /// "reading" or "writing".
        what: &'static str,
        /// The file.
        path: String,
        /// Byte offset of the failed transfer.
        offset: u64,
        /// Its length.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// fsync(2) failed.
    #[error("fsync of {path} failed: {source}")]
    Sync {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Validated geometry of a [`BlkRequest`].
struct Geometry {
    block: usize,
    first_index: u64,
    /// Blocks per batch.
    batch: u64,
}

impl Geometry {
    fn of(req: &BlkRequest) -> Result<Self, BlkError> {
        let bs = req.block_size;
        if bs == 0 || bs > MAX_BLOCK {
            return Err(BlkError::Invalid(format!(
                "block_size {bs} must be between 1 and {MAX_BLOCK}"
            )));
        }
        if !req.offset.is_multiple_of(bs) {
            return Err(BlkError::Invalid(format!(
                "offset {} is not a multiple of block_size {bs}",
                req.offset
            )));
        }
        if req.direct && (!bs.is_multiple_of(SECTOR) || !req.offset.is_multiple_of(SECTOR)) {
            return Err(BlkError::Invalid(format!(
                "O_DIRECT needs offset and block_size to be multiples of {SECTOR} (got {} and {bs})",
                req.offset
            )));
        }
        let len = req.blocks.checked_mul(bs);
        if len.and_then(|l| l.checked_add(req.offset)).is_none() {
            return Err(BlkError::Invalid(format!(
                "{} blocks of {bs} bytes at offset {} overflow",
                req.blocks, req.offset
            )));
        }
        let block = usize::try_from(bs)
            .map_err(|_| BlkError::Invalid(format!("block_size {bs} too large")))?;
        Ok(Geometry {
            block,
            first_index: req.offset / bs,
            batch: (BATCH_BYTES / bs).max(1),
        })
    }

    fn buffer(&self) -> Result<AlignedBuf, BlkError> {
        // batch * block <= max(BATCH_BYTES, MAX_BLOCK), which fits in usize.
        let len = self.block * self.batch as usize;
        AlignedBuf::new(len, DIRECT_ALIGN).map_err(|_| BlkError::NoMemory(len as u64))
    }
}

fn open(path: &str, write: bool, direct: bool) -> Result<File, BlkError> {
    let mut opts = OpenOptions::new();
    if write {
        opts.write(true).create(true);
    } else {
        opts.read(true);
    }
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    opts.open(path).map_err(|source| BlkError::Open {
        path: path.to_owned(),
        direct,
        source,
    })
}

fn elapsed_us(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Writes the pattern blocks of `req`, then fsyncs.
pub fn blk_write(req: &BlkRequest) -> Result<BlkWriteReply, BlkError> {
    let geo = Geometry::of(req)?;
    let mut buf = geo.buffer()?;
    let start = Instant::now();
    let file = open(&req.path, true, req.direct)?;
    let mut done = 0u64;
    while done < req.blocks {
        let n = geo.batch.min(req.blocks - done);
        let bytes = &mut buf.as_mut_slice()[..n as usize * geo.block];
        for (i, chunk) in bytes.chunks_exact_mut(geo.block).enumerate() {
            pattern::fill_block(req.seed, geo.first_index + done + i as u64, chunk);
        }
        let offset = req.offset + done * req.block_size;
        file.write_all_at(bytes, offset)
            .map_err(|source| BlkError::Io {
                what: "writing",
                path: req.path.clone(),
                offset,
                len: bytes.len() as u64,
                source,
            })?;
        done += n;
    }
    file.sync_all().map_err(|source| BlkError::Sync {
        path: req.path.clone(),
        source,
    })?;
    Ok(BlkWriteReply {
        bytes: req.blocks * req.block_size,
        elapsed_us: elapsed_us(start),
    })
}

/// Reads the blocks of `req` back and counts those that differ from the pattern.
pub fn blk_verify(req: &BlkRequest) -> Result<BlkVerifyReply, BlkError> {
    let geo = Geometry::of(req)?;
    let mut buf = geo.buffer()?;
    let mut expected = vec![0u8; geo.block];
    let start = Instant::now();
    let file = open(&req.path, false, req.direct)?;
    let mut done = 0u64;
    let mut mismatches = 0u64;
    let mut first_mismatch = None;
    while done < req.blocks {
        let n = geo.batch.min(req.blocks - done);
        let bytes = &mut buf.as_mut_slice()[..n as usize * geo.block];
        let offset = req.offset + done * req.block_size;
        file.read_exact_at(bytes, offset)
            .map_err(|source| BlkError::Io {
                what: "reading",
                path: req.path.clone(),
                offset,
                len: bytes.len() as u64,
                source,
            })?;
        for (i, got) in bytes.chunks_exact(geo.block).enumerate() {
            let index = geo.first_index + done + i as u64;
            pattern::fill_block(req.seed, index, &mut expected);
            if got != expected.as_slice() {
                mismatches += 1;
                first_mismatch.get_or_insert(index);
            }
        }
        done += n;
    }
    Ok(BlkVerifyReply {
        bytes: req.blocks * req.block_size,
        mismatches,
        first_mismatch,
        elapsed_us: elapsed_us(start),
    })
}

/// FNV-1a 64 of `len` bytes at `offset` of a file; the range must lie within the file.
pub fn checksum(req: &ChecksumRequest) -> Result<ChecksumReply, BlkError> {
    if req.offset.checked_add(req.len).is_none() {
        return Err(BlkError::Invalid(format!(
            "{} bytes at offset {} overflow",
            req.len, req.offset
        )));
    }
    let start = Instant::now();
    let file = open(&req.path, false, false)?;
    let mut buf = vec![0u8; BATCH_BYTES as usize];
    let mut hasher = Fnv64::new();
    let mut done = 0u64;
    while done < req.len {
        let n = BATCH_BYTES.min(req.len - done) as usize;
        let offset = req.offset + done;
        file.read_exact_at(&mut buf[..n], offset)
            .map_err(|source| BlkError::Io {
                what: "reading",
                path: req.path.clone(),
                offset,
                len: n as u64,
                source,
            })?;
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    Ok(ChecksumReply {
        bytes: req.len,
        crc: hasher.finish(),
        elapsed_us: elapsed_us(start),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn temp_file(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-agent-blk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        path
    }

    fn req(path: &Path, offset: u64, block_size: u64, blocks: u64) -> BlkRequest {
        BlkRequest {
            path: path.to_string_lossy().into_owned(),
            offset,
            block_size,
            blocks,
            seed: 42,
            direct: false,
        }
    }

    #[test]
    fn write_then_verify_then_corrupt() {
        let path = temp_file("rw");
        // 600 blocks of 4 KiB: more than one batch.
        let w = blk_write(&req(&path, 8192, 4096, 600)).unwrap();
        assert_eq!(w.bytes, 600 * 4096);
        let v = blk_verify(&req(&path, 8192, 4096, 600)).unwrap();
        assert_eq!((v.mismatches, v.first_mismatch), (0, None));
        // The on-disk block carries its absolute index.
        let data = std::fs::read(&path).unwrap();
        assert_eq!(pattern::header(&data[8192 + 4096..]), Some((42, 3)));
        // A sub-range verifies on its own.
        let v = blk_verify(&req(&path, 8192 * 4, 4096, 10)).unwrap();
        assert_eq!(v.mismatches, 0);

        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff ^ data[8192 + 5 * 4096 + 100]], 8192 + 5 * 4096 + 100)
            .unwrap();
        let v = blk_verify(&req(&path, 8192, 4096, 600)).unwrap();
        assert_eq!((v.mismatches, v.first_mismatch), (1, Some(7)));
        let mut wrong_seed = req(&path, 8192, 4096, 600);
        wrong_seed.seed = 1;
        assert_eq!(blk_verify(&wrong_seed).unwrap().mismatches, 600);
    }

    #[test]
    fn checksum_matches_pattern() {
        let path = temp_file("sum");
        blk_write(&req(&path, 0, 1000, 3)).unwrap();
        let c = checksum(&ChecksumRequest {
            path: path.to_string_lossy().into_owned(),
            offset: 1000,
            len: 2000,
        })
        .unwrap();
        let mut expected = pattern::block(42, 1, 1000);
        expected.extend(pattern::block(42, 2, 1000));
        assert_eq!(c.crc, pattern::checksum(&expected));
        assert_eq!(c.bytes, 2000);
    }

    #[test]
    fn rejects_bad_requests() {
        let path = temp_file("bad");
        assert!(matches!(
            blk_write(&req(&path, 0, 0, 1)),
            Err(BlkError::Invalid(_))
        ));
        assert!(matches!(
            blk_write(&req(&path, 100, 4096, 1)),
            Err(BlkError::Invalid(_))
        ));
        assert!(matches!(
            blk_write(&req(&path, 0, 4096, u64::MAX)),
            Err(BlkError::Invalid(_))
        ));
        let mut direct = req(&path, 0, 1000, 1);
        direct.direct = true;
        assert!(matches!(blk_write(&direct), Err(BlkError::Invalid(_))));
        // Reading past the end is an error naming the file.
        blk_write(&req(&path, 0, 512, 1)).unwrap();
        let e = blk_verify(&req(&path, 0, 512, 2)).unwrap_err();
        assert!(e.to_string().contains("reading"), "{e}");
        let e = blk_verify(&req(&PathBuf::from("/nonexistent/x"), 0, 512, 1)).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x"), "{e}");
    }
}
