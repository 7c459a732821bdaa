//! `guest-vfio mtty`: two mtty mdevs (Linux's `samples/vfio-mdev/mtty.c`, which implements
//! migration v2 with PRE_COPY and P2P, and DMA logging) in one type1 container, through
//! [`KernelVfio`] and [`KernelVfioMigration`]: MAP_DMA, every direct arc, a state moved from
//! one instance to the other while bytes sit in its FIFO, DMA logging, and wrong moves.

use std::cell::RefCell;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

use devices::vfio::backend::{DmaMapping, CONFIG_REGION};
use devices::vfio::kernel::migration::{
    direct, path, DeviceFdIoctls, FeatureBuf, IovaRange, KernelState, KernelVfioMigration,
    MigrationIoctls, ARCS,
};
use devices::vfio::migration::{DeviceMigration, MigrationState, DIRTY_PAGE_SIZE};
use devices::vfio::{KernelVfio, VfioBackend};
use serde_json::json;
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_SET,
};

use crate::report::{check, emit, migration_error_kind, Step, StepError};

/// 16550 registers mtty emulates (BAR0 is port 0).
const UART_TX: u64 = 0;
const UART_IER: u64 = 1;
const UART_FCR: u64 = 2;
const UART_LCR: u64 = 3;
const UART_MCR: u64 = 4;
const UART_LSR: u64 = 5;
const UART_SCR: u64 = 7;
const BYTES: &[u8] = b"mtty-fifo!";
const DMA_IOVA: u64 = 1 << 20;
const DMA_SIZE: u64 = 2 << 20;

/// The raw kernel state machine on a device fd, for the arc tour and the wrong moves. The
/// state a STOP_COPY session streams out is kept and streamed into every RESUMING session:
/// mtty refuses RESUMING -> STOP without a complete state.
struct Raw {
    io: DeviceFdIoctls,
    flags: u64,
    image: RefCell<Vec<u8>>,
}

impl Raw {
    fn get(&self) -> std::io::Result<KernelState> {
        let mut buf = FeatureBuf::new(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            8,
        );
        // SAFETY: the MIG_DEVICE_STATE payload holds no pointers.
        unsafe { self.io.device_feature(&mut buf) }?;
        KernelState::from_raw(buf.u32_at(0))
            .ok_or_else(|| std::io::Error::other(format!("unknown state {}", buf.u32_at(0))))
    }

    /// One SET. A STOP_COPY data fd is read to its end (the saved image), a RESUMING one
    /// is given the image; other data fds are closed at once.
    fn set(&self, to: KernelState) -> std::io::Result<()> {
        let mut buf = FeatureBuf::new(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            8,
        );
        buf.put_u32(0, to.raw());
        buf.put_u32(4, u32::MAX);
        // SAFETY: the MIG_DEVICE_STATE payload holds no pointers.
        unsafe { self.io.device_feature(&mut buf) }?;
        let fd = buf.u32_at(4) as i32;
        if fd < 0 {
            return Ok(());
        }
        // SAFETY: the kernel returned a new fd that nothing else owns.
        let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        match to {
            KernelState::StopCopy => {
                let mut image = Vec::new();
                file.read_to_end(&mut image)?;
                *self.image.borrow_mut() = image;
            }
            KernelState::Resuming => file.write_all(&self.image.borrow())?,
            _ => {}
        }
        Ok(())
    }

    /// Walks to `to` one direct arc at a time.
    fn goto(&self, to: KernelState) -> Result<(), StepError> {
        let from = self.get().step("arcs")?;
        let steps = path(from, to, self.flags).ok_or_else(|| StepError::Check {
            step: "arcs",
            what: format!("no path from {from} to {to}"),
        })?;
        for a in steps {
            self.take(a.from, a.to)?;
        }
        Ok(())
    }

    /// Takes the arc `from -> to` (the device is in `from`).
    fn take(&self, from: KernelState, to: KernelState) -> Result<(), StepError> {
        self.set(to).map_err(|e| StepError::Check {
            step: "arcs",
            what: format!("{from} -> {to}: {e}"),
        })
    }
}

