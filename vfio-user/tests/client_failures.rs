//! The client against servers that misbehave: error replies, death in the middle of a
//! request, malformed replies, silence, and commands from the server. The client must
//! report a distinct error quickly, never hang or panic, and fail fast once broken. The
//! servers are the crate's fake device with scripted faults.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{
    VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED, VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
};
use vfio_user::proto::{
    Capabilities, Command, Header, RegionInfoRequest, RegionType, Version, FLAGS_NO_REPLY,
};
use vfio_user::testing::{memfd, FakeDevice, FakeServer, Fault, Inject, Mapping, Region};
use vfio_user::{Client, ClientError, ServerConfig, SparseArea};

const TIMEOUT: Duration = Duration::from_secs(5);

/// The scripted servers' configuration: 4 KiB transfers, 4 descriptors.
fn small_config() -> ServerConfig {
    ServerConfig {
        max_data_xfer_size: 4096,
        max_msg_fds: 4,
        ..ServerConfig::default()
    }
}

/// A fresh client (with `timeout`) of `device` served with `faults`, and its server.
fn fake_device_with(
    device: FakeDevice,
    timeout: Duration,
    faults: impl IntoIterator<Item = Fault>,
) -> (Client, FakeServer) {
    let builder = FakeServer::builder(device).config(small_config()).record();
    let (ours, server) = faults
        .into_iter()
        .fold(builder, |b, f| b.fault(f))
        .pair()
        .unwrap();
    (
        Client::from_stream(ours, timeout).expect("negotiate"),
        server,
    )
}

/// [`fake_device_with`] a plain fake device.
fn with_faults(timeout: Duration, faults: impl IntoIterator<Item = Fault>) -> (Client, FakeServer) {
    fake_device_with(FakeDevice::builder().build().unwrap(), timeout, faults)
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
    let reset = || Fault::on(Command::DeviceReset);
    let (client, server) = with_faults(
        TIMEOUT,
        [
            reset().nth(0).error(libc::EPERM),
            // Error bit with errno 0 still is an error.
            reset().nth(1).error(0),
        ],
    );
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
    drop(client);
    server.finish(TIMEOUT).unwrap();
}

#[test]
fn server_dying_mid_request_is_a_quick_disconnect() {
    // Dies without answering.
    let (client, server) = with_faults(
        TIMEOUT,
        [Fault::on(Command::DeviceGetInfo).silent().then_close()],
    );
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
    server.finish(TIMEOUT).unwrap();
    assert_broken(&client);
}

#[test]
fn server_dying_mid_reply_is_a_disconnect() {
    // A header announcing 16 bytes, 5 of them, and the end.
    let half = Fault::on(Command::DeviceGetInfo)
        .raw(|h| {
            let mut bytes = Header::reply(h, 16).unwrap().to_bytes().to_vec();
            bytes.extend([0u8; 5]);
            bytes
        })
        .then_close();
    let (client, server) = with_faults(TIMEOUT, [half]);
    assert!(matches!(
        client.device_info(),
        Err(ClientError::Disconnected { .. })
    ));
    server.finish(TIMEOUT).unwrap();
}

#[test]
fn silent_server_times_out_within_the_timeout() {
    let timeout = Duration::from_millis(300);
    // Silent until the client gives up and shuts the socket down.
    let (client, server) = with_faults(timeout, [Fault::on(Command::DeviceReset).silent()]);
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
    server.finish(Duration::from_secs(10)).unwrap();
}

#[test]
fn malformed_replies_are_protocol_errors() {
    fn info() -> Fault {
        Fault::on(Command::DeviceGetInfo)
    }
    type MakeFault = fn() -> Fault;
    let faults: [(&str, MakeFault); 7] = [
        ("garbage bytes", || info().raw(|_| vec![0xff; 40])),
        ("payload of the wrong size", || info().reply(vec![0; 8])),
        ("trailing bytes", || {
            info().rewrite(|_, out| out.payload.push(0))
        }),
        ("wrong message id", || {
            info().rewrite(|_, out| out.header.msg_id = out.header.msg_id.wrapping_add(1))
        }),
        ("wrong command", || {
            info().rewrite(|_, out| out.header.command = Command::DeviceReset as u16)
        }),
        ("message too large", || {
            info().raw(|h| {
                let huge = Header {
                    msg_size: 512 << 20,
                    ..Header::reply(h, 0).unwrap()
                };
                huge.to_bytes().to_vec()
            })
        }),
        ("size smaller than a header", || {
            info().raw(|h| {
                let tiny = Header {
                    msg_size: 8,
                    ..Header::reply(h, 0).unwrap()
                };
                tiny.to_bytes().to_vec()
            })
        }),
    ];
    for (name, fault) in faults {
        // The server keeps the socket open until the client gives up: it must not need
        // EOF.
        let (client, server) = with_faults(TIMEOUT, [fault()]);
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
        server.finish(Duration::from_secs(10)).unwrap();
    }
}

