//! A fake kernel for [`MigrationIoctls`]: decodes the same `struct vfio_device_feature`
//! buffers the real ioctl gets and behaves as the uAPI describes.
//!
//! - The state machine follows the kernel's own `vfio_mig_get_next_state()` table
//!   (transcribed independently of `arcs.rs`), but is stricter than the kernel: it accepts
//!   **direct arcs only** (the kernel would also walk combination transitions), so the
//!   tests see that the code under test walks every arc itself. Every SET is recorded.
//! - Data fds are real memfds (their inode identifies the session), handed out on the arcs
//!   that open a session; a session ended by an arc answers ENODEV afterwards.
//! - Saving: the stream is `"FAKE" | len (u32) | device state | checksum (u32)`. In
//!   PRE_COPY the first `precopy_initial` bytes are readable, and [`FakeKernel::device_runs`]
//!   makes more readable (dirty bytes); past that, read() fails with ENOMSG (EAGAIN while
//!   `producing`, on a non-blocking fd; a blocking read then would hang, so it panics). In
//!   STOP_COPY all is readable, then EOF.
//! - Resuming: writes are collected; RESUMING -> STOP checks the stream and fails with
//!   EINVAL into ERROR if it is incomplete or corrupt.
//! - DMA logging: [`FakeKernel::dma_write`] records written IOVAs; REPORT sets the bits
//!   through the caller's bitmap pointer and clears what it reported.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    vfio_device_feature_dma_logging_range, VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
    VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
};

use super::arcs::{KernelState, FLAG_P2P, FLAG_PRE_COPY};
use super::ioctls::{layout, FeatureBuf, MigrationIoctls};
use crate::vfio::testing::memfd;

use KernelState::{
    Error as E, PreCopy as PC, PreCopyP2p as PCP, Resuming as RS, Running as R, RunningP2p as RP,
    Stop as S, StopCopy as SC,
};

/// The kernel's `vfio_from_fsm_table[cur][new]`: the next state on the way from `cur` to
/// `new` when every optional state is supported.
fn fsm_next(cur: KernelState, new: KernelState) -> KernelState {
    if cur == new {
        return cur;
    }
    match (cur, new) {
        (_, E) | (E, _) => E,
        (S, R | PC | PCP | RP) => RP,
        (S, SC) => SC,
        (S, RS) => RS,
        (R, S | PCP | SC | RS | RP) => RP,
        (R, PC) => PC,
        (PC, S | R | RS | RP) => R,
        (PC, PCP | SC) => PCP,
        (PCP, S | R | RS | RP) => RP,
        (PCP, PC) => PC,
        (PCP, SC) => SC,
        (SC, S | R | RS | RP) => S,
        (SC, PC | PCP) => E,
        (RS, _) => S,
        (RP, S | SC | RS) => S,
        (RP, R | PC) => R,
        (RP, PCP) => PCP,
        _ => unreachable!("{cur} -> {new}"),
    }
}

/// `vfio_mig_get_next_state()`: the table, skipping states the device does not support.
pub fn next_state(cur: KernelState, new: KernelState, flags: u64) -> KernelState {
    let mut next = fsm_next(cur, new);
    while next != E && !next.supported(flags) {
        next = fsm_next(next, new);
    }
    next
}

/// A recorded `SET MIG_DEVICE_STATE`: from, to, accepted.
pub type SetCall = (KernelState, KernelState, bool);

/// An injected failure of one arc.
#[derive(Clone, Copy, Debug)]
pub struct ArcFailure {
    /// The arc.
    pub from: KernelState,
    /// Its end.
    pub to: KernelState,
    /// errno returned.
    pub errno: i32,
    /// Where the device is afterwards.
    pub then: KernelState,
}

enum SessionKind {
    Save {
        stream: Vec<u8>,
        pos: usize,
        window: usize,
    },
    Resume {
        incoming: Vec<u8>,
    },
}

struct FakeSession {
    kind: SessionKind,
    open: bool,
}