fn reg(b: &dyn VfioBackend, offset: u64) -> Result<u8, StepError> {
    let mut v = [0u8];
    b.region_read(0, offset, &mut v).step("uart")?;
    Ok(v[0])
}

fn set_reg(b: &dyn VfioBackend, offset: u64, v: u8) -> Result<(), StepError> {
    b.region_write(0, offset, &[v]).step("uart")
}

/// The registers a saved state must carry (reading them changes nothing).
fn regs(b: &dyn VfioBackend) -> Result<serde_json::Value, StepError> {
    Ok(
        json!({ "ier": reg(b, UART_IER)?, "lcr": reg(b, UART_LCR)?, "mcr": reg(b, UART_MCR)?,
               "lsr": reg(b, UART_LSR)?, "scr": reg(b, UART_SCR)? }),
    )
}

/// Pops up to `n` bytes from the receive FIFO.
fn drain(b: &dyn VfioBackend, n: usize) -> Result<Vec<u8>, StepError> {
    let mut out = Vec::new();
    while out.len() < n && reg(b, UART_LSR)? & 1 != 0 {
        out.push(reg(b, UART_TX)?);
    }
    Ok(out)
}

fn save_all(m: &KernelVfioMigration) -> Result<(Vec<Vec<u8>>, u64, u64), StepError> {
    m.set_state(MigrationState::PreCopy).step("save")?;
    let precopy_pending = m.pending_bytes().step("save")?;
    let mut chunks = Vec::new();
    while let Some(c) = m.save_chunk().step("save")? {
        chunks.push(c);
    }
    m.set_state(MigrationState::StopCopy).step("save")?;
    let stop_pending = m.pending_bytes().step("save")?;
    while let Some(c) = m.save_chunk().step("save")? {
        chunks.push(c);
    }
    m.set_state(MigrationState::Stopped).step("save")?;
    Ok((chunks, precopy_pending, stop_pending))
}

