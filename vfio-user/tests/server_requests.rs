//! Commands from the server (`DMA_READ`, `DMA_WRITE`) served by the client's handler:
//! inline while a call waits for its reply, by the reader thread while the client is idle,
//! refused cleanly when they are bad, and never leaving the stream out of step. The
//! server is the crate's fake device; the commands are injected by its faults, and what
//! the client answered is read from its transcript.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vfio_user::proto::{Command, DmaAccess, DmaAccessData, Header, FLAGS_NO_REPLY};
use vfio_user::testing::{FakeDevice, FakeServer, Fault, Inject};
use vfio_user::{Client, ClientError, Errno, ServerConfig, ServerRequests};

const TIMEOUT: Duration = Duration::from_secs(5);
/// Guest memory of the tests: 64 KiB at DMA address `BASE`.
const BASE: u64 = 0x10_0000;
const SIZE: usize = 0x1_0000;

/// Memory reached by DMA address, recording the calls.
#[derive(Default)]
struct Memory {
    bytes: Mutex<Vec<u8>>,
    calls: Mutex<Vec<(&'static str, u64, usize)>>,
}

impl Memory {
    fn new() -> Arc<Self> {
        Arc::new(Memory {
            bytes: Mutex::new((0..SIZE).map(|i| i as u8).collect()),
            calls: Mutex::default(),
        })
    }

    fn range(addr: u64, len: usize) -> Result<std::ops::Range<usize>, Errno> {
        let start = addr
            .checked_sub(BASE)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or(Errno(libc::EFAULT))?;
        let end = start.checked_add(len).ok_or(Errno(libc::EFAULT))?;
        if end > SIZE {
            return Err(Errno(libc::EFAULT));
        }
        Ok(start..end)
    }

    fn calls(&self) -> Vec<(&'static str, u64, usize)> {
        self.calls.lock().unwrap().clone()
    }
}

impl ServerRequests for Memory {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.calls.lock().unwrap().push(("read", addr, buf.len()));
        let r = Self::range(addr, buf.len())?;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[r]);
        Ok(())
    }

    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        self.calls.lock().unwrap().push(("write", addr, data.len()));
        let r = Self::range(addr, data.len())?;
        self.bytes.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
}

/// The scripted servers' configuration: 4 KiB transfers, 4 descriptors.
fn small_config() -> ServerConfig {
    ServerConfig {
        max_data_xfer_size: 4096,
        max_msg_fds: 4,
        ..ServerConfig::default()
    }
}

/// A client of a fake device served with `faults`, with `memory` as its handler and, if
/// `reader`, its reader thread started.
fn client_with(
    memory: &Arc<Memory>,
    reader: bool,
    faults: impl IntoIterator<Item = Fault>,
) -> (Client, FakeServer) {
    let builder =
        FakeServer::builder(FakeDevice::builder().build().unwrap()).config(small_config());
    let (ours, server) = faults
        .into_iter()
        .fold(builder, |b, f| b.fault(f))
        .pair()
        .unwrap();
    let client = Client::from_stream(ours, TIMEOUT).expect("negotiate");
    client.set_server_requests(memory.clone());
    if reader {
        client.spawn_reader().unwrap();
    }
    (client, server)
}

/// Commands sent to the client right after the handshake, while it is idle.
fn at_start(injects: impl IntoIterator<Item = Inject>) -> Fault {
    Fault::on(Command::Version).after(injects)
}

/// The client's reply to server command `id`; `Err(errno)` if it is an error reply.
fn reply_to(s: &FakeServer, id: u16) -> Result<Vec<u8>, u32> {
    let m = s.wait_for_reply(id, TIMEOUT).expect("a reply");
    assert!(m.header.is_reply(), "expected a reply, got {:?}", m.header);
    assert_eq!(m.header.msg_id, id);
    if m.header.is_error() {
        assert!(m.payload.is_empty());
        return Err(m.header.error);
    }
    Ok(m.payload)
}

/// Ends the connection and waits for the server to see the client go.
fn finish(client: Client, server: &FakeServer) {
    drop(client);
    server.finish(TIMEOUT).unwrap();
}