/// The fake kernel's state; tests set the knobs directly.
pub struct FakeState {
    /// `VFIO_MIGRATION_*` flags; `None`: no migration support (ENOTTY).
    pub flags: Option<u64>,
    /// DMA logging supported.
    pub dma_logging: bool,
    /// The device's state.
    pub state: KernelState,
    /// The device's internal state (what a save streams out, what a load replaces).
    pub blob: Vec<u8>,
    /// Every SET MIG_DEVICE_STATE seen.
    pub sets: Vec<SetCall>,
    /// Number of GET MIG_DEVICE_STATE seen.
    pub gets: usize,
    /// Fail this arc.
    pub fail_arc: Option<ArcFailure>,
    /// PRE_COPY: initial bytes readable.
    pub precopy_initial: usize,
    /// PRE_COPY: the driver is still producing data (EAGAIN instead of ENOMSG).
    pub producing: bool,
    /// Largest read() / write() served at once.
    pub max_io: usize,
    /// STOP_COPY: the stream ends (EOF) after this many bytes.
    pub truncate_at: Option<usize>,
    /// PRE_COPY: read() returns 0 at the temporary end instead of ENOMSG, as Linux 6.12's
    /// mtty does.
    pub precopy_eof: bool,
    /// read() on the data fd fails with this errno.
    pub fail_read: Option<i32>,
    /// Page size DMA_LOGGING_START answers with.
    pub dma_page_size: u64,
    /// DMA logging running.
    pub logging: bool,
    /// Ranges DMA logging was started with: (iova, length).
    pub logged_ranges: Vec<(u64, u64)>,
    /// IOVAs written by the device (any byte address).
    pub dirty: BTreeSet<u64>,
    /// REPORT also sets every bit past the range's last page in the last word.
    pub sloppy_tail: bool,
    /// Whether each data fd was non-blocking when read.
    pub nonblocking_reads: Vec<bool>,
    sessions: HashMap<u64, FakeSession>,
}

/// A fake kernel (cheap to clone: clones share the state).
#[derive(Clone)]
pub struct FakeKernel(Arc<Mutex<FakeState>>);

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// The saved stream of a device state.
pub fn encode(blob: &[u8]) -> Vec<u8> {
    let mut s = b"FAKE".to_vec();
    s.extend_from_slice(&(blob.len() as u32).to_le_bytes());
    s.extend_from_slice(blob);
    s.extend_from_slice(&checksum(blob).to_le_bytes());
    s
}

fn checksum(b: &[u8]) -> u32 {
    b.iter()
        .fold(17u32, |a, &x| a.wrapping_mul(31).wrapping_add(x as u32))
}

fn decode(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() < 12 || &s[..4] != b"FAKE" {
        return None;
    }
    let len = u32::from_le_bytes(s[4..8].try_into().unwrap()) as usize;
    if s.len() != 12 + len {
        return None;
    }
    let blob = &s[8..8 + len];
    let sum = u32::from_le_bytes(s[8 + len..].try_into().unwrap());
    (sum == checksum(blob)).then(|| blob.to_vec())
}

fn inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(File::from(fd.try_clone_to_owned()?).metadata()?.ino())
}

fn is_nonblocking(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: F_GETFL takes no argument; `fd` is open (borrowed).
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    fl >= 0 && fl & libc::O_NONBLOCK != 0
}

impl FakeKernel {
    /// A RUNNING device with migration `flags` (None: no migration) and state `blob`.
    pub fn new(flags: Option<u64>, blob: &[u8]) -> Self {
        FakeKernel(Arc::new(Mutex::new(FakeState {
            flags,
            dma_logging: true,
            state: R,
            blob: blob.to_vec(),
            sets: Vec::new(),
            gets: 0,
            fail_arc: None,
            precopy_initial: 0,
            producing: false,
            max_io: usize::MAX,
            truncate_at: None,
            precopy_eof: false,
            fail_read: None,
            dma_page_size: 4096,
            logging: false,
            logged_ranges: Vec::new(),
            dirty: BTreeSet::new(),
            sloppy_tail: false,
            nonblocking_reads: Vec::new(),
            sessions: HashMap::new(),
        })))
    }

