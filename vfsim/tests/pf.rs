//! The PF control socket, against real `vfsim` processes driven through a real vfio-user
//! client with memfd guest memory.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::process::{Scratch, Vfsim};
use common::*;
use pf_protocol::proto::{ErrorKind, Response, STATE_VERSION};
use pf_protocol::PfError;
use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
use vfsim::blk::*;
use vfsim::layout::*;

const IRQ_WAIT: Duration = Duration::from_secs(5);
/// How long the tests watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(200);
const F_VERSION_1: u64 = 1 << 32;
const F_FLUSH: u64 = 1 << 9;

fn pattern(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Waits until the used index in guest memory reaches `idx`.
fn wait_used_index(d: &Driver, idx: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.used_index() != idx {
        assert!(
            Instant::now() < deadline,
            "used index {} did not reach {idx}",
            d.used_index()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn get_state_reflects_the_driver_setup() {
    let dir = Scratch::new("state");
    let disk = dir.disk(DISK_SIZE);
    let mut vf = Vfsim::start(&dir.0, "a", &disk);
    let pf = vf.pf();
    let mut d = Driver::connect(&vf.socket);

    let fresh = pf.get_state().unwrap();
    assert_eq!(fresh.version, STATE_VERSION);
    assert_eq!(fresh.device_status, 0);
    assert_eq!(fresh.capacity_sectors, DISK_SIZE / 512);
    assert!(fresh.serial.starts_with("vfsim-"));
    assert_eq!(fresh.queues.len(), 1);
    assert!(!fresh.queues[0].ready);
    assert_eq!(fresh.queues[0].max_size, 256);

    d.init();
    d.client
        .region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x04, &0x0006u16.to_le_bytes())
        .unwrap();
    d.bar_write(MSIX_TABLE_OFFSET + 16, &0xfee0_1000u32.to_le_bytes());
    d.bar_write(MSIX_TABLE_OFFSET + 24, &0x4022u32.to_le_bytes());
    let s = pf.get_state().unwrap();
    assert_eq!(s.device_status, 0x0f);
    assert_eq!(s.driver_features, F_VERSION_1 | F_FLUSH);
    assert_eq!(
        s.device_features & (F_VERSION_1 | F_FLUSH),
        F_VERSION_1 | F_FLUSH
    );
    assert_eq!((s.msix_config, s.in_flight, s.isr), (0, 0, 0));
    assert_eq!(s.pci.command, 0x0006);
    assert_eq!(
        (s.msix_table[1].addr, s.msix_table[1].data),
        (0xfee0_1000, 0x4022)
    );
    let q = s.queues[0];
    assert!(q.ready);
    assert_eq!((q.size, q.msix_vector), (QSIZE, 1));
    assert_eq!(
        (q.desc, q.avail, q.used),
        (GUEST_BASE + DESC, GUEST_BASE + AVAIL, GUEST_BASE + USED)
    );
    assert_eq!((q.last_avail_idx, q.used_idx), (0, 0));

    for i in 0..3 {
        let (status, _) = d.request(
            VIRTIO_BLK_T_OUT,
            i,
            Some((&[7u8; 512], false)),
            Doorbell::Trapped,
        );
        assert_eq!(status, VIRTIO_BLK_S_OK);
    }
    let q = pf.get_state().unwrap().queues[0];
    assert_eq!((q.last_avail_idx, q.used_idx), (3, 3));
    let stats = pf.stats().unwrap();
    assert_eq!(stats.requests_completed, 3);
    assert!(stats.doorbells >= 1, "{stats:?}");
    assert!(!stats.quiesced && !stats.dma_logging);
    assert!(vf.alive());
}

#[test]
fn quiesce_completes_what_was_taken_and_holds_new_requests_until_resume() {
    let dir = Scratch::new("quiesce");
    let disk = dir.disk(DISK_SIZE);
    let vf = Vfsim::start(&dir.0, "a", &disk);
    let pf = vf.pf();
    let mut d = Driver::connect(&vf.socket);
    d.map_notify();
    d.init();

    // Three writes, and quiesce while the device may be working on them.
    for slot in 0..3u16 {
        d.post(
            slot,
            VIRTIO_BLK_T_OUT,
            8 * u64::from(slot),
            Some((&pattern(slot as u8), false)),
        );
    }
    d.ring(Doorbell::Mapped);
    let report = pf.quiesce().unwrap();
    assert_eq!(report.in_flight, 0);
    let s = pf.get_state().unwrap();
    let q = s.queues[0];
    // Whatever the device took, it completed: used entries, status bytes, interrupt.
    assert_eq!(q.used_idx, q.last_avail_idx);
    assert_eq!(d.used_index(), q.used_idx);
    assert_eq!(report.requests_completed, u64::from(q.used_idx));
    for slot in 0..3u16 {
        let want = if slot < q.used_idx {
            VIRTIO_BLK_S_OK
        } else {
            0xff
        };
        assert_eq!(d.slot_status(slot), want, "slot {slot}");
    }
    if q.used_idx > 0 {
        assert!(wait_eventfd(&d.irqs[1], IRQ_WAIT).is_some());
    }
    assert!(pf.stats().unwrap().quiesced);

    // Two more while quiesced, with both kinds of doorbell: nothing moves.
    d.post(3, VIRTIO_BLK_T_OUT, 24, Some((&pattern(3), false)));
    d.ring(Doorbell::Trapped);
    d.post(4, VIRTIO_BLK_T_IN, 0, Some((&[0u8; 4096], true)));
    d.ring(Doorbell::Mapped);
    std::thread::sleep(QUIET);
    assert_eq!(d.used_index(), q.used_idx);
    assert_eq!(pf.get_state().unwrap().queues[0], q);
    assert_eq!(d.slot_status(4), 0xff);
    // Quiesce is idempotent.
    assert_eq!(pf.quiesce().unwrap().in_flight, 0);

    pf.resume().unwrap();
    wait_used_index(&d, 5);
    for slot in 0..5u16 {
        assert_eq!(d.slot_status(slot), VIRTIO_BLK_S_OK, "slot {slot}");
    }
    assert_eq!(d.slot_data(4, 4096), pattern(0));
    let image = std::fs::File::open(&disk).unwrap();
    for slot in 0..4u16 {
        let mut on_disk = vec![0u8; 4096];
        image
            .read_exact_at(&mut on_disk, 8 * 512 * u64::from(slot))
            .unwrap();
        assert_eq!(on_disk, pattern(slot as u8), "slot {slot}");
    }
    let s = pf.stats().unwrap();
    assert!(!s.quiesced);
    assert_eq!(s.requests_completed, 5);
    // Resume is idempotent, and the device goes on as usual.
    pf.resume().unwrap();
    d.used_idx = 5;
    d.avail_idx = 5;
    let (status, _) = d.request(VIRTIO_BLK_T_FLUSH, 0, None, Doorbell::Trapped);
    assert_eq!(status, VIRTIO_BLK_S_OK);
}

#[test]
fn the_dma_log_holds_exactly_the_pages_the_device_wrote() {
    let dir = Scratch::new("dmalog");
    let disk = dir.disk(DISK_SIZE);
    let vf = Vfsim::start(&dir.0, "a", &disk);
    let pf = vf.pf();
    let mut d = Driver::connect(&vf.socket);
    d.init();

    let take_err = pf.dma_log_take().unwrap_err();
    assert!(
        matches!(
            &take_err,
            PfError::Device {
                kind: ErrorKind::Refused,
                ..
            }
        ),
        "{take_err}"
    );
    pf.dma_log_start().unwrap();
    assert!(pf.stats().unwrap().dma_logging);
    assert!(matches!(
        pf.dma_log_start(),
        Err(PfError::Device {
            kind: ErrorKind::Refused,
            ..
        })
    ));
    assert_eq!(pf.dma_log_take().unwrap(), Vec::<u64>::new());

    let used_page = GUEST_BASE + USED;
    let status_page = GUEST_BASE + (STATUS & !0xfff);
    // A read: its data page, the status byte's page and the used ring's page.
    d.post(1, VIRTIO_BLK_T_IN, 0, Some((&[0u8; 4096], true)));
    d.ring(Doorbell::Trapped);
    d.wait_used();
    assert_eq!(
        pf.dma_log_take().unwrap(),
        vec![used_page, status_page, GUEST_BASE + slot_data(1)]
    );
    assert_eq!(
        pf.dma_log_take().unwrap(),
        Vec::<u64>::new(),
        "taking empties the log"
    );

    // A write: the device only reads the data page.
    d.post(2, VIRTIO_BLK_T_OUT, 8, Some((&pattern(2), false)));
    d.ring(Doorbell::Trapped);
    d.wait_used();
    assert_eq!(pf.dma_log_take().unwrap(), vec![used_page, status_page]);

    // A read whose buffer starts mid-page and crosses into the next one.
    let head = d.build(3, VIRTIO_BLK_T_IN, 8, Some((&[0u8; 1024], true)));
    let mid = slot_data(3) + 0xe00;
    d.desc(head + 1, GUEST_BASE + mid, 1024, 1 | 2, head + 2);
    d.publish(head);
    d.ring(Doorbell::Trapped);
    d.wait_used();
    assert_eq!(d.slot_status(3), VIRTIO_BLK_S_OK);
    assert_eq!(
        pf.dma_log_take().unwrap(),
        vec![
            used_page,
            status_page,
            GUEST_BASE + slot_data(3),
            GUEST_BASE + slot_data(4)
        ]
    );
    let mut got = vec![0u8; 1024];
    d.mem.read(mid, &mut got).unwrap();
    assert_eq!(got, pattern(2)[..1024]);

    pf.dma_log_stop().unwrap();
    pf.dma_log_stop().unwrap();
    assert!(!pf.stats().unwrap().dma_logging);
    assert!(pf.dma_log_take().is_err());
    // Started again: only what happens from now on.
    pf.dma_log_start().unwrap();
    d.post(0, VIRTIO_BLK_T_FLUSH, 0, None);
    d.ring(Doorbell::Trapped);
    d.wait_used();
    assert_eq!(pf.dma_log_take().unwrap(), vec![used_page, status_page]);
}

#[test]
fn a_second_instance_continues_the_queues_from_the_saved_state() {
    let dir = Scratch::new("migrate");
    let disk = dir.disk(DISK_SIZE);
    let vf_a = Vfsim::start(&dir.0, "a", &disk);
    let pf_a = vf_a.pf();
    let mut d1 = Driver::connect(&vf_a.socket);
    d1.init();
    d1.client
        .region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x04, &0x0006u16.to_le_bytes())
        .unwrap();
    d1.bar_write(MSIX_TABLE_OFFSET + 16, &0xfee0_2000u32.to_le_bytes());
    // Some traffic on A: two writes.
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

    // Quiesce A, then the guest queues two more requests that A must not take.
    assert_eq!(pf_a.quiesce().unwrap().in_flight, 0);
    d1.post(2, VIRTIO_BLK_T_OUT, 16, Some((&pattern(2), false)));
    d1.post(3, VIRTIO_BLK_T_IN, 0, Some((&[0u8; 4096], true)));
    d1.ring(Doorbell::Trapped);
    let saved = pf_a.get_state().unwrap();
    assert_eq!(
        (saved.queues[0].last_avail_idx, saved.queues[0].used_idx),
        (2, 2)
    );
    let json = serde_json::to_string(&saved).unwrap();
    let saved: pf_protocol::proto::VfState = serde_json::from_str(&json).unwrap();

    // The "guest" keeps its memory and its ring positions; A goes away.
    let mem_fd = d1.mem_fd.try_clone().unwrap();
    let (avail_idx, used_idx) = (d1.avail_idx, d1.used_idx);
    drop(d1);
    drop(pf_a);
    drop(vf_a);

    let vf_b = Vfsim::start(&dir.0, "b", &disk);
    let pf_b = vf_b.pf();
    let mut d2 = Driver::connect_with_memory(&vf_b.socket, mem_fd);
    d2.avail_idx = avail_idx;
    d2.used_idx = used_idx;
    pf_b.set_state(&saved).unwrap();
    assert_eq!(pf_b.get_state().unwrap(), saved, "loaded exactly");
    assert!(pf_b.stats().unwrap().quiesced, "quiesced until resume");
    // What the driver reads from the new device is what it set up on the old one.
    let c = COMMON_OFFSET;
    assert_eq!(d2.status(), 0x0f);
    assert_eq!(d2.bar_read(c + 0x1c, 2), 1, "queue enabled");
    assert_eq!(d2.bar_read(c + 0x18, 2), u64::from(QSIZE));
    assert_eq!(d2.bar_read(c + 0x1a, 2), 1);
    assert_eq!(d2.bar_read(c + 0x20, 8), GUEST_BASE + DESC);
    assert_eq!(d2.bar_read(c + 0x30, 8), GUEST_BASE + USED);
    assert_eq!(d2.bar_read(MSIX_TABLE_OFFSET + 16, 4), 0xfee0_2000);
    let mut cmd = [0u8; 2];
    d2.client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0x04, &mut cmd)
        .unwrap();
    assert_eq!(u16::from_le_bytes(cmd), 0x0006);
    std::thread::sleep(QUIET);
    assert_eq!(d2.used_index(), 2, "nothing processed before resume");

    pf_b.resume().unwrap();
    // B takes the two requests A left, in order, and interrupts on the new eventfd.
    assert_eq!(d2.wait_used(), (6, 1));
    assert_eq!(d2.wait_used(), (9, 4097));
    assert!(wait_eventfd(&d2.irqs[1], IRQ_WAIT).is_some());
    assert_eq!(d2.slot_status(2), VIRTIO_BLK_S_OK);
    assert_eq!(d2.slot_status(3), VIRTIO_BLK_S_OK);
    assert_eq!(
        d2.slot_data(3, 4096),
        pattern(0),
        "A's write read back by B"
    );
    // And more requests: the used index goes on from where A left it.
    d2.post(0, VIRTIO_BLK_T_IN, 8, Some((&[0u8; 4096], true)));
    d2.post(1, VIRTIO_BLK_T_IN, 16, Some((&[0u8; 4096], true)));
    d2.ring(Doorbell::Trapped);
    assert_eq!(d2.wait_used(), (0, 4097));
    assert_eq!(d2.wait_used(), (3, 4097));
    assert_eq!(d2.used_index(), 6);
    assert_eq!(d2.slot_data(0, 4096), pattern(1));
    assert_eq!(d2.slot_data(1, 4096), pattern(2));
    let q = pf_b.get_state().unwrap().queues[0];
    assert_eq!((q.last_avail_idx, q.used_idx), (6, 6));
    let (status, len) = d2.request(
        VIRTIO_BLK_T_GET_ID,
        0,
        Some((&[0u8; 20], true)),
        Doorbell::Trapped,
    );
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 21));
    assert_eq!(
        String::from_utf8_lossy(&d2.read_data(saved.serial.len())),
        saved.serial,
        "the id the driver saw on A"
    );
}