#[test]
fn a_dma_write_while_the_client_is_idle_is_served_by_the_reader() {
    let memory = Memory::new();
    let (client, server) = client_with(
        &memory,
        true,
        [at_start([Inject::dma_write(
            7,
            BASE + 0x100,
            b"written while idle",
        )])],
    );
    // The client makes no call until the server has its reply.
    let start = Instant::now();
    while memory.calls().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(5), "never served");
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        &memory.bytes.lock().unwrap()[0x100..0x112],
        b"written while idle"
    );
    client.reset().unwrap();
    assert!(!client.is_broken());
    finish(client, &server);
    let echo = DmaAccess::parse(&reply_to(&server, 7).unwrap()).unwrap();
    assert_eq!((echo.address, echo.count), (BASE + 0x100, 18));
    assert_eq!(server.sequence(), ["Version", "reply 7", "DeviceReset"]);
}

#[test]
fn a_dma_read_before_the_reply_is_served_inline() {
    for reader in [false, true] {
        let memory = Memory::new();
        // The DMA read comes after the client's first request, before its reply.
        let fault = Fault::on(Command::DeviceReset)
            .nth(0)
            .before([Inject::dma_read(9, BASE + 0x20, 16)]);
        let (client, server) = client_with(&memory, reader, [fault]);
        client.reset().unwrap();
        assert_eq!(
            memory.calls(),
            vec![("read", BASE + 0x20, 16)],
            "reader {reader}"
        );
        client.reset().unwrap();
        finish(client, &server);
        let reply = DmaAccessData::parse(&reply_to(&server, 9).unwrap()).unwrap();
        assert_eq!(reply.address, BASE + 0x20);
        assert_eq!(
            reply.data,
            (0x20..0x30).map(|i| i as u8).collect::<Vec<_>>()
        );
        assert_eq!(
            server.sequence(),
            ["Version", "DeviceReset", "reply 9", "DeviceReset"]
        );
    }
}

#[test]
fn a_bad_address_gets_an_error_reply_and_the_connection_lives() {
    let memory = Memory::new();
    // Malformed: a count that differs from the data, a range that wraps.
    let mut bad = DmaAccessData {
        address: BASE,
        data: vec![1; 4],
    }
    .to_bytes();
    bad[8] = 5;
    // An unknown command, and one that wants no reply: nothing comes back for it.
    let quiet = Header {
        flags: FLAGS_NO_REPLY,
        ..Header::command(6, Command::DmaWrite, 0).unwrap()
    };
    let injects = [
        Inject::dma_read(1, BASE + SIZE as u64 - 4, 8),
        Inject::dma_write(2, 0x10, b"below"),
        Inject::command(3, Command::DmaWrite, bad),
        Inject::dma_read(4, u64::MAX - 1, 2),
        Inject::command(5, Command::DeviceReset, vec![]),
        Inject::message(quiet, vec![]),
        Inject::dma_read(7, BASE, 4),
    ];
    let (client, server) = client_with(&memory, true, [at_start(injects)]);
    let start = Instant::now();
    while memory.calls().len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(5), "not served");
        thread::sleep(Duration::from_millis(1));
    }
    client.reset().unwrap();
    assert!(!client.is_broken());
    finish(client, &server);
    assert_eq!(reply_to(&server, 1), Err(libc::EFAULT as u32));
    assert_eq!(reply_to(&server, 2), Err(libc::EFAULT as u32));
    assert_eq!(reply_to(&server, 3), Err(libc::EINVAL as u32));
    assert_eq!(reply_to(&server, 4), Err(libc::EINVAL as u32));
    assert_eq!(reply_to(&server, 5), Err(libc::ENOTSUP as u32));
    assert_eq!(reply_to(&server, 7).unwrap().len(), 16 + 4);
    assert_eq!(
        server.sequence(),
        [
            "Version",
            "reply 1",
            "reply 2",
            "reply 3",
            "reply 4",
            "reply 5",
            "reply 7",
            "DeviceReset"
        ]
    );
}