    /// The state, to inspect or to turn knobs.
    pub fn st(&self) -> MutexGuard<'_, FakeState> {
        self.0.lock().unwrap()
    }

    /// The SET arcs seen (accepted or not) since the last call.
    pub fn take_sets(&self) -> Vec<SetCall> {
        std::mem::take(&mut self.st().sets)
    }

    /// The running device changes `n` more bytes of its state: in PRE_COPY they become
    /// readable as dirty bytes.
    pub fn device_runs(&self, n: usize) {
        let mut st = self.st();
        for s in st.sessions.values_mut().filter(|s| s.open) {
            if let SessionKind::Save { stream, window, .. } = &mut s.kind {
                *window = (*window + n).min(stream.len());
            }
        }
    }

    /// The device writes `len` bytes at `iova` by DMA (logged if logging runs).
    pub fn dma_write(&self, iova: u64, len: u64) {
        let mut st = self.st();
        if !st.logging {
            return;
        }
        let mut a = iova;
        while a < iova + len {
            st.dirty.insert(a);
            a += 4096;
        }
        st.dirty.insert(iova + len - 1);
    }

    fn open_session(st: &mut FakeState, kind: SessionKind) -> io::Result<i32> {
        let file = memfd("fake-vfio-migration-data")?;
        let ino = file.metadata()?.ino();
        st.sessions.insert(ino, FakeSession { kind, open: true });
        Ok(file.into_raw_fd())
    }

    fn mig_state(st: &mut FakeState, buf: &mut FeatureBuf, ops: u32) -> io::Result<()> {
        let flags = st.flags.ok_or_else(|| err(libc::ENOTTY))?;
        if buf.payload().len() < layout::MIG_STATE_SIZE {
            return Err(err(libc::EINVAL));
        }
        if ops == VFIO_DEVICE_FEATURE_GET {
            st.gets += 1;
            buf.put_u32(0, st.state.raw());
            buf.put_u32(layout::MIG_STATE_DATA_FD, -1i32 as u32);
            return Ok(());
        }
        if ops != VFIO_DEVICE_FEATURE_SET {
            return Err(err(libc::EINVAL));
        }
        let cur = st.state;
        let new = KernelState::from_raw(buf.u32_at(0)).ok_or_else(|| err(libc::EINVAL))?;
        let direct =
            new != E && new.supported(flags) && cur != new && next_state(cur, new, flags) == new;
        st.sets.push((cur, new, direct));
        if !direct {
            return Err(err(libc::EINVAL));
        }
        if let Some(f) = st.fail_arc.filter(|f| f.from == cur && f.to == new) {
            st.state = f.then;
            if !f.then.has_session() {
                st.sessions.values_mut().for_each(|s| s.open = false);
            }
            return Err(err(f.errno));
        }
        if cur == RS && new == S {
            let incoming = st.sessions.values().find_map(|s| match (&s.kind, s.open) {
                (SessionKind::Resume { incoming }, true) => Some(incoming.clone()),
                _ => None,
            });
            match incoming.as_deref().and_then(decode) {
                Some(blob) => st.blob = blob,
                None => {
                    st.state = E;
                    st.sessions.values_mut().for_each(|s| s.open = false);
                    return Err(err(libc::EINVAL));
                }
            }
        }
        let mut data_fd = -1;
        if cur.has_session() && !(cur.saving() && new.saving()) {
            st.sessions.values_mut().for_each(|s| s.open = false);
        }
        if new == RS {
            data_fd = Self::open_session(
                st,
                SessionKind::Resume {
                    incoming: Vec::new(),
                },
            )?;
        } else if new.saving() && !cur.saving() {
            let stream = encode(&st.blob);
            let window = if new == SC {
                stream.len()
            } else {
                st.precopy_initial.min(stream.len())
            };
            data_fd = Self::open_session(
                st,
                SessionKind::Save {
                    stream,
                    pos: 0,
                    window,
                },
            )?;
        } else if new == SC {
            for s in st.sessions.values_mut().filter(|s| s.open) {
                if let SessionKind::Save { stream, window, .. } = &mut s.kind {
                    *window = stream.len();
                }
            }
        }
        st.state = new;
        buf.put_u32(layout::MIG_STATE_DATA_FD, data_fd as u32);
        Ok(())
    }

    /// # Safety
    /// As [`MigrationIoctls::device_feature`]: pointers in the payload are valid.
    unsafe fn logging(st: &mut FakeState, buf: &mut FeatureBuf, index: u32) -> io::Result<()> {
        if index == VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP {
            st.logging = false;
            st.dirty.clear();
            return Ok(());
        }
        if index == VFIO_DEVICE_FEATURE_DMA_LOGGING_START {
            if st.logging || buf.payload().len() < layout::LOGGING_CONTROL_SIZE {
                return Err(err(libc::EINVAL));
            }
            let page = buf.u64_at(0);
            let n = buf.u32_at(layout::LOGGING_CONTROL_NUM_RANGES) as usize;
            let ptr = buf.u64_at(layout::LOGGING_CONTROL_RANGES)
                as *const vfio_device_feature_dma_logging_range;
            if !page.is_power_of_two() || n == 0 || ptr.is_null() {
                return Err(err(libc::EINVAL));
            }
            // SAFETY: the caller guarantees `ranges` points at `num_ranges` entries.
            let ranges = unsafe { std::slice::from_raw_parts(ptr, n) };
            st.logged_ranges = ranges.iter().map(|r| (r.iova, r.length)).collect();
            st.logging = true;
            buf.put_u64(0, st.dma_page_size);
            return Ok(());
        }
        // REPORT
        if !st.logging || buf.payload().len() < layout::LOGGING_REPORT_SIZE {
            return Err(err(libc::EINVAL));
        }
        let (iova, len) = (buf.u64_at(0), buf.u64_at(8));
        let page = buf.u64_at(layout::LOGGING_REPORT_PAGE_SIZE);
        let ptr = buf.u64_at(layout::LOGGING_REPORT_BITMAP) as *mut u64;
        if !page.is_power_of_two() || page < 4096 || len == 0 || ptr.is_null() {
            return Err(err(libc::EINVAL));
        }
        let npages = len.div_ceil(page);
        let words = npages.div_ceil(64) as usize;
        // SAFETY: the caller guarantees the bitmap holds ceil(npages / 64) u64s.
        let bitmap = unsafe { std::slice::from_raw_parts_mut(ptr, words) };
        let hits: Vec<u64> = st.dirty.range(iova..iova + len).copied().collect();
        for a in hits {
            let i = (a - iova) / page;
            bitmap[(i / 64) as usize] |= 1 << (i % 64);
            st.dirty.remove(&a);
        }
        if st.sloppy_tail && npages % 64 != 0 {
            bitmap[words - 1] |= !0u64 << (npages % 64);
        }
        Ok(())
    }

    fn session<'a>(st: &'a mut FakeState, fd: BorrowedFd<'_>) -> io::Result<&'a mut FakeSession> {
        let ino = inode(fd)?;
        let s = st.sessions.get_mut(&ino).ok_or_else(|| err(libc::EBADF))?;
        if !s.open {
            return Err(err(libc::ENODEV));
        }
        Ok(s)
    }
}

