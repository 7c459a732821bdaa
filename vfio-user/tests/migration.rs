//! The migration messages across a real socket: the project's client against the
//! project's server with a device that migrates (device features, the v2 state machine,
//! migration data, DMA logging), against a device that does not (everything refused,
//! the connection lives on), against servers scripted to answer wrongly (protocol
//! errors, the client breaks), and random feature requests the server must survive.
//! The devices are the crate's fake device; the wrong answers are its faults.

mod common;

use std::time::Duration;

use common::*;
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_SET, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
};
use vfio_user::proto::{
    Command, DeviceFeature, DmaLoggingReport, FeatureMigDeviceState, FeatureMigration, Header,
    MigData,
};
use vfio_user::testing::{FakeDevice, FakeServer, Fault, Migration, Probe};
use vfio_user::{Client, ClientError, DmaLoggingRange, FeatureOp, MigState, ServerConfig};

const TIMEOUT: Duration = Duration::from_secs(5);
const FLAGS: u64 = (VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY) as u64;

/// A migrating device as these tests use it: pre-copy offered, single arcs only (any
/// other transition is `EINVAL`), DMA logging.
fn migrating_device() -> FakeDevice {
    FakeDevice::builder()
        .info(0, 9, 5)
        .migration(Migration::new(FLAGS).direct_arcs_only())
        .build()
        .unwrap()
}

/// A client of a [`migrating_device`] served with `max_xfer` on another thread.
fn connect(max_xfer: u32) -> (Client, Probe) {
    let config = ServerConfig {
        max_data_xfer_size: max_xfer,
        ..ServerConfig::default()
    };
    let (ours, server) = FakeServer::builder(migrating_device())
        .config(config)
        .pair()
        .unwrap();
    let probe = server.probe().clone();
    (Client::from_stream(ours, TIMEOUT).unwrap(), probe)
}

