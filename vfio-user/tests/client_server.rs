//! The client against the real server loop and the test device (the crate's fake device,
//! `common::test_device`), across real Unix sockets (a socket path and socket pairs)
//! between threads.

mod common;

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::*;
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_user::proto::Command;
use vfio_user::testing::Probe;
use vfio_user::{
    accept_and_serve, serve, Client, ClientError, ServerConfig, ServerError, DEFAULT_TIMEOUT,
};

type Server = JoinHandle<Result<(), ServerError>>;

fn start(config: ServerConfig) -> (Client, Probe, Server) {
    let (a, b) = UnixStream::pair().unwrap();
    let mut dev = test_device();
    let probe = dev.probe();
    let server = thread::spawn(move || serve(b, &mut dev, &config));
    let client = Client::from_stream(a, DEFAULT_TIMEOUT).expect("negotiate");
    (client, probe, server)
}

fn read_u32(client: &Client, offset: u64) -> Result<u32, ClientError> {
    let mut b = [0u8; 4];
    client.region_read(REG_REGION, offset, &mut b)?;
    Ok(u32::from_ne_bytes(b))
}

fn remote_errno(r: Result<impl std::fmt::Debug, ClientError>) -> (Command, i32) {
    match r {
        Err(ClientError::Remote { command, errno }) => (command, errno),
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[test]
fn connect_by_path_negotiates_and_reports_device_info() {
    let path = SocketPath::new("connect");
    let listener = UnixListener::bind(&path.0).unwrap();
    let mut dev = test_device();
    let probe = dev.probe();
    let server =
        thread::spawn(move || accept_and_serve(&listener, &mut dev, &ServerConfig::default()));
    let client = Client::connect(&path.0, Duration::from_secs(5)).unwrap();
    let n = client.negotiated();
    assert_eq!((n.major, n.minor), (0, 1));
    assert_eq!(n.max_msg_fds, 16);
    assert_eq!(n.max_data_xfer_size, 1 << 20);
    assert_eq!(n.pgsizes, 4096);
    assert_eq!(n.migration, None);

    let info = client.device_info().unwrap();
    assert_eq!(info.flags, VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET);
    assert_eq!((info.num_regions, info.num_irqs), (9, 5));

    drop(client);
    server.join().unwrap().expect("clean disconnect");
    assert_eq!(probe.lock().disconnects, 1);
}

#[test]
fn connect_to_missing_socket_fails() {
    let path = SocketPath::new("missing");
    match Client::connect(&path.0, DEFAULT_TIMEOUT) {
        Err(ClientError::Connect { .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn region_info_sparse_area_fd_maps_the_device_memory() {
    let (client, _, _server) = start(ServerConfig::default());

    let regs = client.region_info(REG_REGION).unwrap();
    assert_eq!(regs.size, REG_SIZE);
    assert!(regs.sparse_areas.is_empty());
    assert!(regs.fd.is_none());

    let mem = client.region_info(MEM_REGION).unwrap();
    assert_eq!(mem.index, MEM_REGION);
    assert_eq!(mem.size, MEM_SIZE);
    assert_ne!(mem.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert_ne!(mem.flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
    assert_eq!(mem.sparse_areas, vec![MEM_SPARSE]);
    let fd = mem.fd.expect("region fd");
    let map = Mapping::new(
        fd.as_fd(),
        mem.offset + MEM_SPARSE.offset,
        MEM_SPARSE.size as usize,
    )
    .unwrap();

    // A write by the server is seen through the client's mapping...
    client
        .region_write(MEM_REGION, MEM_SPARSE.offset + 0x10, b"from the server")
        .unwrap();
    let mut seen = [0u8; 15];
    assert!(map.read(0x10, &mut seen));
    assert_eq!(&seen, b"from the server");

    // ...and a write through the mapping is seen by the server.
    assert!(map.write(0x80, b"from the client"));
    let mut back = [0u8; 15];
    client
        .region_read(MEM_REGION, MEM_SPARSE.offset + 0x80, &mut back)
        .unwrap();
    assert_eq!(&back, b"from the client");

    assert_eq!(
        remote_errno(client.region_info(42)),
        (Command::DeviceGetRegionInfo, libc::EINVAL)
    );
}

#[test]
fn region_read_write_round_trip_and_chunking() {
    let config = ServerConfig {
        max_data_xfer_size: 1024,
        ..ServerConfig::default()
    };
    let (client, _, _server) = start(config);
    assert_eq!(client.negotiated().max_data_xfer_size, 1024);

    assert_eq!(read_u32(&client, REG_ID).unwrap(), DEVICE_ID);
    client
        .region_write(REG_REGION, REG_SCRATCH, &0xdead_beefu32.to_ne_bytes())
        .unwrap();
    assert_eq!(read_u32(&client, REG_SCRATCH).unwrap(), 0xdead_beef);

    // 8 KiB in and out of BAR2 takes 8 transfers each way.
    let pattern: Vec<u8> = (0..MEM_SIZE as usize).map(|i| (i * 7) as u8).collect();
    client.region_write(MEM_REGION, 0, &pattern).unwrap();
    let mut back = vec![0u8; pattern.len()];
    client.region_read(MEM_REGION, 0, &mut back).unwrap();
    assert_eq!(back, pattern);

    // Empty accesses send nothing; out-of-range ones are refused by the device.
    client.region_read(MEM_REGION, 0, &mut []).unwrap();
    let mut past = [0u8; 8];
    assert_eq!(
        remote_errno(client.region_read(MEM_REGION, MEM_SIZE - 4, &mut past)),
        (Command::RegionRead, libc::EINVAL)
    );
    assert!(matches!(
        client.region_read(MEM_REGION, u64::MAX, &mut past),
        Err(ClientError::InvalidArgument { .. })
    ));
}

#[test]
fn error_reply_becomes_remote_and_the_client_stays_usable() {
    let (client, _, _server) = start(ServerConfig::default());
    assert_eq!(
        remote_errno(client.region_write(REG_REGION, REG_ID, &[0; 4])),
        (Command::RegionWrite, libc::EINVAL)
    );
    let mut b = [0u8; 4];
    assert_eq!(
        remote_errno(client.region_read(77, 0, &mut b)),
        (Command::RegionRead, libc::EINVAL)
    );
    assert!(!client.is_broken());
    assert_eq!(client.device_info().unwrap().num_regions, 9);
}

#[test]
fn dma_map_shares_client_memory_with_the_device() {
    let (client, probe, _server) = start(ServerConfig::default());
    const IOVA: u64 = 0x10_0000;
    const SIZE: u64 = 0x4000;
    let ram = memfd(SIZE).unwrap();
    let view = Mapping::new(ram.as_fd(), 0, SIZE as usize).unwrap();

    client
        .dma_map(IOVA, SIZE, ram.as_fd(), 0, true, true)
        .unwrap();
    assert_eq!(probe.lock().dma_maps.len(), 1);

    // The device fills 16 bytes at IOVA + 0x1000 with 0xab.
    client
        .region_write(REG_REGION, REG_DMA_ADDR, &(IOVA + 0x1000).to_ne_bytes())
        .unwrap();
    client
        .region_write(REG_REGION, REG_DMA_LEN, &16u32.to_ne_bytes())
        .unwrap();
    client
        .region_write(REG_REGION, REG_DMA_GO, &[0xab])
        .unwrap();
    let mut seen = [0u8; 18];
    assert!(view.read(0x1000 - 1, &mut seen));
    assert_eq!(seen[0], 0);
    assert_eq!(&seen[1..17], &[0xab; 16]);
    assert_eq!(seen[17], 0);

    // Mapping over it again is refused by the device.
    assert_eq!(
        remote_errno(client.dma_map(IOVA, SIZE, ram.as_fd(), 0, true, true)),
        (Command::DmaMap, libc::EEXIST)
    );

    client.dma_unmap(IOVA, SIZE).unwrap();
    assert_eq!(
        remote_errno(client.region_write(REG_REGION, REG_DMA_GO, &[0xcd])),
        (Command::RegionWrite, libc::EFAULT)
    );
    assert_eq!(
        remote_errno(client.dma_unmap(IOVA, SIZE)),
        (Command::DmaUnmap, libc::ENOENT)
    );

    // Unaligned or empty mappings are refused before sending.
    for (iova, size, off) in [
        (IOVA + 1, SIZE, 0),
        (IOVA, 10, 0),
        (IOVA, SIZE, 8),
        (IOVA, 0, 0),
    ] {
        assert!(matches!(
            client.dma_map(iova, size, ram.as_fd(), off, true, false),
            Err(ClientError::InvalidArgument {
                command: Command::DmaMap,
                ..
            })
        ));
    }
}

#[test]
fn set_irqs_passes_eventfds_the_server_signals() {
    // Two descriptors per message: four vectors take two SET_IRQS messages.
    let config = ServerConfig {
        max_msg_fds: 2,
        ..ServerConfig::default()
    };
    let (client, _, _server) = start(config);
    let msix = client.irq_info(2).unwrap();
    assert_eq!((msix.index, msix.count), (2, MSIX_COUNT));
    assert_ne!(msix.flags & VFIO_IRQ_INFO_EVENTFD, 0);
    assert_eq!(
        remote_errno(client.irq_info(9)),
        (Command::DeviceGetIrqInfo, libc::EINVAL)
    );

    let fds: Vec<_> = (0..MSIX_COUNT).map(|_| eventfd().unwrap()).collect();
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let eventfd_trigger = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    client
        .set_irqs(2, eventfd_trigger, 0, MSIX_COUNT, &borrowed)
        .unwrap();

    // The device raises vector 3 (the second message's second descriptor).
    client.region_write(REG_REGION, REG_IRQ, &[3]).unwrap();
    assert_eq!(wait_event(fds[3].as_fd(), Duration::from_secs(5)), Some(1));
    assert_eq!(wait_event(fds[0].as_fd(), Duration::from_millis(10)), None);

    // The client triggers vector 1 through the device.
    let none_trigger = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
    client.set_irqs(2, none_trigger, 1, 1, &[]).unwrap();
    assert_eq!(wait_event(fds[1].as_fd(), Duration::from_secs(5)), Some(1));

    // Disabling the whole type: the device has nothing to signal.
    client.set_irqs(2, none_trigger, 0, 0, &[]).unwrap();
    assert_eq!(
        remote_errno(client.region_write(REG_REGION, REG_IRQ, &[3])),
        (Command::RegionWrite, libc::ENXIO)
    );

    // Arguments the client refuses to send.
    for (flags, count, n) in [
        (eventfd_trigger, 3, 2),
        (none_trigger, 1, 1),
        (VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER, 1, 0),
        (VFIO_IRQ_SET_DATA_EVENTFD, 1, 1),
    ] {
        assert!(
            matches!(
                client.set_irqs(2, flags, 0, count, &borrowed[..n]),
                Err(ClientError::InvalidArgument { .. })
            ),
            "flags {flags:#x}"
        );
    }
    assert!(!client.is_broken());
}

#[test]
fn reset_reaches_the_device() {
    let (client, probe, _server) = start(ServerConfig::default());
    client
        .region_write(REG_REGION, REG_SCRATCH, &7u32.to_ne_bytes())
        .unwrap();
    client.reset().unwrap();
    assert_eq!(probe.lock().resets, 1);
    assert_eq!(read_u32(&client, REG_SCRATCH).unwrap(), 0);
}

#[test]
fn requests_from_several_threads() {
    let (client, _, _server) = start(ServerConfig::default());
    let client = Arc::new(client);
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let client = client.clone();
            thread::spawn(move || {
                for i in 0..100u8 {
                    let at = u64::from(t) * 0x100;
                    let data = [t, i, t ^ i, 0x5a];
                    client.region_write(MEM_REGION, at, &data).unwrap();
                    let mut back = [0u8; 4];
                    client.region_read(MEM_REGION, at, &mut back).unwrap();
                    assert_eq!(back, data);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn posted_writes_are_seen_by_the_next_read() {
    let config = ServerConfig {
        max_data_xfer_size: 1024,
        ..ServerConfig::default()
    };
    let (client, _, _server) = start(config);
    client
        .region_write_posted(REG_REGION, REG_SCRATCH, &0x1234_5678u32.to_ne_bytes())
        .unwrap();
    assert_eq!(read_u32(&client, REG_SCRATCH).unwrap(), 0x1234_5678);

    // Many posted writes in a row, the last one wins; nothing is left unread on the socket
    // (a stray reply would break the next call with a wrong message ID).
    for i in 0..1000u32 {
        client
            .region_write_posted(REG_REGION, REG_SCRATCH, &i.to_ne_bytes())
            .unwrap();
    }
    assert_eq!(read_u32(&client, REG_SCRATCH).unwrap(), 999);

    // Posted writes larger than a transfer are split like synchronous ones.
    let pattern: Vec<u8> = (0..MEM_SIZE as usize).map(|i| (i * 13) as u8).collect();
    client.region_write_posted(MEM_REGION, 0, &pattern).unwrap();
    let mut back = vec![0u8; pattern.len()];
    client.region_read(MEM_REGION, 0, &mut back).unwrap();
    assert_eq!(back, pattern);
}

#[test]
fn a_refused_posted_write_goes_unanswered_and_the_client_stays_usable() {
    let (client, _, _server) = start(ServerConfig::default());
    // The ID register is read-only: a synchronous write is refused...
    assert_eq!(
        remote_errno(client.region_write(REG_REGION, REG_ID, &[0; 4])),
        (Command::RegionWrite, libc::EINVAL)
    );
    // ...a posted one cannot be: the server logs it and sends nothing.
    client
        .region_write_posted(REG_REGION, REG_ID, &[0; 4])
        .unwrap();
    assert_eq!(read_u32(&client, REG_ID).unwrap(), DEVICE_ID);
    assert!(!client.is_broken());
}

#[test]
fn posted_write_to_a_dead_server_fails_the_next_call_without_hanging() {
    let (a, b) = UnixStream::pair().unwrap();
    let killer = b.try_clone().unwrap();
    let mut dev = test_device();
    let server = thread::spawn(move || serve(b, &mut dev, &ServerConfig::default()));
    let client = Client::from_stream(a, Duration::from_secs(5)).expect("negotiate");
    client
        .region_write_posted(REG_REGION, REG_SCRATCH, &1u32.to_ne_bytes())
        .unwrap();
    assert_eq!(read_u32(&client, REG_SCRATCH).unwrap(), 1);
    // The server's socket goes away, as when its process is killed.
    killer.shutdown(std::net::Shutdown::Both).unwrap();
    server.join().unwrap().expect("the server sees end of file");
    drop(killer);

    let start = std::time::Instant::now();
    // Whether the posted write itself already sees the dead peer or the call after it
    // does, the failure is a disconnect, and every call after that fails at once.
    let first = client.region_write_posted(REG_REGION, REG_SCRATCH, &2u32.to_ne_bytes());
    let second = read_u32(&client, REG_SCRATCH);
    match (&first, &second) {
        (Err(ClientError::Disconnected { .. }), Err(ClientError::Broken { .. }))
        | (Ok(()), Err(ClientError::Disconnected { .. })) => {}
        other => panic!("expected a disconnect, got {other:?}"),
    }
    assert!(client.is_broken());
    assert!(matches!(
        client.region_write_posted(REG_REGION, REG_SCRATCH, &3u32.to_ne_bytes()),
        Err(ClientError::Broken { .. })
    ));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
}
