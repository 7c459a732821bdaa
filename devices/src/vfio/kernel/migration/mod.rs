//! [`DeviceMigration`] over the kernel's VFIO migration v2 uAPI (Linux 5.18+, PRE_COPY
//! 6.2+): the device feature `MIGRATION` (capabilities), `MIG_DEVICE_STATE` (the state
//! machine, which hands out a data fd per save or load), `VFIO_MIG_GET_PRECOPY_INFO` on
//! that fd, and DMA logging (`DMA_LOGGING_START` / `_STOP` / `_REPORT`).
//!
//! - `arcs.rs`: the kernel's states and direct arcs, and the walk for each transition;
//! - `ioctls.rs`: the system calls behind [`MigrationIoctls`]; the real ones
//!   ([`DeviceFdIoctls`]) are **untested against hardware here** (no VFIO device on these
//!   machines);
//! - `fake.rs` (tests only): a fake kernel that decodes the same buffers and enforces the
//!   uAPI's arcs, data fd lifetimes, ENOMSG and EOF.
//!
//! Mapping onto [`MigrationState`]:
//!
//! | interface   | kernel                                                               |
//! |-------------|----------------------------------------------------------------------|
//! | `Running`   | RUNNING (RUNNING_P2P, only left behind by a failed walk, reads as it) |
//! | `PreCopy`   | PRE_COPY (PRE_COPY_P2P reads as it); a device without PRE_COPY stays RUNNING with nothing to pre-copy |
//! | `StopCopy`  | STOP_COPY                                                            |
//! | `Stopped`   | STOP                                                                 |
//! | `Resuming`  | RESUMING                                                             |
//! | `Error`     | ERROR                                                                |
//!
//! The interface's transitions are the same as the migration region's (see
//! [`TRANSITIONS`]); each is walked one direct kernel arc per ioctl, so a failure names the
//! arc that failed and the state the kernel reports afterwards.
//!
//! Saving: in PRE_COPY the data fd is non-blocking and [`DeviceMigration::save_chunk`]
//! returns what one `read` gives, or `None` at the temporary end of stream (ENOMSG, a
//! read of 0 bytes as Linux's mtty gives, or
//! EAGAIN while the driver is still producing); [`DeviceMigration::pending_bytes`] is
//! `initial_bytes + dirty_bytes`. In STOP_COPY the stream ends at EOF, which is the only
//! way the kernel tells its length, so `pending_bytes` reads the rest of the stream into
//! memory to be exact (as the interface requires), and `save_chunk` hands it out.

mod arcs;
mod ioctls;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    vfio_device_feature_dma_logging_range, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
};

pub use arcs::{
    direct, path, FsmArc, KernelState, Session, ARCS, FLAG_P2P, FLAG_PRE_COPY, FLAG_STOP_COPY,
};
pub use ioctls::{layout, DeviceFdIoctls, FeatureBuf, MigrationIoctls, HEADER_SIZE};

use crate::vfio::migration::{
    DeviceMigration, MigrationError, MigrationState, Result, DIRTY_PAGE_SIZE,
};

/// Largest chunk [`DeviceMigration::save_chunk`] returns (and largest single `read`).
pub const CHUNK_SIZE: usize = 1 << 20;

/// An interface transition with the reason it is allowed.
#[derive(Clone, Copy, Debug)]
pub struct Transition {
    /// From.
    pub from: MigrationState,
    /// To.
    pub to: MigrationState,
    /// When the VMM asks for it.
    pub why: &'static str,
}

const fn t(from: MigrationState, to: MigrationState, why: &'static str) -> Transition {
    Transition { from, to, why }
}

use MigrationState::{PreCopy, Resuming, Running, StopCopy, Stopped};