fn remote_errno(e: ClientError) -> i32 {
    match e {
        ClientError::Remote { errno, .. } => errno,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[test]
fn features_are_probed_and_read() {
    let (c, _) = connect(1 << 20);
    assert_eq!(c.migration_flags().unwrap(), FLAGS);
    for (feature, op, want) in [
        (VFIO_DEVICE_FEATURE_MIGRATION, FeatureOp::Get, true),
        (VFIO_DEVICE_FEATURE_MIGRATION, FeatureOp::Set, false),
        (VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, FeatureOp::Get, true),
        (VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, FeatureOp::Set, true),
        (VFIO_DEVICE_FEATURE_DMA_LOGGING_START, FeatureOp::Set, true),
        (VFIO_DEVICE_FEATURE_DMA_LOGGING_START, FeatureOp::Get, false),
        (VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, FeatureOp::Get, true),
        (3, FeatureOp::Get, false),
    ] {
        assert_eq!(
            c.probe_feature(feature, op).unwrap(),
            want,
            "{feature} {op:?}"
        );
    }
    assert!(!c.is_broken());
}

#[test]
fn the_state_machine_and_the_data_stream() {
    let (c, mig) = connect(4096);
    let saved: Vec<u8> = (0..10_000u32).map(|i| (i * 13) as u8).collect();
    mig.lock().migration.saved = saved.clone();
    assert_eq!(c.mig_state().unwrap(), MigState::Running);
    // Reading outside a saving state, an illegal arc: error replies, nothing changes.
    assert_eq!(remote_errno(c.mig_data_read(16).unwrap_err()), libc::EINVAL);
    assert_eq!(
        remote_errno(c.set_mig_state(MigState::StopCopy).unwrap_err()),
        libc::EINVAL
    );
    assert_eq!(c.mig_state().unwrap(), MigState::Running);
    c.set_mig_state(MigState::Stop).unwrap();
    c.set_mig_state(MigState::StopCopy).unwrap();
    assert_eq!(c.mig_state().unwrap(), MigState::StopCopy);
    let mut got = Vec::new();
    loop {
        let chunk = c.mig_data_read(4096).unwrap();
        if chunk.is_empty() {
            break;
        }
        got.extend(chunk);
    }
    assert_eq!(got, saved);
    // Over the transfer size, or nothing: refused before sending.
    assert!(matches!(
        c.mig_data_read(4097),
        Err(ClientError::InvalidArgument { .. })
    ));
    assert!(matches!(
        c.mig_data_read(0),
        Err(ClientError::InvalidArgument { .. })
    ));
    assert_eq!(
        remote_errno(c.set_mig_state(MigState::PreCopy).unwrap_err()),
        libc::EINVAL
    );
    c.set_mig_state(MigState::Stop).unwrap();
    c.set_mig_state(MigState::Resuming).unwrap();
    c.mig_data_write(&saved).unwrap();
    assert_eq!(
        mig.lock().migration.restored,
        saved,
        "split into 4 KiB messages"
    );
    c.set_mig_state(MigState::Stop).unwrap();
    assert_eq!(
        remote_errno(c.mig_data_write(b"x").unwrap_err()),
        libc::EINVAL
    );
    c.set_mig_state(MigState::Running).unwrap();
    assert!(!c.is_broken());
}

#[test]
fn dma_logging_reports_bitmaps_split_to_the_transfer_size() {
    let (c, mig) = connect(4096);
    assert_eq!(
        remote_errno(c.dma_logging_report(0, 0x1000, 4096).unwrap_err()),
        libc::EINVAL,
        "not started"
    );
    let ranges = [DmaLoggingRange {
        iova: 0x1000_0000,
        length: 1 << 30,
    }];
    assert_eq!(c.dma_logging_start(512, &ranges).unwrap(), 4096);
    assert_eq!(
        remote_errno(c.dma_logging_start(4096, &ranges).unwrap_err()),
        libc::EBUSY
    );
    let base = 0x1000_0000u64;
    let pages = [
        base,
        base + 0x5000,
        base + 0x800_0000,
        base + (1 << 30) - 4096,
    ];
    mig.lock().migration.dirty.as_mut().unwrap().extend(pages);
    // 1 GiB at 4 KiB is 32 KiB of bitmap: several requests of whole words.
    let bitmap = c.dma_logging_report(base, 1 << 30, 4096).unwrap();
    assert_eq!(bitmap.len(), (1 << 30) / 4096 / 64);
    let set: Vec<u64> = (0..bitmap.len() as u64 * 64)
        .filter(|n| bitmap[(n / 64) as usize] & (1 << (n % 64)) != 0)
        .map(|n| base + n * 4096)
        .collect();
    assert_eq!(set, pages);
    let (iova, length, _) = mig.lock().migration.last_report.unwrap();
    assert!(iova > base && length < 1 << 30, "the last piece");
    assert!(c
        .dma_logging_report(base, 1 << 30, 4096)
        .unwrap()
        .iter()
        .all(|w| *w == 0));
    // Bad arguments never reach the server.
    for r in [
        c.dma_logging_report(0, 0, 4096),
        c.dma_logging_report(u64::MAX, 2, 4096),
        c.dma_logging_report(0, 4096, 3000),
    ] {
        assert!(
            matches!(r, Err(ClientError::InvalidArgument { .. })),
            "{r:?}"
        );
    }
    c.dma_logging_stop().unwrap();
    c.dma_logging_stop().unwrap();
    assert!(!c.is_broken());
}

#[test]
fn a_report_too_large_for_one_transfer_is_refused_by_the_server() {
    let (ours, server) = FakeServer::builder(migrating_device()).pair().unwrap();
    let channel = vfio_user::socket::Channel::new(ours);
    let send = |id: u16, command: Command, payload: &[u8]| {
        let h = Header::command(id, command, payload.len()).unwrap();
        channel.send(&h, payload, &[], deadline(5)).unwrap();
        channel.recv(LIMITS, deadline(5)).unwrap()
    };
    let version = vfio_user::proto::Version {
        major: 0,
        minor: 0,
        capabilities: None,
    };
    send(0, Command::Version, &version.to_bytes());
    let start = DeviceFeature {
        argsz: 64,
        flags: VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        data: vfio_user::proto::DmaLoggingStart {
            page_size: 4096,
            ranges: vec![],
        }
        .to_bytes()
        .unwrap(),
    };
    assert!(!send(1, Command::DeviceFeature, &start.to_bytes().unwrap())
        .header
        .is_error());
    // 2^62 bytes at 1-byte pages: the bitmap would be 2^59 bytes. Refused before the
    // device is asked (it would have to allocate it).
    let huge = DeviceFeature {
        argsz: u32::MAX,
        flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
        data: DmaLoggingReport {
            iova: 0,
            length: 1 << 62,
            page_size: 1,
            bitmap: vec![],
        }
        .to_bytes(),
    };
    let r = send(2, Command::DeviceFeature, &huge.to_bytes().unwrap());
    assert!(r.header.is_error());
    assert_eq!(r.header.error, libc::E2BIG as u32);
    assert!(server.probe().lock().migration.last_report.is_none());
    // A reply that does not fit the request's argsz: E2BIG.
    let small = DeviceFeature {
        argsz: 8,
        flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
        data: vec![],
    };
    let r = send(3, Command::DeviceFeature, &small.to_bytes().unwrap());
    assert_eq!(r.header.error, libc::E2BIG as u32);
    // Data where the feature takes none, or GET of a SET-only feature: EINVAL.
    let odd = DeviceFeature {
        argsz: 64,
        flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
        data: vec![1, 2, 3],
    };
    let r = send(4, Command::DeviceFeature, &odd.to_bytes().unwrap());
    assert_eq!(r.header.error, libc::EINVAL as u32);
    let get_start = DeviceFeature {
        flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        ..start
    };
    let r = send(5, Command::DeviceFeature, &get_start.to_bytes().unwrap());
    assert_eq!(r.header.error, libc::EINVAL as u32);
    // The connection still works.
    let ok = DeviceFeature {
        argsz: 64,
        flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        data: vec![],
    };
    let r = send(6, Command::DeviceFeature, &ok.to_bytes().unwrap());
    assert!(!r.header.is_error());
    let reply = DeviceFeature::parse(&r.payload).unwrap();
    let state = FeatureMigDeviceState::parse(&reply.data).unwrap();
    assert_eq!(state.device_state, MigState::Running as u32);
}

#[test]
fn a_device_without_migration_refuses_everything_and_the_connection_lives() {
    let path = SocketPath::new("nomig");
    let _server = FakeServer::builder(test_device()).listen(&path.0).unwrap();
    let c = Client::connect(&path.0, TIMEOUT).unwrap();
    assert_eq!(
        remote_errno(c.migration_flags().unwrap_err()),
        libc::ENOTSUP
    );
    assert_eq!(remote_errno(c.mig_state().unwrap_err()), libc::ENOTSUP);
    assert_eq!(
        remote_errno(c.set_mig_state(MigState::Stop).unwrap_err()),
        libc::ENOTSUP
    );
    assert_eq!(remote_errno(c.mig_data_read(8).unwrap_err()), libc::ENOTSUP);
    assert_eq!(
        remote_errno(c.mig_data_write(b"x").unwrap_err()),
        libc::ENOTSUP
    );
    assert_eq!(
        remote_errno(c.dma_logging_start(4096, &[]).unwrap_err()),
        libc::ENOTSUP
    );
    assert_eq!(
        remote_errno(c.dma_logging_report(0, 4096, 4096).unwrap_err()),
        libc::ENOTSUP
    );
    assert!(!c
        .probe_feature(VFIO_DEVICE_FEATURE_MIGRATION, FeatureOp::Get)
        .unwrap());
    assert!(!c.is_broken());
    assert_eq!(c.device_info().unwrap().num_regions, 9);
}

/// The configuration of the scripted servers: 4 KiB transfers, 4 descriptors.
fn small_config() -> ServerConfig {
    ServerConfig {
        max_data_xfer_size: 4096,
        max_msg_fds: 4,
        ..ServerConfig::default()
    }
}

/// A client of a device without migration served with `faults`, and its server
/// (recording what the client sends).
fn with_faults(faults: impl IntoIterator<Item = Fault>) -> (Client, FakeServer) {
    let device = FakeDevice::builder().build().unwrap();
    let builder = FakeServer::builder(device).config(small_config()).record();
    let (ours, server) = faults
        .into_iter()
        .fold(builder, |b, f| b.fault(f))
        .pair()
        .unwrap();
    (
        Client::from_stream(ours, TIMEOUT).expect("negotiate"),
        server,
    )
}

/// A client whose server answers the first command after the handshake with `payload`.
fn answering(payload: Vec<u8>) -> Client {
    with_faults([Fault::any().nth(1).reply(payload)]).0
}

fn feature_reply(flags: u32, data: Vec<u8>) -> Vec<u8> {
    DeviceFeature {
        argsz: 8 + data.len() as u32,
        flags,
        data,
    }
    .to_bytes()
    .unwrap()
}

fn assert_protocol(r: Result<impl std::fmt::Debug, ClientError>, needle: &str, c: &Client) {
    match r {
        Err(ClientError::Protocol { reason, .. }) => {
            assert!(reason.contains(needle), "{reason:?} lacks {needle:?}")
        }
        other => panic!("expected a protocol error with {needle:?}, got {other:?}"),
    }
    assert!(c.is_broken());
}

#[test]
fn an_error_reply_to_a_migration_request_leaves_the_client_usable() {
    // A device that migrates with STOP_COPY only (flags 1); its first answer is an error.
    let device = FakeDevice::builder()
        .migration(Migration::new(VFIO_MIGRATION_STOP_COPY.into()))
        .build()
        .unwrap();
    let (ours, _server) = FakeServer::builder(device)
        .fault(Fault::on(Command::MigDataRead).error(libc::EBUSY))
        .pair()
        .unwrap();
    let c = Client::from_stream(ours, TIMEOUT).unwrap();
    assert_eq!(remote_errno(c.mig_data_read(8).unwrap_err()), libc::EBUSY);
    assert!(!c.is_broken());
    assert_eq!(c.migration_flags().unwrap(), 1);
}

/// A `MIG_DATA_READ` reply as libvfio-user sends it: `argsz` 8 + `got`, `size` `got`, and
/// the data zero-padded to the `asked` size.
fn padded_mig_data(got: &[u8], asked: usize) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(8 + got.len() as u32).to_ne_bytes());
    b.extend_from_slice(&(got.len() as u32).to_ne_bytes());
    b.extend_from_slice(got);
    b.resize(8 + asked, 0);
    b
}

