//! The guest's port-I/O and MMIO buses.
//!
//! A thin layer over `vm_device::IoManager` that adds what a VMM needs around it: a name and
//! access counters per registered range (the exit statistics), registration through `&self`
//! (the vCPU threads hold the bus while devices are added or moved), and a defined answer for
//! accesses nobody claims: reads return all ones, as on a real bus with nothing driving it,
//! and writes are dropped. A guest poking unassigned addresses never reaches a panic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use vm_device::bus::{
    MmioAddress, MmioAddressOffset, MmioRange, PioAddress, PioAddressOffset, PioRange,
};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};

/// Errors from registering devices on a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("invalid {space} range {base:#x}+{len:#x} for device {name}")]
    InvalidRange {
        space: &'static str,
        name: String,
        base: u64,
        len: u64,
    },
    /// The range overlaps a device that is already registered.
    #[error("{space} range {base:#x}+{len:#x} for device {name} overlaps a registered device")]
    Overlap {
        space: &'static str,
        name: String,
        base: u64,
        len: u64,
    },
    /// No device is registered at that address.
    #[error("no {space} device registered at {base:#x}")]
    NotRegistered { space: &'static str, base: u64 },
}

/// Access counters of one registered range.
#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
}

/// A registered device with its name and counters.
struct Entry<D: ?Sized> {
    name: String,
    space: &'static str,
    base: u64,
    len: u64,
    counters: Counters,
    dev: Arc<D>,
}

impl<D: DevicePio + ?Sized> DevicePio for Entry<D> {
    fn pio_read(&self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.dev.pio_read(base, offset, data)
    }
    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.dev.pio_write(base, offset, data)
    }
}

impl<D: DeviceMmio + ?Sized> DeviceMmio for Entry<D> {
    fn mmio_read(&self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.dev.mmio_read(base, offset, data)
    }
    fn mmio_write(&self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.dev.mmio_write(base, offset, data)
    }
}

/// One line of [`Bus::stats`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BusStats {
    /// "pio" or "mmio".
    pub space: &'static str,
    /// Device name given at registration ("unassigned" for accesses nobody claimed).
    pub name: String,
    /// First address of the range.
    pub base: u64,
    /// Length of the range.
    pub len: u64,
    /// Guest reads that reached the range.
    pub reads: u64,
    /// Guest writes that reached the range.
    pub writes: u64,
}

type PioEntry = Entry<dyn DevicePio + Send + Sync>;
type MmioEntry = Entry<dyn DeviceMmio + Send + Sync>;

/// The port-I/O and MMIO buses of one VM.
#[derive(Default)]
pub struct Bus {
    io: RwLock<IoManager>,
    pio: RwLock<Vec<Arc<PioEntry>>>,
    mmio: RwLock<Vec<Arc<MmioEntry>>>,
    unassigned: [Counters; 2],
}