/// The interface transitions this source accepts: the migration region's list (see
/// [`crate::vfio::region_migration::layout::TRANSITIONS`] for why the others are refused), so every
/// source behaves alike. Asking for the current state is a no-op.
pub const TRANSITIONS: &[Transition] = &[
    t(
        Running,
        PreCopy,
        "live migration starts: save while the guest runs",
    ),
    t(Running, StopCopy, "snapshot or migration without pre-copy"),
    t(Running, Stopped, "the VM is paused"),
    t(
        Running,
        Resuming,
        "a fresh destination device takes a saved state",
    ),
    t(
        PreCopy,
        StopCopy,
        "pre-copy converged: the device stops, the rest is final",
    ),
    t(
        PreCopy,
        Running,
        "live migration cancelled or failed before stop-and-copy",
    ),
    t(StopCopy, Stopped, "the save is complete"),
    t(
        StopCopy,
        Running,
        "migration failed during stop-and-copy: the source runs on",
    ),
    t(Stopped, Running, "the VM is resumed"),
    t(Stopped, StopCopy, "snapshot of a paused VM"),
    t(Stopped, Resuming, "restore into a stopped device"),
    t(Resuming, Running, "restore complete: the destination runs"),
    t(Resuming, Stopped, "restore complete, the VM stays paused"),
];

/// Whether the interface allows `from -> to` (other than staying put).
pub fn legal(from: MigrationState, to: MigrationState) -> bool {
    TRANSITIONS.iter().any(|t| t.from == from && t.to == to)
}

/// An IOVA range to log DMA writes in (guest RAM as mapped for the device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IovaRange {
    /// First byte.
    pub iova: u64,
    /// Length in bytes.
    pub length: u64,
}

/// The open data transfer session.
struct DataSession {
    fd: OwnedFd,
    /// STOP_COPY only: bytes read ahead of `save_chunk` (to make `pending_bytes` exact).
    ahead: Vec<u8>,
    /// How much of `ahead` was handed out.
    taken: usize,
    /// STOP_COPY only: read() returned 0.
    eof: bool,
}

impl DataSession {
    fn new(fd: OwnedFd) -> Self {
        DataSession {
            fd,
            ahead: Vec::new(),
            taken: 0,
            eof: false,
        }
    }
}

struct Inner {
    session: Option<DataSession>,
    /// In the interface's PreCopy on a device without PRE_COPY (the kernel is RUNNING).
    emulated_precopy: bool,
    dma_ranges: Vec<IovaRange>,
    /// DMA logging started; the page size the kernel chose.
    logging: Option<u64>,
}

/// A VFIO device's migration through the kernel's v2 uAPI. Built by
/// [`KernelVfioMigration::probe`] (or `KernelVfio::migration`).
pub struct KernelVfioMigration {
    io: Box<dyn MigrationIoctls>,
    flags: u64,
    dma_logging: bool,
    inner: Mutex<Inner>,
}

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EINVAL) => format!("EINVAL ({e})"),
        Some(libc::EIO) => format!("EIO ({e})"),
        Some(libc::ENOTTY) => format!("ENOTTY ({e})"),
        Some(libc::ENODEV) => format!("ENODEV ({e})"),
        Some(libc::ENOMSG) => format!("ENOMSG ({e})"),
        Some(libc::EFAULT) => format!("EFAULT ({e})"),
        _ => e.to_string(),
    }
}

fn device_err(op: impl Into<String>, e: &io::Error) -> MigrationError {
    MigrationError::Device {
        op: op.into(),
        reason: errno_name(e),
    }
}

