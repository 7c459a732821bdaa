//! Commands from the server (`DMA_READ`, `DMA_WRITE`) served by the client's handler:
//! inline while a call waits for its reply, by the reader thread while the client is idle,
//! refused cleanly when they are bad, and never leaving the stream out of step.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use vfio_user::proto::{Command, DmaAccess, DmaAccessData, Header, FLAGS_NO_REPLY};
use vfio_user::{Client, ClientError, Errno, ServerRequests};

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

/// A client over a fake server running `script`, with `memory` as its handler and, if
/// `reader`, its reader thread started.
fn client_with<F>(memory: &Arc<Memory>, reader: bool, script: F) -> (Client, thread::JoinHandle<()>)
where
    F: FnOnce(FakeServer) + Send + 'static,
{
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || script(FakeServer::handshake(b)));
    let client = Client::from_stream(a, TIMEOUT).expect("negotiate");
    client.set_server_requests(memory.clone());
    if reader {
        client.spawn_reader().unwrap();
    }
    (client, server)
}

fn send_command(s: &FakeServer, id: u16, command: Command, payload: &[u8]) {
    let h = Header::command(id, command, payload.len()).unwrap();
    s.channel.send(&h, payload, &[], deadline(5)).unwrap();
}

fn dma_read(s: &FakeServer, id: u16, address: u64, count: u64) {
    send_command(
        s,
        id,
        Command::DmaRead,
        &DmaAccess { address, count }.to_bytes(),
    );
}

fn dma_write(s: &FakeServer, id: u16, address: u64, data: &[u8]) {
    let p = DmaAccessData {
        address,
        data: data.to_vec(),
    }
    .to_bytes();
    send_command(s, id, Command::DmaWrite, &p);
}

/// Receives the reply to server command `id`; `Err(errno)` if it is an error reply.
fn reply_to(s: &FakeServer, id: u16) -> Result<Vec<u8>, u32> {
    let m = s.recv();
    assert!(m.header.is_reply(), "expected a reply, got {:?}", m.header);
    assert_eq!(m.header.msg_id, id);
    if m.header.is_error() {
        assert!(m.payload.is_empty());
        return Err(m.header.error);
    }
    Ok(m.payload)
}

/// Answers the client's next command (a reset) with an empty reply.
fn serve_reset(s: &FakeServer) {
    let req = s.recv();
    assert_eq!(req.header.command, Command::DeviceReset as u16);
    s.reply(&req.header, &[]);
}

/// Keeps the connection open until the client goes away (a hang-up would break it).
fn wait_for_the_client(s: &FakeServer) {
    let _ = s.channel.recv(LIMITS, deadline(5));
}

#[test]
fn a_dma_write_while_the_client_is_idle_is_served_by_the_reader() {
    let memory = Memory::new();
    let (client, server) = client_with(&memory, true, |s| {
        dma_write(&s, 7, BASE + 0x100, b"written while idle");
        let echo = DmaAccess::parse(&reply_to(&s, 7).unwrap()).unwrap();
        assert_eq!((echo.address, echo.count), (BASE + 0x100, 18));
        serve_reset(&s);
        wait_for_the_client(&s);
    });
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
    drop(client);
    server.join().unwrap();
}

#[test]
fn a_dma_read_before_the_reply_is_served_inline() {
    for reader in [false, true] {
        let memory = Memory::new();
        let (client, server) = client_with(&memory, reader, |s| {
            let req = s.recv();
            dma_read(&s, 9, BASE + 0x20, 16);
            let reply = DmaAccessData::parse(&reply_to(&s, 9).unwrap()).unwrap();
            assert_eq!(reply.address, BASE + 0x20);
            assert_eq!(
                reply.data,
                (0x20..0x30).map(|i| i as u8).collect::<Vec<_>>()
            );
            // Only now the reply to the client's request.
            s.reply(&req.header, &[]);
            serve_reset(&s);
        });
        client.reset().unwrap();
        assert_eq!(
            memory.calls(),
            vec![("read", BASE + 0x20, 16)],
            "reader {reader}"
        );
        client.reset().unwrap();
        server.join().unwrap();
    }
}

#[test]
fn a_bad_address_gets_an_error_reply_and_the_connection_lives() {
    let memory = Memory::new();
    let (client, server) = client_with(&memory, true, |s| {
        dma_read(&s, 1, BASE + SIZE as u64 - 4, 8);
        assert_eq!(reply_to(&s, 1), Err(libc::EFAULT as u32));
        dma_write(&s, 2, 0x10, b"below");
        assert_eq!(reply_to(&s, 2), Err(libc::EFAULT as u32));
        // Malformed: a count that differs from the data, a range that wraps.
        let mut bad = DmaAccessData {
            address: BASE,
            data: vec![1; 4],
        }
        .to_bytes();
        bad[8] = 5;
        send_command(&s, 3, Command::DmaWrite, &bad);
        assert_eq!(reply_to(&s, 3), Err(libc::EINVAL as u32));
        dma_read(&s, 4, u64::MAX - 1, 2);
        assert_eq!(reply_to(&s, 4), Err(libc::EINVAL as u32));
        // An unknown command, and one that wants no reply: nothing comes back for it.
        send_command(&s, 5, Command::DeviceReset, &[]);
        assert_eq!(reply_to(&s, 5), Err(libc::ENOTSUP as u32));
        let quiet = Header {
            flags: FLAGS_NO_REPLY,
            ..Header::command(6, Command::DmaWrite, 0).unwrap()
        };
        s.channel.send(&quiet, &[], &[], deadline(5)).unwrap();
        dma_read(&s, 7, BASE, 4);
        assert_eq!(reply_to(&s, 7).unwrap().len(), 16 + 4);
        serve_reset(&s);
        wait_for_the_client(&s);
    });
    let start = Instant::now();
    while memory.calls().len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(5), "not served");
        thread::sleep(Duration::from_millis(1));
    }
    client.reset().unwrap();
    assert!(!client.is_broken());
    drop(client);
    server.join().unwrap();
}

