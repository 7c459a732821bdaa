//! Tests of the vfio-user backend against the vfio-user crate's server over a socket pair.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{
    Client, Device, DeviceResult, Errno, IrqData, ServerConfig, ServerRequests, SparseArea,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::vfio::backend::DmaMapping;
use crate::vfio::user::{DmaWriteLog, GuestDma, VfioUserBackend};
use crate::vfio::{BackendError, VfioBackend};

#[derive(Default)]
struct Seen {
    /// `(index, flags, start, count, number of fds)` of each SET_IRQS.
    irqs: Vec<(u32, u32, u32, u32, usize)>,
    /// `(iova, size, offset, had fd)` of each DMA_MAP.
    dma: Vec<(u64, u64, u64, bool)>,
    resets: usize,
}

struct Fake {
    bar0: [u8; 16],
    memfd: OwnedFd,
    seen: Arc<Mutex<Seen>>,
}

impl Device for Fake {
    fn device_info(&mut self) -> vfio_user::DeviceInfo {
        vfio_user::DeviceInfo {
            flags: 3,
            num_regions: 9,
            num_irqs: 5,
        }
    }

    fn region_info(&mut self, index: u32) -> DeviceResult<vfio_user::RegionInfo> {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        match index {
            0 => Ok(vfio_user::RegionInfo {
                index,
                flags: rw | VFIO_REGION_INFO_FLAG_MMAP,
                size: 0x4000,
                offset: 0x1000,
                sparse_areas: vec![SparseArea {
                    offset: 0x2000,
                    size: 0x2000,
                }],
                fd: Some(self.memfd.try_clone().map_err(|_| Errno(libc::EIO))?),
            }),
            1..=8 => Ok(vfio_user::RegionInfo {
                index,
                flags: rw,
                size: 0,
                offset: 0,
                sparse_areas: vec![],
                fd: None,
            }),
            _ => Err(Errno(libc::EINVAL)),
        }
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> DeviceResult<()> {
        let o = offset as usize;
        match self.bar0.get(o..o + data.len()) {
            Some(src) if index == 0 => {
                data.copy_from_slice(src);
                Ok(())
            }
            _ => Err(Errno(libc::EINVAL)),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> DeviceResult<()> {
        let o = offset as usize;
        match self.bar0.get_mut(o..o + data.len()) {
            Some(dst) if index == 0 => {
                dst.copy_from_slice(data);
                Ok(())
            }
            _ => Err(Errno(libc::EINVAL)),
        }
    }

    fn dma_map(&mut self, m: vfio_user::DmaMapping) -> DeviceResult<()> {
        let mut seen = self.seen.lock().unwrap();
        seen.dma
            .push((m.iova, m.size, m.file_offset, m.fd.is_some()));
        Ok(())
    }

    fn dma_unmap(&mut self, _iova: u64, _size: u64) -> DeviceResult<()> {
        Ok(())
    }

    fn irq_info(&mut self, index: u32) -> DeviceResult<vfio_user::IrqInfo> {
        Ok(vfio_user::IrqInfo {
            index,
            flags: 1,
            count: if index == 2 { 4 } else { 0 },
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
        let fds = match data {
            IrqData::Eventfds(f) => f.len(),
            _ => 0,
        };
        self.seen
            .lock()
            .unwrap()
            .irqs
            .push((index, flags, start, count, fds));
        Ok(())
    }

    fn reset(&mut self) -> DeviceResult<()> {
        self.seen.lock().unwrap().resets += 1;
        Ok(())
    }
}

/// A backend connected to a fake device served on another thread.
fn connect() -> (
    VfioUserBackend,
    Arc<Mutex<Seen>>,
    std::thread::JoinHandle<()>,
) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let memfd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let mut fake = Fake {
        bar0: [0; 16],
        memfd,
        seen: seen.clone(),
    };
    let server = std::thread::spawn(move || {
        let _ = vfio_user::serve(theirs, &mut fake, &ServerConfig::default());
    });
    let client = Client::from_stream(ours, Duration::from_secs(5)).unwrap();
    (
        VfioUserBackend::from_client(client, "/test.sock".into()),
        seen,
        server,
    )
}

#[test]
fn regions_info_and_access() {
    let (b, _seen, _server) = connect();
    let info = b.device_info().unwrap();
    assert_eq!((info.num_regions, info.num_irqs, info.flags), (9, 5, 3));
    let r = b.region_info(0).unwrap();
    assert_eq!(r.size, 0x4000);
    assert!(r.flags.read && r.flags.write && r.flags.mmap);
    assert_eq!(r.sparse_areas, vec![(0x2000, 0x2000)]);
    assert_eq!(r.mmap.as_ref().map(|m| m.file_offset), Some(0x1000));
    assert_eq!(r.mappable_areas(), vec![(0x2000, 0x2000)]);
    assert!(b.region_info(1).unwrap().mmap.is_none());

    b.region_write(0, 4, &[1, 2, 3, 4]).unwrap();
    let mut buf = [0u8; 4];
    b.region_read(0, 4, &mut buf).unwrap();
    assert_eq!(buf, [1, 2, 3, 4]);
    let e = b.region_read(0, 14, &mut buf).unwrap_err();
    assert!(matches!(e, BackendError::Refused { .. }), "{e}");
    assert!(e.to_string().contains("at 0xe of region 0"), "{e}");
    assert_eq!(b.irq_info(2).unwrap().count, 4);
}

#[test]
fn interrupts_are_set_in_runs_and_deassigned() {
    let (b, seen, _server) = connect();
    let fds: Vec<EventFd> = (0..4).map(|_| EventFd::new(0).unwrap()).collect();
    let all: Vec<Option<&EventFd>> = fds.iter().map(Some).collect();
    b.set_irq_eventfds(2, 0, &all).unwrap();
    b.set_irq_eventfds(2, 0, &[Some(&fds[0]), None, None, Some(&fds[3])])
        .unwrap();
    b.disable_irqs(2).unwrap();
    let ev = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    let none = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
    assert_eq!(
        seen.lock().unwrap().irqs,
        vec![
            (2, ev, 0, 4, 4),
            (2, ev, 0, 1, 1),
            (2, ev, 1, 2, 0),
            (2, ev, 3, 1, 1),
            (2, none, 0, 0, 0),
        ]
    );
}

#[test]
fn vectors_are_masked_and_unmasked_with_set_irqs_and_no_data() {
    let (b, seen, _server) = connect();
    b.mask_irqs(2, 1, 1, false).unwrap();
    b.mask_irqs(2, 3, 1, true).unwrap();
    let unmask = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK;
    let mask = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK;
    assert_eq!(
        seen.lock().unwrap().irqs,
        vec![(2, unmask, 1, 1, 0), (2, mask, 3, 1, 0)]
    );
}

#[test]
fn dma_maps_pass_the_file_and_reset_works() {
    let (b, seen, _server) = connect();
    let file = std::fs::File::open("/dev/null").unwrap();
    let mapping = DmaMapping {
        iova: 0x10_0000,
        size: 0x20_0000,
        host_addr: 0,
        file: Some((file.as_fd(), 0x10_0000)),
    };
    // SAFETY: the fake device does not touch the memory; nothing is mapped at host_addr.
    unsafe { b.dma_map(&mapping) }.unwrap();
    let anonymous = DmaMapping {
        file: None,
        ..mapping
    };
    // SAFETY: as above; the call is refused before anything is sent.
    let e = unsafe { b.dma_map(&anonymous) }.unwrap_err();
    assert!(matches!(e, BackendError::Unsupported { .. }), "{e}");
    b.reset().unwrap();
    let s = seen.lock().unwrap();
    assert_eq!(s.dma, vec![(0x10_0000, 0x20_0000, 0x10_0000, true)]);
    assert_eq!(s.resets, 1);
}

#[test]
fn a_dead_server_is_a_disconnected_backend() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut fake = Fake {
        bar0: [0; 16],
        memfd: OwnedFd::from(std::fs::File::open("/dev/null").unwrap()),
        seen: Arc::new(Mutex::new(Seen::default())),
    };
    // The server negotiates, then its socket is shut down (as if the process died).
    let killer = theirs.try_clone().unwrap();
    let server = std::thread::spawn(move || {
        let _ = vfio_user::serve(theirs, &mut fake, &ServerConfig::default());
    });
    let client = Client::from_stream(ours, Duration::from_secs(2)).unwrap();
    let b = VfioUserBackend::from_client(client, "/dead.sock".into());
    killer.shutdown(std::net::Shutdown::Both).unwrap();
    server.join().unwrap();
    let mut buf = [0u8; 4];
    let e = b.region_read(0, 0, &mut buf).unwrap_err();
    assert!(matches!(e, BackendError::Disconnected { .. }), "{e}");
    assert!(e.to_string().contains("/dead.sock"), "{e}");
    // Every later call fails the same way, at once.
    let e = b.device_info().unwrap_err();
    assert!(matches!(e, BackendError::Disconnected { .. }), "{e}");
}

#[test]
fn bar_writes_are_posted_and_config_writes_wait() {
    let (b, _seen, _server) = connect();
    // Out of range: the fake refuses it, but a posted BAR write has no reply to carry the
    // refusal (the server logs it), so it is not an error here...
    b.region_write(0, 14, &[1, 2, 3, 4]).unwrap();
    // ...and the connection is still in step: the next read answers.
    b.region_write(0, 8, &[9, 8, 7, 6]).unwrap();
    let mut buf = [0u8; 4];
    b.region_read(0, 8, &mut buf).unwrap();
    assert_eq!(buf, [9, 8, 7, 6]);
    // A config-space write (region 7) waits for its answer, so a refusal is reported.
    let e = b.region_write(7, 0, &[0; 4]).unwrap_err();
    assert!(matches!(e, BackendError::Refused { .. }), "{e}");
}

#[test]
fn a_posted_write_to_a_dead_server_is_a_disconnected_backend() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut fake = Fake {
        bar0: [0; 16],
        memfd: OwnedFd::from(std::fs::File::open("/dev/null").unwrap()),
        seen: Arc::new(Mutex::new(Seen::default())),
    };
    let killer = theirs.try_clone().unwrap();
    let server = std::thread::spawn(move || {
        let _ = vfio_user::serve(theirs, &mut fake, &ServerConfig::default());
    });
    let client = Client::from_stream(ours, Duration::from_secs(2)).unwrap();
    let b = VfioUserBackend::from_client(client, "/dead.sock".into());
    b.region_write(0, 0, &[1, 2, 3, 4]).unwrap();
    killer.shutdown(std::net::Shutdown::Both).unwrap();
    server.join().unwrap();
    // The peer is gone: the posted write itself fails to send.
    let e = b.region_write(0, 0, &[5, 6, 7, 8]).unwrap_err();
    assert!(matches!(e, BackendError::Disconnected { .. }), "{e}");
    assert!(e.to_string().contains("/dead.sock"), "{e}");
    assert!(
        e.to_string()
            .contains("write of 4 bytes at 0x0 of region 0"),
        "{e}"
    );
    let mut buf = [0u8; 4];
    let e = b.region_read(0, 0, &mut buf).unwrap_err();
    assert!(matches!(e, BackendError::Disconnected { .. }), "{e}");
}

/// 64 KiB of RAM at 0, a hole, 4 KiB at 0x20000.
fn guest_ram() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x2_0000), 0x1000),
    ])
    .unwrap()
}

