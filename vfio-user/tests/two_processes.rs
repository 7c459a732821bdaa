//! Client and server in two processes: this test binary re-executes itself with an
//! environment variable naming the socket, and that child runs only `child_server` (the
//! crate's server with the test device).

mod common;

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use vfio_user::{accept_and_serve, Client, ClientError, ServerConfig};

/// Set in the child: the socket path to serve on.
const CHILD_ENV: &str = "VFIO_USER_TEST_CHILD_SOCKET";
const TIMEOUT: Duration = Duration::from_secs(5);

/// The child's entry point; a no-op in the normal test run.
#[test]
fn child_server() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let listener = UnixListener::bind(&path).expect("bind");
    let mut dev = test_device();
    accept_and_serve(&listener, &mut dev, &ServerConfig::default()).expect("serve");
}

fn spawn_server(path: &SocketPath) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_server", "--test-threads=1", "--quiet"])
        .env(CHILD_ENV, &path.0)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the server process")
}

fn connect(path: &SocketPath, child: &mut Child) -> Client {
    let start = Instant::now();
    loop {
        match Client::connect(&path.0, TIMEOUT) {
            Ok(client) => return client,
            Err(ClientError::Connect { .. }) if start.elapsed() < Duration::from_secs(10) => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("cannot reach the server process: {e}");
            }
        }
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server process did not exit");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn client_and_server_in_two_processes() {
    let path = SocketPath::new("process");
    let mut child = spawn_server(&path);
    let client = connect(&path, &mut child);

    assert_eq!(client.device_info().unwrap().num_regions, 9);

    // The BAR's memory is shared across the processes.
    let mem = client.region_info(MEM_REGION).unwrap();
    let fd = mem.fd.expect("region fd");
    let map = Mapping::new(fd.as_fd(), MEM_SPARSE.offset, MEM_SPARSE.size as usize).unwrap();
    client
        .region_write(MEM_REGION, MEM_SPARSE.offset, b"other process")
        .unwrap();
    let mut seen = [0u8; 13];
    assert!(map.read(0, &mut seen));
    assert_eq!(&seen, b"other process");

    // So is the client's memory, for DMA.
    let ram = memfd(0x2000).unwrap();
    let view = Mapping::new(ram.as_fd(), 0, 0x2000).unwrap();
    client
        .dma_map(0x4000, 0x2000, ram.as_fd(), 0, true, true)
        .unwrap();
    client
        .region_write(REG_REGION, REG_DMA_ADDR, &0x5000u64.to_ne_bytes())
        .unwrap();
    client
        .region_write(REG_REGION, REG_DMA_LEN, &4u32.to_ne_bytes())
        .unwrap();
    client
        .region_write(REG_REGION, REG_DMA_GO, &[0x42])
        .unwrap();
    let mut dma = [0u8; 4];
    assert!(view.read(0x1000, &mut dma));
    assert_eq!(dma, [0x42; 4]);

    // And an eventfd signalled by the other process.
    let fds = msix_eventfds(&client);
    client.region_write(REG_REGION, REG_IRQ, &[2]).unwrap();
    assert_eq!(wait_event(fds[2].as_fd(), TIMEOUT), Some(1));
    client.reset().unwrap();

    // Disconnecting ends the server cleanly.
    drop(client);
    assert!(wait_exit(&mut child).success());
}

#[test]
fn killed_server_process_is_a_quick_disconnect() {
    let path = SocketPath::new("killed");
    let mut child = spawn_server(&path);
    let client = connect(&path, &mut child);
    assert_eq!(client.device_info().unwrap().num_irqs, 5);

    child.kill().unwrap();
    child.wait().unwrap();
    let start = Instant::now();
    match client.reset() {
        Err(ClientError::Disconnected { .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(matches!(client.reset(), Err(ClientError::Broken { .. })));
}
