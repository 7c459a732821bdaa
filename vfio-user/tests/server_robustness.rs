//! The server loop against a hand-driven client: bad requests get error replies and the
//! loop goes on; only a broken stream ends it.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_NONE,
};
use vfio_user::proto::{
    Capabilities, Command, DeviceFeature, DeviceInfo as DeviceInfoMsg, DmaAccess, DmaMap, DmaUnmap,
    Header, IrqSet, MigData, MigDataReadRequest, RegionAccess, RegionInfoReply, RegionInfoRequest,
    RegionIoFdsRequest, Version, FLAGS_NO_REPLY,
};
use vfio_user::socket::{Channel, Message, SocketError};
use vfio_user::testing::Probe;
use vfio_user::{serve, ServerConfig, ServerError};

struct RawClient {
    channel: Channel,
    raw: UnixStream,
    next_id: u16,
}

impl RawClient {
    fn call(&mut self, command: u16, payload: &[u8], fds: &[OwnedFd]) -> Message {
        let id = self.next_id;
        self.next_id += 1;
        let h = Header {
            msg_id: id,
            command,
            msg_size: 16 + payload.len() as u32,
            flags: 0,
            error: 0,
        };
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        self.channel
            .send(&h, payload, &borrowed, deadline(5))
            .unwrap();
        let reply = self.channel.recv(LIMITS, deadline(5)).expect("reply");
        assert!(reply.header.is_reply());
        assert_eq!((reply.header.msg_id, reply.header.command), (id, command));
        reply
    }

    fn errno(&mut self, command: u16, payload: &[u8], fds: &[OwnedFd]) -> u32 {
        let reply = self.call(command, payload, fds);
        assert!(reply.header.is_error(), "command {command} succeeded");
        assert!(reply.payload.is_empty());
        reply.header.error
    }

    fn negotiate(&mut self) {
        let v = Version {
            major: 0,
            minor: 0,
            capabilities: Some(Capabilities {
                max_msg_fds: Some(8),
                ..Capabilities::default()
            }),
        };
        let reply = self.call(Command::Version as u16, &v.to_bytes(), &[]);
        assert!(!reply.header.is_error());
        let v = Version::parse(&reply.payload).unwrap();
        assert_eq!((v.major, v.minor), (0, 0));
        assert_eq!(v.capabilities.unwrap().max_msg_fds, Some(16));
    }
}

/// A hand-driven client of the crate's server with the test device; the device's probe
/// and the server thread.
fn start(config: ServerConfig) -> (RawClient, Probe, JoinHandle<Result<(), ServerError>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let mut dev = test_device();
    let probe = dev.probe();
    let server = thread::spawn(move || serve(b, &mut dev, &config));
    let raw = a.try_clone().unwrap();
    let client = RawClient {
        channel: Channel::new(a),
        raw,
        next_id: 1,
    };
    (client, probe, server)
}

fn device_info_request() -> Vec<u8> {
    DeviceInfoMsg {
        argsz: 16,
        flags: 0,
        num_regions: 0,
        num_irqs: 0,
    }
    .to_bytes()
}

const EINVAL: u32 = libc::EINVAL as u32;
const ENOTSUP: u32 = libc::ENOTSUP as u32;

