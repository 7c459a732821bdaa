//! Tests of the vfio-user backend against the vfio-user crate's server over a socket pair,
//! serving the crate's fake device (`vfio_user::testing`).

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::testing::{FakeDevice, FakeServer, Fault, Inject, Region};
use vfio_user::{Client, Errno, ServerConfig, ServerRequests, SparseArea};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::vfio::backend::DmaMapping;
use crate::vfio::user::{DmaWriteLog, GuestDma, VfioUserBackend};
use crate::vfio::{BackendError, VfioBackend};

/// The device these tests talk to: PCI with reset (flags 3), 9 regions, 5 IRQ types.
/// Region 0 is 0x4000 bytes of memory at mmap offset 0x1000 with its second half
/// mappable, of which only the first 16 bytes answer region accesses; regions 1-8 are
/// readable, writable and empty; IRQ type 2 (MSI-X) has 4 vectors.
fn fake_device() -> FakeDevice {
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    let bar0 = Region::memory(0x4000)
        .offset(0x1000)
        .sparse(SparseArea {
            offset: 0x2000,
            size: 0x2000,
        })
        .accessible(16);
    let builder =
        FakeDevice::builder()
            .info(3, 9, 5)
            .region(0, bar0)
            .irq(2, VFIO_IRQ_INFO_EVENTFD, 4);
    (1..=8)
        .fold(builder, |b, i| b.region(i, Region::new(0).flags(rw)))
        .build()
        .unwrap()
}

/// A backend connected to the fake device served on another thread.
fn connect() -> (VfioUserBackend, FakeServer) {
    let (ours, server) = FakeServer::builder(fake_device()).pair().unwrap();
    let client = Client::from_stream(ours, Duration::from_secs(5)).unwrap();
    (
        VfioUserBackend::from_client(client, "/test.sock".into()),
        server,
    )
}

/// `(index, flags, start, count, number of fds)` of each SET_IRQS the device received.
fn set_irqs(server: &FakeServer) -> Vec<(u32, u32, u32, u32, usize)> {
    let state = server.probe().lock();
    let calls = state.set_irqs.iter();
    calls
        .map(|c| (c.index, c.flags, c.start, c.count, c.fds))
        .collect()
}

#[test]
fn regions_info_and_access() {
    let (b, _server) = connect();
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
    let (b, server) = connect();
    let fds: Vec<EventFd> = (0..4).map(|_| EventFd::new(0).unwrap()).collect();
    let all: Vec<Option<&EventFd>> = fds.iter().map(Some).collect();
    b.set_irq_eventfds(2, 0, &all).unwrap();
    b.set_irq_eventfds(2, 0, &[Some(&fds[0]), None, None, Some(&fds[3])])
        .unwrap();
    b.disable_irqs(2).unwrap();
    let ev = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    let none = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
    assert_eq!(
        set_irqs(&server),
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
    let (b, server) = connect();
    b.mask_irqs(2, 1, 1, false).unwrap();
    b.mask_irqs(2, 3, 1, true).unwrap();
    let unmask = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK;
    let mask = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK;
    assert_eq!(
        set_irqs(&server),
        vec![(2, unmask, 1, 1, 0), (2, mask, 3, 1, 0)]
    );
}

#[test]
fn dma_maps_pass_the_file_and_reset_works() {
    let (b, server) = connect();
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
    let s = server.probe().lock();
    let dma: Vec<_> = s
        .dma_maps
        .iter()
        .map(|m| (m.iova, m.size, m.file_offset, m.had_fd))
        .collect();
    assert_eq!(dma, vec![(0x10_0000, 0x20_0000, 0x10_0000, true)]);
    assert_eq!(s.resets, 1);
}

#[test]
fn a_dead_server_is_a_disconnected_backend() {
    // The crate's server with the fake device, run here: the test kills its socket.
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut fake = fake_device();
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
    let (b, _server) = connect();
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
    // The crate's server with the fake device, run here: the test kills its socket.
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut fake = fake_device();
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
    use vfio_user::proto::{Command, DmaAccess};

    let dir = std::env::temp_dir().join(format!("vmm-guest-dma-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    // Right after the handshake, while the client is idle, the server writes guest RAM.
    let write = Fault::on(Command::Version).after([Inject::dma_write(5, 0x2_0010, b"idle DMA")]);
    let server = FakeServer::builder(FakeDevice::builder().build().unwrap())
        .fault(write)
        .listen(&dir)
        .unwrap();
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
    server.finish(Duration::from_secs(5)).unwrap();
    let answer = server.reply_to(5).expect("an answer");
    assert!(answer.header.is_reply() && !answer.header.is_error());
    assert_eq!(
        DmaAccess::parse(&answer.payload).unwrap(),
        DmaAccess {
            address: 0x2_0010,
            count: 8
        }
    );
    // Then a reset from the client, answered.
    assert_eq!(server.sequence(), ["Version", "reply 5", "DeviceReset"]);
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
