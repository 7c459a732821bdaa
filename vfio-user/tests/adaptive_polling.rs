//! The server's adaptive polling ([`ServerConfig::spin_window`]): after each command it
//! checks the socket without sleeping for a while, then blocks. Messages arriving in
//! that window keep their order and their file descriptors, a disconnect or a stalled
//! message still ends the connection as usual, and an idle server does not spin.

mod common;

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::os::unix::thread::JoinHandleExt;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use vfio_user::server::DEFAULT_SPIN_WINDOW;
use vfio_user::socket::SocketError;
use vfio_user::testing::Probe;
use vfio_user::{serve, Client, ServerConfig, ServerError, DEFAULT_TIMEOUT};

type Server = JoinHandle<Result<(), ServerError>>;

/// A client, a raw handle on its socket, the device's probe and the server thread (the
/// test's own: its CPU time is measured).
fn start(spin_window: Duration) -> (Client, UnixStream, Probe, Server) {
    let (a, b) = UnixStream::pair().unwrap();
    let mut dev = test_device();
    let probe = dev.probe();
    let server = thread::spawn(move || {
        let config = ServerConfig {
            spin_window,
            message_timeout: Duration::from_millis(200),
            ..ServerConfig::default()
        };
        serve(b, &mut dev, &config)
    });
    let raw = a.try_clone().unwrap();
    let client = Client::from_stream(a, DEFAULT_TIMEOUT).expect("negotiate");
    (client, raw, probe, server)
}

fn read_u32(client: &Client, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    client.region_read(REG_REGION, offset, &mut b).unwrap();
    u32::from_ne_bytes(b)
}

/// CPU time the thread has used so far.
fn cpu_time(thread: libc::pthread_t) -> Duration {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `thread` is a live thread (its JoinHandle is held by the caller) and `clock`
    // is a valid place for the id.
    assert_eq!(
        unsafe { libc::pthread_getcpuclockid(thread, &mut clock) },
        0
    );
    // SAFETY: timespec is a plain C struct; all-zero bytes are a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid timespec to write into.
    assert_eq!(unsafe { libc::clock_gettime(clock, &mut ts) }, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time the server thread uses over `idle` without any message, after a command.
fn idle_cpu(spin_window: Duration, idle: Duration) -> Duration {
    let (client, raw, _, server) = start(spin_window);
    let thread = server.as_pthread_t();
    read_u32(&client, REG_ID);
    let before = cpu_time(thread);
    thread::sleep(idle);
    let used = cpu_time(thread) - before;
    drop(client);
    drop(raw);
    server.join().unwrap().unwrap();
    used
}

#[test]
fn an_idle_server_blocks_after_the_window() {
    let idle = Duration::from_millis(300);
    let used = idle_cpu(DEFAULT_SPIN_WINDOW, idle);
    assert!(
        used < Duration::from_millis(30),
        "the server used {used:?} of CPU time in {idle:?} without a message"
    );
    // The measurement sees spinning: a window longer than the idle time spins throughout.
    let used = idle_cpu(Duration::from_secs(10), idle);
    assert!(
        used > Duration::from_millis(30),
        "a spinning server used only {used:?} of CPU time in {idle:?}"
    );
}

#[test]
fn a_burst_in_the_window_keeps_order_and_descriptors() {
    for window in [DEFAULT_SPIN_WINDOW, Duration::from_secs(10)] {
        let (client, raw, probe, server) = start(window);
        const IOVA: u64 = 0x10_0000;
        const SIZE: u64 = 0x4000;
        for round in 0..50u32 {
            // Posted writes, then commands carrying descriptors, back to back: each one
            // arrives while the server polls after the previous.
            for i in 0..20u32 {
                client
                    .region_write_posted(REG_REGION, REG_SCRATCH, &(round * 100 + i).to_ne_bytes())
                    .unwrap();
            }
            let fds = msix_eventfds(&client);
            let vector = round % MSIX_COUNT;
            client
                .region_write_posted(REG_REGION, REG_IRQ, &[vector as u8])
                .unwrap();
            assert_eq!(
                wait_event(fds[vector as usize].as_fd(), Duration::from_secs(5)),
                Some(1)
            );
            let ram = memfd(SIZE).unwrap();
            let view = Mapping::new(ram.as_fd(), 0, SIZE as usize).unwrap();
            client
                .dma_map(IOVA, SIZE, ram.as_fd(), 0, true, true)
                .unwrap();
            client
                .region_write_posted(REG_REGION, REG_DMA_ADDR, &(IOVA + 0x100).to_ne_bytes())
                .unwrap();
            client
                .region_write_posted(REG_REGION, REG_DMA_LEN, &8u32.to_ne_bytes())
                .unwrap();
            client
                .region_write_posted(REG_REGION, REG_SCRATCH, &(round * 100 + 99).to_ne_bytes())
                .unwrap();
            client
                .region_write(REG_REGION, REG_DMA_GO, &[round as u8])
                .unwrap();
            let mut got = [0u8; 8];
            assert!(view.read(0x100, &mut got));
            assert_eq!(got, [round as u8; 8]);
            client.dma_unmap(IOVA, SIZE).unwrap();
            // The last posted write wins.
            assert_eq!(read_u32(&client, REG_SCRATCH), round * 100 + 99);
        }
        assert_eq!(probe.lock().dma_maps.len(), 50);
        drop(client);
        drop(raw);
        server.join().unwrap().unwrap();
    }
}

#[test]
fn a_disconnect_in_the_window_ends_the_loop() {
    // A window far longer than the test: the server is polling when the client leaves.
    let (client, raw, probe, server) = start(Duration::from_secs(10));
    client
        .region_write_posted(REG_REGION, REG_SCRATCH, &1u32.to_ne_bytes())
        .unwrap();
    let start = Instant::now();
    drop(client);
    drop(raw);
    server.join().unwrap().unwrap();
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(probe.lock().disconnects, 1);
}

#[test]
fn half_a_message_in_the_window_times_out() {
    let (client, mut raw, _, server) = start(Duration::from_secs(10));
    read_u32(&client, REG_ID);
    raw.write_all(&[1, 2, 3]).unwrap();
    let start = Instant::now();
    assert!(matches!(
        server.join().unwrap(),
        Err(ServerError::Socket(SocketError::Timeout))
    ));
    assert!(start.elapsed() < Duration::from_secs(2));
}
