//! The device driven over a real Unix socket by the project's vfio-user client.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_MASKABLE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfsim::blk::*;
use vfsim::common_cfg::STATUS_NEEDS_RESET;
use vfsim::layout::*;

const IRQ_WAIT: Duration = Duration::from_secs(5);

#[test]
fn config_space_capabilities_and_regions() {
    let server = start_server();
    let d = Driver::connect(&server.socket);
    let mut cfg = [0u8; 256];
    d.client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut cfg)
        .unwrap();
    let w16 = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
    let w32 = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
    assert_eq!((w16(0), w16(2)), (0x1af4, 0x1042));
    assert_eq!((cfg[8], w32(8) >> 8), (1, 0x018000));
    assert_eq!((w16(0x2c), w16(0x2e)), (0x1af4, 0x0002));
    assert_eq!(w32(0x10) & 0xf, 0b0100, "BAR 0 is 64-bit memory");
    assert_ne!(w16(6) & 0x10, 0, "capability list");
    let mut next = cfg[0x34] as usize;
    let (mut virtio, mut msix, mut multiplier, mut devcap) = (Vec::new(), None, None, None);
    while next != 0 {
        match cfg[next] {
            0x09 => {
                virtio.push((cfg[next + 3], w32(next + 8), w32(next + 12)));
                if cfg[next + 3] == 2 {
                    multiplier = Some(w32(next + 16));
                }
            }
            0x11 => msix = Some((w16(next + 2), w32(next + 4), w32(next + 8))),
            0x10 => devcap = Some(w32(next + 4)),
            other => panic!("unexpected capability {other:#x}"),
        }
        next = cfg[next + 1] as usize;
    }
    assert_eq!(
        virtio,
        vec![
            (1, 0, 0x40),
            (2, 0x1000, 0x1000),
            (3, 0x800, 1),
            (4, 0xc00, 0x40)
        ]
    );
    assert_eq!(multiplier, Some(4));
    assert_eq!(
        devcap.map(|d| d & (1 << 28)),
        Some(1 << 28),
        "PCIe FLR capable"
    );
    // Two vectors; enabled by the driver's connect.
    assert_eq!(msix, Some((0x8001, 0x2000, 0x3000)));

    // Read-only bytes stay, the BAR sizes itself.
    d.client
        .region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0, &[0; 4])
        .unwrap();
    d.client
        .region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x10, &[0xff; 8])
        .unwrap();
    let mut b = [0u8; 12];
    d.client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0x0, &mut b[..4])
        .unwrap();
    assert_eq!(b[..4], [0xf4, 0x1a, 0x42, 0x10]);
    d.client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0x10, &mut b[..8])
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(b[..8].try_into().unwrap()),
        0xffff_ffff_ffff_c004
    );

    let info = d.client.region_info(0).unwrap();
    assert_eq!(info.size, BAR0_SIZE);
    assert!(info.fd.is_some());
    assert_eq!(info.sparse_areas.len(), 1);
    assert_eq!(
        (info.sparse_areas[0].offset, info.sparse_areas[0].size),
        (0x1000, 0x1000)
    );
    let cfg_info = d.client.region_info(VFIO_PCI_CONFIG_REGION_INDEX).unwrap();
    assert_eq!(cfg_info.size, 256);
    let irq = d.client.irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap();
    assert_eq!(irq.count, 2);
    assert_ne!(irq.flags & VFIO_IRQ_INFO_MASKABLE, 0, "MSI-X is maskable");

    // The trapped MSI-X table and PBA answer; out-of-BAR accesses fail cleanly.
    d.bar_write(MSIX_TABLE_OFFSET, &0xfee0_0000u32.to_le_bytes());
    assert_eq!(d.bar_read(MSIX_TABLE_OFFSET, 4), 0xfee0_0000);
    assert_eq!(d.bar_read(MSIX_PBA_OFFSET, 8), 0);
    assert!(d.client.region_read(0, BAR0_SIZE - 2, &mut [0; 4]).is_err());
    // Device configuration: capacity in sectors.
    assert_eq!(d.bar_read(DEVICE_CFG_OFFSET, 8), DISK_SIZE / 512);
}