#[test]
fn padded_mig_data_read_replies_are_accepted() {
    let read = || Fault::on(Command::MigDataRead);
    let (c, _server) = with_faults([
        read().nth(0).reply(padded_mig_data(b"state", 64)),
        // The end of the stream: nothing read, still padded.
        read().nth(1).reply(padded_mig_data(b"", 64)),
    ]);
    assert_eq!(c.mig_data_read(64).unwrap(), b"state");
    assert!(c.mig_data_read(64).unwrap().is_empty());
    c.reset().unwrap();
}

#[test]
fn mig_data_read_replies_with_lying_sizes_break_only_the_connection() {
    // `size` above what was asked.
    let mut b = padded_mig_data(&[1; 16], 16);
    b[4..8].copy_from_slice(&24u32.to_ne_bytes());
    let c = answering(b);
    assert_protocol(c.mig_data_read(16), "larger than the size requested", &c);
    // `size` beyond the payload.
    let mut b = padded_mig_data(&[1; 4], 4);
    b[4..8].copy_from_slice(&12u32.to_ne_bytes());
    let c = answering(b);
    assert_protocol(c.mig_data_read(16), "larger than the data present", &c);
    // Padding past the size asked.
    let c = answering(padded_mig_data(&[1; 4], 17));
    assert_protocol(c.mig_data_read(16), "trailing", &c);
}

