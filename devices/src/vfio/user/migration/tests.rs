//! Tests of [`VfioUserMigration`] against the vfio-user crate's server over a socket pair,
//! with a small device that implements the migration messages.

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vfio_bindings::bindings::vfio::{VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY};
use vfio_user::proto::dirty_bitmap;
use vfio_user::{
    Device, DeviceInfo, DeviceResult, DmaLoggingRange, DmaMapping, Errno, IrqData, IrqInfo,
    MigState, RegionInfo, ServerConfig,
};

use super::*;

/// What the device holds, shared with the test.
#[derive(Default)]
struct Shared {
    state: Option<MigState>,
    /// The saved state handed out in STOP_COPY, and pre-copy data in PRE_COPY.
    saved: Vec<u8>,
    pre_copy: Vec<u8>,
    read_at: usize,
    restored: Vec<u8>,
    /// Dirty 4 KiB pages; `None` while logging is off.
    dirty: Option<BTreeSet<u64>>,
    log_ranges: Vec<DmaLoggingRange>,
    fail_resume: bool,
}

struct MigDevice {
    s: Arc<Mutex<Shared>>,
    pre_copy: bool,
}

impl Device for MigDevice {
    fn device_info(&mut self) -> DeviceInfo {
        DeviceInfo {
            flags: 0,
            num_regions: 9,
            num_irqs: 5,
        }
    }
    fn region_info(&mut self, _index: u32) -> DeviceResult<RegionInfo> {
        Err(Errno(libc::EINVAL))
    }
    fn region_read(&mut self, _: u32, _: u64, _: &mut [u8]) -> DeviceResult<()> {
        Err(Errno(libc::EINVAL))
    }
    fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> DeviceResult<()> {
        Err(Errno(libc::EINVAL))
    }
    fn dma_map(&mut self, _: DmaMapping) -> DeviceResult<()> {
        Ok(())
    }
    fn dma_unmap(&mut self, _: u64, _: u64) -> DeviceResult<()> {
        Ok(())
    }
    fn irq_info(&mut self, index: u32) -> DeviceResult<IrqInfo> {
        Ok(IrqInfo {
            index,
            flags: 0,
            count: 0,
        })
    }
    fn set_irqs(&mut self, _: u32, _: u32, _: u32, _: u32, _: IrqData) -> DeviceResult<()> {
        Ok(())
    }
    fn reset(&mut self) -> DeviceResult<()> {
        self.s.lock().unwrap().state = Some(MigState::Running);
        Ok(())
    }
    fn migration_flags(&mut self) -> DeviceResult<u64> {
        let pre = if self.pre_copy {
            VFIO_MIGRATION_PRE_COPY
        } else {
            0
        };
        Ok(u64::from(VFIO_MIGRATION_STOP_COPY | pre))
    }
    fn mig_state(&mut self) -> DeviceResult<MigState> {
        Ok(self.s.lock().unwrap().state.unwrap_or(MigState::Running))
    }
    fn set_mig_state(&mut self, to: MigState) -> DeviceResult<()> {
        let mut s = self.s.lock().unwrap();
        let from = s.state.unwrap_or(MigState::Running);
        if from == MigState::StopCopy && to == MigState::PreCopy {
            return Err(Errno(libc::EINVAL));
        }
        if from == MigState::Resuming && to != MigState::Resuming && s.fail_resume {
            return Err(Errno(libc::EINVAL));
        }
        s.read_at = 0;
        if to == MigState::Resuming {
            s.restored.clear();
        }
        s.state = Some(to);
        Ok(())
    }
    fn mig_data_read(&mut self, size: u32) -> DeviceResult<Vec<u8>> {
        let mut s = self.s.lock().unwrap();
        let data = match s.state {
            Some(MigState::StopCopy) => s.saved.clone(),
            Some(MigState::PreCopy) => s.pre_copy.clone(),
            _ => return Err(Errno(libc::EINVAL)),
        };
        let end = data.len().min(s.read_at + size as usize);
        let out = data[s.read_at..end].to_vec();
        s.read_at = end;
        Ok(out)
    }
    fn mig_data_write(&mut self, data: &[u8]) -> DeviceResult<()> {
        let mut s = self.s.lock().unwrap();
        if s.state != Some(MigState::Resuming) {
            return Err(Errno(libc::EINVAL));
        }
        s.restored.extend_from_slice(data);
        Ok(())
    }
    fn dma_logging_supported(&mut self) -> bool {
        true
    }
    fn dma_logging_start(
        &mut self,
        page_size: u64,
        ranges: &[DmaLoggingRange],
    ) -> DeviceResult<u64> {
        let mut s = self.s.lock().unwrap();
        s.dirty = Some(BTreeSet::new());
        s.log_ranges = ranges.to_vec();
        Ok(page_size)
    }
    fn dma_logging_stop(&mut self) -> DeviceResult<()> {
        self.s.lock().unwrap().dirty = None;
        Ok(())
    }
    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> DeviceResult<Vec<u64>> {
        let mut s = self.s.lock().unwrap();
        let dirty = s.dirty.as_mut().ok_or(Errno(libc::EINVAL))?;
        let taken: Vec<u64> = dirty.range(iova..iova + length).copied().collect();
        for p in &taken {
            dirty.remove(p);
        }
        Ok(dirty_bitmap::encode(&taken, iova, length, page_size))
    }
}

