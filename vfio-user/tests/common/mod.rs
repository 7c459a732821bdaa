//! Shared by the integration tests: the test device (a preset of
//! `vfio_user::testing`'s fake device) and its register layout, and small helpers.

// Each test binary uses only part of it.
#![allow(dead_code, unused_imports)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD,
};
use vfio_user::socket::RecvLimits;
pub use vfio_user::testing::{eventfd, memfd, wait_event, Mapping};
use vfio_user::testing::{FakeDevice, Region, Trigger};
use vfio_user::SparseArea;

/// BAR0: registers, reached by region reads and writes only.
pub const REG_REGION: u32 = 0;
/// BAR2: memfd-backed, with its second page mappable.
pub const MEM_REGION: u32 = 2;
/// Size of BAR0.
pub const REG_SIZE: u64 = 0x100;
/// Size of BAR2.
pub const MEM_SIZE: u64 = 0x2000;
/// The mappable part of BAR2.
pub const MEM_SPARSE: SparseArea = SparseArea {
    offset: 0x1000,
    size: 0x1000,
};
/// Scratch register (read/write, cleared by reset).
pub const REG_SCRATCH: u64 = 0x00;
/// Identification register (read-only).
pub const REG_ID: u64 = 0x04;
/// Value of the identification register.
pub const DEVICE_ID: u32 = 0x5655_0001;
/// DMA address (8 bytes).
pub const REG_DMA_ADDR: u64 = 0x08;
/// DMA length (4 bytes).
pub const REG_DMA_LEN: u64 = 0x10;
/// Writing a byte value here fills the DMA range with it.
pub const REG_DMA_GO: u64 = 0x14;
/// Writing n here signals MSI-X vector n.
pub const REG_IRQ: u64 = 0x18;
/// The MSI-X IRQ type.
pub const MSIX_INDEX: u32 = 2;
/// MSI-X vectors.
pub const MSIX_COUNT: u32 = 4;

/// The test device: BAR0 with the registers above, BAR2 backed by a memfd whose second
/// page may be mapped, MSI-X with four vectors, DMA into client memory.
pub fn test_device() -> FakeDevice {
    let registers = Region::new(REG_SIZE)
        .contents(REG_ID, &DEVICE_ID.to_ne_bytes())
        .read_only(REG_ID..REG_ID + 4)
        .on_write(
            REG_DMA_GO,
            Trigger::DmaFill {
                addr: REG_DMA_ADDR,
                len: REG_DMA_LEN,
            },
        )
        .on_write(REG_IRQ, Trigger::Irq { index: MSIX_INDEX });
    FakeDevice::builder()
        .region(REG_REGION, registers)
        .region(MEM_REGION, Region::memory(MEM_SIZE).sparse(MEM_SPARSE))
        .irq(
            0,
            VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED,
            1,
        )
        .irq(1, VFIO_IRQ_INFO_EVENTFD, 1)
        .irq(
            MSIX_INDEX,
            VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
            MSIX_COUNT,
        )
        .irq(3, VFIO_IRQ_INFO_EVENTFD, 1)
        .irq(4, VFIO_IRQ_INFO_EVENTFD, 1)
        .build()
        .expect("the test device")
}

/// Gives the test device's MSI-X one fresh eventfd per vector through `SET_IRQS`;
/// returns them, vector by vector.
pub fn msix_eventfds(client: &vfio_user::Client) -> Vec<OwnedFd> {
    let fds: Vec<_> = (0..MSIX_COUNT).map(|_| eventfd().unwrap()).collect();
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    client
        .set_irqs(
            MSIX_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            MSIX_COUNT,
            &borrowed,
        )
        .unwrap();
    fds
}

/// A socket path in the temporary directory, removed on drop.
pub struct SocketPath(pub PathBuf);

impl SocketPath {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("vfio-user-{tag}-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        SocketPath(path)
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Generous receive limits for hand-driven peers.
pub const LIMITS: RecvLimits = RecvLimits {
    max_size: 1 << 21,
    max_fds: 16,
};

/// A deadline `secs` seconds away.
pub fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}
