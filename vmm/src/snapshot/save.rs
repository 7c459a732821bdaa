//! Writing a VM's state as stream sections.

use std::io::Write;

use devices::vfio::migration::{DeviceMigration, MigrationState};
use migration::{DevicePhase, RamPagesBuilder, StreamWriter, VmConfig, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::SnapshotError;
use crate::machine::Machine;
use crate::state::vm::VmState;
use crate::state::StateBytes;

/// Bytes of RAM pages per section: small enough to bound the receiver's buffer.
const RAM_CHUNK: usize = 4 << 20;
/// Chunks read from one device before giving up on it.
const MAX_DEVICE_CHUNKS: usize = 100_000;

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

/// Every page of guest RAM.
pub fn all_pages(m: &Machine) -> Vec<u64> {
    let page = PAGE_SIZE as u64;
    m.mem
        .iter()
        .flat_map(|r| {
            let start = r.start_addr().0;
            (0..r.len() / page).map(move |i| start + i * page)
        })
        .collect()
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
        if let Some(mig) = &d.migration {
            write_device_chunks(&d.id, &**mig, DevicePhase::Final, w)?;
        }
    }
    for (i, s) in m.capture_vcpus()?.iter().enumerate() {
        w.write_vcpu(i as u32, &s.to_bytes()?)?;
    }
    let vm = VmState::capture(&m.vm)?;
    w.write_irqchip(&vm.to_bytes()?)?;
    let json = |id: &str, v: serde_json::Result<Vec<u8>>| {
        v.map_err(|e| SnapshotError::Device {
            id: id.to_string(),
            reason: format!("encoding its state: {e}"),
        })
    };
    for (i, s) in m.serials.iter().enumerate() {
        let id = format!("serial{i}");
        let bytes = json(&id, serde_json::to_vec(&s.state()))?;
        w.write_device(&id, DevicePhase::Final, &bytes)?;
    }
    let bytes = json("i8042", serde_json::to_vec(&m.i8042.state()))?;
    w.write_device("i8042", DevicePhase::Final, &bytes)?;
    for d in m.devices.iter() {
        let id = format!("{}/pci", d.id);
        let bytes = json(&id, serde_json::to_vec(&d.device.state()))?;
        w.write_device(&id, DevicePhase::Final, &bytes)?;
    }
    Ok(())
}
