//! MSI-X emulated in the VMM, and the interrupt vectors MSI and MSI-X deliver through.
//!
//! The MSI-X table and PBA the guest sees live here: the BAR pages holding them are
//! trapped (never mapped into a memory slot), guest accesses reach [`Msix`], and every
//! change of a vector (address, data, mask, function mask, enable) is pushed to
//! [`MsiVectors`], which programs KVM through [`InterruptRoutes`]. Each vector owns an
//! eventfd that the device signals and that is registered with KVM as an irqfd while the
//! vector is unmasked, so an interrupt travels device -> eventfd -> KVM -> guest with no VMM
//! thread on the path. A masked vector's irqfd is removed: signals of a device that does not
//! mask by itself accumulate in the eventfd (which is how the PBA reports them pending) and
//! KVM delivers them when the irqfd is registered again on unmask.
//!
//! The address and data of a vector are the VMM's alone (KVM routes them). The enable
//! and function-mask bits and each vector's mask bit are the device's business as well:
//! the vfio-pci function passes them on (see `devices::vfio::irq`), which is why
//! [`Msix::table_write`] reports the mask changes it made.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::persist::{MsixEntryState, MsixState};

/// Bytes per MSI-X table entry.
pub const MSIX_ENTRY_SIZE: usize = 16;
/// Largest MSI-X table (the PCI specification's limit).
pub const MSIX_MAX_VECTORS: usize = 2048;
/// Length of the MSI-X capability in configuration space.
pub const MSIX_CAP_LEN: usize = 12;

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const CONTROL_SIZE_MASK: u16 = 0x7ff;
const VECTOR_MASKED: u32 = 1;

/// Why programming KVM's interrupt routing failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// No GSIs are left for the device's vectors.
    #[error("cannot allocate {count} GSIs for {owner}: {reason}")]
    NoGsi {
        /// The device asking.
        owner: String,
        /// How many it asked for.
        count: usize,
        /// Why the allocator refused.
        reason: String,
    },
    /// The eventfd of a vector could not be created.
    #[error("cannot create the eventfd of interrupt vector {vector} of {owner}: {source}")]
    EventFd {
        /// The device.
        owner: String,
        /// The vector.
        vector: usize,
        /// The error of `eventfd(2)`.
        source: io::Error,
    },
    /// KVM refused a routing or irqfd change.
    #[error("KVM refused to {op} for GSI {gsi}: {source}")]
    Kvm {
        /// What was attempted ("set the MSI route", "register the irqfd", ...).
        op: &'static str,
        /// The GSI involved.
        gsi: u32,
        /// The error KVM returned.
        source: io::Error,
    },
}

/// The interrupt routing of the VM, as devices with MSI/MSI-X need it. The vmm implements it
/// with KVM GSI routing and irqfds; tests use a recorder.
pub trait InterruptRoutes: Send + Sync {
    /// Reserves `count` GSIs for the vectors of device `owner`.
    fn allocate_gsis(&self, owner: &str, count: usize) -> Result<Vec<u32>, RouteError>;
    /// Routes `gsi` to the MSI message `(addr, data)`.
    fn set_msi_route(&self, gsi: u32, addr: u64, data: u32) -> Result<(), RouteError>;
    /// Starts injecting `gsi` whenever `eventfd` is signalled (registers an irqfd).
    fn enable(&self, gsi: u32, eventfd: &EventFd) -> Result<(), RouteError>;
    /// Stops injecting `gsi` for `eventfd` (removes the irqfd).
    fn disable(&self, gsi: u32, eventfd: &EventFd) -> Result<(), RouteError>;
}

/// An MSI message: what the device writes where to raise the interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address.
    pub addr: u64,
    /// Message data.
    pub data: u32,
}

struct Vector {
    gsi: u32,
    eventfd: EventFd,
    /// The route KVM has for `gsi`, if it was set.
    route: Option<MsiMessage>,
    /// Whether the irqfd is registered.
    delivering: bool,
}

