//! The client against hand-driven servers that misbehave: error replies, death in the
//! middle of a request, malformed replies, silence, and commands from the server. The
//! client must report a distinct error quickly, never hang or panic, and fail fast once
//! broken.

mod common;

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use vfio_bindings::bindings::vfio::{
    VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED, VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
};
use vfio_user::proto::{
    Capabilities, Command, DeviceInfo as DeviceInfoMsg, DmaAccess, Header, RegionInfoReply,
    RegionInfoRequest, RegionType, Version, FLAGS_NO_REPLY,
};
use vfio_user::{Client, ClientError, SparseArea};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `script` as the server of a fresh client (with `timeout`) and returns the client.
fn with_fake<F>(timeout: Duration, script: F) -> (Client, thread::JoinHandle<()>)
where
    F: FnOnce(FakeServer) + Send + 'static,
{
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || script(FakeServer::handshake(b)));
    let client = Client::from_stream(a, timeout).expect("negotiate");
    (client, server)
}

fn device_info_reply() -> Vec<u8> {
    DeviceInfoMsg {
        argsz: 16,
        flags: 0,
        num_regions: 9,
        num_irqs: 5,
    }
    .to_bytes()
}

/// The next call fails at once with `Broken`.
fn assert_broken(client: &Client) {
    assert!(client.is_broken());
    let start = Instant::now();
    match client.device_info() {
        Err(ClientError::Broken { reason }) => assert!(!reason.is_empty()),
        other => panic!("expected Broken, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_millis(500));
}

#[test]
fn error_reply_is_remote_not_a_hang() {
    let (client, server) = with_fake(TIMEOUT, |s| {
        let req = s.recv();
        s.send_raw(&Header::error_reply(&req.header, libc::EPERM).to_bytes());
        let req = s.recv();
        s.reply(&req.header, &device_info_reply());
        // Error bit with errno 0 still is an error.
        let req = s.recv();
        s.send_raw(&Header::error_reply(&req.header, 0).to_bytes());
    });
    let start = Instant::now();
    match client.reset() {
        Err(ClientError::Remote { command, errno }) => {
            assert_eq!((command, errno), (Command::DeviceReset, libc::EPERM))
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(!client.is_broken());
    assert_eq!(client.device_info().unwrap().num_irqs, 5);
    assert!(matches!(
        client.reset(),
        Err(ClientError::Remote { errno: 0, .. })
    ));
    server.join().unwrap();
}

#[test]
fn server_dying_mid_request_is_a_quick_disconnect() {
    let (client, server) = with_fake(TIMEOUT, |s| {
        let _request = s.recv();
        // Dies without answering.
    });
    let start = Instant::now();
    match client.device_info() {
        Err(ClientError::Disconnected { command }) => assert_eq!(command, Command::DeviceGetInfo),
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    server.join().unwrap();
    assert_broken(&client);
}

#[test]
fn server_dying_mid_reply_is_a_disconnect() {
    let (client, server) = with_fake(TIMEOUT, |s| {
        let req = s.recv();
        let h = Header::reply(&req.header, 16).unwrap();
        s.send_raw(&h.to_bytes());
        s.send_raw(&[0u8; 5]);
    });
    assert!(matches!(
        client.device_info(),
        Err(ClientError::Disconnected { .. })
    ));
    server.join().unwrap();
}

#[test]
fn silent_server_times_out_within_the_timeout() {
    let timeout = Duration::from_millis(300);
    let (client, server) = with_fake(timeout, |s| {
        let _request = s.recv();
        // Silent until the client gives up and shuts the socket down.
        let _ = s.channel.recv(LIMITS, deadline(10));
    });
    let start = Instant::now();
    match client.reset() {
        Err(
            e @ ClientError::Timeout {
                command,
                timeout: t,
                waiting_for,
            },
        ) => {
            assert_eq!((command, t), (Command::DeviceReset, timeout));
            assert_eq!(waiting_for, "the reply");
            let text = e.to_string();
            assert!(text.contains("timed out after 300ms"), "{text}");
            assert!(!text.contains("os error"), "{text}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let waited = start.elapsed();
    assert!(waited >= timeout, "{waited:?}");
    assert!(waited < timeout + Duration::from_secs(2), "{waited:?}");
    assert_broken(&client);
    server.join().unwrap();
}

#[test]
fn malformed_replies_are_protocol_errors() {
    type Script = fn(&FakeServer, &Header);
    let scripts: [(&str, Script); 7] = [
        ("garbage bytes", |s, _| s.send_raw(&[0xff; 40])),
        ("payload of the wrong size", |s, h| s.reply(h, &[0; 8])),
        ("trailing bytes", |s, h| {
            s.reply(h, &[device_info_reply(), vec![0]].concat())
        }),
        ("wrong message id", |s, h| {
            let other = Header {
                msg_id: h.msg_id.wrapping_add(1),
                ..*h
            };
            s.reply(&other, &device_info_reply())
        }),
        ("wrong command", |s, h| {
            let other = Header {
                command: Command::DeviceReset as u16,
                ..*h
            };
            s.reply(&other, &device_info_reply())
        }),
        ("message too large", |s, h| {
            let huge = Header {
                msg_size: 512 << 20,
                ..Header::reply(h, 0).unwrap()
            };
            s.send_raw(&huge.to_bytes())
        }),
        ("size smaller than a header", |s, h| {
            let tiny = Header {
                msg_size: 8,
                ..Header::reply(h, 0).unwrap()
            };
            s.send_raw(&tiny.to_bytes())
        }),
    ];
    for (name, script) in scripts {
        let (client, server) = with_fake(TIMEOUT, move |s| {
            let req = s.recv();
            script(&s, &req.header);
            // Keep the socket open until the client gives up: it must not need EOF.
            let _ = s.channel.recv(LIMITS, deadline(10));
        });
        let start = Instant::now();
        match client.device_info() {
            Err(ClientError::Protocol { command, reason }) => {
                assert_eq!(command, Command::DeviceGetInfo, "{name}");
                assert!(!reason.is_empty());
            }
            other => panic!("{name}: unexpected {other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(2), "{name}");
        assert_broken(&client);
        server.join().unwrap();
    }
}

#[test]
fn region_info_with_two_fds_is_a_protocol_error() {
    let (client, server) = with_fake(TIMEOUT, |s| {
        let req = s.recv();
        let reply = RegionInfoReply {
            argsz: 0,
            flags: 0,
            index: 0,
            size: 0x1000,
            offset: 0,
            sparse_areas: vec![],
            region_type: None,
        }
        .to_bytes()
        .unwrap();
        let (a, b) = (memfd(4096).unwrap(), memfd(4096).unwrap());
        let h = Header::reply(&req.header, reply.len()).unwrap();
        s.channel
            .send(&h, &reply, &[a.as_fd(), b.as_fd()], deadline(5))
            .unwrap();
    });
    assert!(matches!(
        client.region_info(0),
        Err(ClientError::Protocol { .. })
    ));
    server.join().unwrap();
}

#[test]
fn region_info_with_one_fd_per_sparse_area_is_accepted() {
    // libvfio-user passes the region's descriptor once per sparse area.
    let (client, server) = with_fake(TIMEOUT, |s| {
        let req = s.recv();
        let reply = RegionInfoReply {
            argsz: 0,
            flags: 7,
            index: 2,
            size: 0x3000,
            offset: 0,
            sparse_areas: vec![
                SparseArea {
                    offset: 0,
                    size: 0x1000,
                },
                SparseArea {
                    offset: 0x2000,
                    size: 0x1000,
                },
            ],
            region_type: None,
        }
        .to_bytes()
        .unwrap();
        let file = memfd(0x3000).unwrap();
        let view = Mapping::new(file.as_fd(), 0, 0x3000).unwrap();
        assert!(view.write(0x2000, b"area two"));
        let h = Header::reply(&req.header, reply.len()).unwrap();
        s.channel
            .send(&h, &reply, &[file.as_fd(), file.as_fd()], deadline(5))
            .unwrap();
        // Wait for the client to go away.
        let _ = s.channel.recv(LIMITS, deadline(5));
    });
    let info = client.region_info(2).unwrap();
    assert_eq!(info.sparse_areas.len(), 2);
    let map = Mapping::new(info.fd.unwrap().as_fd(), 0x2000, 0x1000).unwrap();
    let mut seen = [0u8; 8];
    assert!(map.read(0, &mut seen));
    assert_eq!(&seen, b"area two");
    drop(client);
    server.join().unwrap();
}

#[test]
fn a_v1_migration_region_is_found_by_its_type_capability() {
    // libvfio-user 0.1's migration region: the type capability, then the sparse areas,
    // one descriptor per area.
    let (client, server) = with_fake(TIMEOUT, |s| {
        let req = s.recv();
        let reply = RegionInfoReply {
            argsz: 0,
            flags: 7,
            index: 9,
            size: 0x3000,
            offset: 0,
            sparse_areas: vec![SparseArea {
                offset: 0x1000,
                size: 0x2000,
            }],
            region_type: Some(RegionType {
                type_: VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
                subtype: VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED,
            }),
        }
        .to_bytes()
        .unwrap();
        let file = memfd(0x3000).unwrap();
        let h = Header::reply(&req.header, reply.len()).unwrap();
        s.channel
            .send(&h, &reply, &[file.as_fd()], deadline(5))
            .unwrap();
        let req = s.recv();
        let plain = RegionInfoReply {
            argsz: 0,
            flags: 3,
            index: 0,
            size: 0x100,
            offset: 0,
            sparse_areas: vec![],
            region_type: None,
        };
        s.reply(&req.header, &plain.to_bytes().unwrap());
    });
    let (info, kind) = client.region_info_with_type(9).unwrap();
    assert_eq!(
        kind,
        Some(RegionType {
            type_: 3,
            subtype: 1
        })
    );
    assert_eq!(info.sparse_areas.len(), 1);
    assert!(info.fd.is_some());
    assert_eq!(client.region_info_with_type(0).unwrap().1, None);
    server.join().unwrap();
}

#[test]
fn truncated_region_info_is_asked_again_with_the_size_needed() {
    let areas: Vec<SparseArea> = (0..40)
        .map(|i| SparseArea {
            offset: i * 0x1000,
            size: 0x800,
        })
        .collect();
    let expected = areas.clone();
    let (client, server) = with_fake(TIMEOUT, move |s| {
        let reply = RegionInfoReply {
            argsz: 0,
            flags: 0,
            index: 3,
            size: 0x40000,
            offset: 0x1000,
            sparse_areas: areas,
            region_type: None,
        };
        for _ in 0..2 {
            let req = s.recv();
            let q = RegionInfoRequest::parse(&req.payload).unwrap();
            // Padded to the command's argsz when truncated, as libvfio-user does.
            let mut bytes = reply.to_bytes_within(q.argsz).unwrap();
            if bytes.len() < q.argsz as usize {
                bytes.resize(q.argsz as usize, 0);
            }
            s.reply(&req.header, &bytes);
        }
    });
    let info = client.region_info(3).unwrap();
    assert_eq!(info.sparse_areas, expected);
    assert_eq!(info.offset, 0x1000);
    server.join().unwrap();
}

#[test]
fn server_commands_are_refused_without_losing_the_reply() {
    let (client, server) = with_fake(TIMEOUT, |s| {
        let req = s.recv();
        // A DMA read from the server, then one that wants no reply.
        let dma = DmaAccess {
            address: 0x1000,
            count: 8,
        }
        .to_bytes();
        let h = Header::command(77, Command::DmaRead, dma.len()).unwrap();
        s.channel.send(&h, &dma, &[], deadline(5)).unwrap();
        let answer = s.recv();
        assert!(answer.header.is_reply() && answer.header.is_error());
        assert_eq!(answer.header.msg_id, 77);
        assert_eq!(answer.header.error, libc::ENOTSUP as u32);
        let quiet = Header {
            flags: FLAGS_NO_REPLY,
            ..Header::command(78, Command::DmaWrite, 0).unwrap()
        };
        s.channel.send(&quiet, &[], &[], deadline(5)).unwrap();
        s.reply(&req.header, &device_info_reply());
        // The next message is the client's next command, not a reply to 78.
        let next = s.recv();
        assert_eq!(next.header.command, Command::DeviceReset as u16);
        s.reply(&next.header, &[]);
    });
    assert_eq!(client.device_info().unwrap().num_regions, 9);
    client.reset().unwrap();
    server.join().unwrap();
}

/// Runs a handshake against a server that answers the proposal with `major.minor` and the
/// capability text `json` (passing `fds` along); returns the proposal and the outcome.
fn handshake_with(
    major: u16,
    minor: u16,
    json: &str,
    fds: Vec<std::os::fd::OwnedFd>,
) -> (Version, Result<Client, ClientError>) {
    let (a, b) = UnixStream::pair().unwrap();
    let json = json.to_string();
    let server = thread::spawn(move || {
        let ch = vfio_user::socket::Channel::new(b);
        let req = ch.recv(LIMITS, deadline(5)).unwrap();
        let mut v = Vec::new();
        v.extend_from_slice(&major.to_ne_bytes());
        v.extend_from_slice(&minor.to_ne_bytes());
        v.extend_from_slice(json.as_bytes());
        v.push(0);
        let h = Header::reply(&req.header, v.len()).unwrap();
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        ch.send(&h, &v, &borrowed, deadline(5)).unwrap();
        // Serve one reset, if the client survived the handshake.
        if let Ok(req) = ch.recv(LIMITS, deadline(5)) {
            let h = Header::reply(&req.header, 0).unwrap();
            ch.send(&h, &[], &[], deadline(5)).unwrap();
        }
        Version::parse(&req.payload).unwrap()
    });
    let client = Client::from_stream(a, TIMEOUT);
    if let Ok(c) = &client {
        c.reset().unwrap();
    }
    (server.join().unwrap(), client)
}

#[test]
fn the_client_proposes_minor_1_and_takes_a_lower_minor() {
    // libvfio-user's reply to a 0.0 client, with members this client does not know.
    let json = r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,
        "migration":{"pgsize":4096,"future":{"a":[1]}},"write_multiple":true,
        "twin_socket":{"supported":false},"vendor_thing":{"x":{"y":null}}}}"#;
    let (proposal, client) = handshake_with(0, 0, json, Vec::new());
    assert_eq!((proposal.major, proposal.minor), (0, 1));
    let caps = proposal.capabilities.unwrap();
    assert_eq!(
        caps.twin_socket, None,
        "twin-socket mode must not be offered"
    );
    let client = client.expect("a lower minor and unknown members are accepted");
    assert_eq!(client.negotiated().minor, 0);
    assert_eq!(client.negotiated().max_msg_fds, 8);

    let (_, client) = handshake_with(0, 1, r#"{"capabilities":{}}"#, Vec::new());
    assert_eq!(client.unwrap().negotiated().minor, 1);
}

#[test]
fn a_higher_minor_or_an_unoffered_twin_socket_fails_negotiation() {
    let (_, client) = handshake_with(0, 2, "{}", Vec::new());
    match client {
        Err(ClientError::Negotiation(reason)) => assert!(reason.contains("minor"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    let json = r#"{"capabilities":{"twin_socket":{"supported":true,"fd_index":0}}}"#;
    let (theirs, _ours) = UnixStream::pair().unwrap();
    let (_, client) = handshake_with(0, 1, json, vec![theirs.into()]);
    match client {
        Err(ClientError::Negotiation(reason)) => {
            assert!(reason.contains("twin-socket"), "{reason}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn negotiation_failures() {
    // Another major version.
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let ch = vfio_user::socket::Channel::new(b);
        let req = ch.recv(LIMITS, deadline(5)).unwrap();
        let v = Version {
            major: 1,
            minor: 0,
            capabilities: Some(Capabilities::default()),
        }
        .to_bytes();
        let h = Header::reply(&req.header, v.len()).unwrap();
        ch.send(&h, &v, &[], deadline(5)).unwrap();
    });
    assert!(matches!(
        Client::from_stream(a, TIMEOUT),
        Err(ClientError::Negotiation(_))
    ));
    server.join().unwrap();

    // Server closes instead of answering.
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let ch = vfio_user::socket::Channel::new(b);
        let _ = ch.recv(LIMITS, deadline(5)).unwrap();
    });
    assert!(matches!(
        Client::from_stream(a, TIMEOUT),
        Err(ClientError::Disconnected {
            command: Command::Version
        })
    ));
    server.join().unwrap();

    // Server refuses the version.
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let ch = vfio_user::socket::Channel::new(b);
        let req = ch.recv(LIMITS, deadline(5)).unwrap();
        let h = Header::error_reply(&req.header, libc::ENOTSUP);
        ch.send(&h, &[], &[], deadline(5)).unwrap();
    });
    assert!(matches!(
        Client::from_stream(a, TIMEOUT),
        Err(ClientError::Remote {
            command: Command::Version,
            errno: libc::ENOTSUP
        })
    ));
    server.join().unwrap();

    // Server never answers.
    let (a, b) = UnixStream::pair().unwrap();
    let start = Instant::now();
    assert!(matches!(
        Client::from_stream(a, Duration::from_millis(200)),
        Err(ClientError::Timeout { .. })
    ));
    assert!(start.elapsed() < Duration::from_secs(2));
    drop(b);
}

#[test]
fn posted_write_carries_no_reply_and_a_server_dying_after_it_fails_the_next_call() {
    let (client, server) = with_fake(TIMEOUT, |s| {
        let req = s.recv();
        assert_eq!(req.header.command, Command::RegionWrite as u16);
        assert_ne!(req.header.flags & FLAGS_NO_REPLY, 0, "{:?}", req.header);
        // Takes the write in, then dies without a word.
    });
    client.region_write_posted(0, 0x10, &[1, 2, 3, 4]).unwrap();
    server.join().unwrap();
    let start = Instant::now();
    match client.device_info() {
        Err(ClientError::Disconnected { command }) => assert_eq!(command, Command::DeviceGetInfo),
        other => panic!("unexpected {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_broken(&client);
}

#[test]
fn posted_writes_to_a_server_that_stops_reading_time_out() {
    let timeout = Duration::from_millis(300);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (client, server) = with_fake(timeout, move |s| {
        // Alive but not reading: the socket's buffer fills up.
        let _ = rx.recv();
        drop(s);
    });
    let start = Instant::now();
    let data = vec![0u8; 64 << 10];
    let err = loop {
        if let Err(e) = client.region_write_posted(0, 0, &data) {
            break e;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never blocked");
    };
    assert!(
        matches!(
            err,
            ClientError::Timeout {
                waiting_for: "the server to take the request",
                ..
            }
        ),
        "{err:?}"
    );
    match client.device_info() {
        Err(ClientError::Broken { reason }) => {
            assert!(reason.contains("timed out"), "{reason}");
            assert!(!reason.contains("os error 11"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    tx.send(()).unwrap();
    server.join().unwrap();
    assert_broken(&client);
}

/// Every cause is printed once when the chain is walked (`{:#}` at the binary's edge):
/// messages embed their cause, so none is also a `source()`.
#[test]
fn error_messages_carry_their_cause_once() {
    use std::error::Error;
    use vfio_user::socket::SocketError;
    fn chain(e: &dyn Error) -> String {
        let mut out = e.to_string();
        let mut next = e.source();
        while let Some(cause) = next {
            out.push_str(": ");
            out.push_str(&cause.to_string());
            next = cause.source();
        }
        out
    }
    let io = || std::io::Error::from_raw_os_error(libc::EBADF);
    let errors: Vec<Box<dyn Error>> = vec![
        Box::new(ClientError::Connect {
            path: "/run/vf.sock".into(),
            error: io(),
        }),
        Box::new(ClientError::Socket {
            command: Command::RegionRead,
            error: SocketError::Io {
                op: "recvmsg",
                error: io(),
            },
        }),
        Box::new(ClientError::Reader { error: io() }),
        Box::new(vfio_user::ServerError::Socket(SocketError::Io {
            op: "poll",
            error: io(),
        })),
        Box::new(vfio_user::ServerError::Accept(io())),
    ];
    let cause = io().to_string();
    for e in errors {
        let text = chain(e.as_ref());
        assert_eq!(text.matches(&cause).count(), 1, "{text}");
    }
    // The socket failure's own words appear once too.
    let nested = ClientError::Socket {
        command: Command::RegionRead,
        error: SocketError::Io {
            op: "recvmsg",
            error: io(),
        },
    };
    assert_eq!(chain(&nested).matches("recvmsg failed").count(), 1);
}