#[test]
fn bad_requests_get_error_replies_and_the_loop_goes_on() {
    let (mut c, probe, server) = start(ServerConfig::default());

    // Before negotiation only VERSION is accepted; a bad proposal is refused.
    assert_eq!(
        c.errno(Command::DeviceGetInfo as u16, &device_info_request(), &[]),
        EINVAL
    );
    assert_eq!(
        c.errno(Command::Version as u16, &[0, 0, 0, 0, b'{'], &[]),
        EINVAL
    );
    c.negotiate();
    assert_eq!(c.errno(Command::Version as u16, &[0; 4], &[]), EINVAL);

    let cases: Vec<(u16, Vec<u8>, u32)> = vec![
        (0, vec![], ENOTSUP),
        (99, vec![1, 2, 3], ENOTSUP),
        (Command::DeviceGetInfo as u16, vec![0; 3], EINVAL),
        (Command::DeviceGetRegionInfo as u16, vec![0; 31], EINVAL),
        (Command::DeviceGetIrqInfo as u16, vec![0; 17], EINVAL),
        (Command::DmaMap as u16, vec![0; 32], EINVAL),
        (Command::DmaUnmap as u16, vec![0; 24], EINVAL),
        (Command::DeviceSetIrqs as u16, vec![0; 20], EINVAL),
        (Command::RegionRead as u16, vec![0xff; 16], EINVAL),
        (Command::RegionWrite as u16, vec![0; 15], EINVAL),
        (Command::DeviceReset as u16, vec![0], EINVAL),
        (
            Command::DmaRead as u16,
            DmaAccess {
                address: 0,
                count: 1,
            }
            .to_bytes(),
            EINVAL,
        ),
        (Command::DmaWrite as u16, vec![0; 16], EINVAL),
        (Command::DirtyPages as u16, vec![0; 8], ENOTSUP),
        (Command::RegionWriteMulti as u16, vec![0; 8], ENOTSUP),
        (
            Command::DeviceGetRegionIoFds as u16,
            RegionIoFdsRequest {
                argsz: 16,
                index: 0,
            }
            .to_bytes(),
            ENOTSUP,
        ),
        (
            Command::DeviceFeature as u16,
            DeviceFeature {
                argsz: 16,
                flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
                data: vec![],
            }
            .to_bytes()
            .unwrap(),
            ENOTSUP,
        ),
        (
            Command::MigDataRead as u16,
            MigDataReadRequest { size: 64 }.to_bytes(),
            ENOTSUP,
        ),
        (
            Command::MigDataWrite as u16,
            MigData { data: vec![1; 8] }.to_bytes().unwrap(),
            ENOTSUP,
        ),
        (
            Command::RegionRead as u16,
            RegionAccess {
                offset: 0,
                region: 2,
                count: (1 << 20) + 1,
            }
            .to_bytes(),
            libc::E2BIG as u32,
        ),
    ];
    for (command, payload, errno) in cases {
        assert_eq!(c.errno(command, &payload, &[]), errno, "command {command}");
    }

    // Descriptors that do not fit the command.
    let map = DmaMap {
        readable: true,
        writable: true,
        offset: 0,
        iova: 0,
        size: 0x1000,
    }
    .to_bytes();
    let two = vec![memfd(0x1000).unwrap(), memfd(0x1000).unwrap()];
    assert_eq!(c.errno(Command::DmaMap as u16, &map, &two), EINVAL);
    let trigger = IrqSet {
        flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        index: 2,
        start: 0,
        count: 1,
        data: vec![],
    }
    .to_bytes()
    .unwrap();
    assert_eq!(
        c.errno(
            Command::DeviceSetIrqs as u16,
            &trigger,
            &[eventfd().unwrap()]
        ),
        EINVAL
    );
    // Unexpected descriptors with a command that takes none are just closed.
    let info = c.call(
        Command::DeviceGetInfo as u16,
        &device_info_request(),
        &[eventfd().unwrap()],
    );
    assert!(!info.header.is_error());
    // More than the server's 16 per message: refused, stream still in step.
    let many: Vec<_> = (0..20).map(|_| eventfd().unwrap()).collect();
    assert_eq!(
        c.errno(Command::DeviceGetInfo as u16, &device_info_request(), &many),
        EINVAL
    );
    assert_eq!(probe.lock().dma_maps.len(), 0);

    // Still serving.
    let info = c.call(Command::DeviceGetInfo as u16, &device_info_request(), &[]);
    assert_eq!(DeviceInfoMsg::parse(&info.payload).unwrap().num_regions, 9);
    let unmap = DmaUnmap {
        argsz: 24,
        flags: 0,
        iova: 0,
        size: 0x1000,
    };
    assert_eq!(
        c.errno(Command::DmaUnmap as u16, &unmap.to_bytes(), &[]),
        libc::ENOENT as u32
    );

    drop(c);
    server.join().unwrap().expect("clean end");
    assert_eq!(probe.lock().disconnects, 1);
}

#[test]
fn small_argsz_gets_a_truncated_region_info() {
    let (mut c, _, _server) = start(ServerConfig::default());
    c.negotiate();
    let q = RegionInfoRequest {
        argsz: 32,
        index: MEM_REGION,
    };
    let reply = c.call(Command::DeviceGetRegionInfo as u16, &q.to_bytes(), &[]);
    assert_eq!(reply.payload.len(), 32);
    let r = RegionInfoReply::parse(&reply.payload).unwrap();
    assert_eq!(r.argsz, 32 + 16 + 16);
    assert!(r.sparse_areas.is_empty());
}

#[test]
fn no_reply_commands_get_no_reply() {
    let (mut c, probe, _server) = start(ServerConfig::default());
    c.negotiate();
    let quiet = Header {
        flags: FLAGS_NO_REPLY,
        ..Header::command(500, Command::DeviceReset, 0).unwrap()
    };
    c.channel.send(&quiet, &[], &[], deadline(5)).unwrap();
    let reply = c.call(Command::DeviceGetInfo as u16, &device_info_request(), &[]);
    assert!(!reply.header.is_error());
    assert_eq!(probe.lock().resets, 1);
}

#[test]
fn oversized_message_is_refused_and_ends_the_connection() {
    let (mut c, _, server) = start(ServerConfig::default());
    c.negotiate();
    let h = Header::command(9, Command::RegionWrite, 64 << 20).unwrap();
    use std::io::Write;
    c.raw.write_all(&h.to_bytes()).unwrap();
    let reply = c.channel.recv(LIMITS, deadline(5)).unwrap();
    assert_eq!(reply.header.msg_id, 9);
    assert_eq!(reply.header.error, libc::E2BIG as u32);
    assert!(matches!(
        server.join().unwrap(),
        Err(ServerError::Socket(SocketError::MessageTooLarge { .. }))
    ));
}

#[test]
fn another_major_version_is_refused_and_ends_the_connection() {
    let (mut c, _, server) = start(ServerConfig::default());
    let v = Version {
        major: 1,
        minor: 0,
        capabilities: None,
    };
    assert_eq!(
        c.errno(Command::Version as u16, &v.to_bytes(), &[]),
        ENOTSUP
    );
    assert!(matches!(
        server.join().unwrap(),
        Err(ServerError::Negotiation(_))
    ));
}

#[test]
fn half_a_message_times_out() {
    let config = ServerConfig {
        message_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let (mut c, _, server) = start(config);
    c.negotiate();
    use std::io::Write;
    c.raw.write_all(&[1, 2, 3]).unwrap();
    let start = Instant::now();
    assert!(matches!(
        server.join().unwrap(),
        Err(ServerError::Socket(SocketError::Timeout))
    ));
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn garbage_header_ends_the_connection() {
    let (mut c, probe, server) = start(ServerConfig::default());
    c.negotiate();
    use std::io::Write;
    c.raw.write_all(&[0xee; 16]).unwrap();
    assert!(matches!(
        server.join().unwrap(),
        Err(ServerError::Socket(SocketError::InvalidHeader(_)))
    ));
    assert_eq!(probe.lock().disconnects, 1);
}
