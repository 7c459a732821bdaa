//! Guest RAM: one memfd, mapped shared, so that out-of-process devices (vfio-user) can be
//! handed the same memory later.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is not usable: where it came from (`--memory 1M`, or the stream's) and why.
    #[error("{0}: {1}")]
    BadSize(String, String),
    /// The host does not have that much memory.
    #[error("{what}: {requested_mib} MiB is more than this host's {host_mib} MiB of memory; choose a smaller size")]
    TooLarge {
        what: String,
        requested_mib: u64,
        host_mib: u64,
    },
    /// memfd_create or ftruncate failed.
    #[error("cannot create the {size_mib} MiB memfd for guest RAM: {source}")]
    Memfd {
        size_mib: u64,
        source: std::io::Error,
    },
    /// Mapping the memfd failed.
    #[error("cannot map guest RAM: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
}

/// Smallest guest that can boot Linux here.
pub const MIN_MEMORY: u64 = 16 << 20;

/// Parses a size such as `256M`, `1G`, `1048576` or `512K` (binary units).
pub fn parse_size(s: &str) -> Result<u64, MemoryError> {
    let bad = |why: &str| MemoryError::BadSize(format!("--memory {s}"), why.to_string());
    let t = s.trim();
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| {
        bad("not a size; use a number with an optional K, M, G or T suffix, e.g. 256M")
    })?;
    n.checked_mul(1u64 << shift).ok_or_else(|| bad("too large"))
}

/// Checks a requested RAM size against the minimum, page alignment and the host's memory;
/// `what` says where it came from (`--memory 256M`, or a stream).
pub fn validate_size(size: u64, what: &str) -> Result<(), MemoryError> {
    let text = what;
    if size == 0 {
        return Err(MemoryError::BadSize(
            text.into(),
            "guest memory cannot be 0".into(),
        ));
    }
    if size < MIN_MEMORY {
        return Err(MemoryError::BadSize(
            text.into(),
            format!("at least {}M is needed to boot Linux", MIN_MEMORY >> 20),
        ));
    }
    if !size.is_multiple_of(4096) {
        return Err(MemoryError::BadSize(
            text.into(),
            "must be a multiple of 4 KiB".into(),
        ));
    }
    if let Some(host) = host_memory() {
        if size > host {
            return Err(MemoryError::TooLarge {
                what: what.to_owned(),
                requested_mib: size >> 20,
                host_mib: host >> 20,
            });
        }
    }
    Ok(())
}

/// MemTotal from /proc/meminfo, in bytes.
fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Creates guest RAM of `size` bytes laid out by [`resources::layout::ram_regions`], backed
/// by one memfd. Returns the memory and the memfd.
pub fn create(size: u64) -> Result<(GuestMemoryMmap, File), MemoryError> {
    let memfd = create_memfd(size)?;
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    for (gpa, len) in resources::layout::ram_regions(size) {
        let file = memfd.try_clone().map_err(|source| MemoryError::Memfd {
            size_mib: size >> 20,
            source,
        })?;
        ranges.push((
            GuestAddress(gpa),
            len as usize,
            Some(FileOffset::new(file, offset)),
        ));
        offset += len;
    }
    Ok((GuestMemoryMmap::from_ranges_with_files(ranges)?, memfd))
}

fn create_memfd(size: u64) -> Result<File, MemoryError> {
    let err = |source| MemoryError::Memfd {
        size_mib: size >> 20,
        source,
    };
    // SAFETY: the name is a valid NUL-terminated string and the flags are valid; the result
    // is checked before use.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(err)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn sizes_are_validated() {
        assert!(validate_size(0, "0")
            .unwrap_err()
            .to_string()
            .contains("cannot be 0"));
        assert!(validate_size(1 << 20, "1M").is_err());
        assert!(validate_size((64 << 20) + 1, "x").is_err());
        assert!(matches!(
            validate_size(1 << 50, "1P"),
            Err(MemoryError::TooLarge { .. })
        ));
        assert!(validate_size(256 << 20, "256M").is_ok());
    }

    #[test]
    fn memory_is_one_shared_memfd() {
        let (mem, memfd) = create(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        memfd.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(
            u32::from_le_bytes(buf),
            0xdead_beef,
            "RAM writes must land in the memfd"
        );
    }
}
