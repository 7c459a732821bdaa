//! `vfsim --native-migration`: vfio-user's own migration messages against real `vfsim`
//! processes, driven by the project's vfio-user client with memfd guest memory. The PF
//! socket is the ground truth (state, DMA write log).

mod common;

use std::time::{Duration, Instant};

use common::process::{Scratch, Vfsim};
use common::*;
use pf_protocol::proto::VfState;
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
    VFIO_PCI_CONFIG_REGION_INDEX,
};
use vfio_user::{Client, ClientError, DmaLoggingRange, FeatureOp, MigState};
use vfsim::blk::*;
use vfsim::layout::*;

const IRQ_WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(200);
const NATIVE: &[&str] = &["--native-migration"];

fn pattern(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(29) ^ seed)
        .collect()
}

fn wait_used_index(d: &Driver, idx: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.used_index() != idx {
        assert!(
            Instant::now() < deadline,
            "used index {} not {idx}",
            d.used_index()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn errno(e: ClientError) -> i32 {
    match e {
        ClientError::Remote { errno, .. } => errno,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

/// Reads the migration stream until the server answers 0 bytes.
fn read_all(c: &Client) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let chunk = c.mig_data_read(1000).unwrap();
        if chunk.is_empty() {
            return out;
        }
        out.extend(chunk);
    }
}

/// The 4 KiB pages marked in a bitmap of `iova..` at `page_size`.
fn pages_of(bitmap: &[u64], iova: u64, page_size: u64) -> Vec<u64> {
    (0..bitmap.len() as u64 * 64)
        .filter(|n| bitmap[(n / 64) as usize] & (1 << (n % 64)) != 0)
        .map(|n| iova + n * page_size)
        .collect()
}

#[test]
fn without_the_flag_migration_is_refused() {
    let dir = Scratch::new("nomig");
    let disk = dir.disk(DISK_SIZE);
    let vf = Vfsim::start(&dir.0, "a", &disk);
    let d = Driver::connect(&vf.socket);
    assert_eq!(
        errno(d.client.migration_flags().unwrap_err()),
        libc::ENOTSUP
    );
    assert!(!d
        .client
        .probe_feature(VFIO_DEVICE_FEATURE_DMA_LOGGING_START, FeatureOp::Set)
        .unwrap());
    assert_eq!(errno(d.client.mig_data_read(8).unwrap_err()), libc::ENOTSUP);
    assert!(!d.client.is_broken());
}

#[test]
fn save_with_requests_in_flight_restore_into_a_second_vfsim_and_continue() {
    let dir = Scratch::new("native");
    let disk = dir.disk(DISK_SIZE);
    let vf_a = Vfsim::start_with(&dir.0, "a", &disk, NATIVE);
    let pf_a = vf_a.pf();
    let mut d1 = Driver::connect(&vf_a.socket);
    let c = &d1.client;
    assert_eq!(
        c.migration_flags().unwrap(),
        u64::from(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY)
    );
    assert_eq!(c.mig_state().unwrap(), MigState::Running);
    d1.map_notify();
    d1.init();
    d1.client
        .region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x04, &0x0006u16.to_le_bytes())
        .unwrap();
    d1.bar_write(MSIX_TABLE_OFFSET + 16, &0xfee0_3000u32.to_le_bytes());
    for slot in 0..2u16 {
        d1.post(
            slot,
            VIRTIO_BLK_T_OUT,
            8 * u64::from(slot),
            Some((&pattern(slot as u8), false)),
        );
    }
    d1.ring(Doorbell::Trapped);
    wait_used_index(&d1, 2);
    d1.used_idx = 2;
    assert!(wait_eventfd(&d1.irqs[1], IRQ_WAIT).is_some());

    // Pre-copy while the device runs: no pre-copy data. Three more requests go in
    // through the mapped doorbell, racing with the move to STOP_COPY.
    d1.client.set_mig_state(MigState::PreCopy).unwrap();
    assert_eq!(read_all(&d1.client), Vec::<u8>::new());
    for slot in 2..5u16 {
        d1.post(slot, VIRTIO_BLK_T_IN, 0, Some((&[0u8; 4096], true)));
    }
    d1.ring(Doorbell::Mapped);
    d1.client.set_mig_state(MigState::StopCopy).unwrap();
    assert_eq!(d1.client.mig_state().unwrap(), MigState::StopCopy);
    let stats = pf_a.stats().unwrap();
    assert!(stats.quiesced, "STOP_COPY quiesces the device");
    let data = read_all(&d1.client);
    assert_eq!(read_all(&d1.client), Vec::<u8>::new(), "the stream ended");
    let saved: VfState = serde_json::from_slice(&data).unwrap();
    assert_eq!(saved, pf_a.get_state().unwrap(), "the PF socket's state");
    let q = saved.queues[0];
    // Whatever A took it completed; the rest waits in the available ring.
    assert_eq!(q.used_idx, q.last_avail_idx);
    assert!((2..=5).contains(&q.used_idx), "{q:?}");
    assert_eq!(d1.used_index(), q.used_idx);
    // While stopped, more requests arrive; A must not take them.
    d1.post(0, VIRTIO_BLK_T_IN, 8, Some((&[0u8; 4096], true)));
    d1.ring(Doorbell::Trapped);
    std::thread::sleep(QUIET);
    assert_eq!(d1.used_index(), q.used_idx);
    // The saving state cannot go back to pre-copy.
    assert_eq!(
        errno(d1.client.set_mig_state(MigState::PreCopy).unwrap_err()),
        libc::EINVAL
    );
    d1.client.set_mig_state(MigState::Stop).unwrap();

    let mem_fd = d1.mem_fd.try_clone().unwrap();
    let (avail_idx, taken) = (d1.avail_idx, q.used_idx);
    drop(d1);
    drop(pf_a);
    drop(vf_a);

    let vf_b = Vfsim::start_with(&dir.0, "b", &disk, NATIVE);
    let pf_b = vf_b.pf();
    let mut d2 = Driver::connect_with_memory(&vf_b.socket, mem_fd);
    d2.avail_idx = avail_idx;
    d2.used_idx = taken;
    // A fresh device: RUNNING -> RESUMING (through STOP), in pieces.
    assert_eq!(
        errno(d2.client.mig_data_write(&data).unwrap_err()),
        libc::EINVAL,
        "only in RESUMING"
    );
    d2.client.set_mig_state(MigState::Resuming).unwrap();
    for piece in data.chunks(700) {
        d2.client.mig_data_write(piece).unwrap();
    }
    d2.client.set_mig_state(MigState::Stop).unwrap();
    assert_eq!(pf_b.get_state().unwrap(), saved, "loaded exactly");
    std::thread::sleep(QUIET);
    assert_eq!(d2.used_index(), taken, "nothing processed before RUNNING");
    assert_eq!(d2.bar_read(MSIX_TABLE_OFFSET + 16, 4), 0xfee0_3000);
    d2.client.set_mig_state(MigState::Running).unwrap();
    assert!(!pf_b.stats().unwrap().quiesced);

    // B takes what A left (the reads A did not take, then the one queued while
    // stopped), in order, and interrupts on the new eventfd.
    wait_used_index(&d2, avail_idx);
    assert!(wait_eventfd(&d2.irqs[1], IRQ_WAIT).is_some());
    for slot in 0..5u16 {
        assert_eq!(d2.slot_status(slot), VIRTIO_BLK_S_OK, "slot {slot}");
    }
    assert_eq!(
        d2.slot_data(0, 4096),
        pattern(1),
        "sector 8: A's second write"
    );
    for slot in 2..5u16 {
        assert_eq!(d2.slot_data(slot, 4096), pattern(0), "slot {slot}");
    }
    d2.used_idx = avail_idx;
    let (status, _) = d2.request(VIRTIO_BLK_T_FLUSH, 0, None, Doorbell::Trapped);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    let q = pf_b.get_state().unwrap().queues[0];
    assert_eq!(q.used_idx, avail_idx.wrapping_add(1));
}

#[test]
fn dma_logging_reports_the_pages_the_device_wrote() {
    let dir = Scratch::new("dirty");
    let disk = dir.disk(DISK_SIZE);
    let vf = Vfsim::start_with(&dir.0, "a", &disk, NATIVE);
    let pf = vf.pf();
    let mut d = Driver::connect(&vf.socket);
    d.init();
    let c = &d.client;
    assert!(c
        .probe_feature(VFIO_DEVICE_FEATURE_DMA_LOGGING_START, FeatureOp::Set)
        .unwrap());
    assert_eq!(
        errno(
            c.dma_logging_report(GUEST_BASE, GUEST_SIZE, 4096)
                .unwrap_err()
        ),
        libc::EINVAL,
        "not started"
    );
    let all = [DmaLoggingRange {
        iova: GUEST_BASE,
        length: GUEST_SIZE,
    }];
    assert_eq!(c.dma_logging_start(4096, &all).unwrap(), 4096);
    assert_eq!(
        errno(c.dma_logging_start(4096, &all).unwrap_err()),
        libc::EBUSY
    );
    pf.dma_log_start().unwrap();

    // Reads (the device writes their data pages), a write (it only reads the data).
    for (slot, kind) in [
        (1u16, VIRTIO_BLK_T_IN),
        (2, VIRTIO_BLK_T_OUT),
        (3, VIRTIO_BLK_T_IN),
    ] {
        d.post(
            slot,
            kind,
            8,
            Some((&pattern(slot as u8), kind == VIRTIO_BLK_T_IN)),
        );
    }
    d.ring(Doorbell::Trapped);
    wait_used_index(&d, 3);
    let truth = pf.dma_log_take().unwrap();
    let bitmap = d
        .client
        .dma_logging_report(GUEST_BASE, GUEST_SIZE, 4096)
        .unwrap();
    assert_eq!(bitmap.len() as u64, GUEST_SIZE / 4096 / 64);
    let reported = pages_of(&bitmap, GUEST_BASE, 4096);
    assert_eq!(reported, truth);
    assert!(reported.contains(&(GUEST_BASE + slot_data(1))));
    assert!(reported.contains(&(GUEST_BASE + slot_data(3))));
    assert!(!reported.contains(&(GUEST_BASE + slot_data(2))));
    // Reported pages are cleared.
    let again = d
        .client
        .dma_logging_report(GUEST_BASE, GUEST_SIZE, 4096)
        .unwrap();
    assert!(again.iter().all(|w| *w == 0));

    // At a coarser page size: 64 KiB pages covering what was written.
    d.post(4, VIRTIO_BLK_T_IN, 0, Some((&[0u8; 4096], true)));
    d.ring(Doorbell::Trapped);
    wait_used_index(&d, 4);
    let truth = pf.dma_log_take().unwrap();
    let coarse = d
        .client
        .dma_logging_report(GUEST_BASE, GUEST_SIZE, 0x10000)
        .unwrap();
    let mut want: Vec<u64> = truth.iter().map(|p| p & !0xffff).collect();
    want.dedup();
    assert_eq!(pages_of(&coarse, GUEST_BASE, 0x10000), want);

    // Restarted with only the rings' pages: the data pages are not logged.
    d.client.dma_logging_stop().unwrap();
    let rings = [DmaLoggingRange {
        iova: GUEST_BASE,
        length: 0x4000,
    }];
    d.client.dma_logging_start(4096, &rings).unwrap();
    d.post(0, VIRTIO_BLK_T_IN, 0, Some((&[0u8; 4096], true)));
    d.ring(Doorbell::Trapped);
    wait_used_index(&d, 5);
    let truth = pf.dma_log_take().unwrap();
    assert!(truth.contains(&(GUEST_BASE + slot_data(0))));
    let bitmap = d
        .client
        .dma_logging_report(GUEST_BASE, GUEST_SIZE, 4096)
        .unwrap();
    let want: Vec<u64> = truth
        .into_iter()
        .filter(|p| *p < GUEST_BASE + 0x4000)
        .collect();
    assert_eq!(pages_of(&bitmap, GUEST_BASE, 4096), want);
    d.client.dma_logging_stop().unwrap();
    // Bad ranges are refused.
    let overlapping = [rings[0], rings[0]];
    assert_eq!(
        errno(d.client.dma_logging_start(4096, &overlapping).unwrap_err()),
        libc::EINVAL
    );
    assert!(!d.client.is_broken());
}

#[test]
fn bad_migration_data_is_refused_and_the_device_can_still_be_restored() {
    let dir = Scratch::new("badmig");
    let disk = dir.disk(DISK_SIZE);
    let vf = Vfsim::start_with(&dir.0, "a", &disk, NATIVE);
    let pf = vf.pf();
    let mut d = Driver::connect(&vf.socket);
    d.init();
    let c = &d.client;
    c.set_mig_state(MigState::StopCopy).unwrap();
    let good = read_all(c);
    c.set_mig_state(MigState::Resuming).unwrap();
    c.mig_data_write(b"{\"version\": 1, garbage").unwrap();
    assert_eq!(
        errno(c.set_mig_state(MigState::Running).unwrap_err()),
        libc::EINVAL
    );
    assert_eq!(
        c.mig_state().unwrap(),
        MigState::Resuming,
        "stays, unchanged"
    );
    // A state that does not fit: another disk size.
    let mut other: VfState = serde_json::from_slice(&good).unwrap();
    other.capacity_sectors += 8;
    c.mig_data_write(&serde_json::to_vec(&other).unwrap())
        .unwrap();
    assert_eq!(
        errno(c.set_mig_state(MigState::Stop).unwrap_err()),
        libc::EINVAL
    );
    // The right one, sent again from scratch.
    c.mig_data_write(&good).unwrap();
    c.set_mig_state(MigState::Running).unwrap();
    assert_eq!(serde_json::to_vec(&pf.get_state().unwrap()).unwrap(), good);
    // Illegal targets, and reading while running.
    assert_eq!(
        errno(c.set_mig_state(MigState::Error).unwrap_err()),
        libc::EINVAL
    );
    assert_eq!(
        errno(c.set_mig_state(MigState::RunningP2p).unwrap_err()),
        libc::EINVAL
    );
    assert_eq!(errno(c.mig_data_read(16).unwrap_err()), libc::EINVAL);
    // A reset from a stopped state runs the device again.
    c.set_mig_state(MigState::Stop).unwrap();
    assert!(pf.stats().unwrap().quiesced);
    c.reset().unwrap();
    assert_eq!(c.mig_state().unwrap(), MigState::Running);
    assert!(!pf.stats().unwrap().quiesced);
    d.init();
    let (status, _) = d.request(
        VIRTIO_BLK_T_OUT,
        0,
        Some((&[3u8; 512], false)),
        Doorbell::Trapped,
    );
    assert_eq!(status, VIRTIO_BLK_S_OK);
}
