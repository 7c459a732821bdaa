//! Writing a VM's state as stream sections.

use std::io::Write;

use devices::vfio::migration::{DeviceMigration, MigrationState};
use migration::{DevicePhase, RamPagesBuilder, StreamWriter, VmConfig, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::persist::save_device;
use super::section_key::SectionKey;
use super::{Blocked, SnapshotError};
use crate::machine::Machine;
use crate::state::vm::VmState;
use crate::state::StateBytes;

/// Bytes of RAM pages per section: small enough to bound the receiver's buffer.
const RAM_CHUNK: usize = 4 << 20;
/// Chunks read from one device before giving up on it.
const MAX_DEVICE_CHUNKS: usize = 100_000;

/// Refuses a VM holding a device that cannot migrate (a snapshot or migration of it would
/// carry no device state and the device would come back reset: data lost without a word).
/// Called before anything is paused or sent.
pub fn check_migratable(m: &Machine) -> Result<(), SnapshotError> {
    refuse_blocked(&m.devices, "")
}

/// Fails naming every device in `devices` that cannot migrate, each reason followed by
/// `then` (what that means where it is called).
pub fn refuse_blocked(
    devices: &[crate::device_manager::PciPassthrough],
    then: &str,
) -> Result<(), SnapshotError> {
    let blocked: Vec<Blocked> = devices
        .iter()
        .filter(|d| d.migration.is_none())
        .map(|d| Blocked {
            id: d.id.clone(),
            reason: format!(
                "{}{then}",
                d.migration_blocker
                    .as_deref()
                    .unwrap_or("it has no migration interface")
            ),
        })
        .collect();
    if blocked.is_empty() {
        Ok(())
    } else {
        Err(SnapshotError::NotMigratable(blocked))
    }
}

/// The config section of `m`: memory, vCPUs and the devices whose state follows.
pub fn config(m: &Machine) -> VmConfig {
    VmConfig {
        mem_size: m.mem_size,
        vcpus: u32::from(m.cpus),
        devices: m.devices.iter().map(|d| d.id.clone()).collect(),
    }
}

fn ram_err(gpa: u64) -> impl FnOnce(String) -> SnapshotError {
    move |reason| SnapshotError::Ram { gpa, reason }
}

/// Writes the pages at `gpas` (page-aligned guest addresses, sorted) in sections of at most
/// [`RAM_CHUNK`] bytes; returns the number of pages written.
pub fn write_pages<W: Write>(
    m: &Machine,
    w: &mut StreamWriter<W>,
    gpas: impl IntoIterator<Item = u64>,
) -> Result<u64, SnapshotError> {
    let mut b = RamPagesBuilder::new();
    let mut page = vec![0u8; PAGE_SIZE];
    let mut n = 0;
    for gpa in gpas {
        m.mem
            .read_slice(&mut page, GuestAddress(gpa))
            .map_err(|e| ram_err(gpa)(e.to_string()))?;
        b.push_page(gpa, &page)?;
        n += 1;
        if b.payload_len() >= RAM_CHUNK {
            w.write_ram_pages(&b)?;
            b.clear();
        }
    }
    if !b.is_empty() {
        w.write_ram_pages(&b)?;
    }
    Ok(n)
}

/// The parts of `[start, start + len)` of `file` that hold data (`SEEK_DATA` /
/// `SEEK_HOLE`): the rest of a memfd was never written and reads as zeros.
fn data_ranges(file: &std::fs::File, start: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let end = start + len;
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let off = libc::off_t::try_from(pos).map_err(std::io::Error::other)?;
        // SAFETY: lseek on an fd this process owns; it only moves the file offset, which
        // nothing else in this process relies on (guest RAM is accessed through mmap).
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(out)
}

/// Writes all of guest RAM: pages the memfd holds data for are read and sent (all-zero
/// ones as zero runs), the never-written rest is sent as zero runs without touching it
/// (reading it would make the kernel allocate every page of the memfd).
pub fn write_all_ram<W: Write>(m: &Machine, w: &mut StreamWriter<W>) -> Result<u64, SnapshotError> {
    let page = PAGE_SIZE as u64;
    let mut n = 0;
    for r in m.mem.iter() {
        let gpa = r.start_addr().0;
        let len = r.len();
        let data = match r.file_offset() {
            Some(f) => data_ranges(f.file(), f.start(), len)
                .map(|v| v.into_iter().map(|(o, l)| (o - f.start(), l)).collect())
                .unwrap_or_else(|e| {
                    tracing::debug!("SEEK_DATA on guest RAM failed ({e}); reading it all");
                    vec![(0, len)]
                }),
            None => vec![(0, len)],
        };
        let mut b = RamPagesBuilder::new();
        let mut cursor = 0u64;
        let flush = |b: &mut RamPagesBuilder, w: &mut StreamWriter<W>, force: bool| {
            if !b.is_empty() && (force || b.payload_len() >= RAM_CHUNK) {
                w.write_ram_pages(b)?;
                b.clear();
            }
            Ok::<_, SnapshotError>(())
        };
        for (off, dlen) in data.into_iter().chain(std::iter::once((len, 0))) {
            // Round the data range out to whole pages.
            let (dstart, dend) = (off / page * page, (off + dlen).div_ceil(page) * page);
            let dstart = dstart.max(cursor);
            if dstart > cursor {
                let pages = (dstart - cursor) / page;
                let count = u32::try_from(pages).map_err(|_| SnapshotError::Ram {
                    gpa: gpa + cursor,
                    reason: format!("{pages} pages in one hole"),
                })?;
                b.push_zero_pages(gpa + cursor, count)?;
                n += pages;
                flush(&mut b, w, false)?;
            }
            let pages: Vec<u64> = (dstart.max(cursor)..dend.min(len))
                .step_by(PAGE_SIZE)
                .map(|o| gpa + o)
                .collect();
            if !pages.is_empty() {
                flush(&mut b, w, true)?;
                n += write_pages(m, w, pages)?;
            }
            cursor = cursor.max(dend.min(len));
        }
        flush(&mut b, w, true)?;
    }
    Ok(n)
}

/// Saves what `dev` has pending in its current phase as device sections of `id`.
pub fn write_device_chunks<W: Write>(
    id: &str,
    dev: &dyn DeviceMigration,
    phase: DevicePhase,
    w: &mut StreamWriter<W>,
) -> Result<u64, SnapshotError> {
    let derr = |e: devices::vfio::migration::MigrationError| SnapshotError::Device {
        id: id.to_string(),
        reason: e.to_string(),
    };
    let mut bytes = 0;
    for _ in 0..MAX_DEVICE_CHUNKS {
        let final_phase = phase == DevicePhase::Final;
        if final_phase && dev.pending_bytes().map_err(derr)? == 0 {
            return Ok(bytes);
        }
        match dev.save_chunk().map_err(derr)? {
            // An empty section is the end-of-state marker: never send one as a chunk.
            Some(chunk) if chunk.is_empty() => {}
            Some(chunk) => {
                bytes += chunk.len() as u64;
                w.write_device(id, phase, &chunk)?;
            }
            None if final_phase => {}
            None => return Ok(bytes),
        }
    }
    Err(SnapshotError::Device {
        id: id.to_string(),
        reason: format!("it offered more than {MAX_DEVICE_CHUNKS} chunks"),
    })
}

/// Stops every migratable device (StopCopy) for the final state. On failure, the devices
/// stopped so far are set running again.
pub fn stop_devices(m: &Machine) -> Result<(), SnapshotError> {
    let migratable: Vec<_> = m
        .devices
        .iter()
        .filter_map(|d| d.migration.as_ref().map(|mig| (d.id.as_str(), mig)))
        .collect();
    for (n, (id, mig)) in migratable.iter().enumerate() {
        let to_stop_copy = match mig.state() {
            Ok(MigrationState::StopCopy) => Ok(()),
            _ => mig.set_state(MigrationState::StopCopy),
        };
        if let Err(e) = to_stop_copy {
            for (_, m2) in &migratable[..n] {
                let _ = m2.set_state(MigrationState::Running);
            }
            return Err(SnapshotError::Device {
                id: id.to_string(),
                reason: e.to_string(),
            });
        }
    }
    Ok(())
}

/// Sets every migratable device running again (after a snapshot, or a failed
/// migration); logs failures, since the guest must go on either way.
pub fn restart_devices(m: &Machine) {
    for d in m.devices.iter() {
        if let Some(mig) = &d.migration {
            if let Err(e) = mig.set_state(MigrationState::Running) {
                tracing::error!("device {}: cannot run it again: {e}", d.id);
            }
        }
    }
}

/// With vCPUs paused and devices stopped: the final state of the devices, vCPUs and the
/// VM-wide KVM state.
pub fn write_final_state<W: Write>(
    m: &Machine,
    w: &mut StreamWriter<W>,
) -> Result<(), SnapshotError> {
    for d in m.devices.iter() {
        let Some(mig) = &d.migration else {
            // check_migratable refused this VM before anything was stopped.
            return Err(SnapshotError::NotMigratable(vec![Blocked {
                id: d.id.clone(),
                reason: d.migration_blocker.clone().unwrap_or_default(),
            }]));
        };
        write_device_chunks(&d.id, &**mig, DevicePhase::Final, w)?;
        // The end of its state: the receiver refuses a stream without it rather than run
        // the device reset (a device may have zero bytes of state, so chunks cannot tell).
        w.write_device(&d.id, DevicePhase::Final, &[])?;
    }
    for (i, s) in m.capture_vcpus()?.iter().enumerate() {
        w.write_vcpu(i as u32, &s.to_bytes()?)?;
    }
    let vm = VmState::capture(&m.vm)?;
    w.write_irqchip(&vm.to_bytes()?)?;
    for (i, s) in m.emulated.serials.iter().enumerate() {
        save_device(w, &SectionKey::Serial(i), &**s)?;
    }
    save_device(w, &SectionKey::I8042, &*m.emulated.i8042)?;
    save_device(w, &SectionKey::PciRoot, &*m.emulated.pci)?;
    save_device(w, &SectionKey::HostBridge, &*m.emulated.host_bridge)?;
    for d in m.devices.iter() {
        save_device(w, &SectionKey::PciConfig(d.id.clone()), &*d.device)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    #[test]
    fn data_ranges_skip_the_never_written_holes() {
        let f = crate::memory::create(16 << 20)
            .map(|(_, f)| f)
            .expect("memfd");
        assert!(super::data_ranges(&f, 0, 16 << 20).unwrap().is_empty());
        f.write_all_at(&[1], 0x5000).unwrap();
        f.write_all_at(&[2; 0x3000], 0x20_0000).unwrap();
        let r = super::data_ranges(&f, 0, 16 << 20).unwrap();
        // Data is reported at least page by page around what was written.
        assert!(
            r.iter().any(|&(o, l)| o <= 0x5000 && 0x5000 < o + l),
            "{r:x?}"
        );
        assert!(
            r.iter().any(|&(o, l)| o <= 0x20_2fff && 0x20_2fff < o + l),
            "{r:x?}"
        );
        let covered: u64 = r.iter().map(|&(_, l)| l).sum();
        assert!(covered < 1 << 20, "holes stay holes: {r:x?}");
        // A window in the middle sees only its part.
        let r = super::data_ranges(&f, 0x10_0000, 0x10_0000).unwrap();
        assert!(r.is_empty(), "{r:x?}");
    }
}