/// Sets or clears O_NONBLOCK on `fd`.
fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument; `fd` is open (borrowed).
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: F_SETFL takes an int of flags; `fd` is open (borrowed).
    if new != flags && unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, new) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl KernelVfioMigration {
    /// Asks the device for its migration capabilities (`VFIO_DEVICE_FEATURE(GET,
    /// MIGRATION)`): `None` if it has none (ENOTTY: no migration driver, or a kernel
    /// without the feature ioctl), an error if the answer is unusable. Also probes DMA
    /// logging.
    pub fn probe(io: Box<dyn MigrationIoctls>) -> Result<Option<Self>> {
        let mut buf = FeatureBuf::new(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
            layout::MIGRATION_SIZE,
        );
        // SAFETY: the MIGRATION payload holds no pointers.
        match unsafe { io.device_feature(&mut buf) } {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => return Ok(None),
            Err(e) => {
                return Err(device_err(
                    "report its migration capabilities (VFIO_DEVICE_FEATURE GET MIGRATION)",
                    &e,
                ))
            }
        }
        let flags = buf.u64_at(0);
        if flags & FLAG_STOP_COPY == 0 {
            return Err(MigrationError::Protocol(format!(
                "migration flags {flags:#x} lack VFIO_MIGRATION_STOP_COPY, which the uAPI requires"
            )));
        }
        let mut probe = FeatureBuf::new(
            VFIO_DEVICE_FEATURE_PROBE
                | VFIO_DEVICE_FEATURE_SET
                | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            0,
        );
        // SAFETY: a probe carries no payload.
        let dma_logging = unsafe { io.device_feature(&mut probe) }.is_ok();
        Ok(Some(KernelVfioMigration {
            io,
            flags,
            dma_logging,
            inner: Mutex::new(Inner {
                session: None,
                emulated_precopy: false,
                dma_ranges: Vec::new(),
                logging: None,
            }),
        }))
    }

    /// The `VFIO_MIGRATION_*` flags the device reported.
    pub fn flags(&self) -> u64 {
        self.flags
    }

    /// Whether the device can log its DMA writes (`DMA_LOGGING_START` probe succeeded).
    pub fn dma_logging_supported(&self) -> bool {
        self.dma_logging
    }

    /// Sets the IOVA ranges dirty tracking covers (guest RAM as DMA-mapped for the
    /// device), [`DIRTY_PAGE_SIZE`]-aligned and not overlapping. Not while tracking runs.
    pub fn set_dma_ranges(&self, ranges: &[IovaRange]) -> Result<()> {
        let mut sorted = ranges.to_vec();
        sorted.sort_by_key(|r| r.iova);
        for r in &sorted {
            let end = r.iova.checked_add(r.length);
            if r.length == 0
                || r.iova % DIRTY_PAGE_SIZE != 0
                || r.length % DIRTY_PAGE_SIZE != 0
                || end.is_none()
            {
                return Err(MigrationError::Protocol(format!(
                    "IOVA range {:#x}+{:#x} is empty, overflows or is not {DIRTY_PAGE_SIZE}-byte aligned",
                    r.iova, r.length
                )));
            }
        }
        if let Some(w) = sorted
            .windows(2)
            .find(|w| w[0].iova + w[0].length > w[1].iova)
        {
            return Err(MigrationError::Protocol(format!(
                "IOVA ranges {:#x}+{:#x} and {:#x}+{:#x} overlap",
                w[0].iova, w[0].length, w[1].iova, w[1].length
            )));
        }
        let mut inner = self.lock();
        if inner.logging.is_some() {
            return Err(MigrationError::Device {
                op: "change the DMA logging ranges".into(),
                reason: "DMA logging is running; stop it first".into(),
            });
        }
        inner.dma_ranges = sorted;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `VFIO_DEVICE_FEATURE(GET, MIG_DEVICE_STATE)`.
    fn kernel_state(&self) -> Result<KernelState> {
        let mut buf = FeatureBuf::new(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            layout::MIG_STATE_SIZE,
        );
        // SAFETY: the MIG_DEVICE_STATE payload holds no pointers.
        unsafe { self.io.device_feature(&mut buf) }.map_err(|e| {
            device_err(
                "report its migration state (VFIO_DEVICE_FEATURE GET MIG_DEVICE_STATE)",
                &e,
            )
        })?;
        let raw = buf.u32_at(0);
        KernelState::from_raw(raw).ok_or_else(|| {
            MigrationError::Protocol(format!("the kernel reports unknown migration state {raw}"))
        })
    }

    /// `VFIO_DEVICE_FEATURE(SET, MIG_DEVICE_STATE)` to `to`: the data fd, if one came back.
    fn set_kernel_state(&self, to: KernelState) -> io::Result<Option<OwnedFd>> {
        let mut buf = FeatureBuf::new(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            layout::MIG_STATE_SIZE,
        );
        buf.put_u32(0, to.raw());
        buf.put_u32(layout::MIG_STATE_DATA_FD, -1i32 as u32);
        // SAFETY: the MIG_DEVICE_STATE payload holds no pointers.
        unsafe { self.io.device_feature(&mut buf) }?;
        let fd = buf.u32_at(layout::MIG_STATE_DATA_FD) as i32;
        // SAFETY: a non-negative data_fd is a new descriptor the kernel installed for this
        // call, owned by nobody else (MigrationIoctls::device_feature's contract).
        Ok((fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The interface's view of kernel state `k`.
    fn view(k: KernelState, emulated_precopy: bool) -> MigrationState {
        match k {
            KernelState::Running if emulated_precopy => PreCopy,
            KernelState::Running | KernelState::RunningP2p => Running,
            KernelState::PreCopy | KernelState::PreCopyP2p => PreCopy,
            KernelState::StopCopy => StopCopy,
            KernelState::Stop => Stopped,
            KernelState::Resuming => Resuming,
            KernelState::Error => MigrationState::Error,
        }
    }

    /// The kernel state that realises interface state `s` on this device.
    fn target(&self, s: MigrationState) -> KernelState {
        match s {
            Running => KernelState::Running,
            PreCopy if self.flags & FLAG_PRE_COPY != 0 => KernelState::PreCopy,
            PreCopy => KernelState::Running,
            StopCopy => KernelState::StopCopy,
            Stopped => KernelState::Stop,
            Resuming => KernelState::Resuming,
            MigrationState::Error => KernelState::Error,
        }
    }

    /// Reads the kernel's state and forgets what it contradicts (a reset behind our back
    /// returns the device to RUNNING and closes the session).
    fn sync(&self, inner: &mut Inner) -> Result<KernelState> {
        let k = self.kernel_state()?;
        if k != KernelState::Running {
            inner.emulated_precopy = false;
        }
        if !k.has_session() {
            inner.session = None;
        }
        Ok(k)
    }

    fn current(&self, inner: &mut Inner) -> Result<(KernelState, MigrationState)> {
        let k = self.sync(inner)?;
        Ok((k, Self::view(k, inner.emulated_precopy)))
    }

    /// Walks `steps` from `start`; on failure, reports where the kernel ended up.
    fn walk(
        &self,
        inner: &mut Inner,
        steps: &[&'static FsmArc],
        from: MigrationState,
        to: MigrationState,
    ) -> Result<()> {
        let n = steps.len();
        for (i, a) in steps.iter().enumerate() {
            let fail = |inner: &mut Inner, reason: String| {
                let now = match self.sync(inner) {
                    Ok(k) => Self::view(k, false),
                    Err(_) => MigrationState::Error,
                };
                MigrationError::TransitionFailed {
                    from,
                    to,
                    now,
                    reason: format!(
                        "arc {} -> {} (step {} of {n}: {}): {reason}",
                        a.from,
                        a.to,
                        i + 1,
                        a.why
                    ),
                }
            };
            let fd = match self.set_kernel_state(a.to) {
                Ok(fd) => fd,
                Err(e) => {
                    let reason = format!(
                        "VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE failed: {}",
                        errno_name(&e)
                    );
                    // `fail` re-reads the state: the session survives if the device is
                    // still in it (e.g. a failed PRE_COPY -> STOP_COPY), else it is dropped.
                    return Err(fail(inner, reason));
                }
            };
            match (a.session, fd) {
                (Session::Opens, Some(fd)) => inner.session = Some(DataSession::new(fd)),
                (Session::Opens, None) => {
                    inner.session = None;
                    return Err(fail(inner, "the kernel returned no data fd".into()));
                }
                (Session::Ends, fd) => {
                    inner.session = None;
                    drop(fd);
                }
                (Session::Keeps, None) => {}
                (Session::Keeps, Some(fd)) => {
                    // Not what the uAPI says (the saving group shares one session); the
                    // newest fd is the one the kernel streams on.
                    tracing::warn!(
                        "VFIO migration: arc {} -> {} returned a data fd; using it",
                        a.from,
                        a.to
                    );
                    inner.session = Some(DataSession::new(fd));
                }
            }
        }
        Ok(())
    }

    /// Reads at most `max` bytes from the data fd, retrying on EINTR.
    fn read_some(&self, fd: BorrowedFd<'_>, max: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; max];
        loop {
            match self.io.read(fd, &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// STOP_COPY: reads the rest of the stream into `s.ahead`.
    fn read_to_eof(&self, s: &mut DataSession) -> Result<()> {
        while !s.eof {
            let got = self.read_some(s.fd.as_fd(), CHUNK_SIZE).map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOMSG) {
                    MigrationError::Protocol(
                        "the data fd returned ENOMSG in STOP_COPY, where the uAPI forbids it"
                            .into(),
                    )
                } else {
                    device_err("read its stop-copy state from the data fd", &e)
                }
            })?;
            if got.is_empty() {
                s.eof = true;
            } else {
                s.ahead.extend_from_slice(&got);
            }
        }
        Ok(())
    }

    fn no_session(state: MigrationState) -> MigrationError {
        MigrationError::Protocol(format!(
            "the device is {state} but no data fd is open (the session was lost)"
        ))
    }
}

impl DeviceMigration for KernelVfioMigration {
    fn state(&self) -> Result<MigrationState> {
        let mut inner = self.lock();
        Ok(self.current(&mut inner)?.1)
    }

    fn set_state(&self, to: MigrationState) -> Result<()> {
        let mut inner = self.lock();
        let (k, from) = self.current(&mut inner)?;
        let target = self.target(to);
        if to == MigrationState::Error || (from != to && !legal(from, to)) {
            return Err(MigrationError::IllegalTransition { from, to });
        }
        if from == to && k == target {
            return Ok(());
        }
        let steps = path(k, target, self.flags).ok_or_else(|| {
            MigrationError::Protocol(format!(
                "no path of kernel arcs from {k} to {target} with migration flags {:#x}",
                self.flags
            ))
        })?;
        inner.emulated_precopy = false;
        self.walk(&mut inner, &steps, from, to)?;
        inner.emulated_precopy = to == PreCopy && target == KernelState::Running;
        let nonblocking = match to {
            PreCopy if !inner.emulated_precopy => true,
            StopCopy => false,
            _ => return Ok(()),
        };
        let session = inner.session.as_ref().ok_or_else(|| Self::no_session(to))?;
        set_nonblocking(session.fd.as_fd(), nonblocking)
            .map_err(|e| device_err("set the data fd's O_NONBLOCK flag (fcntl)", &e))
    }

    fn pending_bytes(&self) -> Result<u64> {
        let mut inner = self.lock();
        let (_, state) = self.current(&mut inner)?;
        match state {
            PreCopy if inner.emulated_precopy => Ok(0),
            PreCopy => {
                let s = inner
                    .session
                    .as_ref()
                    .ok_or_else(|| Self::no_session(state))?;
                let (initial, dirty) = self.io.precopy_info(s.fd.as_fd()).map_err(|e| {
                    device_err("report its pre-copy sizes (VFIO_MIG_GET_PRECOPY_INFO)", &e)
                })?;
                Ok(initial.saturating_add(dirty))
            }
            StopCopy => {
                let s = inner
                    .session
                    .as_mut()
                    .ok_or_else(|| Self::no_session(state))?;
                self.read_to_eof(s)?;
                Ok((s.ahead.len() - s.taken) as u64)
            }
            _ => Ok(0),
        }
    }

    fn save_chunk(&self) -> Result<Option<Vec<u8>>> {
        let mut inner = self.lock();
        let (_, state) = self.current(&mut inner)?;
        match state {
            PreCopy if inner.emulated_precopy => Ok(None),
            PreCopy => {
                let s = inner
                    .session
                    .as_ref()
                    .ok_or_else(|| Self::no_session(state))?;
                match self.read_some(s.fd.as_fd(), CHUNK_SIZE) {
                    // The uAPI asks for ENOMSG at the temporary end, but Linux's own mtty
                    // sample returns 0 there (its read stops at what it has filled), and
                    // QEMU takes 0 as "nothing now" too; the stream goes on in STOP_COPY.
                    Ok(v) if v.is_empty() => Ok(None),
                    Ok(v) => Ok(Some(v)),
                    Err(e)
                        if e.raw_os_error() == Some(libc::ENOMSG)
                            || e.kind() == io::ErrorKind::WouldBlock =>
                    {
                        Ok(None)
                    }
                    Err(e) => Err(device_err("read its pre-copy state from the data fd", &e)),
                }
            }
            StopCopy => {
                let s = inner
                    .session
                    .as_mut()
                    .ok_or_else(|| Self::no_session(state))?;
                if s.taken == s.ahead.len() && !s.eof {
                    // Nothing read ahead: read straight from the fd.
                    s.ahead.clear();
                    s.taken = 0;
                    let got = self.read_some(s.fd.as_fd(), CHUNK_SIZE).map_err(|e| {
                        if e.raw_os_error() == Some(libc::ENOMSG) {
                            MigrationError::Protocol(
                                "the data fd returned ENOMSG in STOP_COPY, where the uAPI \
                                 forbids it"
                                    .into(),
                            )
                        } else {
                            device_err("read its stop-copy state from the data fd", &e)
                        }
                    })?;
                    if got.is_empty() {
                        s.eof = true;
                        return Ok(None);
                    }
                    return Ok(Some(got));
                }
                if s.taken == s.ahead.len() {
                    return Ok(None);
                }
                let end = (s.taken + CHUNK_SIZE).min(s.ahead.len());
                let chunk = s.ahead[s.taken..end].to_vec();
                s.taken = end;
                if s.taken == s.ahead.len() {
                    s.ahead = Vec::new();
                    s.taken = 0;
                }
                Ok(Some(chunk))
            }
            _ => Err(MigrationError::WrongState {
                op: "save a chunk",
                state,
            }),
        }
    }

    fn restore_chunk(&self, data: &[u8]) -> Result<()> {
        let mut inner = self.lock();
        let (_, state) = self.current(&mut inner)?;
        if state != Resuming {
            return Err(MigrationError::WrongState {
                op: "restore a chunk",
                state,
            });
        }
        let s = inner
            .session
            .as_ref()
            .ok_or_else(|| Self::no_session(state))?;
        let mut rest = data;
        while !rest.is_empty() {
            match self.io.write(s.fd.as_fd(), rest) {
                Ok(0) => {
                    return Err(MigrationError::Device {
                        op: format!("take {} more bytes of state on the data fd", rest.len()),
                        reason: "write() accepted 0 bytes".into(),
                    })
                }
                Ok(n) => rest = &rest[n.min(rest.len())..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(device_err(
                        format!(
                            "take state on the data fd ({} of {} bytes written)",
                            data.len() - rest.len(),
                            data.len()
                        ),
                        &e,
                    ))
                }
            }
        }
        Ok(())
    }

    fn start_dirty_tracking(&self) -> Result<()> {
        let op = "start DMA logging (VFIO_DEVICE_FEATURE SET DMA_LOGGING_START)";
        if !self.dma_logging {
            return Err(MigrationError::Device {
                op: op.into(),
                reason: "the device does not support DMA logging (probe failed); IOMMU dirty \
                         tracking is not implemented"
                    .into(),
            });
        }
        let mut inner = self.lock();
        if inner.logging.is_some() {
            return Ok(());
        }
        if inner.dma_ranges.is_empty() {
            return Err(MigrationError::Device {
                op: op.into(),
                reason: "no IOVA ranges were given (set_dma_ranges)".into(),
            });
        }
        let ranges: Vec<vfio_device_feature_dma_logging_range> = inner
            .dma_ranges
            .iter()
            .map(|r| vfio_device_feature_dma_logging_range {
                iova: r.iova,
                length: r.length,
            })
            .collect();
        let mut buf = FeatureBuf::new(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            layout::LOGGING_CONTROL_SIZE,
        );
        buf.put_u64(0, DIRTY_PAGE_SIZE);
        buf.put_u32(layout::LOGGING_CONTROL_NUM_RANGES, ranges.len() as u32);
        buf.put_u64(layout::LOGGING_CONTROL_RANGES, ranges.as_ptr() as u64);
        // SAFETY: `ranges` has `num_ranges` entries and lives until after the call.
        unsafe { self.io.device_feature(&mut buf) }.map_err(|e| device_err(op, &e))?;
        let page_size = buf.u64_at(0);
        if !page_size.is_power_of_two() {
            // Started, but with a granularity we cannot use: stop it again.
            let _ = self.stop_logging();
            return Err(MigrationError::Protocol(format!(
                "DMA logging started with page size {page_size:#x}, not a power of two"
            )));
        }
        inner.logging = Some(page_size);
        Ok(())
    }

    fn stop_dirty_tracking(&self) -> Result<()> {
        let mut inner = self.lock();
        if inner.logging.is_none() {
            return Ok(());
        }
        self.stop_logging()?;
        inner.logging = None;
        Ok(())
    }

    fn take_dirty_pages(&self) -> Result<Vec<u64>> {
        let inner = self.lock();
        if inner.logging.is_none() {
            return Err(MigrationError::Device {
                op: "report dirty pages".into(),
                reason: "DMA logging is not started".into(),
            });
        }
        let mut pages = Vec::new();
        for r in &inner.dma_ranges {
            let npages = r.length / DIRTY_PAGE_SIZE;
            let words = usize::try_from(npages.div_ceil(64)).map_err(|_| {
                MigrationError::Protocol(format!(
                    "IOVA range of {:#x} bytes is too large",
                    r.length
                ))
            })?;
            // The kernel only sets bits: the bitmap starts zeroed.
            let mut bitmap = vec![0u64; words];
            let mut buf =
                FeatureBuf::logging_report(r.iova, r.length, DIRTY_PAGE_SIZE, &mut bitmap);
            // SAFETY: `bitmap` holds ceil(length / page_size / 64) u64s, what the kernel
            // writes for this range and page size, and lives until after the call.
            unsafe { self.io.device_feature(&mut buf) }.map_err(|e| MigrationError::Device {
                op: format!(
                    "report dirty pages of IOVA {:#x}+{:#x} (VFIO_DEVICE_FEATURE GET \
                     DMA_LOGGING_REPORT); the dirty log is now unreliable: treat all memory \
                     as dirty or restart tracking",
                    r.iova, r.length
                ),
                reason: errno_name(&e),
            })?;
            for (w, &word) in bitmap.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let bit = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let page = w as u64 * 64 + bit;
                    if page < npages {
                        pages.push(r.iova + page * DIRTY_PAGE_SIZE);
                    }
                }
            }
        }
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }
}

impl KernelVfioMigration {
    fn stop_logging(&self) -> Result<()> {
        let mut buf = FeatureBuf::new(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
            0,
        );
        // SAFETY: DMA_LOGGING_STOP has no payload.
        unsafe { self.io.device_feature(&mut buf) }.map_err(|e| {
            device_err(
                "stop DMA logging (VFIO_DEVICE_FEATURE SET DMA_LOGGING_STOP)",
                &e,
            )
        })
    }
}
