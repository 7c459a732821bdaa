//! The two-host harness without a VM: two network namespaces joined by a veth pair, TCP across
//! it, cutting and restoring the link, and cleanup. Needs root and iproute2 (as all the tests
//! here).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use vmm_tests::harness::netns::list_namespaces;
use vmm_tests::harness::{NetnsPair, Side};

/// Echoes what each of `count` connections sends until it closes, then drops the listener.
fn echo(listener: TcpListener, count: usize) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for _ in 0..count {
            let (mut conn, _) = listener.accept().expect("accept");
            thread::spawn(move || {
                let mut buf = [0u8; 256];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    })
}

fn exchange(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).unwrap();
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, message);
}

#[test]
fn tcp_across_the_link_and_cutting_it() {
    let pair = NetnsPair::create("nstest").unwrap();
    let names = [pair.name(Side::A).to_owned(), pair.name(Side::B).to_owned()];
    let listed = list_namespaces().unwrap();
    assert!(names.iter().all(|n| listed.contains(n)), "{listed:?}");

    let listener = pair
        .within(Side::B, || TcpListener::bind((pair.addr(Side::B), 0)))
        .unwrap()
        .unwrap();
    let target = SocketAddr::from((pair.addr(Side::B), listener.local_addr().unwrap().port()));
    let server = echo(listener, 2);
    let connect = |timeout: Duration| {
        pair.within(Side::A, || TcpStream::connect_timeout(&target, timeout))
            .unwrap()
    };

    let mut stream = connect(Duration::from_secs(5)).unwrap();
    // The connection really crosses the link: A's end of it is A's address.
    assert_eq!(stream.local_addr().unwrap().ip(), pair.addr(Side::A));
    exchange(&mut stream, b"hello over veth");

    // Cut: a new connection fails quickly, and an established one stalls.
    pair.link_down().unwrap();
    let start = Instant::now();
    let e = connect(Duration::from_secs(2)).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    eprintln!(
        "connect with the link down: {e} after {:?}",
        start.elapsed()
    );
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    stream.write_all(b"while cut").unwrap();
    let mut buf = [0u8; 9];
    let e = stream.read_exact(&mut buf).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{e}"
    );

    // Restored: TCP retransmits what was sent while cut, and new connections work.
    pair.link_up().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"while cut");
    let mut again = connect(Duration::from_secs(5)).unwrap();
    exchange(&mut again, b"back up");
    exchange(&mut stream, b"old one too");
    drop((stream, again));
    server.join().unwrap();

    drop(pair);
    let listed = list_namespaces().unwrap();
    assert!(!names.iter().any(|n| listed.contains(n)), "{listed:?}");
}

#[test]
fn namespaces_are_separate_from_each_other_and_the_host() {
    let pair = NetnsPair::create("nsiso").unwrap();
    // A loopback listener in B is invisible from A's loopback and from this process's.
    let listener = pair
        .within(Side::B, || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .unwrap()
        .unwrap();
    let local = listener.local_addr().unwrap();
    let refused = |e: std::io::Error| e.kind() == ErrorKind::ConnectionRefused;
    let from_a = pair
        .within(Side::A, || {
            TcpStream::connect_timeout(&local, Duration::from_secs(2))
        })
        .unwrap();
    assert!(from_a.is_err_and(refused));
    let from_host = TcpStream::connect_timeout(&local, Duration::from_secs(2));
    assert!(from_host.is_err_and(refused));
    // ... and visible from B.
    let from_b = pair
        .within(Side::B, || {
            TcpStream::connect_timeout(&local, Duration::from_secs(2))
        })
        .unwrap();
    assert!(from_b.is_ok());
}

#[test]
fn processes_run_inside_a_namespace() {
    let pair = NetnsPair::create("nsproc").unwrap();
    let out = pair
        .command(Side::B, "ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{}/24", pair.addr(Side::B))),
        "{text}"
    );
    assert!(!text.contains(&pair.addr(Side::A).to_string()), "{text}");

    // A prepared command, wrapped.
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "ip -4 -o addr show veth0; echo \"$MARK\""])
        .env("MARK", "carried");
    let out = pair.run_in(Side::A, &cmd).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains(&format!("{}/24", pair.addr(Side::A))),
        "{text}"
    );
    assert!(text.ends_with("carried\n"), "{text}");
}