#[test]
fn malformed_migration_replies_break_the_client() {
    let get_mig = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION;
    let get_state = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
    let set_state = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
    let report = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT;
    let state = |s: u32| {
        FeatureMigDeviceState {
            device_state: s,
            data_fd: 0,
        }
        .to_bytes()
    };
    // Flags that do not echo the request.
    let c = answering(feature_reply(get_state, state(2)));
    assert_protocol(c.migration_flags(), "flags", &c);
    // Migration flags without STOP_COPY.
    let c = answering(feature_reply(
        get_mig,
        FeatureMigration { flags: 4 }.to_bytes(),
    ));
    assert_protocol(c.migration_flags(), "STOP_COPY", &c);
    // An undefined state.
    let c = answering(feature_reply(get_state, state(9)));
    assert_protocol(c.mig_state(), "undefined", &c);
    // A successful SET that reports another state.
    let c = answering(feature_reply(set_state, state(2)));
    assert_protocol(
        c.set_mig_state(MigState::Stop),
        "after a successful move",
        &c,
    );
    // More migration data than asked.
    let c = answering(MigData { data: vec![0; 32] }.to_bytes().unwrap());
    assert_protocol(c.mig_data_read(16), "trailing", &c);
    // A migration data reply whose size field lies.
    let mut b = MigData { data: vec![0; 8] }.to_bytes().unwrap();
    b[4] = 9;
    let c = answering(b);
    assert_protocol(c.mig_data_read(16), "size", &c);
    // A bitmap of the wrong size, another range, bits beyond the range.
    let bad_reports: [(DmaLoggingReport, &str); 3] = [
        (
            DmaLoggingReport {
                iova: 0,
                length: 128 * 4096,
                page_size: 4096,
                bitmap: vec![1],
            },
            "size does not match",
        ),
        (
            DmaLoggingReport {
                iova: 0x1000,
                length: 64 * 4096,
                page_size: 4096,
                bitmap: vec![1],
            },
            "asked",
        ),
        (
            DmaLoggingReport {
                iova: 0,
                length: 10 * 4096,
                page_size: 4096,
                bitmap: vec![1 << 10],
            },
            "beyond",
        ),
    ];
    for (bad, needle) in bad_reports {
        let length = if needle == "beyond" {
            10 * 4096
        } else {
            64 * 4096
        };
        let c = answering(feature_reply(report, bad.to_bytes()));
        assert_protocol(c.dma_logging_report(0, length, 4096), needle, &c);
    }
    // Feature data on a reply to STOP, which has none.
    let stop = VFIO_DEVICE_FEATURE_SET
        | vfio_bindings::bindings::vfio::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP;
    let c = answering(feature_reply(stop, vec![0; 8]));
    assert_protocol(c.dma_logging_stop(), "at most 0", &c);
}

