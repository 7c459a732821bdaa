//! Tests of [`VfioUserMigration`] against the vfio-user crate's server over a socket pair,
//! serving the crate's fake device with migration (`vfio_user::testing`).

use std::sync::Arc;
use std::time::Duration;

use vfio_bindings::bindings::vfio::{VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY};
use vfio_user::testing::{FakeDevice, FakeServer, Migration, Probe};
use vfio_user::{DmaLoggingRange, MigState, ServerConfig};

use super::*;

const RAM: [(u64, u64); 2] = [(0, 0x10_0000), (0x1_0000_0000, 0x4_0000)];

/// A migration over the fake device (pre-copy offered if `pre_copy`; 4 KiB transfers)
/// and the device's probe.
fn connect(pre_copy: bool) -> (VfioUserMigration, Probe) {
    let pre = if pre_copy { VFIO_MIGRATION_PRE_COPY } else { 0 };
    let device = FakeDevice::builder()
        .info(0, 9, 5)
        .migration(Migration::new(u64::from(VFIO_MIGRATION_STOP_COPY | pre)))
        .build()
        .unwrap();
    let config = ServerConfig {
        max_data_xfer_size: 4096,
        ..ServerConfig::default()
    };
    let (ours, server) = FakeServer::builder(device).config(config).pair().unwrap();
    let client = Arc::new(Client::from_stream(ours, Duration::from_secs(5)).unwrap());
    let m = VfioUserMigration::probe(client, Path::new("/test.sock"), RAM.to_vec())
        .unwrap()
        .expect("the device offers migration");
    (m, server.probe().clone())
}

#[test]
fn a_server_without_migration_has_none() {
    let plain = FakeDevice::builder().info(0, 9, 5).build().unwrap();
    let (ours, _server) = FakeServer::builder(plain).pair().unwrap();
    let client = Arc::new(Client::from_stream(ours, Duration::from_secs(5)).unwrap());
    let m = VfioUserMigration::probe(client.clone(), Path::new("/p.sock"), RAM.to_vec()).unwrap();
    assert!(m.is_none());
    assert!(!client.is_broken(), "a refusal is not a failure");
}

#[test]
fn save_in_chunks_until_the_stream_ends_then_restore() {
    let (m, s) = connect(true);
    let saved: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    {
        let mut s = s.lock();
        s.migration.saved = saved.clone();
        s.migration.pre_copy = b"early".to_vec();
    }
    assert_eq!(m.state().unwrap(), MigrationState::Running);
    assert_eq!(m.pending_bytes().unwrap(), 0);
    assert!(matches!(
        m.save_chunk(),
        Err(MigrationError::WrongState { .. })
    ));
    m.set_state(MigrationState::PreCopy).unwrap();
    assert_eq!(s.lock().migration.state, MigState::PreCopy);
    assert_eq!(m.save_chunk().unwrap(), Some(b"early".to_vec()));
    assert_eq!(m.save_chunk().unwrap(), None, "nothing more for now");
    m.set_state(MigrationState::StopCopy).unwrap();
    // Exact: the whole stream is read ahead (4 KiB per message here).
    assert_eq!(m.pending_bytes().unwrap(), saved.len() as u64);
    let mut got = Vec::new();
    while m.pending_bytes().unwrap() > 0 {
        got.extend(m.save_chunk().unwrap().unwrap());
    }
    assert_eq!(got, saved);
    assert_eq!(m.save_chunk().unwrap(), None);
    // STOP_COPY -> PRE_COPY is refused here, before the server sees it.
    assert!(matches!(
        m.set_state(MigrationState::PreCopy),
        Err(MigrationError::IllegalTransition { .. })
    ));
    assert!(matches!(
        m.set_state(MigrationState::Error),
        Err(MigrationError::IllegalTransition { .. })
    ));
    m.set_state(MigrationState::Stopped).unwrap();
    assert_eq!(s.lock().migration.state, MigState::Stop);

    m.set_state(MigrationState::Resuming).unwrap();
    for chunk in saved.chunks(3000) {
        m.restore_chunk(chunk).unwrap();
    }
    assert_eq!(
        s.lock().migration.restored,
        saved,
        "split to the transfer size"
    );
    m.set_state(MigrationState::Running).unwrap();
    assert!(matches!(
        m.restore_chunk(b"late"),
        Err(MigrationError::WrongState { .. })
    ));
}

#[test]
fn a_refused_transition_says_where_the_device_is() {
    let (m, s) = connect(false);
    assert!(
        matches!(
            m.set_state(MigrationState::PreCopy),
            Err(MigrationError::IllegalTransition { .. })
        ),
        "no pre-copy on this device"
    );
    m.set_state(MigrationState::Resuming).unwrap();
    m.restore_chunk(b"garbage").unwrap();
    // The device refuses the state it was given: it cannot leave RESUMING.
    s.lock().migration.refuse_to_leave = Some(MigState::Resuming);
    match m.set_state(MigrationState::Running) {
        Err(MigrationError::TransitionFailed {
            from,
            to,
            now,
            reason,
        }) => {
            assert_eq!(
                (from, to, now),
                (
                    MigrationState::Resuming,
                    MigrationState::Running,
                    MigrationState::Resuming
                )
            );
            assert!(reason.contains("errno 22"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // A device reset behind the VMM's back is noticed.
    s.lock().migration.state = MigState::Running;
    assert_eq!(m.state().unwrap(), MigrationState::Running);
}

#[test]
fn dirty_pages_come_from_the_dma_log_of_each_ram_range() {
    let (m, s) = connect(true);
    assert!(m.take_dirty_pages().is_err(), "not started");
    m.start_dirty_tracking().unwrap();
    {
        let s = s.lock();
        assert_eq!(
            s.migration.log_ranges,
            RAM.iter()
                .map(|&(iova, length)| DmaLoggingRange { iova, length })
                .collect::<Vec<_>>()
        );
    }
    let written = [0x0, 0x5000, 0xff000, 0x1_0000_0000, 0x1_0003_f000];
    s.lock().migration.dirty.as_mut().unwrap().extend(written);
    assert_eq!(m.take_dirty_pages().unwrap(), written.to_vec());
    assert_eq!(m.take_dirty_pages().unwrap(), Vec::<u64>::new());
    m.stop_dirty_tracking().unwrap();
    assert!(s.lock().migration.dirty.is_none());
}
