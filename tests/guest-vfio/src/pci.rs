//! `guest-vfio pci`: a virtio-blk PCI function bound to vfio-pci in no-IOMMU mode, driven
//! through [`KernelVfio`] as a user-space driver: every step the issue names, then one write
//! request by DMA to locked pages (no-IOMMU has no MAP_DMA: addresses are physical).

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use devices::vfio::backend::{CONFIG_REGION, IRQ_MSIX};
use devices::vfio::{KernelVfio, VfioBackend};
use serde_json::json;
use vfio_bindings::bindings::vfio::VFIO_DEVICE_FLAGS_RESET;
use vmm_sys_util::eventfd::EventFd;

use crate::phys::LockedPage;
use crate::report::{check, emit, Step, StepError};
use crate::virtio::{common, find_layout, Common, MappedPage, SplitQueue, QUEUE_SIZE};

const STATUS_ACK: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const BLK_T_OUT: u32 = 1;

/// The 512 bytes written to `sector` (the host test computes the same).
pub fn pattern(sector: u64) -> Vec<u8> {
    (0..512u64)
        .map(|i| ((i * 7 + sector) % 251) as u8)
        .collect()
}

/// Waits up to `timeout` for `fd` to be signalled; returns its counter (0: timed out).
fn wait_eventfd(fd: &EventFd, timeout: Duration) -> std::io::Result<u64> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n == 0 {
        return Ok(0);
    }
    fd.read()
}