#[test]
fn transfers_over_the_advertised_size_are_refused_without_allocating_them() {
    let memory = Memory::new();
    let max = u64::from(vfio_user::proto::DEFAULT_MAX_DATA_XFER_SIZE);
    let injects = [
        // A read of 1 TiB: refused from its count alone.
        Inject::dma_read(1, BASE, 1 << 40),
        Inject::dma_read(2, BASE, max + 1),
        // A write whose message is over the client's receive limit: its payload is read
        // and dropped in pieces, and the stream stays in step.
        Inject::dma_write(3, BASE, &vec![0xee; 2 * max as usize]),
        // A write within the receive limit but over the transfer size.
        Inject::dma_write(4, BASE, &vec![0xee; max as usize + 1]),
    ];
    let (client, server) = client_with(&memory, true, [at_start(injects)]);
    server
        .wait_for_reply(4, Duration::from_secs(10))
        .expect("all refused");
    client.reset().unwrap();
    assert!(memory.calls().is_empty(), "{:?}", memory.calls());
    assert!(!client.is_broken());
    finish(client, &server);
    assert_eq!(reply_to(&server, 1), Err(libc::EINVAL as u32));
    assert_eq!(reply_to(&server, 2), Err(libc::EINVAL as u32));
    assert_eq!(reply_to(&server, 3), Err(libc::E2BIG as u32));
    assert_eq!(reply_to(&server, 4), Err(libc::EINVAL as u32));
    assert_eq!(
        server.sequence(),
        [
            "Version",
            "reply 1",
            "reply 2",
            "reply 3",
            "reply 4",
            "DeviceReset"
        ]
    );
}

#[test]
fn without_a_handler_commands_are_refused_and_the_stream_stays_in_step() {
    let fault = at_start([Inject::dma_write(1, BASE, b"x")]);
    let (ours, server) = FakeServer::builder(FakeDevice::builder().build().unwrap())
        .config(small_config())
        .fault(fault)
        .pair()
        .unwrap();
    let client = Client::from_stream(ours, TIMEOUT).unwrap();
    client.spawn_reader().unwrap();
    client.spawn_reader().unwrap();
    assert_eq!(reply_to(&server, 1), Err(libc::ENOTSUP as u32));
    client.reset().unwrap();
    finish(client, &server);
    assert_eq!(server.sequence(), ["Version", "reply 1", "DeviceReset"]);
}

#[test]
fn a_reply_with_no_request_in_flight_closes_the_connection() {
    let memory = Memory::new();
    let stray = Header::reply(&Header::command(40, Command::DeviceReset, 0).unwrap(), 0);
    let (client, server) = client_with(
        &memory,
        true,
        [at_start([Inject::message(stray.unwrap(), vec![])])],
    );
    // The client shuts the connection down.
    server.finish(TIMEOUT).unwrap();
    match client.reset() {
        Err(ClientError::Broken { reason }) => {
            assert!(reason.contains("no request in flight"), "{reason}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_hang_up_while_idle_breaks_the_connection_at_once() {
    let memory = Memory::new();
    let (client, server) = client_with(&memory, true, [Fault::on(Command::Version).then_close()]);
    server.finish(TIMEOUT).unwrap();
    let start = Instant::now();
    while !client.is_broken() {
        assert!(start.elapsed() < Duration::from_secs(5), "hang-up not seen");
        thread::sleep(Duration::from_millis(1));
    }
    match client.reset() {
        Err(ClientError::Broken { reason }) => {
            assert!(reason.contains("closed the connection"), "{reason}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn dropping_the_client_stops_the_reader_and_closes_the_socket() {
    let memory = Memory::new();
    let (client, server) = client_with(&memory, true, []);
    drop(client);
    // End of file once the client is gone (the server then ends cleanly): the reader
    // kept no copy of the socket.
    server.finish(TIMEOUT).unwrap();
    // The handler's only other owner was the reader's session: no reference is left.
    assert_eq!(Arc::strong_count(&memory), 1);
}

#[test]
fn a_command_right_after_a_reply_is_not_lost() {
    // Each round: the server answers a call and at once sends a DMA write, which lands
    // while the caller may still hold the session; the reader must serve it anyway.
    const ROUNDS: u16 = 50;
    let memory = Memory::new();
    let faults = (0..ROUNDS).map(|round| {
        Fault::on(Command::DeviceReset)
            .nth(usize::from(round))
            .after([Inject::dma_write(round, BASE + u64::from(round), &[0xaa])])
    });
    let (client, server) = client_with(&memory, true, faults);
    for round in 0..usize::from(ROUNDS) {
        client.reset().unwrap();
        let start = Instant::now();
        while memory.calls().len() <= round {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "round {round} lost"
            );
            thread::yield_now();
        }
    }
    assert!(!client.is_broken());
    finish(client, &server);
    let mut expected = vec!["Version".to_string()];
    for round in 0..ROUNDS {
        assert!(reply_to(&server, round).is_ok());
        expected.extend(["DeviceReset".to_string(), format!("reply {round}")]);
    }
    assert_eq!(server.sequence(), expected);
}