const RAM: [(u64, u64); 2] = [(0, 0x10_0000), (0x1_0000_0000, 0x4_0000)];

fn connect(pre_copy: bool) -> (VfioUserMigration, Arc<Mutex<Shared>>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut dev = MigDevice {
        s: shared.clone(),
        pre_copy,
    };
    std::thread::spawn(move || {
        let config = ServerConfig {
            max_data_xfer_size: 4096,
            ..ServerConfig::default()
        };
        let _ = vfio_user::serve(theirs, &mut dev, &config);
    });
    let client = Arc::new(Client::from_stream(ours, Duration::from_secs(5)).unwrap());
    let m = VfioUserMigration::probe(client, Path::new("/test.sock"), RAM.to_vec())
        .unwrap()
        .expect("the device offers migration");
    (m, shared)
}

#[test]
fn a_server_without_migration_has_none() {
    struct Plain;
    impl Device for Plain {
        fn device_info(&mut self) -> DeviceInfo {
            DeviceInfo {
                flags: 0,
                num_regions: 9,
                num_irqs: 5,
            }
        }
        fn region_info(&mut self, _: u32) -> DeviceResult<RegionInfo> {
            Err(Errno(libc::EINVAL))
        }
        fn region_read(&mut self, _: u32, _: u64, _: &mut [u8]) -> DeviceResult<()> {
            Err(Errno(libc::EINVAL))
        }
        fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> DeviceResult<()> {
            Err(Errno(libc::EINVAL))
        }
        fn dma_map(&mut self, _: DmaMapping) -> DeviceResult<()> {
            Ok(())
        }
        fn dma_unmap(&mut self, _: u64, _: u64) -> DeviceResult<()> {
            Ok(())
        }
        fn irq_info(&mut self, _: u32) -> DeviceResult<IrqInfo> {
            Err(Errno(libc::EINVAL))
        }
        fn set_irqs(&mut self, _: u32, _: u32, _: u32, _: u32, _: IrqData) -> DeviceResult<()> {
            Ok(())
        }
        fn reset(&mut self) -> DeviceResult<()> {
            Ok(())
        }
    }
    let (ours, theirs) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let _ = vfio_user::serve(theirs, &mut Plain, &ServerConfig::default());
    });
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
        let mut s = s.lock().unwrap();
        s.saved = saved.clone();
        s.pre_copy = b"early".to_vec();
    }
    assert_eq!(m.state().unwrap(), MigrationState::Running);
    assert_eq!(m.pending_bytes().unwrap(), 0);
    assert!(matches!(
        m.save_chunk(),
        Err(MigrationError::WrongState { .. })
    ));
    m.set_state(MigrationState::PreCopy).unwrap();
    assert_eq!(s.lock().unwrap().state, Some(MigState::PreCopy));
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
    assert_eq!(s.lock().unwrap().state, Some(MigState::Stop));

    m.set_state(MigrationState::Resuming).unwrap();
    for chunk in saved.chunks(3000) {
        m.restore_chunk(chunk).unwrap();
    }
    assert_eq!(
        s.lock().unwrap().restored,
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
    s.lock().unwrap().fail_resume = true;
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
    s.lock().unwrap().state = Some(MigState::Running);
    assert_eq!(m.state().unwrap(), MigrationState::Running);
}

#[test]
fn dirty_pages_come_from_the_dma_log_of_each_ram_range() {
    let (m, s) = connect(true);
    assert!(m.take_dirty_pages().is_err(), "not started");
    m.start_dirty_tracking().unwrap();
    {
        let s = s.lock().unwrap();
        assert_eq!(
            s.log_ranges,
            RAM.iter()
                .map(|&(iova, length)| DmaLoggingRange { iova, length })
                .collect::<Vec<_>>()
        );
    }
    let written = [0x0, 0x5000, 0xff000, 0x1_0000_0000, 0x1_0003_f000];
    s.lock().unwrap().dirty.as_mut().unwrap().extend(written);
    assert_eq!(m.take_dirty_pages().unwrap(), written.to_vec());
    assert_eq!(m.take_dirty_pages().unwrap(), Vec::<u64>::new());
    m.stop_dirty_tracking().unwrap();
    assert!(s.lock().unwrap().dirty.is_none());
}