/// Runs every step on the function at `sysfs`, writing [`pattern`] to `sector`.
pub fn run(sysfs: &Path, sector: u64) -> Result<(), StepError> {
    let dev = KernelVfio::open_noiommu(sysfs).map_err(|e| StepError::Check {
        step: "open",
        what: e.to_string(),
    })?;
    emit("open", json!({ "path": sysfs }));
    let b: &dyn VfioBackend = &dev;

    let info = b.device_info().step("device_info")?;
    emit(
        "device_info",
        json!({ "num_regions": info.num_regions, "num_irqs": info.num_irqs, "flags": info.flags,
                "reset": info.flags & VFIO_DEVICE_FLAGS_RESET != 0 }),
    );

    let mut regions = Vec::new();
    for i in 0..info.num_regions {
        let r = b.region_info(i).step("region_info")?;
        regions.push(json!({
            "index": i, "size": r.size, "read": r.flags.read, "write": r.flags.write,
            "mmap": r.flags.mmap, "sparse_areas": r.sparse_areas,
            "caps": dev.region_capability_ids(i).step("region_info")?,
        }));
    }
    emit("regions", json!({ "regions": regions }));

    // Configuration space: ids, then the command register (memory space and bus master,
    // which DMA needs), written and read back.
    let mut id = [0u8; 4];
    b.region_read(CONFIG_REGION, 0, &mut id).step("config")?;
    let mut cmd = [0u8; 2];
    b.region_read(CONFIG_REGION, 4, &mut cmd).step("config")?;
    let before = u16::from_le_bytes(cmd);
    b.region_write(CONFIG_REGION, 4, &(before | 0x6).to_le_bytes())
        .step("config")?;
    b.region_read(CONFIG_REGION, 4, &mut cmd).step("config")?;
    let after = u16::from_le_bytes(cmd);
    let (layout, cap_ids) = find_layout(b).step("config")?;
    emit(
        "config",
        json!({ "vendor": u16::from_le_bytes([id[0], id[1]]), "device": u16::from_le_bytes([id[2], id[3]]),
                "command_before": before, "command_after": after, "capabilities": cap_ids,
                "msix_vectors": layout.msix_vectors, "common_bar": layout.common.bar,
                "notify_bar": layout.notify.bar }),
    );
    check(after & 0x6 == 0x6, "config", || {
        format!("command register reads {after:#x} after setting memory and bus master")
    })?;

    // MSI-X: vector 0 for configuration changes, 1 for the queue.
    let irq = b.irq_info(IRQ_MSIX).step("msix")?;
    check(irq.count >= 2, "msix", || {
        format!("{} MSI-X vectors, 2 needed", irq.count)
    })?;
    let fds = [EventFd::new(0).step("msix")?, EventFd::new(0).step("msix")?];
    b.set_irq_eventfds(IRQ_MSIX, 0, &[Some(&fds[0]), Some(&fds[1])])
        .step("msix")?;
    emit("msix", json!({ "vectors": irq.count, "enabled": 2 }));

    // Virtio initialisation (virtio 1.x, 3.1.1).
    let c = Common::new(b, layout.common);
    c.write(common::STATUS, &[0]).step("virtio_init")?;
    c.write(common::STATUS, &[STATUS_ACK | STATUS_DRIVER])
        .step("virtio_init")?;
    c.write(common::DFSELECT, &1u32.to_le_bytes())
        .step("virtio_init")?;
    let high = c.read(common::DF, 4).step("virtio_init")?;
    check(high & 1 != 0, "virtio_init", || {
        "the device does not offer VIRTIO_F_VERSION_1".into()
    })?;
    c.write(common::GFSELECT, &0u32.to_le_bytes())
        .step("virtio_init")?;
    c.write(common::GF, &0u32.to_le_bytes())
        .step("virtio_init")?;
    c.write(common::GFSELECT, &1u32.to_le_bytes())
        .step("virtio_init")?;
    c.write(common::GF, &1u32.to_le_bytes())
        .step("virtio_init")?;
    c.write(
        common::STATUS,
        &[STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK],
    )
    .step("virtio_init")?;
    let status = c.read(common::STATUS, 1).step("virtio_init")? as u8;
    check(status & STATUS_FEATURES_OK != 0, "virtio_init", || {
        format!("FEATURES_OK not kept (status {status:#x})")
    })?;
    c.write(common::MSIX_CONFIG, &0u16.to_le_bytes())
        .step("virtio_init")?;
    let q = SplitQueue::new().step("virtio_init")?;
    c.write(common::Q_SELECT, &0u16.to_le_bytes())
        .step("virtio_init")?;
    let max = c.read(common::Q_SIZE, 2).step("virtio_init")? as u16;
    check(max >= QUEUE_SIZE, "virtio_init", || {
        format!("queue 0 holds {max} entries, {QUEUE_SIZE} needed")
    })?;
    c.write(common::Q_SIZE, &QUEUE_SIZE.to_le_bytes())
        .step("virtio_init")?;
    c.write(common::Q_MSIX, &1u16.to_le_bytes())
        .step("virtio_init")?;
    let vector = c.read(common::Q_MSIX, 2).step("virtio_init")? as u16;
    check(vector == 1, "virtio_init", || {
        format!("queue vector reads {vector:#x}, not 1 (0xffff: the device refused it)")
    })?;
    c.write(common::Q_DESC, &q.desc.phys().to_le_bytes())
        .step("virtio_init")?;
    c.write(common::Q_AVAIL, &q.avail.phys().to_le_bytes())
        .step("virtio_init")?;
    c.write(common::Q_USED, &q.used.phys().to_le_bytes())
        .step("virtio_init")?;
    let notify_off = c.read(common::Q_NOTIFY_OFF, 2).step("virtio_init")?;
    c.write(common::Q_ENABLE, &1u16.to_le_bytes())
        .step("virtio_init")?;
    c.write(
        common::STATUS,
        &[STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK],
    )
    .step("virtio_init")?;
    let status = c.read(common::STATUS, 1).step("virtio_init")? as u8;
    emit(
        "virtio_init",
        json!({ "status": status, "queue_max": max, "desc_phys": q.desc.phys() }),
    );

    // The doorbell through an mmap of the notify page.
    let doorbell = layout.notify.offset + notify_off * u64::from(layout.notify_multiplier);
    let page =
        MappedPage::map(b, layout.notify.bar, doorbell).map_err(|what| StepError::Check {
            step: "notify_mmap",
            what,
        })?;
    emit(
        "notify_mmap",
        json!({ "bar": layout.notify.bar, "offset": doorbell }),
    );

    // One write request: header, data, status.
    let (hdr, data, st) = (
        LockedPage::new().step("request")?,
        LockedPage::new().step("request")?,
        LockedPage::new().step("request")?,
    );
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&BLK_T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    hdr.write(0, &h);
    let bytes = pattern(sector);
    data.write(0, &bytes);
    st.write(0, &[0xff]);
    q.set_desc(0, hdr.phys(), 16, DESC_NEXT, 1);
    q.set_desc(1, data.phys(), 512, DESC_NEXT, 2);
    q.set_desc(2, st.phys(), 1, DESC_WRITE, 0);
    q.publish(0, 0, 1);
    page.write_u16(doorbell & 0xfff, 0);
    let signalled = wait_eventfd(&fds[1], Duration::from_secs(20)).step("interrupt")?;
    emit("interrupt", json!({ "vector": 1, "count": signalled }));
    check(signalled > 0, "interrupt", || {
        "no MSI-X interrupt on vector 1 within 20 s".into()
    })?;
    let used = q.used_idx();
    let status = st.read(0, 1)[0];
    emit(
        "request",
        json!({ "sector": sector, "used_idx": used, "status": status,
                "data": bytes.iter().map(|b| format!("{b:02x}")).collect::<String>() }),
    );
    check(used == 1 && status == 0, "request", || {
        format!("used index {used}, status {status} (want 1 and 0)")
    })?;

    // Reset: interrupts off, then a function reset, after which virtio's status reads 0.
    b.disable_irqs(IRQ_MSIX).step("reset")?;
    b.reset().step("reset")?;
    let status = c.read(common::STATUS, 1).step("reset")? as u8;
    emit("reset", json!({ "status_after": status }));
    check(status == 0, "reset", || {
        format!("virtio status reads {status:#x} after reset")
    })?;
    Ok(())
}
