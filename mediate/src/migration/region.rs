//! [`MigrationRegion`]: the register protocol of the migration region, over the hooks a
//! mediator supplies ([`MigrationOps`]).

use std::sync::{Mutex, MutexGuard};

use devices::vfio::backend::BackendError;
use devices::vfio::migration::{MigrationState, DIRTY_PAGE_SIZE};
use devices::vfio::region_migration::layout::{
    decode_state, encode_state, transition, Step, DATA_OFFSET, DATA_SIZE, DATA_WINDOW_OFFSET,
    DEFAULT_WINDOW_SIZE, DEVICE_STATE, HEADER_SIZE, MAX_WINDOW_SIZE, PAGE_SIZE, PENDING_BYTES,
    REGION_FLAGS, RESERVED, STATE_RUNNING, STATE_SAVING,
};
use devices::vfio::region_migration::{DirtyTracker, OpsError, OpsResult};
use devices::vfio::{RegionFlags, RegionInfo};

/// What a mediator supplies so that [`MigrationRegion`] can migrate its device.
///
/// Every state transition is made of the one-bit steps in
/// [`TRANSITIONS`](devices::vfio::region_migration::layout::TRANSITIONS), each one call
/// here. A hook that fails must have changed nothing: the region then reports
/// the state reached by the steps before it, which is always a valid state, and the VMM
/// continues (or recovers) from there.
///
/// The hooks run under the region's lock, so they never run concurrently with each other
/// or with a register access; they should not block for long (vCPU threads may wait).
pub trait MigrationOps: Send {
    /// Stops the device: no more DMA, interrupts or state changes until
    /// [`resume_device`](Self::resume_device). Once saving, the state is final.
    fn stop_device(&mut self) -> OpsResult<()>;

    /// Lets the device run again.
    fn resume_device(&mut self) -> OpsResult<()>;

    /// Saving starts. `live` is the pre-copy hook: the device is still running, so what is
    /// saved now may change and [`pending_bytes`](Self::pending_bytes) is an estimate; when
    /// it is later stopped ([`stop_device`](Self::stop_device) while saving) the rest must be
    /// exact. Not live: the device is already stopped (stop-and-copy from the start).
    fn begin_save(&mut self, live: bool) -> OpsResult<()>;

    /// Saving ends: completed, or cancelled (the device may be resumed next). Whatever
    /// was not read is dropped.
    fn end_save(&mut self) -> OpsResult<()>;

    /// Bytes of state not yet handed out by [`save_chunk`](Self::save_chunk). Only called
    /// while saving; must be 0 eventually once the device is stopped.
    fn pending_bytes(&mut self) -> OpsResult<u64>;

    /// Writes the next chunk of state into `buf` (at most `buf.len()` bytes, the window)
    /// and returns its length. Only called while saving and with `pending_bytes() > 0`.
    fn save_chunk(&mut self, buf: &mut [u8]) -> OpsResult<usize>;

    /// Restoring starts (the device is stopped).
    fn begin_restore(&mut self) -> OpsResult<()>;

    /// The next piece of the saved stream, in order. Boundaries are those of the
    /// destination's window, not the source's chunks: treat the data as a byte stream.
    fn restore_chunk(&mut self, data: &[u8]) -> OpsResult<()>;

    /// Restoring ends: all data was given; apply it, or refuse it (incomplete, corrupt)
    /// without applying any of it: the restore is then abandoned and the device is stopped
    /// with the state it had, ready to run again or to take another restore.
    fn end_restore(&mut self) -> OpsResult<()>;

    /// Starts recording the guest pages the device writes by DMA (e.g. by trapping the
    /// doorbells and reading the rings).
    fn start_dirty_tracking(&mut self) -> OpsResult<()>;

    /// Stops recording dirty pages.
    fn stop_dirty_tracking(&mut self) -> OpsResult<()>;

    /// Guest physical addresses written since tracking started or since the last call; in
    /// any order and granularity (the region aligns, sorts and deduplicates).
    fn take_dirty_pages(&mut self) -> OpsResult<Vec<u64>>;
}

