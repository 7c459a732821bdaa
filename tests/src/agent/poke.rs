//! The `poke` op: read, write and read back I/O ports and physical memory (MMIO), so a
//! robustness test can check that the VMM survives a guest touching what nobody emulates.
//!
//! Ports are accessed with `in`/`out` after iopl(3) or, when the kernel lacks iopl
//! (CONFIG_X86_IOPL_IOPERM unset), through /dev/port; MMIO through /dev/mem. Only ever run as
//! the guest's PID 1: the server refuses it elsewhere.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use thiserror::Error;

use super::protocol::{PokeReply, PokeRequest};

/// Byte written to each port.
const PORT_VALUE: u8 = 0xA5;
/// Word written to each MMIO address.
const MMIO_VALUE: u32 = 0xA5A5_A5A5;

/// Why a poke failed.
#[derive(Debug, Error)]
pub enum PokeError {
    /// Neither iopl(3) nor /dev/port is available.
    #[error("no port I/O: iopl(3) failed ({iopl}) and /dev/port cannot be opened ({devport})")]
    NoPortIo {
        /// Why iopl failed.
        iopl: String,
        /// Why /dev/port could not be opened.
        devport: io::Error,
    },
    /// A /dev/port access failed.
    #[error("{what} port {port:#x} through /dev/port failed: {source}")]
    DevPort {
        /// "reading" or "writing".
        what: &'static str,
        /// The port.
        port: u16,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The address is not 4-byte aligned or does not fit an mmap offset.
    #[error("MMIO address {0:#x} must be 4-byte aligned and below 2^63")]
    BadAddress(u64),
    /// /dev/mem could not be opened.
    #[error("cannot open /dev/mem: {0}")]
    OpenMem(#[source] io::Error),
    /// The page could not be mapped.
    #[error("cannot mmap the /dev/mem page of {addr:#x}: {source}")]
    Map {
        /// The address.
        addr: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Pokes every port, then every address, stopping at the first failure.
pub fn poke(req: &PokeRequest) -> Result<PokeReply, PokeError> {
    let mut reply = PokeReply::default();
    if !req.ports.is_empty() {
        let ports = Ports::open()?;
        for &port in &req.ports {
            let before = ports.read(port)?;
            ports.write(port, PORT_VALUE)?;
            reply.ports.push((port, before, ports.read(port)?));
        }
    }
    if !req.mmio.is_empty() {
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open("/dev/mem")
            .map_err(PokeError::OpenMem)?;
        for &addr in &req.mmio {
            let (before, after) = poke_mmio(mem.as_raw_fd(), addr)?;
            reply.mmio.push((addr, before, after));
        }
    }
    Ok(reply)
}

/// How ports are reached.
enum Ports {
    /// `in`/`out` instructions (iopl(3) succeeded).
    Instructions,
    /// pread/pwrite of /dev/port at the port number.
    DevPort(File),
}

impl Ports {
    fn open() -> Result<Self, PokeError> {
        let iopl = match port_io::enable() {
            Ok(()) => return Ok(Ports::Instructions),
            Err(e) => e,
        };
        OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/port")
            .map(Ports::DevPort)
            .map_err(|devport| PokeError::NoPortIo { iopl, devport })
    }

    fn read(&self, port: u16) -> Result<u8, PokeError> {
        match self {
            // SAFETY: iopl(3) succeeded, so `in` does not fault. Touching arbitrary ports is
            // the point of this op, which only runs in a disposable test guest.
            Ports::Instructions => Ok(unsafe { port_io::inb(port) }),
            Ports::DevPort(file) => {
                let mut byte = [0u8];
                file.read_exact_at(&mut byte, u64::from(port))
                    .map_err(|source| PokeError::DevPort {
                        what: "reading",
                        port,
                        source,
                    })?;
                Ok(byte[0])
            }
        }
    }

    fn write(&self, port: u16, value: u8) -> Result<(), PokeError> {
        match self {
            // SAFETY: as in `read`.
            Ports::Instructions => unsafe { port_io::outb(port, value) },
            Ports::DevPort(file) => {
                file.write_all_at(&[value], u64::from(port))
                    .map_err(|source| PokeError::DevPort {
                        what: "writing",
                        port,
                        source,
                    })?
            }
        }
        Ok(())
    }
}

/// Reads the u32 at physical `addr`, writes [`MMIO_VALUE`], reads again.
fn poke_mmio(fd: libc::c_int, addr: u64) -> Result<(u32, u32), PokeError> {
    if !addr.is_multiple_of(4) || i64::try_from(addr).is_err() {
        return Err(PokeError::BadAddress(addr));
    }
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096);
    let base = addr & !(page - 1);
    let map =
        Mapping::new(fd, base, page as usize).map_err(|source| PokeError::Map { addr, source })?;
    let offset = (addr - base) as usize;
    // SAFETY: `offset + 4 <= page` (addr is 4-aligned within the page) so the pointer lies in
    // the live mapping and is 4-aligned; volatile accesses are how device memory is accessed.
    unsafe {
        let ptr = map.ptr.add(offset).cast::<u32>();
        let before = ptr.read_volatile();
        ptr.write_volatile(MMIO_VALUE);
        Ok((before, ptr.read_volatile()))
    }
}

/// A shared read-write mapping of one range of a file, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(fd: libc::c_int, offset: u64, len: usize) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: a fresh mapping at an address of the kernel's choice aliases no Rust object;
        // the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr and len describe a mapping this struct created and nothing else unmaps.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(target_arch = "x86_64")]
mod port_io {
    use std::arch::asm;
    use std::io;

    /// Raises the I/O privilege level so user space may use `in`/`out`; the error says why
    /// not.
    pub fn enable() -> Result<(), String> {
        // SAFETY: iopl has no memory-safety preconditions; it fails without CAP_SYS_RAWIO or
        // kernel support.
        if unsafe { libc::iopl(3) } != 0 {
            return Err(io::Error::last_os_error().to_string());
        }
        Ok(())
    }

    /// Reads a byte from `port`.
    ///
    /// # Safety
    /// The I/O privilege level must allow port I/O, and reading the port must be harmless.
    pub unsafe fn inb(port: u16) -> u8 {
        let value: u8;
        // SAFETY: the caller guarantees port I/O is permitted; `in` touches no memory.
        unsafe {
            asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags));
        }
        value
    }

    /// Writes a byte to `port`.
    ///
    /// # Safety
    /// The I/O privilege level must allow port I/O, and writing the port must be harmless.
    pub unsafe fn outb(port: u16, value: u8) {
        // SAFETY: the caller guarantees port I/O is permitted; `out` touches no memory.
        unsafe {
            asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod port_io {
    /// Port instructions exist only on x86.
    pub fn enable() -> Result<(), String> {
        Err("port I/O instructions need x86_64".to_owned())
    }

    /// Never called: `enable` fails.
    pub unsafe fn inb(_port: u16) -> u8 {
        0
    }

    /// Never called: `enable` fails.
    pub unsafe fn outb(_port: u16, _value: u8) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unaligned_addresses_before_touching_anything() {
        assert!(matches!(
            poke_mmio(-1, 0x1001),
            Err(PokeError::BadAddress(0x1001))
        ));
        assert!(matches!(
            poke_mmio(-1, u64::MAX - 3),
            Err(PokeError::BadAddress(_))
        ));
    }

    #[test]
    fn empty_request_touches_nothing() {
        assert_eq!(poke(&PokeRequest::default()).unwrap(), PokeReply::default());
    }
}