#[test]
fn transfers_over_the_advertised_size_are_refused_without_allocating_them() {
    let memory = Memory::new();
    let max = u64::from(vfio_user::proto::DEFAULT_MAX_DATA_XFER_SIZE);
    let (done, refused) = std::sync::mpsc::channel();
    let (client, server) = client_with(&memory, true, move |s| {
        // A read of 1 TiB: refused from its count alone.
        dma_read(&s, 1, BASE, 1 << 40);
        assert_eq!(reply_to(&s, 1), Err(libc::EINVAL as u32));
        dma_read(&s, 2, BASE, max + 1);
        assert_eq!(reply_to(&s, 2), Err(libc::EINVAL as u32));
        // A write whose message is over the client's receive limit: its payload is read
        // and dropped in pieces, and the stream stays in step.
        let big = vec![0xee; 2 * max as usize];
        dma_write(&s, 3, BASE, &big);
        assert_eq!(reply_to(&s, 3), Err(libc::E2BIG as u32));
        // A write within the receive limit but over the transfer size.
        dma_write(&s, 4, BASE, &vec![0xee; max as usize + 1]);
        assert_eq!(reply_to(&s, 4), Err(libc::EINVAL as u32));
        done.send(()).unwrap();
        serve_reset(&s);
        wait_for_the_client(&s);
    });
    refused.recv_timeout(Duration::from_secs(10)).unwrap();
    client.reset().unwrap();
    assert!(memory.calls().is_empty(), "{:?}", memory.calls());
    assert!(!client.is_broken());
    drop(client);
    server.join().unwrap();
}

#[test]
fn without_a_handler_commands_are_refused_and_the_stream_stays_in_step() {
    let (a, b) = UnixStream::pair().unwrap();
    let (done, refused) = std::sync::mpsc::channel();
    let server = thread::spawn(move || {
        let s = FakeServer::handshake(b);
        dma_write(&s, 1, BASE, b"x");
        assert_eq!(reply_to(&s, 1), Err(libc::ENOTSUP as u32));
        done.send(()).unwrap();
        serve_reset(&s);
    });
    let client = Client::from_stream(a, TIMEOUT).unwrap();
    client.spawn_reader().unwrap();
    client.spawn_reader().unwrap();
    refused.recv_timeout(Duration::from_secs(5)).unwrap();
    client.reset().unwrap();
    server.join().unwrap();
}

#[test]
fn a_reply_with_no_request_in_flight_closes_the_connection() {
    let memory = Memory::new();
    let (client, server) = client_with(&memory, true, |s| {
        let stray = Header::reply(&Header::command(40, Command::DeviceReset, 0).unwrap(), 0);
        s.channel
            .send(&stray.unwrap(), &[], &[], deadline(5))
            .unwrap();
        // The client shuts the connection down.
        assert!(s.channel.recv(LIMITS, deadline(5)).is_err());
    });
    server.join().unwrap();
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
    let (client, server) = client_with(&memory, true, drop);
    server.join().unwrap();
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
    let (tx, rx) = std::sync::mpsc::channel();
    let (client, server) = client_with(&memory, true, move |s| {
        // End of file once the client is gone: the reader kept no copy of the socket.
        let got = s.channel.recv(LIMITS, deadline(5));
        tx.send(matches!(
            got,
            Err(vfio_user::socket::SocketError::Disconnected)
        ))
        .unwrap();
    });
    drop(client);
    assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
    server.join().unwrap();
    // The handler's only other owner was the reader's session: no reference is left.
    assert_eq!(Arc::strong_count(&memory), 1);
}

#[test]
fn a_command_right_after_a_reply_is_not_lost() {
    // Each round: the server answers a call and at once sends a DMA write, which lands
    // while the caller may still hold the session; the reader must serve it anyway.
    const ROUNDS: u16 = 50;
    let memory = Memory::new();
    let (client, server) = client_with(&memory, true, |s| {
        for round in 0..ROUNDS {
            let req = s.recv();
            s.reply(&req.header, &[]);
            dma_write(&s, round, BASE + u64::from(round), &[0xaa]);
            assert!(reply_to(&s, round).is_ok());
        }
        wait_for_the_client(&s);
    });
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
    drop(client);
    server.join().unwrap();
}