/// The interrupt vectors of one device: a GSI and an eventfd each, shared by MSI and MSI-X
/// (a function never has both enabled).
pub struct MsiVectors {
    owner: String,
    routes: Arc<dyn InterruptRoutes>,
    vectors: Vec<Vector>,
    errors: u64,
}

impl MsiVectors {
    /// Allocates `count` GSIs for `owner` and creates an eventfd per vector.
    pub fn new(
        owner: &str,
        routes: Arc<dyn InterruptRoutes>,
        count: usize,
    ) -> Result<Self, RouteError> {
        let gsis = if count == 0 {
            Vec::new()
        } else {
            routes.allocate_gsis(owner, count)?
        };
        if gsis.len() != count {
            return Err(RouteError::NoGsi {
                owner: owner.to_string(),
                count,
                reason: format!("the allocator returned {} GSIs", gsis.len()),
            });
        }
        let vectors = gsis
            .into_iter()
            .enumerate()
            .map(|(vector, gsi)| {
                let eventfd = EventFd::new(EFD_NONBLOCK).map_err(|source| RouteError::EventFd {
                    owner: owner.to_string(),
                    vector,
                    source,
                })?;
                Ok(Vector {
                    gsi,
                    eventfd,
                    route: None,
                    delivering: false,
                })
            })
            .collect::<Result<_, RouteError>>()?;
        Ok(MsiVectors {
            owner: owner.to_string(),
            routes,
            vectors,
            errors: 0,
        })
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// The GSI of vector `i`.
    pub fn gsi(&self, i: usize) -> Option<u32> {
        self.vectors.get(i).map(|v| v.gsi)
    }

    /// The eventfd the device signals for vector `i`.
    pub fn eventfd(&self, i: usize) -> Option<&EventFd> {
        self.vectors.get(i).map(|v| &v.eventfd)
    }

    /// The eventfds of the first `n` vectors (fewer if there are fewer vectors).
    pub fn eventfds(&self, n: usize) -> Vec<&EventFd> {
        self.vectors.iter().take(n).map(|v| &v.eventfd).collect()
    }

    /// Routing and irqfd failures so far (each is logged, rate-limited).
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Whether vector `i` is currently delivering (irqfd registered).
    pub fn is_delivering(&self, i: usize) -> bool {
        self.vectors.get(i).is_some_and(|v| v.delivering)
    }

    /// Makes vector `i` deliver `msg` (`Some`), or stop delivering (`None`: masked or
    /// disabled). Only changes are passed to KVM; failures are logged (rate-limited) and
    /// leave the vector not delivering, so a later change retries.
    pub fn deliver(&mut self, i: usize, msg: Option<MsiMessage>) {
        let Some(v) = self.vectors.get_mut(i) else {
            return;
        };
        let result = match msg {
            Some(msg) => {
                let routed = if v.route == Some(msg) {
                    Ok(())
                } else {
                    v.route = None;
                    self.routes
                        .set_msi_route(v.gsi, msg.addr, msg.data)
                        .map(|()| v.route = Some(msg))
                };
                routed.and_then(|()| {
                    if v.delivering {
                        Ok(())
                    } else {
                        self.routes
                            .enable(v.gsi, &v.eventfd)
                            .map(|()| v.delivering = true)
                    }
                })
            }
            None if v.delivering => self
                .routes
                .disable(v.gsi, &v.eventfd)
                .map(|()| v.delivering = false),
            None => Ok(()),
        };
        if let Err(e) = result {
            self.errors += 1;
            if self.errors.is_power_of_two() {
                tracing::warn!(
                    "{}: interrupt vector {i} not updated ({} such errors so far): {e}",
                    self.owner,
                    self.errors
                );
            }
        }
    }

    /// Whether the device signalled vector `i` while it was not delivering: its eventfd is
    /// readable (checked without consuming the count).
    pub fn is_pending(&self, i: usize) -> bool {
        let Some(v) = self.vectors.get(i) else {
            return false;
        };
        if v.delivering {
            return false;
        }
        let mut pfd = libc::pollfd {
            fd: v.eventfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for an eventfd we own, the count is 1 and the
        // timeout 0, so poll only writes `revents` and returns at once.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n == 1 && pfd.revents & libc::POLLIN != 0
    }
}

/// What a write to the MSI-X control register changed, for the caller to tell the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixChange {
    /// MSI-X was enabled: hand the device the vectors' eventfds.
    Enabled,
    /// MSI-X was disabled: stop the device's vectors.
    Disabled,
    /// Nothing the device needs to know.
    None,
}

/// A vector whose mask bit a table write changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskChange {
    /// The vector.
    pub vector: usize,
    /// Whether it is masked now.
    pub masked: bool,
}