/// Random and mutated `DEVICE_FEATURE`, `MIG_DATA_READ` and `MIG_DATA_WRITE` payloads
/// through a real server with a migrating device: every one is answered and the
/// server never panics.
#[test]
fn random_migration_requests_never_break_the_server() {
    let config = ServerConfig {
        max_data_xfer_size: 1 << 16,
        ..ServerConfig::default()
    };
    let (ours, server) = FakeServer::builder(migrating_device())
        .config(config)
        .pair()
        .unwrap();
    let channel = vfio_user::socket::Channel::new(ours);
    let version = vfio_user::proto::Version {
        major: 0,
        minor: 0,
        capabilities: None,
    }
    .to_bytes();
    let h = Header::command(0, Command::Version, version.len()).unwrap();
    channel.send(&h, &version, &[], deadline(5)).unwrap();
    channel.recv(LIMITS, deadline(5)).unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let features = [1u32, 2, 6, 7, 8, 3, 0xffff];
    let ops = [
        VFIO_DEVICE_FEATURE_GET,
        VFIO_DEVICE_FEATURE_SET,
        VFIO_DEVICE_FEATURE_GET | vfio_bindings::bindings::vfio::VFIO_DEVICE_FEATURE_PROBE,
    ];
    for id in 1..4000u16 {
        let r = next();
        let (command, payload) = match r % 4 {
            0 | 1 => {
                let feature = features[(next() % features.len() as u64) as usize];
                let op = ops[(next() % ops.len() as u64) as usize];
                let data: Vec<u8> = match next() % 4 {
                    0 => vec![],
                    1 => (0..next() % 64).map(|_| next() as u8).collect(),
                    2 => FeatureMigDeviceState {
                        device_state: (next() % 8) as u32,
                        data_fd: 0,
                    }
                    .to_bytes(),
                    _ => DmaLoggingReport {
                        iova: next() % (1 << 40),
                        length: next() >> (next() % 64),
                        page_size: 1 << (next() % 40),
                        bitmap: vec![],
                    }
                    .to_bytes(),
                };
                let argsz = match next() % 3 {
                    0 => next() as u32,
                    1 => 8,
                    _ => 1 << 20,
                };
                let f = DeviceFeature {
                    argsz,
                    flags: feature | op,
                    data,
                };
                (Command::DeviceFeature, f.to_bytes().unwrap())
            }
            2 => {
                let mut b = vec![0u8; 8];
                b[0..4].copy_from_slice(&(next() as u32).to_ne_bytes());
                b[4..8].copy_from_slice(&((next() % (1 << 17)) as u32).to_ne_bytes());
                b.truncate((next() % 10) as usize);
                (Command::MigDataRead, b)
            }
            _ => {
                let data: Vec<u8> = (0..next() % 100).map(|_| next() as u8).collect();
                let mut b = MigData { data }.to_bytes().unwrap();
                if next() % 2 == 0 && !b.is_empty() {
                    let at = (next() % b.len() as u64) as usize;
                    b[at] ^= next() as u8;
                }
                (Command::MigDataWrite, b)
            }
        };
        let h = Header::command(id, command, payload.len()).unwrap();
        channel.send(&h, &payload, &[], deadline(5)).unwrap();
        let reply = channel
            .recv(LIMITS, deadline(5))
            .expect("a reply to every request");
        assert_eq!(reply.header.msg_id, id);
    }
    drop(channel);
    server.finish(Duration::from_secs(5)).unwrap();
}

