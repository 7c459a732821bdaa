//! What a posted region write costs the caller (ignored: a measurement, run by hand with
//! `cargo test --release -p vfio-user --test posted_cost -- --ignored --nocapture`).
//! It separates the client's own work from the kernel's cost of waking the server
//! thread that sleeps in `poll()` on the other end of the socket, and compares a burst
//! of writes to a server that blocks at once with one to a server that polls for a while
//! after each command ([`ServerConfig::spin_window`]).

mod common;

use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use vfio_user::proto::{Capabilities, Header, Version, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use vfio_user::socket::Channel;
use vfio_user::{serve, Client, ServerConfig};

const N: u32 = 20_000;

/// The server end after answering the client's version proposal, read by the test
/// itself. Kept here rather than using the fake server: the measurement needs nobody
/// waiting on the socket while the client sends, and the fake server (or its relay)
/// always has a thread asleep in `poll()` there, whose wake-up the send would pay for.
fn negotiated_peer(stream: UnixStream) -> Channel {
    let channel = Channel::new(stream);
    let proposal = channel.recv(LIMITS, deadline(5)).expect("version proposal");
    let reply = Version {
        major: PROTOCOL_MAJOR,
        minor: PROTOCOL_MINOR,
        capabilities: Some(Capabilities::default()),
    }
    .to_bytes();
    let h = Header::reply(&proposal.header, reply.len()).unwrap();
    channel.send(&h, &reply, &[], deadline(5)).unwrap();
    channel
}

fn per_call(f: impl FnMut(u32)) -> f64 {
    let mut f = f;
    let start = Instant::now();
    for i in 0..N {
        f(i);
    }
    start.elapsed().as_nanos() as f64 / f64::from(N)
}

/// Per-write cost of `count` posted writes separated by a busy-waited `gap` (the client
/// never sleeps, as a vCPU thread running a guest loop of trapped writes), to a server
/// with `spin_window`.
fn burst(spin_window: Duration, gap: Duration, count: u32) -> f64 {
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let mut dev = test_device();
        let config = ServerConfig {
            spin_window,
            ..ServerConfig::default()
        };
        serve(b, &mut dev, &config)
    });
    let client = Client::from_stream(a, Duration::from_secs(5)).unwrap();
    let data = 1u32.to_ne_bytes();
    let mut total = Duration::ZERO;
    for _ in 0..count {
        let until = Instant::now() + gap;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        let t = Instant::now();
        client
            .region_write_posted(REG_REGION, REG_SCRATCH, &data)
            .unwrap();
        total += t.elapsed();
    }
    // All handled (a synchronous call after them), then disconnect.
    let mut b4 = [0u8; 4];
    client.region_read(REG_REGION, 0, &mut b4).unwrap();
    drop(client);
    server.join().unwrap().unwrap();
    total.as_nanos() as f64 / f64::from(count)
}

#[test]
#[ignore = "measurement, not a test"]
fn posted_burst_cost() {
    let window = vfio_user::server::DEFAULT_SPIN_WINDOW;
    for gap_us in [0u64, 5, 20, 50] {
        let gap = Duration::from_micros(gap_us);
        let blocking = burst(Duration::ZERO, gap, 5000);
        let polling = burst(window, gap, 5000);
        println!(
            "posted-burst: writes {gap_us:>2} us apart: server blocking {blocking:>7.0} ns, \
             polling ({} us window) {polling:>7.0} ns",
            window.as_micros()
        );
    }
}