/// The MSI-X capability, table and PBA of one function.
#[derive(Clone, Debug)]
pub struct Msix {
    /// Per entry: address low, address high, data, vector control.
    entries: Vec<[u32; 4]>,
    enabled: bool,
    function_mask: bool,
    table_reg: u32,
    pba_reg: u32,
}

impl Msix {
    /// An MSI-X capability with `size` vectors (clamped to 1..=2048) whose table and PBA
    /// registers (offset | BIR) read `table_reg` and `pba_reg`. Every vector starts masked.
    pub fn new(size: usize, table_reg: u32, pba_reg: u32) -> Self {
        let size = size.clamp(1, MSIX_MAX_VECTORS);
        Msix {
            entries: vec![[0, 0, 0, VECTOR_MASKED]; size],
            enabled: false,
            function_mask: false,
            table_reg,
            pba_reg,
        }
    }

    /// Number of vectors.
    pub fn size(&self) -> usize {
        self.entries.len()
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether vector `i` is masked by its own bit (the function mask aside). Vectors
    /// outside the table read as masked.
    pub fn vector_masked(&self, i: usize) -> bool {
        self.entries
            .get(i)
            .is_none_or(|e| e[3] & VECTOR_MASKED != 0)
    }

    /// The enable and function-mask bits and the whole table, for saving. Pending bits are
    /// not here: they live in the vectors' eventfds ([`MsiVectors::is_pending`]).
    pub fn state(&self) -> MsixState {
        MsixState {
            enabled: self.enabled,
            function_mask: self.function_mask,
            entries: self
                .entries
                .iter()
                .map(|e| MsixEntryState {
                    address: u64::from(e[0]) | u64::from(e[1]) << 32,
                    data: e[2],
                    vector_control: e[3],
                })
                .collect(),
        }
    }

    /// Size of the table in bytes.
    pub fn table_len(&self) -> u64 {
        (self.entries.len() * MSIX_ENTRY_SIZE) as u64
    }

    /// Size of the PBA in bytes (a qword per 64 vectors).
    pub fn pba_len(&self) -> u64 {
        (self.entries.len().div_ceil(64) * 8) as u64
    }

    /// The message control register.
    pub fn control(&self) -> u16 {
        let mut c = (self.entries.len() - 1) as u16 & CONTROL_SIZE_MASK;
        if self.enabled {
            c |= CONTROL_ENABLE;
        }
        if self.function_mask {
            c |= CONTROL_FUNCTION_MASK;
        }
        c
    }

    fn cap_image(&self) -> [u8; MSIX_CAP_LEN] {
        let mut img = [0u8; MSIX_CAP_LEN];
        img[2..4].copy_from_slice(&self.control().to_le_bytes());
        img[4..8].copy_from_slice(&self.table_reg.to_le_bytes());
        img[8..12].copy_from_slice(&self.pba_reg.to_le_bytes());
        img
    }

    /// Reads capability bytes at `offset` from the capability's start. Bytes 0 and 1 (id
    /// and next pointer) read 0: the caller owns the list. Bytes past the capability read
    /// all ones.
    pub fn cap_read(&self, offset: usize, data: &mut [u8]) {
        let img = self.cap_image();
        for (k, b) in data.iter_mut().enumerate() {
            *b = img.get(offset + k).copied().unwrap_or(0xff);
        }
    }

    /// A guest write to capability bytes at `offset`; only the enable and function-mask
    /// bits are writable. Vectors are updated; the result says whether the device's
    /// interrupts must be switched on or off.
    pub fn cap_write(
        &mut self,
        offset: usize,
        data: &[u8],
        vectors: &mut MsiVectors,
    ) -> MsixChange {
        let mut control = self.control().to_le_bytes();
        let mut touched = false;
        for (k, &b) in data.iter().enumerate() {
            if let Some(i) = (offset + k).checked_sub(2).filter(|&i| i < 2) {
                control[i] = b;
                touched = true;
            }
        }
        if !touched {
            return MsixChange::None;
        }
        let control = u16::from_le_bytes(control);
        let was = self.enabled;
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_mask = control & CONTROL_FUNCTION_MASK != 0;
        let change = match (was, self.enabled) {
            (false, true) => MsixChange::Enabled,
            (true, false) => MsixChange::Disabled,
            _ => MsixChange::None,
        };
        // The vectors are shared with MSI: while MSI-X is off (before and after), they
        // are not MSI-X's to change.
        if was || self.enabled {
            self.resync(vectors);
        }
        change
    }

    /// Turns MSI-X off without a guest write (e.g. the guest enabled MSI instead).
    pub fn force_disable(&mut self, vectors: &mut MsiVectors) {
        self.enabled = false;
        self.resync(vectors);
    }

    /// The message vector `i` should deliver now, if any.
    fn message(&self, i: usize) -> Option<MsiMessage> {
        let e = self.entries.get(i)?;
        let live = self.enabled && !self.function_mask && e[3] & VECTOR_MASKED == 0;
        live.then(|| MsiMessage {
            addr: u64::from(e[0]) | u64::from(e[1]) << 32,
            data: e[2],
        })
    }

    /// Pushes every vector's current state to `vectors` again (after another user of the
    /// shared vectors, MSI, changed them).
    pub fn resync(&self, vectors: &mut MsiVectors) {
        for i in 0..self.entries.len() {
            vectors.deliver(i, self.message(i));
        }
    }

    fn table_word(&self, byte: usize) -> Option<u32> {
        self.entries
            .get(byte / MSIX_ENTRY_SIZE)
            .map(|e| e[(byte % MSIX_ENTRY_SIZE) / 4])
    }

    /// Reads table bytes at `offset`. An access that does not lie wholly inside the table
    /// reads all ones.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        if !within(offset, data.len(), self.table_len()) {
            data.fill(0xff);
            return;
        }
        for (k, b) in data.iter_mut().enumerate() {
            let byte = offset as usize + k;
            *b = self
                .table_word(byte)
                .map_or(0xff, |w| (w >> ((byte % 4) * 8)) as u8);
        }
    }

    /// A guest write of table bytes at `offset`; reserved vector-control bits stay zero.
    /// Writes not wholly inside the table are dropped. The vectors written are updated
    /// (while MSI-X is on). Returns the vectors whose mask bit the write changed, whether
    /// MSI-X is on or not (the device's own mask bits follow the table either way).
    pub fn table_write(
        &mut self,
        offset: u64,
        data: &[u8],
        vectors: &mut MsiVectors,
    ) -> Vec<MaskChange> {
        if !within(offset, data.len(), self.table_len()) {
            return Vec::new();
        }
        let first = offset as usize / MSIX_ENTRY_SIZE;
        let last = (offset as usize + data.len() - 1) / MSIX_ENTRY_SIZE;
        let before: Vec<bool> = (first..=last).map(|i| self.vector_masked(i)).collect();
        for (k, &b) in data.iter().enumerate() {
            let byte = offset as usize + k;
            let entry = &mut self.entries[byte / MSIX_ENTRY_SIZE];
            let word = (byte % MSIX_ENTRY_SIZE) / 4;
            let shift = (byte % 4) * 8;
            let mut value = (entry[word] & !(0xff << shift)) | (u32::from(b) << shift);
            if word == 3 {
                value &= VECTOR_MASKED;
            }
            entry[word] = value;
        }
        let changes = (first..=last)
            .zip(before)
            .filter(|&(i, was)| self.vector_masked(i) != was)
            .map(|(vector, _)| MaskChange {
                vector,
                masked: self.vector_masked(vector),
            })
            .collect();
        // While MSI-X is off the shared vectors are not its to change (MSI may use them);
        // enabling MSI-X pushes the whole table.
        if self.enabled {
            for i in first..=last {
                vectors.deliver(i, self.message(i));
            }
        }
        changes
    }

    /// Reads PBA bytes at `offset`: a vector is pending when it is masked (by its own bit or
    /// the function mask) and the device signalled its eventfd since, or when `device`
    /// (the device's own PBA bytes at the same offset, if it keeps one) has its bit set.
    /// Bits past the last vector read zero; accesses not wholly inside the PBA read all
    /// ones.
    pub fn pba_read(
        &self,
        offset: u64,
        data: &mut [u8],
        vectors: &MsiVectors,
        device: Option<&[u8]>,
    ) {
        if !within(offset, data.len(), self.pba_len()) {
            data.fill(0xff);
            return;
        }
        for (k, b) in data.iter_mut().enumerate() {
            let first = (offset as usize + k) * 8;
            let from_device = device.and_then(|d| d.get(k)).copied().unwrap_or(0);
            *b = (0..8)
                .filter(|bit| {
                    let i = first + bit;
                    i < self.entries.len()
                        && ((self.enabled && vectors.is_pending(i)) || from_device & 1 << bit != 0)
                })
                .fold(0u8, |acc, bit| acc | 1 << bit);
        }
    }
}