fn write_read_roundtrip(how: Doorbell) {
    let server = start_server();
    let mut d = Driver::connect(&server.socket);
    if how == Doorbell::Mapped {
        d.map_notify();
    }
    d.init();
    let block: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    let (status, len) = d.request(VIRTIO_BLK_T_OUT, 8, Some((&block, false)), how);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1));
    assert!(
        wait_eventfd(&d.irqs[1], IRQ_WAIT).is_some(),
        "queue vector signalled"
    );

    let image = std::fs::File::open(&server.disk).unwrap();
    let mut on_disk = vec![0u8; 1024];
    image.read_exact_at(&mut on_disk, 8 * 512).unwrap();
    assert_eq!(on_disk, block);

    let (status, len) = d.request(VIRTIO_BLK_T_IN, 8, Some((&[0u8; 1024], true)), how);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1025));
    assert_eq!(d.read_data(1024), block);
    assert!(wait_eventfd(&d.irqs[1], IRQ_WAIT).is_some());

    let (status, _) = d.request(VIRTIO_BLK_T_FLUSH, 0, None, how);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    let (status, len) = d.request(VIRTIO_BLK_T_GET_ID, 0, Some((&[0u8; 20], true)), how);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 21));
    assert!(d.read_data(20).starts_with(b"vfsim-"));
    let (status, _) = d.request(99, 0, None, how);
    assert_eq!(status, VIRTIO_BLK_S_UNSUPP);
}

#[test]
fn write_and_read_back_with_trapped_doorbell() {
    write_read_roundtrip(Doorbell::Trapped);
}

#[test]
fn write_and_read_back_with_mapped_doorbell() {
    write_read_roundtrip(Doorbell::Mapped);
}

#[test]
fn bad_requests_get_an_error_status() {
    let server = start_server();
    let mut d = Driver::connect(&server.socket);
    d.init();
    let how = Doorbell::Trapped;
    // Beyond the end of the disk.
    let (status, _) = d.request(
        VIRTIO_BLK_T_IN,
        DISK_SIZE / 512,
        Some((&[0u8; 512], true)),
        how,
    );
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    // Data buffer outside every DMA mapping.
    d.mem
        .write(HEADER, &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    d.mem.write(STATUS, &[0xff]).unwrap();
    d.desc(0, GUEST_BASE + HEADER, 16, 1, 1);
    d.desc(1, 0xdead_0000, 512, 1, 2);
    d.desc(2, GUEST_BASE + STATUS, 1, 2, 0);
    d.kick(how);
    d.wait_used();
    let mut s = [0u8];
    d.mem.read(STATUS, &mut s).unwrap();
    assert_eq!(s[0], VIRTIO_BLK_S_IOERR);
    // Length not a multiple of the sector size, header cut short.
    let (status, _) = d.request(VIRTIO_BLK_T_OUT, 0, Some((&[1u8; 100], false)), how);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    d.desc(0, GUEST_BASE + HEADER, 4, 1, 1);
    d.desc(1, GUEST_BASE + STATUS, 1, 2, 0);
    d.kick(how);
    d.wait_used();
    d.mem.read(STATUS, &mut s).unwrap();
    assert_eq!(s[0], VIRTIO_BLK_S_IOERR);
    // The device still works.
    let (status, _) = d.request(VIRTIO_BLK_T_OUT, 0, Some((&[5u8; 512], false)), how);
    assert_eq!(status, VIRTIO_BLK_S_OK);
}

#[test]
fn broken_chain_needs_reset_and_reset_recovers() {
    let server = start_server();
    let mut d = Driver::connect(&server.socket);
    d.init();
    // A descriptor pointing past the queue.
    d.desc(0, GUEST_BASE + HEADER, 16, 1, 200);
    d.kick(Doorbell::Trapped);
    assert!(
        wait_eventfd(&d.irqs[0], IRQ_WAIT).is_some(),
        "config vector signalled"
    );
    assert_ne!(d.status() & STATUS_NEEDS_RESET, 0);
    // A loop.
    d.init();
    d.desc(0, GUEST_BASE + HEADER, 16, 1, 0);
    d.kick(Doorbell::Trapped);
    assert!(wait_eventfd(&d.irqs[0], IRQ_WAIT).is_some());
    assert_ne!(d.status() & STATUS_NEEDS_RESET, 0);
    d.init();
    let (status, _) = d.request(
        VIRTIO_BLK_T_OUT,
        1,
        Some((&[9u8; 512], false)),
        Doorbell::Trapped,
    );
    assert_eq!(status, VIRTIO_BLK_S_OK);
}

#[test]
fn a_new_client_is_served_after_a_disconnect() {
    let server = start_server();
    {
        let mut d = Driver::connect(&server.socket);
        d.init();
        let (status, _) = d.request(
            VIRTIO_BLK_T_OUT,
            2,
            Some((&[0xab; 512], false)),
            Doorbell::Trapped,
        );
        assert_eq!(status, VIRTIO_BLK_S_OK);
    }
    let mut d = Driver::connect(&server.socket);
    d.init();
    let (status, _) = d.request(
        VIRTIO_BLK_T_IN,
        2,
        Some((&[0u8; 512], true)),
        Doorbell::Trapped,
    );
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(d.read_data(512), vec![0xab; 512]);
}