#[test]
#[ignore = "measurement, not a test"]
fn posted_write_cost() {
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let mut dev = test_device();
        serve(b, &mut dev, &ServerConfig::default())
    });
    let client = Client::from_stream(a, Duration::from_secs(5)).unwrap();
    let data = 1u32.to_ne_bytes();

    // Back to back: the server is mostly awake, draining.
    let busy = per_call(|_| {
        client
            .region_write_posted(REG_REGION, REG_SCRATCH, &data)
            .unwrap()
    });
    // One at a time with a pause longer than the server's spin window: the server has
    // gone back to sleep in poll() before each write.
    let mut total = Duration::ZERO;
    for _ in 0..2000 {
        thread::sleep(Duration::from_micros(200));
        let t = Instant::now();
        client
            .region_write_posted(REG_REGION, REG_SCRATCH, &data)
            .unwrap();
        total += t.elapsed();
    }
    let sleeping = total.as_nanos() as f64 / 2000.0;
    let mut total = Duration::ZERO;
    let mut b4 = [0u8; 4];
    for _ in 0..2000 {
        thread::sleep(Duration::from_micros(200));
        let t = Instant::now();
        client.region_write(REG_REGION, REG_SCRATCH, &data).unwrap();
        total += t.elapsed();
    }
    let sync = total.as_nanos() as f64 / 2000.0;
    client.region_read(REG_REGION, 0, &mut b4).unwrap();
    drop(client);
    server.join().unwrap().unwrap();

    // Raw sendmsg of the same 32-byte message with nobody waiting on the other end.
    let (x, y) = UnixStream::pair().unwrap();
    y.set_nonblocking(true).unwrap();
    let mut sink = vec![0u8; 1 << 16];
    let msg = [0u8; 32];
    let mut total = Duration::ZERO;
    for _ in 0..2000 {
        let t = Instant::now();
        // SAFETY: a valid socket and a live 32-byte buffer.
        let n = unsafe {
            libc::send(
                std::os::fd::AsRawFd::as_raw_fd(&x),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_DONTWAIT,
            )
        };
        total += t.elapsed();
        assert_eq!(n, 32);
        // Drained outside the timing, so the buffer never fills.
        let _ = std::io::Read::read(&mut &y, &mut sink);
    }
    let raw_nobody = total.as_nanos() as f64 / 2000.0;
    // The same raw send() while a thread sleeps in poll() on the other end: the kernel
    // wakes it (on another CPU, an inter-processor interrupt: under nested KVM a VM exit).
    let (x, y) = UnixStream::pair().unwrap();
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 32];
        for _ in 0..2000 {
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&y),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, -1) };
            std::io::Read::read_exact(&mut &y, &mut buf).unwrap();
        }
    });
    let mut total = Duration::ZERO;
    for _ in 0..2000 {
        thread::sleep(Duration::from_micros(200));
        let t = Instant::now();
        // SAFETY: a valid socket and a live 32-byte buffer.
        let n = unsafe {
            libc::send(
                std::os::fd::AsRawFd::as_raw_fd(&x),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_DONTWAIT,
            )
        };
        total += t.elapsed();
        assert_eq!(n, 32);
    }
    reader.join().unwrap();
    let raw_waking = total.as_nanos() as f64 / 2000.0;

    // The client's posted write with the server negotiated but not reading (no wake-up):
    // the client's own work plus send().
    let (a, b) = UnixStream::pair().unwrap();
    let peer = thread::spawn(move || negotiated_peer(b));
    let client = Client::from_stream(a, Duration::from_secs(5)).unwrap();
    let peer = peer.join().unwrap();
    let mut total = Duration::ZERO;
    for _ in 0..2000 {
        let t = Instant::now();
        client
            .region_write_posted(REG_REGION, REG_SCRATCH, &data)
            .unwrap();
        total += t.elapsed();
        let _ = peer.recv(LIMITS, deadline(5));
    }
    let client_only = total.as_nanos() as f64 / 2000.0;

    println!("posted-cost: raw send(), reader asleep in poll():       {raw_waking:>9.0} ns");
    println!("posted-cost: posted write, nobody waiting (client work): {client_only:>8.0} ns");
    println!("posted-cost: posted write, server awake (back to back): {busy:>9.0} ns");
    println!("posted-cost: posted write, server asleep in poll():     {sleeping:>9.0} ns");
    println!("posted-cost: synchronous write, server asleep:          {sync:>9.0} ns");
    println!("posted-cost: raw send(), no reader waiting:             {raw_nobody:>9.0} ns");
}
