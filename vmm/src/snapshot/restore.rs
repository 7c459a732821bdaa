//! Loading a stream into a freshly built VM, before its vCPUs run.

use std::collections::BTreeSet;
use std::io::Read;
use std::time::{Duration, Instant};

use devices::vfio::migration::MigrationState;
use kvm_ioctls::{VcpuFd, VmFd};
use migration::{Control, Section, StreamReader, VmConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::persist::restore_device;
use super::section_key::SectionKey;
use super::SnapshotError;
use crate::device_manager::PciPassthrough;
use crate::state::vcpu::{KvmCaps, VcpuState};
use crate::state::vm::{ClockRestore, VmState};
use crate::state::StateBytes;

/// What a stream is loaded into.
pub struct Target<'a> {
    /// The VM (irqchip and PIT created).
    pub vm: &'a VmFd,
    /// Guest RAM.
    pub mem: &'a GuestMemoryMmap,
    /// The vCPUs, not yet running.
    pub vcpus: &'a [VcpuFd],
    /// What KVM can load.
    pub caps: &'a KvmCaps,
    /// The devices, built from this VMM's `--device` options.
    pub devices: &'a [PciPassthrough],
    /// The legacy devices and the PCI root.
    pub emulated: &'a crate::device_manager::Emulated,
}

/// The legacy and PCI configuration states from the stream, applied after the KVM state.
#[derive(Default)]
struct Configs {
    serials: Vec<(usize, Vec<u8>)>,
    i8042: Option<Vec<u8>>,
    pci_root: Option<Vec<u8>>,
    host_bridge: Option<Vec<u8>>,
    pci: Vec<(String, Vec<u8>)>,
}

impl Configs {
    /// Takes the section if it is one of the VMM's own (see [`SectionKey`]).
    fn take(&mut self, key: &SectionKey, data: &[u8]) -> bool {
        match key {
            SectionKey::Serial(n) => self.serials.push((*n, data.to_vec())),
            SectionKey::I8042 => self.i8042 = Some(data.to_vec()),
            SectionKey::PciRoot => self.pci_root = Some(data.to_vec()),
            SectionKey::HostBridge => self.host_bridge = Some(data.to_vec()),
            SectionKey::PciConfig(dev) => self.pci.push((dev.clone(), data.to_vec())),
            SectionKey::Passthrough(_) => return false,
        }
        true
    }

    fn apply(&self, t: &Target<'_>) -> Result<(), SnapshotError> {
        for (n, data) in &self.serials {
            let key = SectionKey::Serial(*n);
            let port = t
                .emulated
                .serials
                .get(*n)
                .ok_or_else(|| SnapshotError::Mismatch(format!("no {} here", key.encode())))?;
            restore_device(&**port, &key, data, "restoring its registers")?;
        }
        if let Some(data) = &self.i8042 {
            restore_device(
                &*t.emulated.i8042,
                &SectionKey::I8042,
                data,
                "restoring its registers",
            )?;
        }
        if let Some(data) = &self.pci_root {
            restore_device(
                &*t.emulated.pci,
                &SectionKey::PciRoot,
                data,
                "restoring the configuration address latch",
            )?;
        }
        if let Some(data) = &self.host_bridge {
            restore_device(
                &*t.emulated.host_bridge,
                &SectionKey::HostBridge,
                data,
                "restoring its configuration space",
            )?;
        }
        for (id, data) in &self.pci {
            let dev = t.devices.iter().find(|d| &d.id == id).ok_or_else(|| {
                SnapshotError::Mismatch(format!(
                    "the stream has PCI state of an unknown device {id:?}"
                ))
            })?;
            restore_device(
                &*dev.device,
                &SectionKey::PciConfig(id.clone()),
                data,
                "restoring its PCI configuration",
            )?;
        }
        Ok(())
    }
}

/// Reads the stream's header and first section, which must be the VM's config.
pub fn open<R: Read>(r: R) -> Result<(StreamReader<R>, VmConfig), SnapshotError> {
    let mut reader = StreamReader::read_header(r)?;
    let config = reader.read_config()?;
    Ok((reader, config))
}

/// Checks that the devices of this VMM are exactly those the stream carries, and that each
/// can take its saved state here (a device that cannot migrate would run reset).
pub fn check_devices(config: &VmConfig, devices: &[PciPassthrough]) -> Result<(), SnapshotError> {
    let theirs: BTreeSet<&str> = config.devices.iter().map(String::as_str).collect();
    let ours: BTreeSet<&str> = devices.iter().map(|d| d.id.as_str()).collect();
    if theirs != ours {
        let list = |s: &BTreeSet<&str>| {
            if s.is_empty() {
                "none".to_string()
            } else {
                s.iter().copied().collect::<Vec<_>>().join(", ")
            }
        };
        return Err(SnapshotError::Mismatch(format!(
            "the saved VM has devices [{}] but this VMM was given [{}]; give each saved device again with --device ...,id=NAME",
            list(&theirs),
            list(&ours)
        )));
    }
    super::save::refuse_blocked(devices, ", so its saved state cannot be loaded here")
}