impl MigrationIoctls for FakeKernel {
    unsafe fn device_feature(&self, buf: &mut FeatureBuf) -> io::Result<()> {
        let mut st = self.st();
        if buf.argsz() as usize != buf.bytes().len() {
            return Err(err(libc::EINVAL));
        }
        let flags = buf.flags();
        let index = flags & 0xffff;
        let ops = flags & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET);
        let probe = flags & VFIO_DEVICE_FEATURE_PROBE != 0;
        match index {
            VFIO_DEVICE_FEATURE_MIGRATION => {
                let f = st.flags.ok_or_else(|| err(libc::ENOTTY))?;
                if ops != VFIO_DEVICE_FEATURE_GET {
                    return Err(err(libc::EINVAL));
                }
                if !probe {
                    buf.put_u64(0, f);
                }
                Ok(())
            }
            VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => Self::mig_state(&mut st, buf, ops),
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START
            | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP
            | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => {
                if !st.dma_logging {
                    return Err(err(libc::ENOTTY));
                }
                let want = if index == VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT {
                    VFIO_DEVICE_FEATURE_GET
                } else {
                    VFIO_DEVICE_FEATURE_SET
                };
                if ops != want {
                    return Err(err(libc::EINVAL));
                }
                if probe {
                    return Ok(());
                }
                // SAFETY: forwarded from this method's contract.
                unsafe { Self::logging(&mut st, buf, index) }
            }
            _ => Err(err(libc::ENOTTY)),
        }
    }

    fn read(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        let mut st = self.st();
        let nonblocking = is_nonblocking(fd);
        st.nonblocking_reads.push(nonblocking);
        if let Some(e) = st.fail_read {
            return Err(err(e));
        }
        let state = st.state;
        let (producing, max_io, truncate_at, precopy_eof) =
            (st.producing, st.max_io, st.truncate_at, st.precopy_eof);
        let s = Self::session(&mut st, fd)?;
        let SessionKind::Save {
            stream,
            pos,
            window,
        } = &mut s.kind
        else {
            return Err(err(libc::EINVAL));
        };
        let end = match state {
            PC | PCP => *window,
            SC => truncate_at.unwrap_or(stream.len()).min(stream.len()),
            _ => return Err(err(libc::EINVAL)),
        };
        if *pos == end {
            return match state {
                SC => Ok(0),
                _ if precopy_eof => Ok(0),
                _ if producing && nonblocking => Err(err(libc::EAGAIN)),
                _ if producing => panic!("a blocking read in PRE_COPY would hang"),
                _ => Err(err(libc::ENOMSG)),
            };
        }
        let n = buf.len().min(end - *pos).min(max_io);
        buf[..n].copy_from_slice(&stream[*pos..*pos + n]);
        *pos += n;
        Ok(n)
    }

    fn write(&self, fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.st();
        let max_io = st.max_io;
        let s = Self::session(&mut st, fd)?;
        let SessionKind::Resume { incoming } = &mut s.kind else {
            return Err(err(libc::EINVAL));
        };
        let n = buf.len().min(max_io);
        incoming.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn precopy_info(&self, fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
        let mut st = self.st();
        if !matches!(st.state, PC | PCP) {
            return Err(err(libc::EINVAL));
        }
        let initial = st.precopy_initial;
        let s = Self::session(&mut st, fd)?;
        let SessionKind::Save { pos, window, .. } = &s.kind else {
            return Err(err(libc::EINVAL));
        };
        let initial_left = initial.saturating_sub(*pos);
        let dirty = window.saturating_sub((*pos).max(initial));
        Ok((initial_left as u64, dirty as u64))
    }
}

#[test]
fn fsm_table_matches_the_uapi_arcs() {
    // Spot checks of the transcription: the direct arcs without optional states.
    let f = super::arcs::FLAG_STOP_COPY;
    assert_eq!(next_state(R, SC, f), S);
    assert_eq!(next_state(R, S, f), S);
    assert_eq!(next_state(R, S, f | FLAG_P2P), RP);
    assert_eq!(next_state(PC, SC, f | FLAG_PRE_COPY), SC);
    assert_eq!(next_state(PC, SC, f | FLAG_PRE_COPY | FLAG_P2P), PCP);
    assert_eq!(next_state(SC, PC, f | FLAG_PRE_COPY), E);
    assert_eq!(next_state(RS, R, f), S);
}