#[test]
fn guest_dma_reaches_ram_and_refuses_what_is_outside() {
    let mem = guest_ram();
    let dma = GuestDma::new(&mem, Arc::default());
    dma.dma_write(0x100, b"from the device").unwrap();
    let mut seen = [0u8; 15];
    mem.read_slice(&mut seen, GuestAddress(0x100)).unwrap();
    assert_eq!(&seen, b"from the device");
    let mut back = [0u8; 15];
    dma.dma_read(0x100, &mut back).unwrap();
    assert_eq!(&back, b"from the device");
    dma.dma_write(0x2_0ff0, &[7; 16]).unwrap();

    let efault = Err(Errno(libc::EFAULT));
    let mut buf = [0u8; 8];
    // Across the end of the first region into the hole, in the hole, past the end, and
    // where address + length wraps around.
    assert_eq!(dma.dma_read(0xfffc, &mut buf), efault);
    assert_eq!(dma.dma_write(0x1_8000, &buf), efault);
    assert_eq!(dma.dma_write(0x2_0ffc, &buf), efault);
    assert_eq!(dma.dma_read(u64::MAX - 3, &mut buf), efault);
    // Nothing was written by the refused accesses.
    let mut edge = [0u8; 4];
    mem.read_slice(&mut edge, GuestAddress(0xfffc)).unwrap();
    assert_eq!(edge, [0; 4]);
}