#[test]
fn region_info_with_two_fds_is_a_protocol_error() {
    let device = FakeDevice::builder()
        .region(0, Region::new(0x1000).flags(0))
        .build()
        .unwrap();
    let two_fds = Fault::on_region_info(0).rewrite(|_, out| {
        out.fds = (0..2).filter_map(|_| memfd(4096).ok()).collect();
    });
    let (client, server) = fake_device_with(device, TIMEOUT, [two_fds]);
    assert!(matches!(
        client.region_info(0),
        Err(ClientError::Protocol { .. })
    ));
    drop(client);
    server.finish(TIMEOUT).unwrap();
}

#[test]
fn region_info_with_one_fd_per_sparse_area_is_accepted() {
    // libvfio-user passes the region's descriptor once per sparse area.
    let region = Region::memory(0x3000)
        .sparse(SparseArea {
            offset: 0,
            size: 0x1000,
        })
        .sparse(SparseArea {
            offset: 0x2000,
            size: 0x1000,
        })
        .contents(0x2000, b"area two");
    let device = FakeDevice::builder().region(2, region).build().unwrap();
    let fd_per_area = Fault::on_region_info(2).rewrite(|_, out| {
        let copy = out.fds.first().and_then(|fd| fd.try_clone().ok());
        out.fds.extend(copy);
    });
    let (client, server) = fake_device_with(device, TIMEOUT, [fd_per_area]);
    let info = client.region_info(2).unwrap();
    assert_eq!(info.flags & 7, 7);
    assert_eq!(info.sparse_areas.len(), 2);
    let map = Mapping::new(info.fd.unwrap().as_fd(), 0x2000, 0x1000).unwrap();
    let mut seen = [0u8; 8];
    assert!(map.read(0, &mut seen));
    assert_eq!(&seen, b"area two");
    drop(client);
    server.finish(TIMEOUT).unwrap();
}

#[test]
fn a_v1_migration_region_is_found_by_its_type_capability() {
    // libvfio-user 0.1's migration region: the type capability, then the sparse areas,
    // one descriptor per area.
    let migration_region = Region::memory(0x3000).sparse(SparseArea {
        offset: 0x1000,
        size: 0x2000,
    });
    let device = FakeDevice::builder()
        .region(9, migration_region)
        .region(0, Region::new(0x100))
        .build()
        .unwrap();
    let typed = Fault::on_region_info(9).region_type(
        VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
        VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED,
    );
    let (client, server) = fake_device_with(device, TIMEOUT, [typed]);
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
    drop(client);
    server.finish(TIMEOUT).unwrap();
}

#[test]
fn truncated_region_info_is_asked_again_with_the_size_needed() {
    let areas: Vec<SparseArea> = (0..40)
        .map(|i| SparseArea {
            offset: i * 0x1000,
            size: 0x800,
        })
        .collect();
    let region = areas
        .iter()
        .fold(Region::new(0x40000).flags(0).offset(0x1000), |r, a| {
            r.sparse(*a)
        });
    let device = FakeDevice::builder().region(3, region).build().unwrap();
    // Padded to the command's argsz when truncated, as libvfio-user does.
    let padded = Fault::on_region_info(3).rewrite(|request, out| {
        if let Ok(q) = RegionInfoRequest::parse(&request.payload) {
            if out.payload.len() < q.argsz as usize {
                out.payload.resize(q.argsz as usize, 0);
            }
        }
    });
    let (client, server) = fake_device_with(device, TIMEOUT, [padded]);
    let info = client.region_info(3).unwrap();
    assert_eq!(info.sparse_areas, areas);
    assert_eq!(info.offset, 0x1000);
    drop(client);
    server.finish(TIMEOUT).unwrap();
    assert_eq!(
        server.sequence(),
        ["Version", "DeviceGetRegionInfo", "DeviceGetRegionInfo"]
    );
}

