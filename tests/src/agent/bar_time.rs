//! `bar_time`: the cost of a 32-bit write from guest user space to a mapped file (a PCI BAR
//! through sysfs `resourceN`: a KVM memslot when the VMM maps that page, an exit when it
//! traps it) and to ordinary RAM, for `benches/bar-access.sh`.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::time::Instant;

use super::protocol::{BarTimeReply, BarTimeRequest};

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum BarTimeError {
    /// The file cannot be opened or mapped.
    #[error("cannot map {path}: {source}")]
    Map {
        path: String,
        source: std::io::Error,
    },
    /// An offset is unaligned or past the file's mapped size.
    #[error(
        "offset {offset:#x} is not a 4-byte aligned offset inside the {len:#x} bytes of {path}"
    )]
    Offset { path: String, offset: u64, len: u64 },
    /// Nothing to measure.
    #[error("count must be at least 1")]
    Count,
}

fn per_write_ns(count: u64, mut write: impl FnMut(u32)) -> f64 {
    let start = Instant::now();
    for i in 0..count {
        write(i as u32);
    }
    start.elapsed().as_nanos() as f64 / count as f64
}

/// Maps `req.path` and times `req.count` writes at each offset, then the same to RAM.
pub fn bar_time(req: &BarTimeRequest) -> Result<BarTimeReply, BarTimeError> {
    if req.count == 0 {
        return Err(BarTimeError::Count);
    }
    let map_err = |source| BarTimeError::Map {
        path: req.path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&req.path)
        .map_err(map_err)?;
    let len = file.metadata().map_err(map_err)?.len();
    for &offset in &req.offsets {
        if offset % 4 != 0 || offset + 4 > len {
            return Err(BarTimeError::Offset {
                path: req.path.clone(),
                offset,
                len,
            });
        }
    }
    // SAFETY: a fresh shared mapping of `len` bytes of an open file; checked for failure.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(map_err(std::io::Error::last_os_error()));
    }
    let mapped_ns = req
        .offsets
        .iter()
        .map(|&offset| {
            // SAFETY: `offset + 4 <= len` was checked and the mapping is `len` bytes long.
            let p = unsafe { base.cast::<u8>().add(offset as usize).cast::<u32>() };
            // SAFETY: `p` is an aligned pointer into the live mapping.
            per_write_ns(req.count, |v| unsafe { p.write_volatile(v) })
        })
        .collect();
    // SAFETY: unmapping exactly the mapping made above, which nothing refers to any more.
    unsafe { libc::munmap(base, len as usize) };

    let mut ram = vec![0u32; 1024];
    let p = ram.as_mut_ptr();
    // SAFETY: `p` points at the first element of a live Vec.
    let ram_ns = per_write_ns(req.count, |v| unsafe { p.write_volatile(v) });
    std::hint::black_box(&ram);
    Ok(BarTimeReply { mapped_ns, ram_ns })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_writes_to_a_mapped_file_and_checks_offsets() {
        let path = std::env::temp_dir().join(format!("bar-time-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let req = BarTimeRequest {
            path: path.display().to_string(),
            offsets: vec![0, 4096],
            count: 1000,
        };
        let reply = bar_time(&req).unwrap();
        assert_eq!(reply.mapped_ns.len(), 2);
        assert!(reply.mapped_ns.iter().all(|ns| *ns > 0.0) && reply.ram_ns > 0.0);
        let last = std::fs::read(&path).unwrap();
        assert_eq!(
            &last[..4],
            &999u32.to_le_bytes(),
            "the writes reached the file"
        );
        let bad = BarTimeRequest {
            offsets: vec![8192],
            ..req.clone()
        };
        assert!(matches!(bar_time(&bad), Err(BarTimeError::Offset { .. })));
        let odd = BarTimeRequest {
            offsets: vec![2],
            ..req
        };
        assert!(matches!(bar_time(&odd), Err(BarTimeError::Offset { .. })));
        let _ = std::fs::remove_file(path);
    }
}
