//! Locked pages and their physical addresses, for DMA without an IOMMU: a no-IOMMU VFIO
//! device reaches physical memory, so a user-space driver gives it the physical addresses
//! of pages it locked (from `/proc/self/pagemap`, which shows frame numbers to root only).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

const PAGE: usize = 4096;

/// One page of anonymous memory, locked in RAM, with its physical address.
pub struct LockedPage {
    ptr: NonNull<u8>,
    phys: u64,
}

impl LockedPage {
    /// Maps, populates and locks a zeroed page and looks up its frame.
    pub fn new() -> io::Result<Self> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).expect("mmap does not return null on success");
        // SAFETY: the page was just mapped; mlock only pins it.
        if unsafe { libc::mlock(p, PAGE) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: unmapping the page mapped above, not used after.
            unsafe { libc::munmap(p, PAGE) };
            return Err(e);
        }
        // Touch it so it has a frame (MAP_POPULATE should have, but be sure).
        // SAFETY: the page is mapped writable and owned by this value.
        unsafe { ptr.as_ptr().write_volatile(0) };
        let phys = physical_address(ptr.as_ptr() as usize)?;
        Ok(LockedPage { ptr, phys })
    }

    /// The page's physical address (what a no-IOMMU device uses to reach it).
    pub fn phys(&self) -> u64 {
        self.phys
    }

    /// Writes `data` at `offset` (volatile: a device may read the page at any time).
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= PAGE, "write outside the page");
        for (i, b) in data.iter().enumerate() {
            // SAFETY: inside the page (checked above), which this value owns.
            unsafe { self.ptr.as_ptr().add(offset + i).write_volatile(*b) };
        }
    }

    /// Reads `len` bytes at `offset` (volatile: a device may write the page at any time).
    pub fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= PAGE, "read outside the page");
        // SAFETY: inside the page (checked above), which this value owns.
        (0..len)
            .map(|i| unsafe { self.ptr.as_ptr().add(offset + i).read_volatile() })
            .collect()
    }
}

impl Drop for LockedPage {
    fn drop(&mut self) {
        // SAFETY: unmapping the page this value mapped; no reference to it outlives self.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), PAGE) };
    }
}

/// The physical address of virtual address `va` of this process.
fn physical_address(va: usize) -> io::Result<u64> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut entry = [0u8; 8];
    pagemap.read_exact_at(&mut entry, (va / PAGE * 8) as u64)?;
    let entry = u64::from_ne_bytes(entry);
    let pfn = entry & ((1 << 55) - 1);
    if entry & (1 << 63) == 0 || pfn == 0 {
        return Err(io::Error::other(format!(
            "page {va:#x} is not present or its frame is hidden (pagemap entry {entry:#x}; root needed)"
        )));
    }
    Ok(pfn * PAGE as u64 + (va % PAGE) as u64)
}
