//! The function's state as a [`VfState`]: taken from the engine and the PCI registers,
//! checked against this device, and loaded back.

use pf_protocol::proto::{MsixEntry, PciState, QueueState, VfState, STATE_VERSION};

use crate::common_cfg::STATUS_NEEDS_RESET;
use crate::engine::Engine;
use crate::layout::CAP_MSIX;
use crate::pci_config::PciRegs;
use crate::virtqueue::NO_VECTOR;

/// Offset of the command register.
const COMMAND: u64 = 0x04;
/// Offset of BAR 0 (two dwords).
const BAR0: u64 = 0x10;
/// Offset of the interrupt line register.
const INTERRUPT_LINE: u64 = 0x3c;
/// Offset of the MSI-X message control word.
const MSIX_CONTROL: u64 = CAP_MSIX as u64 + 2;
/// Bytes per MSI-X table entry.
const MSIX_ENTRY: usize = 16;

/// The state of `engine` and `pci` now.
pub fn capture(engine: &Engine, pci: &PciRegs) -> VfState {
    let c = &engine.common;
    let mut state = VfState {
        version: STATE_VERSION,
        device_status: c.status,
        device_features: c.device_features,
        driver_features: c.driver_features,
        device_feature_select: c.device_feature_select,
        driver_feature_select: c.driver_feature_select,
        msix_config: c.config_msix_vector,
        config_generation: c.config_generation,
        queue_select: c.queue_select,
        isr: engine.isr,
        capacity_sectors: 0,
        serial: String::new(),
        net: None,
        pci: PciState {
            command: cfg(pci, COMMAND, 2) as u16,
            bar0: cfg(pci, BAR0, 8),
            interrupt_line: cfg(pci, INTERRUPT_LINE, 1) as u8,
            msix_control: cfg(pci, MSIX_CONTROL, 2) as u16,
        },
        msix_table: pci
            .msix_table
            .chunks_exact(MSIX_ENTRY)
            .map(|e| MsixEntry {
                addr: le(&e[0..8]),
                data: le(&e[8..12]) as u32,
                control: le(&e[12..16]) as u32,
            })
            .collect(),
        msix_pending: engine.irqs.pending_bits(),
        queues: c
            .queues
            .iter()
            .map(|q| QueueState {
                max_size: q.max_size,
                size: q.size,
                ready: q.ready,
                msix_vector: q.msix_vector,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                last_avail_idx: q.next_avail,
                used_idx: q.next_used,
            })
            .collect(),
        in_flight: 0,
    };
    engine.personality.save(&mut state);
    state
}

/// Why `state` cannot be loaded into the device `engine` belongs to, if it cannot.
pub fn check(state: &VfState, engine: &Engine) -> Result<(), String> {
    let c = &engine.common;
    if state.version != STATE_VERSION {
        return Err(format!(
            "state version {} is not the supported version {STATE_VERSION}",
            state.version
        ));
    }
    // The personality first: a state of another kind of function fails here, clearly.
    engine.personality.check(state)?;
    if state.in_flight != 0 {
        return Err(format!(
            "the state has {} requests in flight; save it quiesced",
            state.in_flight
        ));
    }
    if state.device_features != c.device_features {
        return Err(format!(
            "the state comes from a device offering features {:#x}, this one offers {:#x}",
            state.device_features, c.device_features
        ));
    }
    if state.driver_features & !c.device_features != 0 {
        return Err(format!(
            "driver features {:#x} include features the device does not offer ({:#x})",
            state.driver_features, c.device_features
        ));
    }
    let vectors = c.msix_vectors();
    let vector_ok = |v: u16| v == NO_VECTOR || v < vectors;
    if !vector_ok(state.msix_config) {
        return Err(format!(
            "msix_config {} is not a vector of the {vectors} the device has",
            state.msix_config
        ));
    }
    if state.msix_table.len() != usize::from(vectors) {
        return Err(format!(
            "the MSI-X table has {} entries, the device {vectors}",
            state.msix_table.len()
        ));
    }
    if state.queues.len() != c.queues.len() {
        return Err(format!(
            "the state has {} queues, the device {}",
            state.queues.len(),
            c.queues.len()
        ));
    }
    for (i, (s, q)) in state.queues.iter().zip(&c.queues).enumerate() {
        if s.max_size != q.max_size {
            return Err(format!(
                "queue {i} comes from a device offering {} entries, this one offers {} (see --queue-size)",
                s.max_size, q.max_size
            ));
        }
        if s.ready && !(s.size.is_power_of_two() && s.size <= q.max_size) {
            return Err(format!(
                "queue {i} is ready with size {}, which is not a power of two up to {}",
                s.size, q.max_size
            ));
        }
        if !vector_ok(s.msix_vector) {
            return Err(format!(
                "queue {i}'s MSI-X vector {} is not a vector of the {vectors} the device has",
                s.msix_vector
            ));
        }
        // Requests complete in order within one pass, so a healthy queue has used every
        // entry it took (a broken one may not: the driver will reset it anyway).
        let broken = state.device_status & STATUS_NEEDS_RESET != 0;
        if s.ready && !broken && s.used_idx != s.last_avail_idx {
            return Err(format!(
                "queue {i}: used index {} differs from the next available index {}, so requests are in flight",
                s.used_idx, s.last_avail_idx
            ));
        }
    }
    Ok(())
}