/// Refuses a stream that does not carry the whole state of every device: running the
/// guest with a device reset would lose the device's data without a word.
fn check_complete(t: &Target<'_>, done: &[&str], configs: &Configs) -> Result<(), SnapshotError> {
    for d in t.devices {
        if !done.contains(&d.id.as_str()) {
            return Err(SnapshotError::Device {
                id: d.id.clone(),
                reason: "the stream ends without the end of its state (the source never \
                         saved it whole); refusing to run the guest with the device reset"
                    .into(),
            });
        }
        if !configs.pci.iter().any(|(id, _)| id == &d.id) {
            return Err(SnapshotError::Device {
                id: d.id.clone(),
                reason: "the stream carries no PCI configuration for it; refusing to run \
                         the guest with the device unconfigured"
                    .into(),
            });
        }
    }
    Ok(())
}

/// Which guest pages a stream has written (grows as needed).
#[derive(Default)]
struct PageBits(Vec<u64>);

impl PageBits {
    fn set(&mut self, gpa: u64) {
        let page = (gpa / 4096) as usize;
        if self.0.len() <= page / 64 {
            self.0.resize(page / 64 + 1, 0);
        }
        self.0[page / 64] |= 1 << (page % 64);
    }

    /// The addresses of the pages set among `pages` pages from `gpa`, skipping 64 clear
    /// pages at a time.
    fn set_in(&self, gpa: u64, pages: u64) -> impl Iterator<Item = u64> + '_ {
        let first = gpa / 4096;
        let end = first + pages;
        let words = (first / 64) as usize..(end.div_ceil(64) as usize).min(self.0.len());
        words
            .map(move |w| (w, self.0[w]))
            .filter(|&(_, bits)| bits != 0)
            .flat_map(|(w, bits)| {
                (0..64u64)
                    .filter(move |b| bits & (1 << b) != 0)
                    .map(move |b| w as u64 * 64 + b)
            })
            .filter(move |&p| p >= first && p < end)
            .map(|p| p * 4096)
    }
}

/// What [`apply`] loaded.
#[derive(Debug, Default)]
pub struct Loaded {
    /// RAM pages written.
    pub pages: u64,
    /// Device state bytes.
    pub device_bytes: u64,
    /// When the last section was read (the source's Complete, or the end of the file).
    pub read_at: Option<Instant>,
    /// Time to restore the VM-wide KVM state and the vCPUs (where a migration's downtime
    /// goes on this side, with the next two).
    pub kvm_state: Duration,
    /// Time to apply the devices' PCI configuration.
    pub device_config: Duration,
    /// Time to set the devices running.
    pub devices_running: Duration,
}

