//! Identity and layout of the function: PCI ids (per personality, [`Identity`]),
//! capability offsets in configuration space, and what lives where in BAR 0.
//!
//! BAR 0 is a 64-bit, non-prefetchable 16 KiB memory BAR:
//!
//! | offset   | size   | contents                                    | access |
//! |----------|--------|---------------------------------------------|--------|
//! | `0x0000` | `0x40` | virtio common configuration                 | trapped |
//! | `0x0800` | `0x4`  | virtio ISR status                           | trapped |
//! | `0x0c00` | `0x40` | device configuration (blk or net)           | trapped |
//! | `0x1000` | `0x1000` | notify area (queue n at `4 * n`)          | sparse mmap area with a memfd |
//! | `0x2000` | `0x10` per vector | MSI-X table (blk 2, net 3 vectors) | trapped |
//! | `0x3000` | `0x8`  | MSI-X pending bit array                     | trapped |

/// PCI vendor id (Red Hat / virtio).
pub const VENDOR_ID: u16 = 0x1af4;
/// Subsystem vendor id.
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
/// Revision id (1 for modern-only virtio devices).
pub const REVISION: u8 = 1;

/// What tells one personality's function from another's: PCI ids and class, and the
/// queue and MSI-X vector counts (vector 0 is the configuration vector, one per queue
/// after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// PCI device id (0x1040 + virtio device type).
    pub device_id: u16,
    /// Subsystem id: the virtio device type.
    pub subsystem_id: u16,
    /// Class code (class, subclass, programming interface).
    pub class_code: u32,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Number of MSI-X vectors (at most [`MAX_MSIX_VECTORS`]).
    pub msix_vectors: u16,
}

impl Identity {
    /// Size of the MSI-X table in BAR 0.
    pub const fn msix_table_size(&self) -> u64 {
        16 * self.msix_vectors as u64
    }
}

/// The modern virtio-blk function: one request queue; vectors: configuration, requests.
pub const BLK_IDENTITY: Identity = Identity {
    device_id: 0x1042,
    subsystem_id: 2,
    // Mass storage (0x01), other (0x80), programming interface 0.
    class_code: 0x01_80_00,
    num_queues: 1,
    msix_vectors: 2,
};

/// The modern virtio-net function: receiveq (0) and transmitq (1); vectors:
/// configuration, receive, transmit.
pub const NET_IDENTITY: Identity = Identity {
    device_id: 0x1041,
    subsystem_id: 1,
    // Network controller (0x02), Ethernet (0x00), programming interface 0.
    class_code: 0x02_00_00,
    num_queues: 2,
    msix_vectors: 3,
};

/// Size of the configuration space exposed as region 7.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Offset of the first capability.
pub const CAP_COMMON: usize = 0x40;
/// Offset of the notify capability.
pub const CAP_NOTIFY: usize = 0x50;
/// Offset of the ISR capability.
pub const CAP_ISR: usize = 0x68;
/// Offset of the device-configuration capability.
pub const CAP_DEVICE: usize = 0x78;
/// Offset of the MSI-X capability.
pub const CAP_MSIX: usize = 0x88;
/// Offset of the PCI Express capability (the last one): an SR-IOV VF must offer FLR.
pub const CAP_PCIE: usize = 0x98;

/// Size of BAR 0.
pub const BAR0_SIZE: u64 = 0x4000;
/// Offset of the common configuration in BAR 0.
pub const COMMON_OFFSET: u64 = 0x0000;
/// Size of the common configuration.
pub const COMMON_SIZE: u64 = 0x40;
/// Offset of the ISR status in BAR 0.
pub const ISR_OFFSET: u64 = 0x0800;
/// Size of the ISR status block.
pub const ISR_SIZE: u64 = 0x4;
/// Offset of the device configuration in BAR 0.
pub const DEVICE_CFG_OFFSET: u64 = 0x0c00;
/// Size of the device configuration.
pub const DEVICE_CFG_SIZE: u64 = 0x40;
/// Offset of the notify area in BAR 0 (page 1).
pub const NOTIFY_OFFSET: u64 = 0x1000;
/// Size of the notify area.
pub const NOTIFY_SIZE: u64 = 0x1000;
/// Bytes between the doorbells of consecutive queues.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table in BAR 0 (page 2).
pub const MSIX_TABLE_OFFSET: u64 = 0x2000;
/// Offset of the MSI-X pending bit array in BAR 0 (page 3).
pub const MSIX_PBA_OFFSET: u64 = 0x3000;
/// Size of the MSI-X pending bit array.
pub const MSIX_PBA_SIZE: u64 = 8;

/// Most MSI-X vectors any personality has: the table (16 bytes each) must fit the page
/// at [`MSIX_TABLE_OFFSET`] and the pending bits the [`MSIX_PBA_SIZE`] bytes.
pub const MAX_MSIX_VECTORS: u16 = 8;

const _: () = assert!(MAX_MSIX_VECTORS as u64 * 16 <= MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET);
const _: () = assert!(MAX_MSIX_VECTORS as u64 <= MSIX_PBA_SIZE * 8);
const _: () = assert!(BLK_IDENTITY.msix_vectors <= MAX_MSIX_VECTORS);
const _: () = assert!(NET_IDENTITY.msix_vectors <= MAX_MSIX_VECTORS);
// One doorbell per queue in the notify area, and one vector per queue plus the
// configuration vector.
const _: () = assert!(NET_IDENTITY.num_queues as u64 * NOTIFY_OFF_MULTIPLIER as u64 <= NOTIFY_SIZE);
const _: () = assert!(NET_IDENTITY.msix_vectors == NET_IDENTITY.num_queues + 1);
const _: () = assert!(BLK_IDENTITY.msix_vectors == BLK_IDENTITY.num_queues + 1);