#[test]
fn server_commands_are_refused_without_losing_the_reply() {
    // A DMA read from the server, then one that wants no reply, before the reply.
    let quiet = Header {
        flags: FLAGS_NO_REPLY,
        ..Header::command(78, Command::DmaWrite, 0).unwrap()
    };
    let commands = Fault::on(Command::DeviceGetInfo).before([
        Inject::dma_read(77, 0x1000, 8),
        Inject::message(quiet, vec![]),
    ]);
    let (client, server) = with_faults(TIMEOUT, [commands]);
    assert_eq!(client.device_info().unwrap().num_regions, 9);
    client.reset().unwrap();
    drop(client);
    server.finish(TIMEOUT).unwrap();
    let answer = server.reply_to(77).expect("an answer");
    assert!(answer.header.is_reply() && answer.header.is_error());
    assert_eq!(answer.header.msg_id, 77);
    assert_eq!(answer.header.error, libc::ENOTSUP as u32);
    // The next message is the client's next command, not a reply to 78.
    assert_eq!(
        server.sequence(),
        ["Version", "DeviceGetInfo", "reply 77", "DeviceReset"]
    );
}

/// Runs a handshake against a server that answers the proposal with `major.minor` and the
/// capability text `json` (passing `fds` along); returns the proposal and the outcome.
fn handshake_with(
    major: u16,
    minor: u16,
    json: &str,
    fds: Vec<std::os::fd::OwnedFd>,
) -> (Version, Result<Client, ClientError>) {
    let mut v = Vec::new();
    v.extend_from_slice(&major.to_ne_bytes());
    v.extend_from_slice(&minor.to_ne_bytes());
    v.extend_from_slice(json.as_bytes());
    v.push(0);
    let mut fds = Some(fds);
    // The device still negotiates (its own answer is dropped), so it serves the reset.
    let answer = Fault::on(Command::Version).rewrite(move |_, out| {
        out.payload = v.clone();
        out.fds = fds.take().unwrap_or_default();
    });
    let (ours, server) = FakeServer::builder(FakeDevice::builder().build().unwrap())
        .fault(answer)
        .pair()
        .unwrap();
    let client = Client::from_stream(ours, TIMEOUT);
    if let Ok(c) = &client {
        c.reset().unwrap();
    }
    let proposal = server.transcript()[0].payload.clone();
    (Version::parse(&proposal).unwrap(), client)
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

/// A client's handshake with a server whose answer to the proposal is `fault`'s.
fn negotiate_with(fault: Fault, timeout: Duration) -> Result<Client, ClientError> {
    let (ours, _server) = FakeServer::builder(FakeDevice::builder().build().unwrap())
        .fault(fault)
        .pair()
        .unwrap();
    Client::from_stream(ours, timeout)
}

#[test]
fn negotiation_failures() {
    let version = || Fault::on(Command::Version);
    // Another major version.
    let v = Version {
        major: 1,
        minor: 0,
        capabilities: Some(Capabilities::default()),
    };
    assert!(matches!(
        negotiate_with(version().reply(v.to_bytes()), TIMEOUT),
        Err(ClientError::Negotiation(_))
    ));

    // Server closes instead of answering.
    assert!(matches!(
        negotiate_with(version().silent().then_close(), TIMEOUT),
        Err(ClientError::Disconnected {
            command: Command::Version
        })
    ));

    // Server refuses the version.
    assert!(matches!(
        negotiate_with(version().error(libc::ENOTSUP), TIMEOUT),
        Err(ClientError::Remote {
            command: Command::Version,
            errno: libc::ENOTSUP
        })
    ));

    // Server never answers.
    let start = Instant::now();
    assert!(matches!(
        negotiate_with(version().silent(), Duration::from_millis(200)),
        Err(ClientError::Timeout { .. })
    ));
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn posted_write_carries_no_reply_and_a_server_dying_after_it_fails_the_next_call() {
    // Takes the write in, then dies without a word.
    let (client, server) = with_faults(
        TIMEOUT,
        [Fault::on(Command::RegionWrite).silent().then_close()],
    );
    client.region_write_posted(0, 0x10, &[1, 2, 3, 4]).unwrap();
    server.finish(TIMEOUT).unwrap();
    let write = &server.transcript()[1];
    assert_eq!(write.header.command, Command::RegionWrite as u16);
    assert_ne!(write.header.flags & FLAGS_NO_REPLY, 0, "{:?}", write.header);
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
    // Alive but not reading: the socket's buffer fills up.
    let (client, server) = with_faults(timeout, [Fault::on(Command::Version).then_stall()]);
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
    server.release();
    server.finish(TIMEOUT).unwrap();
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