/// Why an access to the migration region failed. None of them changes the region's state
/// except [`RegionError::TransitionFailed`], which says where the device is now.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The access is empty or reaches past the end of the region.
    #[error("{len}-byte access at {offset:#x} is outside the {size:#x}-byte migration region")]
    OutOfBounds {
        /// Offset of the access.
        offset: u64,
        /// Its length.
        len: usize,
        /// Size of the region.
        size: u64,
    },
    /// A register access that is not exactly one whole register.
    #[error(
        "{len}-byte access at {offset:#x} is not one whole register (device_state and \
         reserved are 4 bytes at 0x0 and 0x4; pending_bytes, data_offset and data_size \
         8 bytes at 0x8, 0x10 and 0x18)"
    )]
    NotARegister {
        /// Offset of the access.
        offset: u64,
        /// Its length.
        len: usize,
    },
    /// An access to the unused space between the registers and the data window.
    #[error("{len}-byte access at {offset:#x} lies in the unused space between the registers and the data window at {DATA_WINDOW_OFFSET:#x}")]
    Hole {
        /// Offset of the access.
        offset: u64,
        /// Its length.
        len: usize,
    },
    /// A 2-, 4- or 8-byte access to the data window that is not naturally aligned.
    #[error("{len}-byte access at {offset:#x} of the data window is not naturally aligned")]
    Misaligned {
        /// Offset of the access.
        offset: u64,
        /// Its length.
        len: usize,
    },
    /// A write to a read-only register.
    #[error("{0} is read-only")]
    ReadOnly(&'static str),
    /// A `device_state` value that is no state.
    #[error("device_state {value:#x} is not a valid state: {why}")]
    InvalidState {
        /// The value written.
        value: u32,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A transition the table does not allow; nothing changed.
    #[error("the migration region does not allow the transition from {from} to {to}")]
    IllegalTransition {
        /// The current state.
        from: MigrationState,
        /// The state asked for.
        to: MigrationState,
    },
    /// A mediator hook failed during a transition; the device is in `now`.
    #[error("transition from {from} to {to} failed in {step}, the device is {now}: {source}")]
    TransitionFailed {
        /// The state before.
        from: MigrationState,
        /// The state asked for.
        to: MigrationState,
        /// The state reached by the steps that succeeded.
        now: MigrationState,
        /// The hook that failed.
        step: &'static str,
        /// What the mediator said.
        source: OpsError,
    },
    /// An access that the current state does not allow.
    #[error("{what} is not possible while the device is {state}")]
    WrongState {
        /// What was attempted.
        what: &'static str,
        /// The current state.
        state: MigrationState,
    },
    /// A read of the data window while saving that is not within the chunk staged by the
    /// last `data_offset` read.
    #[error("{len}-byte read at {offset:#x} is outside the {chunk:#x}-byte chunk in the data window (read data_offset first)")]
    OutsideChunk {
        /// Offset of the access.
        offset: u64,
        /// Its length.
        len: usize,
        /// Length of the staged chunk (0: none).
        chunk: u64,
    },
    /// A `data_size` written while resuming that is larger than the data window.
    #[error("data_size {size:#x} is larger than the {window:#x}-byte data window")]
    DataSizeTooLarge {
        /// The value written.
        size: u64,
        /// Size of the window.
        window: u64,
    },
    /// A mediator hook outside a transition failed.
    #[error("the mediator failed to {op}: {source}")]
    Device {
        /// The hook.
        op: &'static str,
        /// What the mediator said.
        source: OpsError,
    },
    /// The mediator claims to have saved more than the window holds.
    #[error("the mediator saved {len} bytes into a {window}-byte data window")]
    MediatorOverrun {
        /// What it claimed.
        len: usize,
        /// Size of the window.
        window: usize,
    },
    /// A window size the region cannot use.
    #[error("data window size {0:#x} is not a non-zero multiple of {PAGE_SIZE:#x} up to {MAX_WINDOW_SIZE:#x}")]
    BadWindowSize(u64),
}

impl RegionError {
    /// The error as a [`BackendError`], for a mediator that serves the region as region
    /// `index` of a [`devices::vfio::VfioBackend`].
    pub fn into_backend_error(self, index: u32) -> BackendError {
        match self {
            RegionError::OutOfBounds { offset, len, size } => BackendError::OutOfRange {
                index,
                offset,
                len,
                size,
            },
            e => BackendError::Refused {
                op: format!("migration region {index} access"),
                reason: e.to_string(),
            },
        }
    }
}

/// The register state behind the lock.
struct Inner<O> {
    ops: O,
    /// `device_state`, always a valid state's encoding.
    state: MigrationState,
    window: Vec<u8>,
    /// While saving: length of the chunk in the window that the last `data_offset` read
    /// staged and no `pending_bytes` read has acknowledged yet.
    staged: Option<usize>,
    /// While resuming: the last `data_size` written.
    resume_size: u64,
}

/// The migration region of a mediated device: the v1 register protocol (see
/// [`layout`](devices::vfio::region_migration::layout)) over a mediator's [`MigrationOps`].
///
/// Save: the VMM reads `pending_bytes`; if non-zero it reads `data_offset`, which makes the
/// region ask the mediator for the next chunk and put it in the window (reading it again
/// before the next `pending_bytes` read returns the same chunk), then `data_size` and the
/// chunk. The next `pending_bytes` read acknowledges it. In stop-and-copy the VMM repeats
/// until `pending_bytes` is 0. Reading `data_offset` with nothing pending stages nothing
/// (`data_size` reads 0).
///
/// Resume: in RESUMING the VMM writes up to a window's worth of the stream into the window,
/// then its length to `data_size`, which hands it to the mediator.
///
/// Accesses: registers whole, with their own size; the window with any length within it,
/// 2-, 4- and 8-byte accesses naturally aligned; the window is readable only within the
/// staged chunk while saving, read/write while resuming, and closed otherwise. Every bad
/// access is an error that leaves the region unchanged.
///
/// The state sits behind a mutex: vCPU threads (the guest-visible device) and the VMM's
/// migration thread may call in at the same time.
pub struct MigrationRegion<O> {
    inner: Mutex<Inner<O>>,
    window_size: u64,
}

impl<O: MigrationOps> MigrationRegion<O> {
    /// A region with the [default window](DEFAULT_WINDOW_SIZE), in state Running.
    pub fn new(ops: O) -> Self {
        Self::build(ops, DEFAULT_WINDOW_SIZE)
    }

    /// A region whose data window is `window_size` bytes: a non-zero multiple of the page
    /// size, at most [`MAX_WINDOW_SIZE`].
    pub fn with_window_size(ops: O, window_size: u64) -> Result<Self, RegionError> {
        if window_size == 0
            || !window_size.is_multiple_of(PAGE_SIZE)
            || window_size > MAX_WINDOW_SIZE
        {
            return Err(RegionError::BadWindowSize(window_size));
        }
        Ok(Self::build(ops, window_size))
    }

    fn build(ops: O, window_size: u64) -> Self {
        MigrationRegion {
            inner: Mutex::new(Inner {
                ops,
                state: MigrationState::Running,
                window: vec![0; window_size as usize],
                staged: None,
                resume_size: 0,
            }),
            window_size,
        }
    }

    /// Size of the region: registers, unused space, data window.
    pub fn size(&self) -> u64 {
        DATA_WINDOW_OFFSET + self.window_size
    }

    /// Size of the data window.
    pub fn window_size(&self) -> u64 {
        self.window_size
    }

    /// What a mediator reports for the region; it also advertises
    /// [`REGION_TYPE`](devices::vfio::region_migration::layout::REGION_TYPE) /
    /// [`REGION_SUBTYPE`](devices::vfio::region_migration::layout::REGION_SUBTYPE) in the
    /// region's type capability.
    pub fn region_info(&self) -> RegionInfo {
        RegionInfo {
            size: self.size(),
            flags: RegionFlags::from_vfio(REGION_FLAGS),
            sparse_areas: Vec::new(),
            mmap: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> MigrationState {
        self.lock().state
    }

    /// Runs `f` on the mediator's hooks under the region's lock (for the mediator's own
    /// use, e.g. marking pages dirty, and for tests).
    pub fn with_ops<R>(&self, f: impl FnOnce(&mut O) -> R) -> R {
        f(&mut self.lock().ops)
    }

    /// Back to Running after a device reset, without calling the mediator (which is the one
    /// resetting the device): any save or restore in progress is abandoned.
    pub fn reset(&self) {
        let mut inner = self.lock();
        inner.state = MigrationState::Running;
        inner.staged = None;
        inner.resume_size = 0;
        inner.window.fill(0);
    }

    fn lock(&self) -> MutexGuard<'_, Inner<O>> {
        // A panic in a hook leaves consistent registers behind (every field is updated
        // after the hook returns), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads `data.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), RegionError> {
        let area = self.classify(offset, data.len())?;
        let mut inner = self.lock();
        match area {
            Area::Register(reg) => {
                let value = inner.read_register(reg)?;
                let bytes = value.to_le_bytes();
                data.copy_from_slice(&bytes[..data.len()]);
                Ok(())
            }
            Area::Window(at) => inner.read_window(at, data),
        }
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), RegionError> {
        let area = self.classify(offset, data.len())?;
        let mut inner = self.lock();
        match area {
            Area::Register(reg) => {
                let mut bytes = [0u8; 8];
                bytes[..data.len()].copy_from_slice(data);
                inner.write_register(reg, u64::from_le_bytes(bytes))
            }
            Area::Window(at) => inner.write_window(at, data),
        }
    }

    /// Checks bounds, size and alignment; says what is accessed.
    fn classify(&self, offset: u64, len: usize) -> Result<Area, RegionError> {
        let end = offset.checked_add(len as u64);
        if len == 0 || end.is_none_or(|e| e > self.size()) {
            return Err(RegionError::OutOfBounds {
                offset,
                len,
                size: self.size(),
            });
        }
        if offset < HEADER_SIZE {
            let reg = match (offset, len) {
                (DEVICE_STATE, 4) => Register::DeviceState,
                (RESERVED, 4) => Register::Reserved,
                (PENDING_BYTES, 8) => Register::PendingBytes,
                (DATA_OFFSET, 8) => Register::DataOffset,
                (DATA_SIZE, 8) => Register::DataSize,
                _ => return Err(RegionError::NotARegister { offset, len }),
            };
            return Ok(Area::Register(reg));
        }
        if offset < DATA_WINDOW_OFFSET {
            return Err(RegionError::Hole { offset, len });
        }
        if matches!(len, 2 | 4 | 8) && !offset.is_multiple_of(len as u64) {
            return Err(RegionError::Misaligned { offset, len });
        }
        // In bounds, so this is below the window size, which fits a usize (a Vec of it
        // was allocated).
        Ok(Area::Window((offset - DATA_WINDOW_OFFSET) as usize))
    }
}

impl<O: MigrationOps> DirtyTracker for MigrationRegion<O> {
    fn start_dirty_tracking(&self) -> OpsResult<()> {
        self.lock().ops.start_dirty_tracking()
    }

    fn stop_dirty_tracking(&self) -> OpsResult<()> {
        self.lock().ops.stop_dirty_tracking()
    }

    fn take_dirty_pages(&self) -> OpsResult<Vec<u64>> {
        let mut pages = self.lock().ops.take_dirty_pages()?;
        for p in &mut pages {
            *p &= !(DIRTY_PAGE_SIZE - 1);
        }
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }
}

#[derive(Clone, Copy, Debug)]
enum Register {
    DeviceState,
    Reserved,
    PendingBytes,
    DataOffset,
    DataSize,
}

#[derive(Clone, Copy, Debug)]
enum Area {
    Register(Register),
    /// Offset within the window.
    Window(usize),
}

fn saving(state: MigrationState) -> bool {
    encode_state(state) & STATE_SAVING != 0
}

impl<O: MigrationOps> Inner<O> {
    fn read_register(&mut self, reg: Register) -> Result<u64, RegionError> {
        match reg {
            Register::DeviceState => Ok(u64::from(encode_state(self.state))),
            Register::Reserved => Ok(0),
            Register::PendingBytes => {
                if !saving(self.state) {
                    return Ok(0);
                }
                // Reading pending_bytes acknowledges the chunk in the window (step f of
                // the v1 sequence), so the next data_offset read stages a new one.
                self.staged = None;
                self.ops
                    .pending_bytes()
                    .map_err(|source| RegionError::Device {
                        op: "report pending bytes",
                        source,
                    })
            }
            Register::DataOffset => {
                if saving(self.state) && self.staged.is_none() {
                    self.stage_chunk()?;
                }
                Ok(DATA_WINDOW_OFFSET)
            }
            Register::DataSize => Ok(match self.state {
                s if saving(s) => self.staged.unwrap_or(0) as u64,
                MigrationState::Resuming => self.resume_size,
                _ => 0,
            }),
        }
    }

    /// Asks the mediator for the next chunk, if anything is pending.
    fn stage_chunk(&mut self) -> Result<(), RegionError> {
        let pending = self
            .ops
            .pending_bytes()
            .map_err(|source| RegionError::Device {
                op: "report pending bytes",
                source,
            })?;
        if pending == 0 {
            return Ok(());
        }
        let len = self
            .ops
            .save_chunk(&mut self.window)
            .map_err(|source| RegionError::Device {
                op: "save a chunk",
                source,
            })?;
        if len > self.window.len() {
            return Err(RegionError::MediatorOverrun {
                len,
                window: self.window.len(),
            });
        }
        self.staged = Some(len);
        Ok(())
    }

    fn write_register(&mut self, reg: Register, value: u64) -> Result<(), RegionError> {
        match reg {
            // The access was 4 bytes, so the value fits.
            Register::DeviceState => self.set_state(value as u32),
            // v1: "writes are ignored".
            Register::Reserved => Ok(()),
            Register::PendingBytes => Err(RegionError::ReadOnly("pending_bytes")),
            Register::DataOffset => Err(RegionError::ReadOnly("data_offset")),
            Register::DataSize => {
                if saving(self.state) {
                    return Err(RegionError::ReadOnly("data_size (while saving)"));
                }
                if self.state != MigrationState::Resuming {
                    return Err(RegionError::WrongState {
                        what: "writing data_size",
                        state: self.state,
                    });
                }
                let window = self.window.len() as u64;
                if value > window {
                    return Err(RegionError::DataSizeTooLarge {
                        size: value,
                        window,
                    });
                }
                if value > 0 {
                    self.ops
                        .restore_chunk(&self.window[..value as usize])
                        .map_err(|source| RegionError::Device {
                            op: "restore a chunk",
                            source,
                        })?;
                }
                self.resume_size = value;
                Ok(())
            }
        }
    }

    fn set_state(&mut self, value: u32) -> Result<(), RegionError> {
        let to = decode_state(value).map_err(|why| RegionError::InvalidState { value, why })?;
        if to == MigrationState::Error {
            return Err(RegionError::InvalidState {
                value,
                why: "SAVING|RESUMING is the error state, which a device reports but no one may ask for",
            });
        }
        let from = self.state;
        if to == from {
            // Rewriting the current state (a read-modify-write that changed nothing).
            return Ok(());
        }
        let t = transition(from, to).ok_or(RegionError::IllegalTransition { from, to })?;
        let mut bits = encode_state(from);
        for &step in t.steps {
            let result = match step {
                Step::StopDevice => self.ops.stop_device(),
                Step::ResumeDevice => self.ops.resume_device(),
                Step::BeginSave => self.ops.begin_save(bits & STATE_RUNNING != 0),
                Step::EndSave => self.ops.end_save(),
                Step::BeginRestore => self.ops.begin_restore(),
                Step::EndRestore => self.ops.end_restore(),
            };
            if let Err(source) = result {
                if step == Step::EndRestore {
                    // The saved state was refused before it took effect: it is dropped and
                    // the device is stopped with the state it had, a defined state it can
                    // be resumed from or restored into again (not left "resuming").
                    self.enter(MigrationState::Stopped);
                }
                return Err(RegionError::TransitionFailed {
                    from,
                    to,
                    now: self.state,
                    step: step.name(),
                    source,
                });
            }
            bits = step.apply(bits);
            // Every intermediate of a table entry is valid (the layout tests check it).
            if let Ok(s) = decode_state(bits) {
                self.enter(s);
            }
        }
        Ok(())
    }

    /// Bookkeeping on entering `state`.
    fn enter(&mut self, state: MigrationState) {
        let was = self.state;
        self.state = state;
        if saving(was) != saving(state) {
            self.staged = None;
        }
        if state == MigrationState::Resuming && was != MigrationState::Resuming {
            // A restore starts from an empty window, never from what a save left there.
            self.window.fill(0);
            self.resume_size = 0;
        }
    }

    fn read_window(&mut self, at: usize, data: &mut [u8]) -> Result<(), RegionError> {
        let end = at + data.len();
        match self.state {
            s if saving(s) => {
                let chunk = self.staged.unwrap_or(0);
                if end > chunk {
                    return Err(RegionError::OutsideChunk {
                        offset: DATA_WINDOW_OFFSET + at as u64,
                        len: data.len(),
                        chunk: chunk as u64,
                    });
                }
            }
            MigrationState::Resuming => {}
            state => {
                return Err(RegionError::WrongState {
                    what: "reading the data window",
                    state,
                })
            }
        }
        data.copy_from_slice(&self.window[at..end]);
        Ok(())
    }

    fn write_window(&mut self, at: usize, data: &[u8]) -> Result<(), RegionError> {
        if self.state != MigrationState::Resuming {
            return Err(RegionError::WrongState {
                what: "writing the data window",
                state: self.state,
            });
        }
        self.window[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
}
