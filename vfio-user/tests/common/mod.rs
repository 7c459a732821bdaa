//! Shared by the integration tests: memfd, mmap and eventfd helpers, a small test device,
//! and a fake server for failure tests.

#![allow(dead_code)]

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE, VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::proto::{Capabilities, Command, Header, Version, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use vfio_user::socket::{Channel, Message, RecvLimits};
use vfio_user::{
    Device, DeviceInfo, DeviceResult, DmaMapping, Errno, IrqData, IrqInfo, RegionInfo, SparseArea,
};

/// BAR0: registers, reached by region reads and writes only.
pub const REG_REGION: u32 = 0;
/// BAR2: memfd-backed, with its second page mappable.
pub const MEM_REGION: u32 = 2;
/// Size of BAR0.
pub const REG_SIZE: u64 = 0x100;
/// Size of BAR2.
pub const MEM_SIZE: u64 = 0x2000;
/// The mappable part of BAR2.
pub const MEM_SPARSE: SparseArea = SparseArea {
    offset: 0x1000,
    size: 0x1000,
};
/// Scratch register (read/write, cleared by reset).
pub const REG_SCRATCH: u64 = 0x00;
/// Identification register (read-only).
pub const REG_ID: u64 = 0x04;
/// Value of the identification register.
pub const DEVICE_ID: u32 = 0x5655_0001;
/// DMA address (8 bytes).
pub const REG_DMA_ADDR: u64 = 0x08;
/// DMA length (4 bytes).
pub const REG_DMA_LEN: u64 = 0x10;
/// Writing a byte value here fills the DMA range with it.
pub const REG_DMA_GO: u64 = 0x14;
/// Writing n here signals MSI-X vector n.
pub const REG_IRQ: u64 = 0x18;
/// MSI-X vectors.
pub const MSIX_COUNT: u32 = 4;

/// Counters the tests look at while the device runs in another thread.
#[derive(Debug, Default)]
pub struct Stats {
    pub resets: AtomicU32,
    pub dma_maps: AtomicUsize,
    pub disconnected: AtomicBool,
}

/// A shared memory file.
pub fn memfd(size: u64) -> OwnedFd {
    // SAFETY: the name is a NUL-terminated string; memfd_create returns a new descriptor
    // or -1.
    let fd = unsafe { libc::memfd_create(c"vfio-user-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just created and is ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on a valid descriptor.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
    assert_eq!(r, 0, "ftruncate: {}", std::io::Error::last_os_error());
    fd
}

/// A shared read/write mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; the raw pointer is only dereferenced
// through the bounds-checked methods below.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from `offset`.
    pub fn new(fd: BorrowedFd<'_>, offset: u64, len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh shared mapping chosen by the kernel; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Copies out `out.len()` bytes at `offset`; false if out of bounds.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        if offset
            .checked_add(out.len())
            .is_none_or(|end| end > self.len)
        {
            return false;
        }
        // SAFETY: the range is within the live mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), out.as_mut_ptr(), out.len()) };
        true
    }

    /// Copies `data` in at `offset`; false if out of bounds.
    pub fn write(&self, offset: usize, data: &[u8]) -> bool {
        if offset
            .checked_add(data.len())
            .is_none_or(|end| end > self.len)
        {
            return false;
        }
        // SAFETY: the range is within the live mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) };
        true
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping made by `new` and not unmapped yet.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A non-blocking eventfd.
pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: fd was just created and is ours alone.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Gives the test device's MSI-X (IRQ index 2) one fresh eventfd per vector through
/// `SET_IRQS`; returns them, vector by vector.
pub fn msix_eventfds(client: &vfio_user::Client) -> Vec<OwnedFd> {
    let fds: Vec<_> = (0..MSIX_COUNT).map(|_| eventfd()).collect();
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    client
        .set_irqs(
            2,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            MSIX_COUNT,
            &borrowed,
        )
        .unwrap();
    fds
}

/// Adds 1 to an eventfd.
pub fn signal(fd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from an 8-byte buffer to a valid descriptor.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
}

/// Waits up to `timeout` for an eventfd to be signalled; returns its counter.
pub fn wait_event(fd: BorrowedFd<'_>, timeout: Duration) -> Option<u64> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    if r != 1 {
        return None;
    }
    let mut buf = [0u8; 8];
    // SAFETY: reads 8 bytes into an 8-byte buffer from a valid descriptor.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    (n == 8).then(|| u64::from_ne_bytes(buf))
}

/// A socket path in the temporary directory, removed on drop.
pub struct SocketPath(pub PathBuf);

impl SocketPath {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("vfio-user-{tag}-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        SocketPath(path)
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct DmaRegion {
    iova: u64,
    size: u64,
    map: Mapping,
}

/// The test device: BAR0 with registers, BAR2 backed by a memfd whose second page may be
/// mapped, MSI-X with four vectors, DMA into client memory.
pub struct TestDevice {
    regs: [u8; REG_SIZE as usize],
    mem_fd: OwnedFd,
    mem: Mapping,
    dma: Vec<DmaRegion>,
    msix: Vec<Option<OwnedFd>>,
    stats: Arc<Stats>,
}

impl TestDevice {
    pub fn new(stats: Arc<Stats>) -> Self {
        let mem_fd = memfd(MEM_SIZE);
        let mem = Mapping::new(mem_fd.as_fd(), 0, MEM_SIZE as usize).expect("map BAR2");
        let mut dev = TestDevice {
            regs: [0; REG_SIZE as usize],
            mem_fd,
            mem,
            dma: Vec::new(),
            msix: (0..MSIX_COUNT).map(|_| None).collect(),
            stats,
        };
        dev.regs[REG_ID as usize..REG_ID as usize + 4].copy_from_slice(&DEVICE_ID.to_ne_bytes());
        dev
    }

    fn reg_u64(&self, at: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        b[..len].copy_from_slice(&self.regs[at as usize..at as usize + len]);
        u64::from_ne_bytes(b)
    }

    fn do_dma(&mut self, value: u8) -> DeviceResult<()> {
        let addr = self.reg_u64(REG_DMA_ADDR, 8);
        let len = self.reg_u64(REG_DMA_LEN, 4);
        let region = self
            .dma
            .iter()
            .find(|r| addr >= r.iova && addr + len <= r.iova + r.size)
            .ok_or(Errno(libc::EFAULT))?;
        let data = vec![value; len as usize];
        if !region.map.write((addr - region.iova) as usize, &data) {
            return Err(Errno(libc::EFAULT));
        }
        Ok(())
    }
}

impl Device for TestDevice {
    fn device_info(&mut self) -> DeviceInfo {
        DeviceInfo {
            flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
            num_regions: 9,
            num_irqs: 5,
        }
    }

    fn region_info(&mut self, index: u32) -> DeviceResult<RegionInfo> {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let (flags, size, sparse_areas, fd) = match index {
            REG_REGION => (rw, REG_SIZE, vec![], None),
            MEM_REGION => (
                rw | VFIO_REGION_INFO_FLAG_MMAP,
                MEM_SIZE,
                vec![MEM_SPARSE],
                Some(self.mem_fd.try_clone().map_err(|_| Errno(libc::EIO))?),
            ),
            1 | 3..=8 => (0, 0, vec![], None),
            _ => return Err(Errno(libc::EINVAL)),
        };
        Ok(RegionInfo {
            index,
            flags,
            size,
            offset: 0,
            sparse_areas,
            fd,
        })
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> DeviceResult<()> {
        match index {
            REG_REGION => {
                let range = offset as usize..offset as usize + data.len();
                let src = self.regs.get(range).ok_or(Errno(libc::EINVAL))?;
                data.copy_from_slice(src);
                Ok(())
            }
            MEM_REGION if self.mem.read(offset as usize, data) => Ok(()),
            _ => Err(Errno(libc::EINVAL)),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> DeviceResult<()> {
        match index {
            REG_REGION => {
                let end = offset as usize + data.len();
                if end > REG_SIZE as usize || offset == REG_ID {
                    return Err(Errno(libc::EINVAL));
                }
                self.regs[offset as usize..end].copy_from_slice(data);
                match offset {
                    REG_DMA_GO => self.do_dma(data[0]),
                    REG_IRQ => {
                        let vector = data[0] as usize;
                        let fd = self
                            .msix
                            .get(vector)
                            .and_then(|v| v.as_ref())
                            .ok_or(Errno(libc::ENXIO))?;
                        signal(fd.as_fd());
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
            MEM_REGION if self.mem.write(offset as usize, data) => Ok(()),
            _ => Err(Errno(libc::EINVAL)),
        }
    }

    fn dma_map(&mut self, mapping: DmaMapping) -> DeviceResult<()> {
        let fd = mapping.fd.ok_or(Errno(libc::EINVAL))?;
        let overlaps = self
            .dma
            .iter()
            .any(|r| mapping.iova < r.iova + r.size && r.iova < mapping.iova + mapping.size);
        if overlaps {
            return Err(Errno(libc::EEXIST));
        }
        let map = Mapping::new(fd.as_fd(), mapping.file_offset, mapping.size as usize)
            .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
        self.dma.push(DmaRegion {
            iova: mapping.iova,
            size: mapping.size,
            map,
        });
        self.stats.dma_maps.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> DeviceResult<()> {
        let i = self
            .dma
            .iter()
            .position(|r| r.iova == iova && r.size == size)
            .ok_or(Errno(libc::ENOENT))?;
        self.dma.remove(i);
        Ok(())
    }

    fn irq_info(&mut self, index: u32) -> DeviceResult<IrqInfo> {
        let (flags, count) = match index {
            0 => (
                VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED,
                1,
            ),
            1 => (VFIO_IRQ_INFO_EVENTFD, 1),
            2 => (VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE, MSIX_COUNT),
            3 | 4 => (VFIO_IRQ_INFO_EVENTFD, 1),
            _ => return Err(Errno(libc::EINVAL)),
        };
        Ok(IrqInfo {
            index,
            flags,
            count,
        })
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> DeviceResult<()> {
        if index != 2 || flags & VFIO_IRQ_SET_ACTION_TRIGGER == 0 {
            return Ok(());
        }
        if start + count > MSIX_COUNT {
            return Err(Errno(libc::EINVAL));
        }
        let range = start as usize..(start + count) as usize;
        match (flags & VFIO_IRQ_SET_DATA_TYPE_MASK, data) {
            (VFIO_IRQ_SET_DATA_EVENTFD, IrqData::Eventfds(fds)) if fds.is_empty() => {
                range.for_each(|i| self.msix[i] = None);
            }
            (VFIO_IRQ_SET_DATA_EVENTFD, IrqData::Eventfds(fds)) => {
                for (i, fd) in range.zip(fds) {
                    self.msix[i] = Some(fd);
                }
            }
            (VFIO_IRQ_SET_DATA_NONE, _) if count == 0 => {
                self.msix.iter_mut().for_each(|v| *v = None);
            }
            (VFIO_IRQ_SET_DATA_NONE, _) => {
                for fd in self.msix[range].iter().flatten() {
                    signal(fd.as_fd());
                }
            }
            _ => return Err(Errno(libc::EINVAL)),
        }
        Ok(())
    }

    fn reset(&mut self) -> DeviceResult<()> {
        self.regs[REG_SCRATCH as usize..REG_SCRATCH as usize + 4].fill(0);
        self.stats.resets.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn client_disconnected(&mut self) {
        self.dma.clear();
        self.msix.iter_mut().for_each(|v| *v = None);
        self.stats.disconnected.store(true, Ordering::SeqCst);
    }
}

/// Generous receive limits for fake peers.
pub const LIMITS: RecvLimits = RecvLimits {
    max_size: 1 << 21,
    max_fds: 16,
};

/// A deadline `secs` seconds away.
pub fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// A hand-driven server end for failure tests: it answers the version handshake, then
/// the test scripts what happens next.
pub struct FakeServer {
    pub channel: Channel,
    /// The same socket, for writing bytes that are not a valid message.
    pub raw: UnixStream,
}

impl FakeServer {
    /// Answers the client's version proposal on `stream`.
    pub fn handshake(stream: UnixStream) -> Self {
        let raw = stream.try_clone().expect("clone socket");
        let channel = Channel::new(stream);
        let proposal = channel.recv(LIMITS, deadline(5)).expect("version proposal");
        assert_eq!(proposal.header.command, Command::Version as u16);
        let reply = Version {
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
            capabilities: Some(Capabilities {
                max_msg_fds: Some(4),
                max_data_xfer_size: Some(4096),
                ..Capabilities::default()
            }),
        }
        .to_bytes();
        let h = Header::reply(&proposal.header, reply.len()).unwrap();
        channel.send(&h, &reply, &[], deadline(5)).unwrap();
        FakeServer { channel, raw }
    }

    /// Receives the next command.
    pub fn recv(&self) -> Message {
        self.channel.recv(LIMITS, deadline(5)).expect("command")
    }

    /// Sends a reply to `request` with `payload`.
    pub fn reply(&self, request: &Header, payload: &[u8]) {
        let h = Header::reply(request, payload.len()).unwrap();
        self.channel.send(&h, payload, &[], deadline(5)).unwrap();
    }

    /// Writes raw bytes (possibly not a valid message).
    pub fn send_raw(&self, bytes: &[u8]) {
        use std::io::Write;
        (&self.raw).write_all(bytes).unwrap();
    }
}