const PIO: usize = 0;
const MMIO: usize = 1;

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `dev` for ports `[base, base + len)`.
    pub fn register_pio(
        &self,
        name: &str,
        base: u16,
        len: u16,
        dev: Arc<dyn DevicePio + Send + Sync>,
    ) -> Result<(), BusError> {
        let invalid = || BusError::InvalidRange {
            space: "pio",
            name: name.to_string(),
            base: base.into(),
            len: len.into(),
        };
        let range = PioRange::new(PioAddress(base), len).map_err(|_| invalid())?;
        let entry = Arc::new(Entry {
            name: name.to_string(),
            space: "pio",
            base: base.into(),
            len: len.into(),
            counters: Counters::default(),
            dev,
        });
        self.io
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .register_pio(range, entry.clone())
            .map_err(|_| BusError::Overlap {
                space: "pio",
                name: name.to_string(),
                base: base.into(),
                len: len.into(),
            })?;
        self.pio
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(entry);
        Ok(())
    }

    /// Registers `dev` for guest physical addresses `[base, base + len)`.
    pub fn register_mmio(
        &self,
        name: &str,
        base: u64,
        len: u64,
        dev: Arc<dyn DeviceMmio + Send + Sync>,
    ) -> Result<(), BusError> {
        let invalid = || BusError::InvalidRange {
            space: "mmio",
            name: name.to_string(),
            base,
            len,
        };
        let range = MmioRange::new(MmioAddress(base), len).map_err(|_| invalid())?;
        let entry = Arc::new(Entry {
            name: name.to_string(),
            space: "mmio",
            base,
            len,
            counters: Counters::default(),
            dev,
        });
        self.io
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .register_mmio(range, entry.clone())
            .map_err(|_| BusError::Overlap {
                space: "mmio",
                name: name.to_string(),
                base,
                len,
            })?;
        self.mmio
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(entry);
        Ok(())
    }

    /// Removes the MMIO device registered at `base` (e.g. before a BAR moves).
    pub fn deregister_mmio(&self, base: u64) -> Result<(), BusError> {
        self.io
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .deregister_mmio(MmioAddress(base))
            .ok_or(BusError::NotRegistered {
                space: "mmio",
                base,
            })?;
        self.mmio
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|e| e.base != base);
        Ok(())
    }

    /// Removes the port-I/O device registered at `base` (e.g. before an I/O BAR moves).
    pub fn deregister_pio(&self, base: u16) -> Result<(), BusError> {
        self.io
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .deregister_pio(PioAddress(base))
            .ok_or(BusError::NotRegistered {
                space: "pio",
                base: base.into(),
            })?;
        self.pio
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|e| e.base != u64::from(base));
        Ok(())
    }

    /// The device claiming ports `[port, port + len)`, cloned out of the bus so that no bus
    /// lock is held while the device runs: a device may re-register itself from inside an
    /// access (a PCI BAR moves when the guest writes its config space).
    fn pio_target(
        &self,
        port: u16,
        len: usize,
    ) -> Option<(PioAddress, Arc<dyn DevicePio + Send + Sync>)> {
        let io = self.io.read().unwrap_or_else(|e| e.into_inner());
        let (range, dev) = io.pio_device(PioAddress(port))?;
        let last = u64::from(port) + (len as u64).checked_sub(1)?;
        (last <= u64::from(range.last().0)).then(|| (range.base(), dev.clone()))
    }

    /// The MMIO twin of [`Self::pio_target`].
    fn mmio_target(
        &self,
        addr: u64,
        len: usize,
    ) -> Option<(MmioAddress, Arc<dyn DeviceMmio + Send + Sync>)> {
        let io = self.io.read().unwrap_or_else(|e| e.into_inner());
        let (range, dev) = io.mmio_device(MmioAddress(addr))?;
        let last = addr.checked_add((len as u64).checked_sub(1)?)?;
        (last <= range.last().0).then(|| (range.base(), dev.clone()))
    }

    /// Dispatches a guest port read. Returns false (and all ones in `data`) if no device
    /// claims the whole access.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        if let Some((base, dev)) = self.pio_target(port, data.len()) {
            dev.pio_read(base, port - base.0, data);
            return true;
        }
        data.fill(0xff);
        self.unassigned_access(PIO, port.into(), false);
        false
    }

    /// Dispatches a guest port write. Returns false if no device claims the whole access.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        if let Some((base, dev)) = self.pio_target(port, data.len()) {
            dev.pio_write(base, port - base.0, data);
            return true;
        }
        self.unassigned_access(PIO, port.into(), true);
        false
    }

    /// Dispatches a guest MMIO read. Returns false (and all ones in `data`) if no device
    /// claims the whole access.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if let Some((base, dev)) = self.mmio_target(addr, data.len()) {
            dev.mmio_read(base, addr - base.0, data);
            return true;
        }
        data.fill(0xff);
        self.unassigned_access(MMIO, addr, false);
        false
    }

    /// Dispatches a guest MMIO write. Returns false if no device claims the whole access.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        if let Some((base, dev)) = self.mmio_target(addr, data.len()) {
            dev.mmio_write(base, addr - base.0, data);
            return true;
        }
        self.unassigned_access(MMIO, addr, true);
        false
    }

    fn unassigned_access(&self, space: usize, addr: u64, write: bool) {
        let c = &self.unassigned[space];
        let n = if write { &c.writes } else { &c.reads };
        // Log the first few so a misbehaving guest is visible without flooding the log.
        if n.fetch_add(1, Ordering::Relaxed) < 16 {
            let s = if space == PIO { "port" } else { "mmio" };
            let op = if write { "write to" } else { "read from" };
            tracing::debug!("guest {op} unassigned {s} {addr:#x}");
        }
    }

    /// Access counters of every registered range, plus one "unassigned" line per bus.
    pub fn stats(&self) -> Vec<BusStats> {
        fn line<D: ?Sized>(e: &Entry<D>) -> BusStats {
            BusStats {
                space: e.space,
                name: e.name.clone(),
                base: e.base,
                len: e.len,
                reads: e.counters.reads.load(Ordering::Relaxed),
                writes: e.counters.writes.load(Ordering::Relaxed),
            }
        }
        let mut out: Vec<BusStats> = self
            .pio
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|e| line(e))
            .collect();
        out.extend(
            self.mmio
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|e| line(e)),
        );
        for (i, space) in ["pio", "mmio"].into_iter().enumerate() {
            out.push(BusStats {
                space,
                name: "unassigned".into(),
                base: 0,
                len: 0,
                reads: self.unassigned[i].reads.load(Ordering::Relaxed),
                writes: self.unassigned[i].writes.load(Ordering::Relaxed),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Reg(Mutex<Vec<(u64, Vec<u8>)>>);
    impl DevicePio for Reg {
        fn pio_read(&self, _b: PioAddress, off: PioAddressOffset, data: &mut [u8]) {
            data.fill(off as u8);
        }
        fn pio_write(&self, _b: PioAddress, off: PioAddressOffset, data: &[u8]) {
            self.0.lock().unwrap().push((off.into(), data.to_vec()));
        }
    }
    impl DeviceMmio for Reg {
        fn mmio_read(&self, _b: MmioAddress, off: MmioAddressOffset, data: &mut [u8]) {
            data.fill(off as u8);
        }
        fn mmio_write(&self, _b: MmioAddress, off: MmioAddressOffset, data: &[u8]) {
            self.0.lock().unwrap().push((off, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_with_offsets_and_counts() {
        let bus = Bus::new();
        let dev = Arc::new(Reg::default());
        bus.register_pio("reg", 0x3f8, 8, dev.clone()).unwrap();
        bus.register_mmio("reg", 0x1000, 0x100, dev.clone())
            .unwrap();
        let mut b = [0u8; 1];
        assert!(bus.pio_read(0x3fa, &mut b));
        assert_eq!(b, [2]);
        assert!(bus.pio_write(0x3f9, &[7]));
        let mut w = [0u8; 4];
        assert!(bus.mmio_read(0x1010, &mut w));
        assert_eq!(w, [0x10; 4]);
        assert!(bus.mmio_write(0x1020, &[1, 2]));
        assert_eq!(
            *dev.0.lock().unwrap(),
            vec![(1, vec![7]), (0x20, vec![1, 2])]
        );
        let stats = bus.stats();
        let pio = stats
            .iter()
            .find(|s| s.space == "pio" && s.name == "reg")
            .unwrap();
        assert_eq!((pio.reads, pio.writes), (1, 1));
    }

    #[test]
    fn unassigned_reads_are_all_ones_and_counted() {
        let bus = Bus::new();
        let mut b = [0u8; 2];
        assert!(!bus.pio_read(0x80, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        assert!(!bus.pio_write(0x80, &[1]));
        let mut w = [0u8; 8];
        assert!(!bus.mmio_read(0xdead_0000, &mut w));
        assert_eq!(w, [0xff; 8]);
        let stats = bus.stats();
        let un: Vec<_> = stats.iter().filter(|s| s.name == "unassigned").collect();
        assert_eq!((un[0].reads, un[0].writes), (1, 1));
        assert_eq!((un[1].reads, un[1].writes), (1, 0));
    }

    #[test]
    fn access_straddling_the_end_of_a_range_is_unassigned() {
        let bus = Bus::new();
        bus.register_pio("reg", 0x60, 1, Arc::new(Reg::default()))
            .unwrap();
        let mut b = [0u8; 2];
        assert!(!bus.pio_read(0x60, &mut b));
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let bus = Bus::new();
        bus.register_mmio("a", 0x1000, 0x1000, Arc::new(Reg::default()))
            .unwrap();
        let e = bus
            .register_mmio("b", 0x1800, 0x1000, Arc::new(Reg::default()))
            .unwrap_err();
        assert!(matches!(e, BusError::Overlap { .. }), "{e}");
        let e = bus
            .register_mmio("c", 0x4000, 0, Arc::new(Reg::default()))
            .unwrap_err();
        assert!(matches!(e, BusError::InvalidRange { .. }), "{e}");
        bus.deregister_mmio(0x1000).unwrap();
        bus.register_mmio("b", 0x1800, 0x1000, Arc::new(Reg::default()))
            .unwrap();
        assert!(bus.deregister_mmio(0x1000).is_err());
    }

    #[test]
    fn port_ranges_can_be_removed_and_reused() {
        let bus = Bus::new();
        bus.register_pio("a", 0xc000, 0x20, Arc::new(Reg::default()))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(bus.pio_read(0xc01f, &mut b));
        assert_eq!(b, [0x1f]);
        bus.deregister_pio(0xc000).unwrap();
        assert!(!bus.pio_read(0xc01f, &mut b), "unclaimed after removal");
        assert_eq!(b, [0xff]);
        assert!(
            bus.stats().iter().all(|s| s.name != "a"),
            "its counters are gone"
        );
        let e = bus.deregister_pio(0xc000).unwrap_err();
        assert!(
            matches!(e, BusError::NotRegistered { space: "pio", .. }),
            "{e}"
        );
        bus.register_pio("b", 0xc010, 0x20, Arc::new(Reg::default()))
            .unwrap();
        assert!(bus.pio_read(0xc010, &mut b));
        assert_eq!(b, [0]);
    }
}