/// An interrupt the device holds pending (vector masked) is part of its state: the
/// second instance holds it too, and sends it when the vector is unmasked there.
#[test]
fn pending_msix_vectors_travel_with_the_state() {
    let dir = Scratch::new("pending");
    let disk = dir.disk(DISK_SIZE);
    let vf_a = Vfsim::start(&dir.0, "a", &disk);
    let pf_a = vf_a.pf();
    let mut d1 = Driver::connect_masked(
        &vf_a.socket,
        vfsim::mmap::memfd(c"guest", GUEST_SIZE).unwrap(),
    );
    d1.init();
    d1.msix_control(MSIX_ENABLE);
    d1.mask_vectors(0, 1, false);
    let (status, _) = d1.request(VIRTIO_BLK_T_FLUSH, 0, None, Doorbell::Trapped);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert!(
        wait_eventfd(&d1.irqs[1], QUIET).is_none(),
        "vector 1 is masked"
    );
    pf_a.quiesce().unwrap();
    let saved = pf_a.get_state().unwrap();
    assert_eq!(saved.msix_pending, 0b10);
    assert_eq!(saved.pci.msix_control, 0x8001);
    assert_eq!(
        (saved.msix_table[0].control, saved.msix_table[1].control),
        (0, 1)
    );
    let mem_fd = d1.mem_fd.try_clone().unwrap();
    drop(d1);
    drop(pf_a);
    drop(vf_a);

    let vf_b = Vfsim::start(&dir.0, "b", &disk);
    let pf_b = vf_b.pf();
    let d2 = Driver::connect_masked(&vf_b.socket, mem_fd);
    pf_b.set_state(&saved).unwrap();
    assert_eq!(pf_b.get_state().unwrap(), saved, "loaded exactly");
    assert!(
        wait_eventfd(&d2.irqs[1], QUIET).is_none(),
        "still masked on B"
    );
    assert_eq!(d2.bar_read(MSIX_PBA_OFFSET, 8), 0b10);
    d2.mask_vectors(1, 1, false);
    assert!(
        wait_eventfd(&d2.irqs[1], IRQ_WAIT).is_some(),
        "sent by B on unmask"
    );
    assert_eq!(d2.bar_read(MSIX_PBA_OFFSET, 8), 0);
}