/// Applies every section after the config until the end of the stream (or a live
/// migration's Complete): RAM, device state
/// (each device resuming from its first chunk, running at the end), then the VM-wide KVM
/// state and the vCPUs (VM first, as the state module requires).
///
/// `synced` is called with each pre-copy pass's number once the pass is applied (a live
/// migration answers the source with it).
pub fn apply<R: Read>(
    reader: &mut StreamReader<R>,
    t: &Target<'_>,
    mut synced: impl FnMut(u32) -> Result<(), SnapshotError>,
) -> Result<Loaded, SnapshotError> {
    let mut loaded = Loaded::default();
    let mut vcpus: Vec<Option<VcpuState>> = (0..t.vcpus.len()).map(|_| None).collect();
    let mut vm_state = None;
    let mut resuming: Vec<&PciPassthrough> = Vec::new();
    // Devices whose end-of-state marker (an empty final section) arrived.
    let mut done: Vec<&str> = Vec::new();
    let mut configs = Configs::default();
    let mut written = PageBits::default();
    loop {
        match reader.next_section()? {
            Section::End => break,
            Section::RamPages(p) => {
                for run in p.runs() {
                    let len = u64::from(run.pages) * migration::PAGE_SIZE as u64;
                    let ram = |e: String| SnapshotError::Ram {
                        gpa: run.gpa,
                        reason: e,
                    };
                    // Checked before any work: a run past guest RAM is a corrupt or hostile
                    // stream, and the work below is bounded by RAM's size, not the run's.
                    if !t.mem.check_range(GuestAddress(run.gpa), len as usize) {
                        return Err(ram(format!(
                            "a run of {} pages does not lie within guest RAM",
                            run.pages
                        )));
                    }
                    match run.data {
                        Some(data) => {
                            t.mem
                                .write_slice(data, GuestAddress(run.gpa))
                                .map_err(|e| ram(e.to_string()))?;
                            for i in 0..u64::from(run.pages) {
                                written.set(run.gpa + i * 4096);
                            }
                        }
                        None => {
                            // Fresh guest RAM is zero already: only pages this stream
                            // wrote before need zeroing (writing the others would make
                            // the kernel allocate every page of the memfd).
                            let zeros = vec![0u8; migration::PAGE_SIZE];
                            for gpa in written.set_in(run.gpa, u64::from(run.pages)) {
                                t.mem
                                    .write_slice(&zeros, GuestAddress(gpa))
                                    .map_err(|e| ram(e.to_string()))?;
                            }
                        }
                    }
                    loaded.pages += len / migration::PAGE_SIZE as u64;
                }
            }
            Section::Device(d) => {
                let key = SectionKey::parse(&d.id).ok_or_else(|| {
                    SnapshotError::Mismatch(format!(
                        "the stream has a device section {:?} this VMM does not know",
                        d.id
                    ))
                })?;
                if configs.take(&key, &d.data) {
                    continue;
                }
                let dev = t.devices.iter().find(|x| x.id == d.id).ok_or_else(|| {
                    SnapshotError::Mismatch(format!(
                        "the stream has state of an unknown device {:?}",
                        d.id
                    ))
                })?;
                let mig = dev
                    .migration
                    .as_ref()
                    .ok_or_else(|| SnapshotError::Device {
                        id: d.id.clone(),
                        reason: format!(
                            "the stream has its state but it cannot take it here: {}",
                            dev.migration_blocker
                                .as_deref()
                                .unwrap_or("no migration interface")
                        ),
                    })?;
                let derr = |e: devices::vfio::migration::MigrationError| SnapshotError::Device {
                    id: d.id.clone(),
                    reason: e.to_string(),
                };
                if done.contains(&dev.id.as_str()) {
                    return Err(SnapshotError::Device {
                        id: d.id.clone(),
                        reason: "the stream has more of its state after its end".into(),
                    });
                }
                if !resuming.iter().any(|r| r.id == d.id) {
                    mig.set_state(MigrationState::Resuming).map_err(derr)?;
                    resuming.push(dev);
                }
                if d.data.is_empty() && d.phase == migration::DevicePhase::Final {
                    done.push(dev.id.as_str());
                    continue;
                }
                mig.restore_chunk(&d.data).map_err(derr)?;
                loaded.device_bytes += d.data.len() as u64;
            }
            Section::Vcpu { id, state } => {
                let slot = vcpus.get_mut(id as usize).ok_or_else(|| {
                    SnapshotError::Mismatch(format!(
                        "the stream has vCPU {id} but this VM has {} vCPUs",
                        t.vcpus.len()
                    ))
                })?;
                *slot = Some(VcpuState::from_bytes(&state)?);
            }
            Section::Irqchip(bytes) => vm_state = Some(VmState::from_bytes(&bytes)?),
            Section::VmConfig(_) => {
                return Err(SnapshotError::Mismatch("a second VM config section".into()))
            }
            Section::Control(c) => match c {
                Control::IterationEnd { iteration } => synced(iteration)?,
                Control::IterationBegin { .. } | Control::StopAndCopy => {}
                Control::Complete => break,
                Control::Abort { reason } => {
                    return Err(SnapshotError::Mismatch(format!(
                        "the source aborted the migration: {reason}"
                    )))
                }
                other => {
                    return Err(SnapshotError::Mismatch(format!(
                        "unexpected {other:?} from the source"
                    )))
                }
            },
        }
    }
    let read_at = Instant::now();
    loaded.read_at = Some(read_at);
    check_complete(t, &done, &configs)?;
    let vm_state = vm_state.ok_or_else(|| {
        SnapshotError::Mismatch("the stream has no irqchip/PIT/clock state".into())
    })?;
    vm_state.restore(t.vm, ClockRestore::Frozen)?;
    for (i, (fd, s)) in t.vcpus.iter().zip(&vcpus).enumerate() {
        let s = s.as_ref().ok_or_else(|| {
            SnapshotError::Mismatch(format!("the stream has no state of vCPU {i}"))
        })?;
        s.restore(fd, t.caps)?;
    }
    loaded.kvm_state = read_at.elapsed();
    let step = Instant::now();
    configs.apply(t)?;
    loaded.device_config = step.elapsed();
    let step = Instant::now();
    for dev in resuming {
        if let Some(mig) = &dev.migration {
            mig.set_state(MigrationState::Running)
                .map_err(|e| SnapshotError::Device {
                    id: dev.id.clone(),
                    reason: e.to_string(),
                })?;
        }
    }
    loaded.devices_running = step.elapsed();
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::PageBits;

    #[test]
    fn pages_set_in_a_range_are_found_and_only_those() {
        let mut b = PageBits::default();
        for page in [0u64, 63, 64, 65, 200, 1000] {
            b.set(page * 4096);
        }
        let found: Vec<u64> = b.set_in(63 * 4096, 200 - 63).map(|g| g / 4096).collect();
        assert_eq!(found, vec![63, 64, 65]);
        let all: Vec<u64> = b.set_in(0, 2000).map(|g| g / 4096).collect();
        assert_eq!(all, vec![0, 63, 64, 65, 200, 1000]);
        // Far past what was ever set, and a huge run: nothing, and no work per page.
        let t = std::time::Instant::now();
        assert_eq!(b.set_in(0, u64::from(u32::MAX)).count(), 6);
        assert_eq!(b.set_in(1 << 40, u64::from(u32::MAX)).count(), 0);
        assert!(t.elapsed() < std::time::Duration::from_millis(50));
    }
}