/// Loads `state`, which [`check`] accepted for this device.
pub fn apply(state: &VfState, engine: &mut Engine, pci: &mut PciRegs) {
    let c = &mut engine.common;
    c.status = state.device_status;
    c.driver_features = state.driver_features;
    c.device_feature_select = state.device_feature_select;
    c.driver_feature_select = state.driver_feature_select;
    c.config_msix_vector = state.msix_config;
    c.config_generation = state.config_generation;
    c.queue_select = state.queue_select;
    for (q, s) in c.queues.iter_mut().zip(&state.queues) {
        q.size = s.size;
        q.ready = s.ready;
        q.msix_vector = s.msix_vector;
        q.desc = s.desc;
        q.avail = s.avail;
        q.used = s.used;
        q.next_avail = s.last_avail_idx;
        q.next_used = s.used_idx;
    }
    engine.isr = state.isr;
    engine.personality.load(state);

    // Through the write masks, as the driver wrote them: read-only bits stay this
    // device's.
    let p = &state.pci;
    let _ = pci.config.write(COMMAND, &p.command.to_le_bytes());
    let _ = pci.config.write(BAR0, &p.bar0.to_le_bytes());
    let _ = pci.config.write(INTERRUPT_LINE, &[p.interrupt_line]);
    let _ = pci
        .config
        .write(MSIX_CONTROL, &p.msix_control.to_le_bytes());
    for (slot, e) in pci
        .msix_table
        .chunks_exact_mut(MSIX_ENTRY)
        .zip(&state.msix_table)
    {
        slot[0..8].copy_from_slice(&e.addr.to_le_bytes());
        slot[8..12].copy_from_slice(&e.data.to_le_bytes());
        slot[12..16].copy_from_slice(&e.control.to_le_bytes());
    }
    // The interrupts follow the registers just loaded; the pending bits come along, and
    // what may be sent already is (the state is loaded quiesced, with the driver's
    // eventfds, if any, already assigned).
    // Everything is loaded with MSI-X off, and switched on last, so that nothing of the
    // state before is sent.
    let (enabled, function_masked) = pci.config.msix_control();
    let irqs = &mut engine.irqs;
    irqs.reset();
    let loaded = (0..irqs.count())
        .try_for_each(|v| irqs.set_masked(v, 1, pci.vector_masked(v as usize)))
        .and_then(|()| irqs.set_pending_bits(state.msix_pending))
        .and_then(|()| irqs.set_control(enabled, function_masked));
    if let Err(e) = loaded {
        tracing::warn!("loading the MSI-X state: {e}");
    }
}

/// `len` bytes of configuration space at `offset`, little-endian.
fn cfg(pci: &PciRegs, offset: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    // The offsets are constants inside the 256-byte space.
    let _ = pci.config.read(offset, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn le(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..bytes.len()].copy_from_slice(bytes);
    u64::from_le_bytes(b)
}