/// Sends raw lines and reads one response per line.
struct Raw {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &std::path::Path) -> Raw {
        let w = UnixStream::connect(path).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        Raw { w, r }
    }

    fn send(&mut self, bytes: &[u8]) -> Response {
        self.w.write_all(bytes).unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "{line:?}");
        serde_json::from_str(&line).unwrap()
    }

    fn error(&mut self, bytes: &[u8], kind: ErrorKind, needle: &str) {
        match self.send(bytes) {
            Response::Error { kind: k, message } => {
                assert_eq!(k, kind, "{message}");
                assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            }
            other => panic!("{:?} got {other:?}", String::from_utf8_lossy(bytes)),
        }
    }
}

#[test]
fn bad_input_gets_error_responses_and_vfsim_lives_on() {
    let dir = Scratch::new("bad");
    let disk = dir.disk(DISK_SIZE);
    let mut vf = Vfsim::start(&dir.0, "a", &disk);
    let mut raw = Raw::connect(&vf.pf_socket);
    raw.error(b"not json\n", ErrorKind::BadRequest, "expected");
    raw.error(
        b"{\"op\":\"bogus\"}\n",
        ErrorKind::BadRequest,
        "unknown variant `bogus`",
    );
    raw.error(
        b"{\"no_op\":1}\n",
        ErrorKind::BadRequest,
        "missing field `op`",
    );
    raw.error(
        b"{\"op\":\"set_state\",\"state\":{\"version\":\"one\"}}\n",
        ErrorKind::BadRequest,
        "invalid type",
    );
    raw.error(
        b"{\"op\":\"set_state\"}\n",
        ErrorKind::BadRequest,
        "missing field `state`",
    );
    raw.error(b"[1,2,3]\n", ErrorKind::BadRequest, "");
    raw.error(b"\xff\xfe\x00garbage\n", ErrorKind::BadRequest, "");
    raw.error(b"\n", ErrorKind::BadRequest, "EOF");
    let mut deep = b"{\"op\":\"stats\",\"x\":".to_vec();
    deep.extend(vec![b'['; 100_000]);
    deep.push(b'\n');
    raw.error(&deep, ErrorKind::BadRequest, "recursion limit");
    let mut long = vec![b' '; 2 << 20];
    long.extend_from_slice(b"{\"op\":\"stats\"}\n");
    raw.error(&long, ErrorKind::LineTooLong, "longer than the limit");
    // Two requests in one write, answered in order; the connection still works.
    raw.w
        .write_all(b"{\"op\":\"stats\"}\n{\"op\":\"dma_log_take\"}\n")
        .unwrap();
    let mut line = String::new();
    raw.r.read_line(&mut line).unwrap();
    assert!(matches!(
        serde_json::from_str(&line).unwrap(),
        Response::Stats(_)
    ));
    line.clear();
    raw.r.read_line(&mut line).unwrap();
    assert!(matches!(
        serde_json::from_str(&line).unwrap(),
        Response::Error {
            kind: ErrorKind::Refused,
            ..
        }
    ));

    // A client that leaves mid-line does not disturb anyone.
    let mut half = UnixStream::connect(&vf.pf_socket).unwrap();
    half.write_all(b"{\"op\":\"qui").unwrap();
    drop(half);

    // set_state while the driver runs is refused; a wrong state is refused once quiesced.
    let pf = vf.pf();
    let mut d = Driver::connect(&vf.socket);
    d.init();
    let state = pf.get_state().unwrap();
    match pf.set_state(&state) {
        Err(PfError::Device {
            kind: ErrorKind::Refused,
            message,
            ..
        }) => {
            assert!(message.contains("quiesce it first"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    pf.quiesce().unwrap();
    let mut bad = state.clone();
    bad.version = 99;
    let mut big = state.clone();
    big.queues[0].size = 512;
    let mut features = state.clone();
    features.driver_features |= 1 << 40;
    let mut capacity = state.clone();
    capacity.capacity_sectors += 1;
    let mut vector = state.clone();
    vector.queues[0].msix_vector = 7;
    for (s, needle) in [
        (bad, "version 99"),
        (big, "size 512"),
        (features, "does not offer"),
        (capacity, "sectors"),
        (vector, "vector 7"),
    ] {
        match pf.set_state(&s) {
            Err(PfError::Device {
                kind: ErrorKind::InvalidState,
                message,
                ..
            }) => {
                assert!(message.contains(needle), "{message:?} lacks {needle:?}")
            }
            other => panic!("{needle}: {other:?}"),
        }
    }
    assert_eq!(
        pf.get_state().unwrap(),
        state,
        "refused states change nothing"
    );
    pf.set_state(&state).unwrap();
    pf.resume().unwrap();
    let (status, _) = d.request(
        VIRTIO_BLK_T_OUT,
        0,
        Some((&[1u8; 512], false)),
        Doorbell::Trapped,
    );
    assert_eq!(status, VIRTIO_BLK_S_OK);
    // The raw connection is still served, next to the client's.
    assert!(matches!(raw.send(b"{\"op\":\"resume\"}\n"), Response::Ok));
    assert!(vf.alive());
}

#[test]
fn the_state_json_is_what_a_mediator_can_read() {
    let dir = Scratch::new("json");
    let disk = dir.disk(DISK_SIZE);
    let vf = Vfsim::start(&dir.0, "a", &disk);
    let mut d = Driver::connect(&vf.socket);
    d.init();
    let mut raw = Raw::connect(&vf.pf_socket);
    raw.w.write_all(b"{\"op\":\"get_state\"}\n").unwrap();
    let mut line = String::new();
    raw.r.read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["type"], "state");
    assert_eq!(v["state"]["device_status"], 15);
    assert_eq!(v["state"]["queues"][0]["desc"], GUEST_BASE + DESC);
    assert_eq!(v["state"]["queues"][0]["last_avail_idx"], 0);
}

#[test]
fn quiesce_racing_with_processing_never_leaves_a_request_half_done() {
    let dir = Scratch::new("race");
    let disk = dir.disk(DISK_SIZE);
    let vf = Vfsim::start(&dir.0, "a", &disk);
    let pf = vf.pf();
    let mut d = Driver::connect(&vf.socket);
    d.map_notify();
    d.init();
    let mut done = 0u16;
    for round in 0..40u16 {
        for slot in 0..5u16 {
            d.post(
                slot,
                VIRTIO_BLK_T_IN,
                8 * u64::from(slot),
                Some((&[0u8; 4096], true)),
            );
        }
        d.ring(Doorbell::Mapped);
        if round % 2 == 1 {
            // Give the poller a head start on odd rounds.
            std::thread::yield_now();
        }
        assert_eq!(pf.quiesce().unwrap().in_flight, 0);
        let q = pf.get_state().unwrap().queues[0];
        assert_eq!(q.used_idx, q.last_avail_idx, "round {round}");
        assert_eq!(d.used_index(), q.used_idx, "round {round}");
        for slot in 0..5u16 {
            let taken = q.used_idx.wrapping_sub(done) > slot;
            let want = if taken { VIRTIO_BLK_S_OK } else { 0xff };
            assert_eq!(d.slot_status(slot), want, "round {round} slot {slot}");
        }
        pf.resume().unwrap();
        done = done.wrapping_add(5);
        wait_used_index(&d, done);
    }
    assert_eq!(pf.stats().unwrap().requests_completed, 200);
}