#[test]
fn dirty_pages_start_get_and_stop_against_a_libvfio_user_style_server() {
    use vfio_user::proto::dirty_pages::{self, BitmapRange, DirtyPages};
    // The crate's server refuses DIRTY_PAGES: the fake answers as libvfio-user 0.1 would.
    let dirty = || Fault::on(Command::DirtyPages);
    let (c, server) = with_faults([
        dirty().nth(0).reply(vec![]),
        dirty().nth(1).reply_with(|r| {
            // Pages 0, 2, 64 and 129 (the last) are dirty.
            let bitmap = [0b101, 1, 1 << 1];
            BitmapRange::parse(r.payload.get(8..).unwrap_or_default())
                .map(|range| dirty_pages::bitmap_reply(&range, &bitmap))
                .unwrap_or_default()
        }),
        dirty().nth(2).reply(vec![]),
    ]);
    c.dirty_pages_start().unwrap();
    assert_eq!(
        c.dirty_pages_get(0x10_0000, 0x8_2000, 4096).unwrap(),
        vec![0x10_0000, 0x10_2000, 0x14_0000, 0x18_1000]
    );
    c.dirty_pages_stop().unwrap();
    assert!(!c.is_broken());
    // What the server received: start, get, stop.
    let requests: Vec<_> = server.transcript().into_iter().skip(1).collect();
    assert_eq!(requests.len(), 3);
    for (r, flags) in requests.iter().zip([1u32, 4, 2]) {
        assert_eq!(r.header.command, Command::DirtyPages as u16);
        assert_eq!(r.header.command, 14);
        let head = DirtyPages::parse_prefix(&r.payload).unwrap();
        assert_eq!(head.flags, flags);
        if flags != 4 {
            assert_eq!(r.payload, [8, 0, 0, 0, flags as u8, 0, 0, 0]);
            continue;
        }
        let range = BitmapRange::parse(&r.payload[8..]).unwrap();
        assert_eq!(
            (range.iova, range.size, range.pgsize),
            (0x10_0000, 0x8_2000, 4096)
        );
        assert_eq!(range.bitmap_size, 24);
        assert_eq!(head.argsz, 8 + 32 + 24);
    }
}

#[test]
fn dirty_pages_replies_that_lie_break_the_client_and_bad_requests_send_nothing() {
    use vfio_user::proto::dirty_pages::{self, BitmapRange};
    // Another range in the reply.
    let other = BitmapRange::new(0, 0x1000 * 64, 4096).unwrap();
    let c = answering(dirty_pages::bitmap_reply(&other, &[1]));
    assert_protocol(c.dirty_pages_get(0x1000, 0x1000 * 64, 4096), "range", &c);
    // A bit past the last page.
    let (c, _server) = with_faults([Fault::any().nth(1).reply_with(|r| {
        BitmapRange::parse(r.payload.get(8..).unwrap_or_default())
            .map(|range| dirty_pages::bitmap_reply(&range, &[1 << 3]))
            .unwrap_or_default()
    })]);
    assert_protocol(c.dirty_pages_get(0, 3 * 4096, 4096), "beyond", &c);
    // A reply to START with a payload.
    let c = answering(vec![0; 4]);
    assert_protocol(c.dirty_pages_start(), "expected", &c);
    // Refused before sending: a bitmap over the transfer size (4096 here), a bad page
    // size, an empty range. The server sees only the reset after them.
    let (c, server) = with_faults([]);
    for (iova, size, pgsize) in [(0, 4096 * 8 * 4097, 4096), (0, 4096, 3000), (0, 0, 4096)] {
        assert!(matches!(
            c.dirty_pages_get(iova, size, pgsize),
            Err(ClientError::InvalidArgument { .. })
        ));
    }
    c.reset().unwrap();
    assert_eq!(server.sequence(), ["Version", "DeviceReset"]);
}