/// Whether `[offset, offset + len)` is a non-empty range inside `[0, size)`.
fn within(offset: u64, len: usize, size: u64) -> bool {
    len > 0
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size)
}

/// A recorder of [`InterruptRoutes`] calls, for tests of devices with MSI/MSI-X (with the
/// `testing` feature only).
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use std::collections::{BTreeMap, BTreeSet};
    use std::os::fd::AsRawFd;
    use std::sync::Mutex;

    use super::*;

    /// What the recorder saw, by GSI.
    #[derive(Debug, Default)]
    pub struct RoutesState {
        /// Next GSI to hand out.
        pub next_gsi: u32,
        /// Current MSI route of each GSI.
        pub routes: BTreeMap<u32, MsiMessage>,
        /// GSIs with a registered irqfd, and the eventfd's raw fd.
        pub enabled: BTreeMap<u32, i32>,
        /// Every call, in order, as text ("route 32 fee00000 41", "enable 32", ...).
        pub log: Vec<String>,
        /// GSIs whose next `set_msi_route` fails.
        pub fail_route: BTreeSet<u32>,
    }

    /// An [`InterruptRoutes`] that records calls instead of programming KVM.
    #[derive(Debug, Default)]
    pub struct RecordingRoutes {
        /// The recorded state.
        pub state: Mutex<RoutesState>,
    }

    impl RecordingRoutes {
        /// A recorder handing out GSIs from `first_gsi`.
        pub fn new(first_gsi: u32) -> Arc<Self> {
            let r = RecordingRoutes::default();
            r.lock().next_gsi = first_gsi;
            Arc::new(r)
        }

        /// Locks the recorded state.
        pub fn lock(&self) -> std::sync::MutexGuard<'_, RoutesState> {
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    impl InterruptRoutes for RecordingRoutes {
        fn allocate_gsis(&self, _owner: &str, count: usize) -> Result<Vec<u32>, RouteError> {
            let mut s = self.lock();
            let first = s.next_gsi;
            s.next_gsi += count as u32;
            Ok((first..first + count as u32).collect())
        }

        fn set_msi_route(&self, gsi: u32, addr: u64, data: u32) -> Result<(), RouteError> {
            let mut s = self.lock();
            if s.fail_route.remove(&gsi) {
                return Err(RouteError::Kvm {
                    op: "set the MSI route",
                    gsi,
                    source: io::Error::from_raw_os_error(libc::EINVAL),
                });
            }
            s.log.push(format!("route {gsi} {addr:x} {data:x}"));
            s.routes.insert(gsi, MsiMessage { addr, data });
            Ok(())
        }

        fn enable(&self, gsi: u32, eventfd: &EventFd) -> Result<(), RouteError> {
            let mut s = self.lock();
            s.log.push(format!("enable {gsi}"));
            s.enabled.insert(gsi, eventfd.as_raw_fd());
            Ok(())
        }

        fn disable(&self, gsi: u32, _eventfd: &EventFd) -> Result<(), RouteError> {
            let mut s = self.lock();
            s.log.push(format!("disable {gsi}"));
            s.enabled.remove(&gsi);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::RecordingRoutes;
    use super::*;

    fn setup(n: usize) -> (Msix, MsiVectors, Arc<RecordingRoutes>) {
        let routes = RecordingRoutes::new(40);
        let vectors = MsiVectors::new("dev", routes.clone(), n).unwrap();
        (Msix::new(n, 0x2002, 0x3002), vectors, routes)
    }

    fn write_entry(m: &mut Msix, v: &mut MsiVectors, i: usize, addr: u64, data: u32, masked: bool) {
        let base = (i * 16) as u64;
        m.table_write(base, &(addr as u32).to_le_bytes(), v);
        m.table_write(base + 4, &((addr >> 32) as u32).to_le_bytes(), v);
        m.table_write(base + 8, &data.to_le_bytes(), v);
        m.table_write(base + 12, &u32::from(masked).to_le_bytes(), v);
    }

    #[test]
    fn capability_reads_size_and_locations() {
        let (m, ..) = setup(8);
        let mut d = [0u8; 2];
        m.cap_read(2, &mut d);
        assert_eq!(u16::from_le_bytes(d), 7);
        let mut d = [0u8; 4];
        m.cap_read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x2002);
        m.cap_read(8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x3002);
        m.cap_read(10, &mut d);
        assert_eq!(d[2..], [0xff, 0xff]);
    }

    #[test]
    fn enable_routes_unmasked_vectors_only() {
        let (mut m, mut v, routes) = setup(4);
        write_entry(&mut m, &mut v, 0, 0xfee0_0000, 0x41, false);
        write_entry(&mut m, &mut v, 1, 0xfee0_1000, 0x42, true);
        assert!(
            routes.lock().log.is_empty(),
            "nothing routed while disabled"
        );
        assert_eq!(m.cap_write(3, &[0x80], &mut v), MsixChange::Enabled);
        let s = routes.lock();
        assert_eq!(
            s.routes[&40],
            MsiMessage {
                addr: 0xfee0_0000,
                data: 0x41
            }
        );
        assert_eq!(s.enabled.keys().copied().collect::<Vec<_>>(), vec![40]);
        drop(s);
        // Unmask vector 1: routed and enabled.
        m.table_write(16 + 12, &[0], &mut v);
        assert!(routes.lock().enabled.contains_key(&41));
        assert_eq!(routes.lock().routes[&41].data, 0x42);
        // Function mask: everything stops; clearing it restarts without re-routing.
        assert_eq!(m.cap_write(2, &[0x03, 0xc0], &mut v), MsixChange::None);
        assert!(routes.lock().enabled.is_empty());
        routes.lock().log.clear();
        m.cap_write(2, &[0x03, 0x80], &mut v);
        assert_eq!(routes.lock().log, vec!["enable 40", "enable 41"]);
        assert_eq!(m.cap_write(3, &[0], &mut v), MsixChange::Disabled);
        assert!(routes.lock().enabled.is_empty());
    }

    #[test]
    fn masked_vector_reports_pending_in_pba() {
        let (mut m, mut v, _routes) = setup(70);
        write_entry(&mut m, &mut v, 65, 0xfee0_0000, 0x50, true);
        m.cap_write(3, &[0x80], &mut v);
        v.eventfd(65).unwrap().write(1).unwrap();
        let mut q = [0u8; 8];
        m.pba_read(8, &mut q, &v, None);
        assert_eq!(u64::from_le_bytes(q), 1 << 1);
        m.pba_read(0, &mut q, &v, None);
        assert_eq!(q, [0; 8]);
        m.pba_read(16, &mut q, &v, None);
        assert_eq!(q, [0xff; 8], "past the PBA");
    }

    #[test]
    fn table_writes_report_mask_changes_whether_enabled_or_not() {
        let (mut m, mut v, _routes) = setup(4);
        let change = |vector, masked| MaskChange { vector, masked };
        // Disabled: still reported (the device's table follows).
        assert_eq!(m.table_write(12, &[0], &mut v), vec![change(0, false)]);
        assert_eq!(m.table_write(12, &[0], &mut v), vec![], "no change");
        assert_eq!(m.table_write(0, &[1; 4], &mut v), vec![], "address only");
        m.cap_write(3, &[0x80], &mut v);
        // A write over entries 1 and 2 that unmasks both, and a reserved bit alone.
        let mut two = [0u8; 32];
        two[12] = 0xfe;
        assert_eq!(
            m.table_write(16, &two, &mut v),
            vec![change(1, false), change(2, false)]
        );
        assert_eq!(m.table_write(44, &[1], &mut v), vec![change(2, true)]);
        assert!(m.vector_masked(2) && !m.vector_masked(1) && m.vector_masked(9));
    }

    #[test]
    fn reserved_bits_and_odd_accesses() {
        let (mut m, mut v, _routes) = setup(2);
        m.table_write(12, &0xffff_fffeu32.to_le_bytes(), &mut v);
        let mut d = [0u8; 4];
        m.table_read(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        m.table_write(30, &[1, 2, 3, 4], &mut v); // straddles the end: dropped
        m.table_read(28, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "still masked");
        let mut q = [0u8; 8];
        m.table_read(u64::MAX - 2, &mut q);
        assert_eq!(q, [0xff; 8]);
        m.table_write(u64::MAX, &[1], &mut v);
        m.table_write(0, &[], &mut v);
    }

    #[test]
    fn the_disabled_capability_leaves_the_shared_vectors_alone() {
        use crate::pci::msi::MsiCap;
        let (mut m, mut v, routes) = setup(4);
        // MSI on with 4 vectors; MSI-X table writes while MSI-X is off change nothing.
        let mut msi = MsiCap::new(0x0184);
        msi.write(4, &0xfee0_0000u32.to_le_bytes(), &mut v);
        msi.write(2, &0x00a5u16.to_le_bytes(), &mut v);
        assert_eq!(routes.lock().enabled.len(), 4);
        write_entry(&mut m, &mut v, 0, 0xfee0_1000, 0x41, true);
        m.cap_write(2, &[0x03, 0x40], &mut v); // function mask only, still off
        assert_eq!(routes.lock().enabled.len(), 4, "MSI vectors untouched");
        msi.force_disable(&mut v);
        // MSI-X on; writes to the (off) MSI capability leave its vectors alone.
        write_entry(&mut m, &mut v, 1, 0xfee0_2000, 0x42, false);
        m.cap_write(2, &[0x03, 0x80], &mut v);
        assert_eq!(
            routes.lock().enabled.keys().copied().collect::<Vec<_>>(),
            vec![41]
        );
        msi.write(8, &0x1u32.to_le_bytes(), &mut v);
        msi.write(0x0c, &0x30u16.to_le_bytes(), &mut v);
        assert_eq!(
            routes.lock().enabled.keys().copied().collect::<Vec<_>>(),
            vec![41]
        );
        assert_eq!(routes.lock().routes[&41].data, 0x42);
    }

    #[test]
    fn route_failure_is_retried_on_next_change() {
        let (mut m, mut v, routes) = setup(1);
        m.cap_write(3, &[0x80], &mut v);
        routes.lock().fail_route.insert(40);
        write_entry(&mut m, &mut v, 0, 0xfee0_0000, 0x41, false);
        // The first attempt (unmask write) failed, the data/addr writes came before it.
        assert!(!v.is_delivering(0));
        m.table_write(12, &[0], &mut v);
        assert!(v.is_delivering(0));
    }
}