/// Runs every step on the mdevs at `a` and `b`.
pub fn run(a_path: &Path, b_path: &Path) -> Result<(), StepError> {
    let open = |p: &Path, c| {
        KernelVfio::open(p, c).map_err(|e| StepError::Check {
            step: "open",
            what: e.to_string(),
        })
    };
    let container = KernelVfio::container(None).map_err(|e| StepError::Check {
        step: "open",
        what: e.to_string(),
    })?;
    let a = open(a_path, container.clone())?;
    let b = open(b_path, container)?;
    let info = a.device_info().step("device_info")?;
    let bar0 = a.region_info(0).step("device_info")?;
    let mut id = [0u8; 4];
    a.region_read(CONFIG_REGION, 0, &mut id)
        .step("device_info")?;
    emit(
        "device_info",
        json!({ "num_regions": info.num_regions, "num_irqs": info.num_irqs, "flags": info.flags,
                "bar0_size": bar0.size, "vendor_device": u32::from_le_bytes(id) }),
    );

    // MAP_DMA of 2 MiB of this process's memory, unmapped at the end.
    // SAFETY: a fresh private anonymous mapping.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            DMA_SIZE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    check(mem != libc::MAP_FAILED, "dma_map", || "mmap failed".into())?;
    let mapping = DmaMapping {
        iova: DMA_IOVA,
        size: DMA_SIZE,
        host_addr: mem as u64,
        file: None,
    };
    // SAFETY: `mem` stays mapped until after the unmap at the end of this function, and no
    // Rust reference to it exists.
    unsafe { a.dma_map(&mapping) }.step("dma_map")?;
    emit("dma_map", json!({ "iova": DMA_IOVA, "size": DMA_SIZE }));

    let ma = a
        .migration()
        .step("migration")?
        .ok_or_else(|| StepError::Check {
            step: "migration",
            what: "mtty reports no migration (VFIO_DEVICE_FEATURE MIGRATION: ENOTTY)".into(),
        })?;
    let mb = b
        .migration()
        .step("migration")?
        .ok_or_else(|| StepError::Check {
            step: "migration",
            what: "the second mtty reports no migration".into(),
        })?;
    emit(
        "migration",
        json!({ "flags": ma.flags(), "dma_logging": ma.dma_logging_supported() }),
    );

    // Every direct arc the device supports, each checked by reading the state back.
    let raw = Raw {
        io: DeviceFdIoctls::new(a.try_clone_device_fd().step("arcs")?),
        flags: ma.flags(),
        image: RefCell::new(Vec::new()),
    };
    // A first save, so that RESUMING sessions have a complete state to take.
    raw.goto(KernelState::StopCopy)?;
    let mut walked = Vec::new();
    for arc in ARCS {
        if direct(arc.from, arc.to, raw.flags).is_none() {
            continue;
        }
        raw.goto(KernelState::Stop)?;
        raw.goto(arc.from)?;
        raw.take(arc.from, arc.to)?;
        let now = raw.get().step("arcs")?;
        check(now == arc.to, "arcs", || {
            format!("{} -> {}: the kernel reports {now}", arc.from, arc.to)
        })?;
        walked.push(format!("{}->{}", arc.from, arc.to));
    }
    raw.goto(KernelState::Stop)?;
    raw.goto(KernelState::Running)?;
    emit("arcs", json!({ "walked": walked }));

    // Bytes in a's FIFO and registers set, then a's state saved (PRE_COPY, STOP_COPY).
    set_reg(&a, UART_FCR, 0x01)?; // FIFO on: up to 16 bytes
    set_reg(&a, UART_LCR, 0x03)?;
    set_reg(&a, UART_MCR, 0x0b)?;
    set_reg(&a, UART_SCR, 0x5a)?;
    for &byte in BYTES {
        set_reg(&a, UART_TX, byte)?;
    }
    let regs_a = regs(&a)?;
    let (chunks, precopy_pending, stop_pending) = save_all(&ma)?;
    let saved: usize = chunks.iter().map(Vec::len).sum();
    emit(
        "save",
        json!({ "regs": regs_a, "precopy_pending": precopy_pending, "stop_copy_pending": stop_pending,
                "chunks": chunks.len(), "bytes": saved }),
    );

    // ... restored into b: RUNNING -> STOP -> RESUMING -> STOP -> RUNNING.
    mb.set_state(MigrationState::Stopped).step("restore")?;
    mb.set_state(MigrationState::Resuming).step("restore")?;
    for c in &chunks {
        mb.restore_chunk(c).step("restore")?;
    }
    mb.set_state(MigrationState::Stopped).step("restore")?;
    mb.set_state(MigrationState::Running).step("restore")?;
    let regs_b = regs(&b)?;
    let fifo_b = drain(&b, 64)?;
    emit(
        "restore",
        json!({ "regs": regs_b, "fifo": String::from_utf8_lossy(&fifo_b) }),
    );
    check(regs_b == regs_a && fifo_b == BYTES, "restore", || {
        format!("b holds {regs_b} and {fifo_b:?}, a held {regs_a} and {BYTES:?}")
    })?;
    ma.set_state(MigrationState::Running).step("restore")?;
    let fifo_a = drain(&a, 64)?;
    emit(
        "source_after",
        json!({ "fifo": String::from_utf8_lossy(&fifo_a) }),
    );

    // DMA logging over the mapped range. The 6.12 guest has CONFIG_IOMMUFD_DRIVER (the
    // core's iova_bitmap, without which every REPORT fails with EOPNOTSUPP; see
    // tests/guest/linux-6.12.config), so start, report and stop must all work. What mtty
    // reports is fixed by its source (samples/vfio-mdev/mtty.c, 6.12): mtty_log_start,
    // mtty_log_stop and mtty_log_read_and_clear all `return 0` and never call
    // iova_bitmap_set (an emulated serial port does no DMA), and the core's
    // iova_bitmap_for_each calls read_and_clear once over the whole range and only pins and
    // writes the caller's bitmap pages from iova_bitmap_set. So the report succeeds with no
    // dirty page, and the bitmap is not written at all: a raw REPORT with a patterned bitmap
    // gets it back unchanged (which is why take_dirty_pages must hand in a zeroed one).
    if ma.dma_logging_supported() {
        let range = IovaRange {
            iova: DMA_IOVA,
            length: DMA_SIZE,
        };
        ma.set_dma_ranges(&[range]).step("dma_logging")?;
        ma.start_dirty_tracking().step("dma_logging")?;
        let dirty = ma.take_dirty_pages().step("dma_logging")?;
        check(dirty.is_empty(), "dma_logging", || {
            format!("mtty reported dirty pages though it does no DMA: {dirty:x?}")
        })?;
        // The same range by hand, with a bitmap of DIRTY_PAGE_SIZE bits the kernel would
        // only ever set bits in.
        const PATTERN: u64 = 0xa5a5_5a5a_0f0f_f0f0;
        let words = (DMA_SIZE / DIRTY_PAGE_SIZE).div_ceil(64) as usize;
        let mut bitmap = vec![PATTERN; words];
        let mut buf =
            FeatureBuf::logging_report(range.iova, range.length, DIRTY_PAGE_SIZE, &mut bitmap);
        // SAFETY: `bitmap` holds ceil(length / page_size / 64) u64s and outlives the call.
        unsafe { raw.io.device_feature(&mut buf) }.step("dma_logging")?;
        let untouched = bitmap.iter().all(|&w| w == PATTERN);
        check(untouched, "dma_logging", || {
            format!("mtty's report wrote the bitmap: {bitmap:x?}")
        })?;
        ma.stop_dirty_tracking().step("dma_logging")?;
        emit(
            "dma_logging",
            json!({ "started": true, "stopped": true,
                    "report": { "iova": range.iova, "length": range.length,
                                "page_size": DIRTY_PAGE_SIZE, "dirty_pages": dirty.len() },
                    "raw_report": { "bitmap_words": words, "bitmap_untouched": untouched } }),
        );
    }

    // Wrong moves, each mapped to a typed error, the device left where it was.
    let wrong_read = ma.save_chunk().err();
    let mut wrong = vec![json!({ "move": "read data while running",
        "kind": wrong_read.as_ref().map(migration_error_kind), "error": wrong_read.map(|e| e.to_string()) })];
    ma.set_state(MigrationState::StopCopy).step("wrong_moves")?;
    let illegal = ma.set_state(MigrationState::PreCopy).err();
    let state_after = raw.get().step("wrong_moves")?;
    wrong.push(json!({ "move": "stop-copy to pre-copy (interface)",
        "kind": illegal.as_ref().map(migration_error_kind), "error": illegal.map(|e| e.to_string()),
        "kernel_state_after": state_after.to_string() }));
    let raw_err = raw.set(KernelState::PreCopy).err();
    let state_after = raw.get().step("wrong_moves")?;
    wrong.push(json!({ "move": "STOP_COPY -> PRE_COPY (raw ioctl)",
        "errno": raw_err.as_ref().and_then(|e| e.raw_os_error()),
        "kernel_state_after": state_after.to_string() }));
    ma.set_state(MigrationState::Running).step("wrong_moves")?;
    // A state that is not mtty's restored into b.
    mb.set_state(MigrationState::Stopped).step("wrong_moves")?;
    mb.set_state(MigrationState::Resuming).step("wrong_moves")?;
    let garbage_write = mb.restore_chunk(b"this is not an mtty state").err();
    let garbage_end = mb.set_state(MigrationState::Running).err();
    let b_state = mb
        .state()
        .map(|s| s.to_string())
        .unwrap_or_else(|e| e.to_string());
    wrong.push(json!({ "move": "restore garbage",
        "write_kind": garbage_write.as_ref().map(migration_error_kind),
        "write_error": garbage_write.map(|e| e.to_string()),
        "end_kind": garbage_end.as_ref().map(migration_error_kind),
        "end_error": garbage_end.map(|e| e.to_string()), "state_after": b_state }));
    // mtty does not report VFIO_DEVICE_FLAGS_RESET, so the backend refuses to reset it
    // (the uAPI's rule); the error is recorded.
    let reset = b.reset().err().map(|e| e.to_string());
    emit("wrong_moves", json!({ "moves": wrong, "reset_b": reset }));

    a.dma_unmap(DMA_IOVA, DMA_SIZE).step("dma_unmap")?;
    // SAFETY: unmapping the buffer mapped above, after the device's mapping was removed.
    unsafe { libc::munmap(mem, DMA_SIZE as usize) };
    emit("dma_unmap", json!({}));
    Ok(())
}
