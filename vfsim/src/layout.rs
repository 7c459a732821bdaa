//! Identity and layout of the function: PCI ids, capability offsets in configuration
//! space, and what lives where in BAR 0.
//!
//! BAR 0 is a 64-bit, non-prefetchable 16 KiB memory BAR:
//!
//! | offset   | size   | contents                                    | access |
//! |----------|--------|---------------------------------------------|--------|
//! | `0x0000` | `0x40` | virtio common configuration                 | trapped |
//! | `0x0800` | `0x4`  | virtio ISR status                           | trapped |
//! | `0x0c00` | `0x40` | virtio-blk device configuration             | trapped |
//! | `0x1000` | `0x1000` | notify area (queue n at `4 * n`)          | sparse mmap area with a memfd |
//! | `0x2000` | `0x20` | MSI-X table (2 vectors)                     | trapped |
//! | `0x3000` | `0x8`  | MSI-X pending bit array                     | trapped |

/// PCI vendor id (Red Hat / virtio).
pub const VENDOR_ID: u16 = 0x1af4;
/// PCI device id: modern virtio-blk (0x1040 + 2).
pub const DEVICE_ID: u16 = 0x1042;
/// Subsystem vendor id.
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
/// Subsystem id: virtio device type 2 (block).
pub const SUBSYSTEM_ID: u16 = 0x0002;
/// Revision id (1 for modern-only virtio devices).
pub const REVISION: u8 = 1;
/// Class code: mass storage (0x01), other (0x80), programming interface 0.
pub const CLASS_CODE: u32 = 0x01_80_00;

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

/// Number of MSI-X vectors: 0 for configuration changes, 1 for the request queue.
pub const MSIX_VECTORS: u16 = 2;
/// Size of the MSI-X table.
pub const MSIX_TABLE_SIZE: u64 = 16 * MSIX_VECTORS as u64;
/// Number of virtqueues.
pub const NUM_QUEUES: u16 = 1;