#[test]
fn a_server_dma_write_lands_in_guest_ram_while_the_client_is_idle() {
    use vfio_user::proto::{Capabilities, Command, DmaAccess, DmaAccessData, Header, Version};
    use vfio_user::socket::{Channel, RecvLimits};

    let dir = std::env::temp_dir().join(format!("vmm-guest-dma-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let listener = std::os::unix::net::UnixListener::bind(&dir).unwrap();
    let limits = RecvLimits {
        max_size: 1 << 16,
        max_fds: 4,
    };
    let soon = || std::time::Instant::now() + Duration::from_secs(5);
    let server = std::thread::spawn(move || {
        let ch = Channel::new(listener.accept().unwrap().0);
        let v = ch.recv(limits, soon()).unwrap();
        let reply = Version {
            major: 0,
            minor: 1,
            capabilities: Some(Capabilities::default()),
        }
        .to_bytes();
        ch.send(
            &Header::reply(&v.header, reply.len()).unwrap(),
            &reply,
            &[],
            soon(),
        )
        .unwrap();
        let write = DmaAccessData {
            address: 0x2_0010,
            data: b"idle DMA".to_vec(),
        }
        .to_bytes();
        let h = Header::command(5, Command::DmaWrite, write.len()).unwrap();
        ch.send(&h, &write, &[], soon()).unwrap();
        let answer = ch.recv(limits, soon()).unwrap();
        assert!(answer.header.is_reply() && !answer.header.is_error());
        assert_eq!(
            DmaAccess::parse(&answer.payload).unwrap(),
            DmaAccess {
                address: 0x2_0010,
                count: 8
            }
        );
        // Then a reset from the client, answered.
        let reset = ch.recv(limits, soon()).unwrap();
        ch.send(&Header::reply(&reset.header, 0).unwrap(), &[], &[], soon())
            .unwrap();
        let _ = ch.recv(limits, soon());
    });
    let mem = guest_ram();
    let b = VfioUserBackend::connect(&dir, Duration::from_secs(5), &mem).unwrap();
    let start = std::time::Instant::now();
    let mut seen = [0u8; 8];
    while &seen != b"idle DMA" {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "DMA write not served"
        );
        std::thread::sleep(Duration::from_millis(1));
        mem.read_slice(&mut seen, GuestAddress(0x2_0010)).unwrap();
    }
    b.reset().unwrap();
    drop(b);
    server.join().unwrap();
    let _ = std::fs::remove_file(&dir);
}

#[test]
fn server_dma_writes_are_dirty_while_tracking_only() {
    let mem = guest_ram();
    let log = Arc::new(DmaWriteLog::default());
    let dma = GuestDma::new(&mem, log.clone());
    dma.dma_write(0x100, &[1; 8]).unwrap();
    assert!(log.take().is_empty(), "not tracking: nothing recorded");
    log.start();
    // Across a page boundary: both pages.
    dma.dma_write(0x1ffc, &[2; 8]).unwrap();
    dma.dma_write(0x100, &[3; 4]).unwrap();
    assert_eq!(log.take(), vec![0, 0x1000, 0x2000]);
    assert!(log.take().is_empty(), "taken once");
    log.stop();
    dma.dma_write(0x100, &[4; 4]).unwrap();
    assert!(log.take().is_empty());
}
