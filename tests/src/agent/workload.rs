//! The `workload_*` ops: a memory writer and a disk writer that run in background threads
//! while the host does something to the machine (live migration, snapshots), and an exact
//! check of everything they wrote.
//!
//! Each writer thread owns all of its data (buffer, records); requests reach it through a
//! channel, which it polls between two chunks or two blocks, so a verification always sees a
//! consistent state and needs no locks: the writer itself runs the check and replies.
//!
//! **Memory**: the buffer is split into 4 KiB chunks (one page each) written in passes; in pass
//! `n` chunk `k` gets [`fill`]`(seed, k, n)` and its record `(seq n, FNV-1a of the chunk)`.
//! A chunk matches when its checksum equals the record's, its header names `(seed, k, seq)`,
//! and the record's seq is the one the writer's position says (chunks before the position
//! hold pass `n`, the others pass `n - 1`, or zeros before the first pass): a page that went
//! stale, or a stale record page, both show. Each chunk is checked before it is rewritten, so
//! damage is reported even when the writer gets there before a `workload_verify`.
//!
//! **Disk**: block `b` of the range is written round and round; write number `seq` (counted
//! from 1 over the whole run) puts [`fill`]`(seed, offset / block_size + b, seq)` there. Once
//! the write (with O_DIRECT) or the write and fdatasync (without) returned success, `seq` is
//! recorded as the block's last acknowledged write; a failed write forgets the block (its
//! content is then unknown). Before a block is overwritten it is read back into the next buffer
//! of a ring and checked against its record; the ring buffer is then recorded as holding that
//! content. With O_DIRECT the device fills these buffers by DMA, so they are guest memory that
//! only the device dirties: a migration that misses device-dirtied pages leaves them stale,
//! which the ring check finds.
//!
//! Every mismatch is reported once, by the writer (counted until the next verify) or by the
//! verify that found it, and its record is then dropped so that it is not reported again.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::aligned::{AlignedBuf, DIRECT_ALIGN};
use super::pattern;
use super::protocol::{
    DiskWorkloadStatus, MemWorkloadStatus, WorkloadCorruptReply, WorkloadCorruptRequest,
    WorkloadDisk, WorkloadMismatch, WorkloadStartRequest, WorkloadStatus, WorkloadVerifyReply,
    WorkloadVerifyRequest,
};
use super::sys;

/// Bytes per memory chunk: one page, so one lost page is one mismatching chunk.
pub const CHUNK: usize = 4096;
/// Length of the header [`fill`] writes: seed, index, seq.
pub const HEADER_LEN: usize = 24;
/// Memory left alone when checking the buffer size against MemAvailable.
const HEADROOM: u64 = 16 << 20;
/// Largest memory buffer accepted.
const MAX_MEM_MIB: u64 = 64 << 10;
/// Smallest and largest disk block.
const MIN_BLOCK: u64 = 512;
const MAX_BLOCK: u64 = 1 << 20;
/// Most blocks in the disk range (the record keeps 8 bytes per block).
const MAX_BLOCKS: u64 = 1 << 22;
/// Read-back ring: at most this many buffers and this many bytes.
const MAX_READBACK_SLOTS: u64 = 256;
const READBACK_BYTES: u64 = 1 << 20;
/// Bytes read per system call when `workload_verify` reads the disk range.
const SCAN_BYTES: u64 = 1 << 20;
/// How long a `workload_verify` waits for the writers to pause unless told.
const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long stopping waits for a writer (it may be stuck in I/O) before leaving it detached.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause of the disk writer after a failed I/O.
const ERROR_BACKOFF: Duration = Duration::from_millis(20);
/// Byte of a chunk that `workload_corrupt_mem` flips unless told.
const DEFAULT_CORRUPT_OFFSET: u64 = 100;

/// Why a workload op failed.
#[derive(Debug, Error)]
pub enum WorkloadError {
    /// The request's numbers do not make sense.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// `workload_start` while a workload runs.
    #[error("a workload is already running; send workload_stop first")]
    AlreadyRunning,
    /// An op that needs a workload without one.
    #[error("no workload is running; send workload_start first")]
    NotRunning,
    /// The buffer asked for does not fit.
    #[error("{mib} MiB requested but only {available_mib} MiB available (keeping {} MiB spare)", HEADROOM >> 20)]
    TooLarge {
        /// Requested size.
        mib: u64,
        /// MemAvailable.
        available_mib: u64,
    },
    /// An allocation failed.
    #[error("cannot allocate {0} bytes")]
    NoMemory(u64),
    /// The disk could not be opened or probed.
    #[error("cannot use {path}{direct}: {source}", direct = if *.direct { " with O_DIRECT" } else { "" })]
    Open {
        /// The file.
        path: String,
        /// Whether O_DIRECT was in use.
        direct: bool,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A writer thread could not be started.
    #[error("cannot start the {0} thread: {1}")]
    Spawn(&'static str, #[source] io::Error),
    /// A writer thread did not answer or is gone.
    #[error("{0}")]
    Writer(String),
}

/// Fills `buf` with the workload's content for `(seed, index, seq)`: the header (seed, index,
/// seq as little-endian `u64`s, truncated if `buf` is shorter) then a pseudo-random body that
/// depends on all three.
pub fn fill(seed: u64, index: u64, seq: u64, buf: &mut [u8]) {
    pattern::fill_block(mix(seed, seq), index, buf);
    let mut head = [0u8; HEADER_LEN];
    head[..8].copy_from_slice(&seed.to_le_bytes());
    head[8..16].copy_from_slice(&index.to_le_bytes());
    head[16..].copy_from_slice(&seq.to_le_bytes());
    let n = buf.len().min(HEADER_LEN);
    buf[..n].copy_from_slice(&head[..n]);
}

/// The `(seed, index, seq)` header of workload data (zeros where `buf` is too short).
pub fn header(buf: &[u8]) -> (u64, u64, u64) {
    let word = |i: usize| {
        buf.get(i * 8..i * 8 + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    (word(0), word(1), word(2))
}

fn mix(seed: u64, seq: u64) -> u64 {
    seed ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Mismatches found and not yet reported: how many, and the first.
#[derive(Debug, Default)]
struct Findings {
    count: u64,
    first: Option<WorkloadMismatch>,
}

impl Findings {
    fn add(&mut self, m: WorkloadMismatch) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(m);
        }
    }

    /// `self` (found earlier) followed by `later`.
    fn then(mut self, later: Findings) -> Findings {
        self.count += later.count;
        if self.first.is_none() {
            self.first = later.first;
        }
        self
    }
}

fn mismatch(
    index: u64,
    expected_seq: u64,
    data: &[u8],
    found_by: &str,
    detail: String,
) -> WorkloadMismatch {
    let (found_seed, found_index, found_seq) = header(data);
    WorkloadMismatch {
        index,
        expected_seq,
        found_seed,
        found_index,
        found_seq,
        found_by: found_by.to_owned(),
        detail,
    }
}

// ---------------------------------------------------------------------------------------------
// Memory writer

/// Counters of the memory writer, read by `workload_status` while it runs.
#[derive(Debug, Default)]
struct MemShared {
    passes: AtomicU64,
    chunks_written: AtomicU64,
    mismatches: AtomicU64,
}

enum MemCmd {
    Verify(Sender<MemReport>),
    Corrupt {
        chunk: u64,
        offset: u64,
        reply: Sender<Result<WorkloadCorruptReply, String>>,
    },
    Stop,
}

struct MemReport {
    checked: u64,
    findings: Findings,
}

#[derive(Debug, Clone, Copy)]
struct ChunkRecord {
    /// The write the chunk holds (0: never written, all zeros).
    seq: u64,
    /// FNV-1a 64 of the chunk.
    crc: u64,
    /// A mismatch was reported: not checked again until rewritten.
    reported: bool,
}

struct MemWriter {
    seed: u64,
    data: Vec<u8>,
    records: Vec<ChunkRecord>,
    /// The pass being written (from 1): its chunks get seq `pass`.
    pass: u64,
    /// The next chunk to write.
    next: usize,
    /// Found by the writer since the last verify.
    pending: Findings,
    shared: Arc<MemShared>,
    bytes_per_s: Option<u64>,
}

impl MemWriter {
    fn new(req: &WorkloadStartRequest, shared: Arc<MemShared>) -> Result<Self, WorkloadError> {
        let mib = req.mem_mib;
        if mib > MAX_MEM_MIB {
            return Err(WorkloadError::Invalid(format!(
                "mem_mib {mib} is more than the {MAX_MEM_MIB} MiB accepted"
            )));
        }
        let bytes = mib << 20;
        if let Some(available) = sys::mem_available() {
            if bytes.saturating_add(HEADROOM) > available {
                return Err(WorkloadError::TooLarge {
                    mib,
                    available_mib: available >> 20,
                });
            }
        }
        let len = usize::try_from(bytes).map_err(|_| WorkloadError::NoMemory(bytes))?;
        let mut data = Vec::new();
        data.try_reserve_exact(len)
            .map_err(|_| WorkloadError::NoMemory(bytes))?;
        data.resize(len, 0);
        let chunks = len / CHUNK;
        let mut records = Vec::new();
        records
            .try_reserve_exact(chunks)
            .map_err(|_| WorkloadError::NoMemory((chunks * 24) as u64))?;
        let zero = pattern::checksum(&[0u8; CHUNK]);
        records.resize(
            chunks,
            ChunkRecord {
                seq: 0,
                crc: zero,
                reported: false,
            },
        );
        Ok(MemWriter {
            seed: req.seed,
            data,
            records,
            pass: 1,
            next: 0,
            pending: Findings::default(),
            shared,
            bytes_per_s: req
                .mem_mib_per_s
                .filter(|&r| r > 0)
                .map(|r| r.saturating_mul(1 << 20)),
        })
    }

    fn chunk(&self, k: usize) -> &[u8] {
        &self.data[k * CHUNK..(k + 1) * CHUNK]
    }

    /// The seq chunk `k` should hold, from the writer's position.
    fn expected_seq(&self, k: usize) -> u64 {
        if k < self.next {
            self.pass
        } else {
            self.pass - 1
        }
    }

    /// Checks chunk `k` against its record and the writer's position.
    fn check(&self, k: usize, found_by: &str) -> Option<WorkloadMismatch> {
        let record = self.records[k];
        if record.reported {
            return None;
        }
        let expected = self.expected_seq(k);
        let data = self.chunk(k);
        let crc = pattern::checksum(data);
        let detail = if record.seq != expected {
            format!(
                "the chunk's record says write {} but the writer's position (pass {}, chunk {}) says write {expected}",
                record.seq, self.pass, self.next
            )
        } else if crc != record.crc {
            format!("checksum {crc:#018x}, recorded {:#018x}", record.crc)
        } else if record.seq != 0 && header(data) != (self.seed, k as u64, record.seq) {
            "the checksum matches but the header does not".to_owned()
        } else {
            return None;
        };
        Some(mismatch(k as u64, expected, data, found_by, detail))
    }

    /// Checks, then rewrites, the next chunk.
    fn step(&mut self) {
        let k = self.next;
        if let Some(m) = self.check(k, "writer") {
            self.pending.add(m);
            self.shared.mismatches.fetch_add(1, Ordering::Relaxed);
        }
        let seq = self.pass;
        let chunk = &mut self.data[k * CHUNK..(k + 1) * CHUNK];
        fill(self.seed, k as u64, seq, chunk);
        self.records[k] = ChunkRecord {
            seq,
            crc: pattern::checksum(chunk),
            reported: false,
        };
        self.shared.chunks_written.fetch_add(1, Ordering::Relaxed);
        self.next += 1;
        if self.next == self.records.len() {
            self.next = 0;
            self.pass += 1;
            self.shared.passes.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn verify(&mut self) -> MemReport {
        let mut found = Findings::default();
        for k in 0..self.records.len() {
            if let Some(m) = self.check(k, "verify") {
                found.add(m);
                self.records[k].reported = true;
                self.shared.mismatches.fetch_add(1, Ordering::Relaxed);
            }
        }
        MemReport {
            checked: self.records.len() as u64,
            findings: std::mem::take(&mut self.pending).then(found),
        }
    }

    fn corrupt(&mut self, chunk: u64, offset: u64) -> Result<WorkloadCorruptReply, String> {
        let chunks = self.records.len() as u64;
        if chunk >= chunks || offset >= CHUNK as u64 {
            return Err(format!(
                "chunk {chunk} offset {offset} is outside the buffer ({chunks} chunks of {CHUNK} bytes)"
            ));
        }
        let at = chunk as usize * CHUNK + offset as usize;
        let before = self.data[at];
        self.data[at] = !before;
        Ok(WorkloadCorruptReply {
            chunk,
            offset,
            before,
            after: self.data[at],
        })
    }

    /// Handles a command; false to stop.
    fn handle(&mut self, cmd: MemCmd) -> bool {
        match cmd {
            MemCmd::Verify(reply) => {
                let _ = reply.send(self.verify());
            }
            MemCmd::Corrupt {
                chunk,
                offset,
                reply,
            } => {
                let _ = reply.send(self.corrupt(chunk, offset));
            }
            MemCmd::Stop => return false,
        }
        true
    }

    fn run(mut self, commands: Receiver<MemCmd>) {
        if self.records.is_empty() {
            // A buffer under one chunk: nothing to write, wait for commands.
            while let Ok(cmd) = commands.recv() {
                if !self.handle(cmd) {
                    return;
                }
            }
            return;
        }
        let mut epoch = Instant::now();
        let mut since_epoch = 0u64;
        loop {
            match commands.try_recv() {
                Ok(cmd) => {
                    if !self.handle(cmd) {
                        return;
                    }
                    // Do not catch up on the time spent paused.
                    (epoch, since_epoch) = (Instant::now(), 0);
                    continue;
                }
                Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => {}
            }
            self.step();
            let Some(rate) = self.bytes_per_s else {
                continue;
            };
            since_epoch += CHUNK as u64;
            let due = epoch + Duration::from_secs_f64(since_epoch as f64 / rate as f64);
            let wait = due.saturating_duration_since(Instant::now());
            if wait < Duration::from_millis(1) {
                continue;
            }
            match commands.recv_timeout(wait) {
                Ok(cmd) => {
                    if !self.handle(cmd) {
                        return;
                    }
                    (epoch, since_epoch) = (Instant::now(), 0);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Disk writer

/// Counters of the disk writer, read by `workload_status` while it runs.
#[derive(Debug, Default)]
struct DiskShared {
    writes: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    recorded: AtomicU64,
    readbacks: AtomicU64,
    block_mismatches: AtomicU64,
    readback_mismatches: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl DiskShared {
    fn error(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(message);
        }
    }
}

enum DiskCmd {
    Verify(Sender<DiskReport>),
    Stop,
}

struct DiskReport {
    blocks_checked: u64,
    blocks: Findings,
    slots_checked: u64,
    slots: Findings,
}

/// The disk target, validated and opened.
struct DiskTarget {
    file: File,
    path: String,
    offset: u64,
    block: usize,
    blocks: u64,
    direct: bool,
    readback: bool,
}

impl DiskTarget {
    fn open(disk: &WorkloadDisk) -> Result<Self, WorkloadError> {
        let bs = disk.block_size;
        if !(MIN_BLOCK..=MAX_BLOCK).contains(&bs) || !bs.is_multiple_of(MIN_BLOCK) {
            return Err(WorkloadError::Invalid(format!(
                "block_size {bs} must be a multiple of {MIN_BLOCK} between {MIN_BLOCK} and {MAX_BLOCK}"
            )));
        }
        if !disk.offset.is_multiple_of(bs) {
            return Err(WorkloadError::Invalid(format!(
                "offset {} is not a multiple of block_size {bs}",
                disk.offset
            )));
        }
        if disk.blocks == 0 || disk.blocks > MAX_BLOCKS {
            return Err(WorkloadError::Invalid(format!(
                "blocks {} must be between 1 and {MAX_BLOCKS}",
                disk.blocks
            )));
        }
        let end = disk.offset.checked_add(disk.blocks * bs).ok_or_else(|| {
            WorkloadError::Invalid(format!(
                "{} blocks of {bs} bytes at offset {} overflow",
                disk.blocks, disk.offset
            ))
        })?;
        let open_err = |direct: bool| {
            let path = disk.path.clone();
            move |source| WorkloadError::Open {
                path,
                direct,
                source,
            }
        };
        let want_direct = disk.direct != Some(false);
        let mut file = open(&disk.path, want_direct).map_err(open_err(want_direct));
        let mut direct = want_direct;
        if want_direct {
            // Some file systems refuse O_DIRECT at open, others at the first transfer: probe with
            // a read of block 0 (a short read past the end of a new file is fine).
            let probed = file.and_then(|f| {
                let mut buf = AlignedBuf::new(bs as usize, DIRECT_ALIGN)
                    .map_err(|_| WorkloadError::NoMemory(bs))?;
                f.read_at(buf.as_mut_slice(), disk.offset)
                    .map(|_| f)
                    .map_err(open_err(true))
            });
            file = match probed {
                Err(WorkloadError::Open { source, .. })
                    if disk.direct.is_none() && source.raw_os_error() == Some(libc::EINVAL) =>
                {
                    direct = false;
                    open(&disk.path, false).map_err(open_err(false))
                }
                other => other,
            };
        }
        let file = file?;
        let meta = file.metadata().map_err(open_err(direct))?;
        if meta.file_type().is_block_device() {
            let size = file.seek_end_size().map_err(open_err(direct))?;
            if end > size {
                return Err(WorkloadError::Invalid(format!(
                    "{} blocks of {bs} bytes at offset {} end at byte {end}, past the end of {} ({size} bytes)",
                    disk.blocks, disk.offset, disk.path
                )));
            }
        }
        Ok(DiskTarget {
            file,
            path: disk.path.clone(),
            offset: disk.offset,
            block: bs as usize,
            blocks: disk.blocks,
            direct,
            readback: disk.readback != Some(false),
        })
    }
}

trait SeekEndSize {
    fn seek_end_size(&self) -> io::Result<u64>;
}

impl SeekEndSize for File {
    /// The size of a block device (its metadata says 0).
    fn seek_end_size(&self) -> io::Result<u64> {
        use std::io::Seek;
        let mut f = self;
        f.seek(io::SeekFrom::End(0))
    }
}

fn open(path: &str, direct: bool) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(true);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    opts.open(path)
}

fn alloc(len: usize) -> Result<AlignedBuf, WorkloadError> {
    AlignedBuf::new(len, DIRECT_ALIGN).map_err(|_| WorkloadError::NoMemory(len as u64))
}

struct DiskWriter {
    seed: u64,
    target: DiskTarget,
    /// Absolute index of block 0 (`offset / block_size`).
    first: u64,
    /// Per block: the seq of its last acknowledged write, 0 for none (or unknown).
    record: Vec<u64>,
    /// Writes issued so far; the next write has seq `written + 1`.
    written: u64,
    write_buf: AlignedBuf,
    expected: Vec<u8>,
    ring: AlignedBuf,
    /// Per ring slot: the block (relative) and seq its content came from.
    slots: Vec<Option<(u64, u64)>>,
    next_slot: usize,
    scan: AlignedBuf,
    pending_blocks: Findings,
    pending_slots: Findings,
    shared: Arc<DiskShared>,
}

impl DiskWriter {
    fn new(seed: u64, target: DiskTarget, shared: Arc<DiskShared>) -> Result<Self, WorkloadError> {
        let bs = target.block as u64;
        let slots = if target.readback {
            (READBACK_BYTES / bs).clamp(1, MAX_READBACK_SLOTS) as usize
        } else {
            0
        };
        let mut record = Vec::new();
        record
            .try_reserve_exact(target.blocks as usize)
            .map_err(|_| WorkloadError::NoMemory(target.blocks * 8))?;
        record.resize(target.blocks as usize, 0);
        let mut ring = alloc(slots * target.block)?;
        // Touch every page of the ring now: a page's first touch makes the guest kernel
        // zero it (a CPU write, which KVM's dirty log sees), and then a later read-back
        // would not be a DMA-only write, which is what the ring is for.
        ring.as_mut_slice().fill(0xa5);
        Ok(DiskWriter {
            seed,
            first: target.offset / bs,
            record,
            written: 0,
            write_buf: alloc(target.block)?,
            expected: vec![0; target.block],
            ring,
            slots: vec![None; slots],
            next_slot: 0,
            scan: alloc(SCAN_BYTES.max(bs) as usize)?,
            pending_blocks: Findings::default(),
            pending_slots: Findings::default(),
            shared,
            target,
        })
    }

    fn block_offset(&self, b: u64) -> u64 {
        self.target.offset + b * self.target.block as u64
    }

    /// Checks ring slot `slot` against its record; a mismatch is returned and forgets the
    /// record.
    fn check_slot(&mut self, slot: usize, found_by: &str) -> Option<WorkloadMismatch> {
        let (b, seq) = self.slots[slot]?;
        let bs = self.target.block;
        fill(self.seed, self.first + b, seq, &mut self.expected);
        let data = &self.ring.as_slice()[slot * bs..(slot + 1) * bs];
        if data == self.expected.as_slice() {
            return None;
        }
        self.slots[slot] = None;
        self.shared
            .readback_mismatches
            .fetch_add(1, Ordering::Relaxed);
        Some(mismatch(
            slot as u64,
            seq,
            data,
            found_by,
            format!(
                "read-back buffer {slot} does not hold block {} write {seq}: the disk returned other data, or the buffer lost what the device wrote there by DMA",
                self.first + b
            ),
        ))
    }

    /// Reads block `b` (which has a record) into the next ring slot, checking first what the
    /// slot held.
    fn read_back(&mut self, b: u64) {
        let slot = self.next_slot;
        self.next_slot = (slot + 1) % self.slots.len();
        if let Some(m) = self.check_slot(slot, "writer") {
            self.pending_slots.add(m);
        }
        self.slots[slot] = None;
        let bs = self.target.block;
        let offset = self.block_offset(b);
        let buf = &mut self.ring.as_mut_slice()[slot * bs..(slot + 1) * bs];
        if let Err(e) = self.target.file.read_exact_at(buf, offset) {
            self.shared.error(format!(
                "reading back block {} at offset {offset} of {}: {e}",
                self.first + b,
                self.target.path
            ));
            return;
        }
        self.shared.readbacks.fetch_add(1, Ordering::Relaxed);
        // Not checked now but when the slot comes round again (or at verify): the CPU must
        // not touch a page the device wrote by DMA. Under shadow paging (this platform's
        // nested KVM) a guest read of a page whose PTE is writable and dirty installs a
        // writable mapping, which KVM logs as a dirty page: the read itself would get the
        // page migrated again and hide a device that does not report its DMA writes.
        self.slots[slot] = Some((b, self.record[b as usize]));
    }

    /// Reads back (if asked to), then writes, the next block; false after an I/O error.
    fn step(&mut self) -> bool {
        let b = self.written % self.target.blocks;
        self.written += 1;
        let seq = self.written;
        if !self.slots.is_empty() && self.record[b as usize] != 0 {
            self.read_back(b);
        }
        fill(
            self.seed,
            self.first + b,
            seq,
            self.write_buf.as_mut_slice(),
        );
        let offset = self.block_offset(b);
        self.shared.writes.fetch_add(1, Ordering::Relaxed);
        let file = &self.target.file;
        let result = file
            .write_all_at(self.write_buf.as_slice(), offset)
            .and_then(|()| {
                if self.target.direct {
                    Ok(())
                } else {
                    file.sync_data()
                }
            });
        let had = self.record[b as usize] != 0;
        match result {
            Ok(()) => {
                self.record[b as usize] = seq;
                if !had {
                    self.shared.recorded.fetch_add(1, Ordering::Relaxed);
                }
                self.shared.acked.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                // The block now holds the old content, the new one or a mix: forget it.
                self.record[b as usize] = 0;
                if had {
                    self.shared.recorded.fetch_sub(1, Ordering::Relaxed);
                }
                self.shared.error(format!(
                    "writing block {} (write {seq}) at offset {offset} of {}: {e}",
                    self.first + b,
                    self.target.path
                ));
                false
            }
        }
    }

    /// Forgets block `b` after reporting it.
    fn forget(&mut self, b: usize) {
        if self.record[b] != 0 {
            self.record[b] = 0;
            self.shared.recorded.fetch_sub(1, Ordering::Relaxed);
        }
        self.shared.block_mismatches.fetch_add(1, Ordering::Relaxed);
    }

    fn verify(&mut self) -> DiskReport {
        let bs = self.target.block;
        let per_read = (self.scan.as_slice().len() / bs).max(1) as u64;
        let mut found = Findings::default();
        let mut checked = 0u64;
        let mut b = 0u64;
        while b < self.target.blocks {
            if self.record[b as usize] == 0 {
                b += 1;
                continue;
            }
            // A run of recorded blocks, read with one system call.
            let mut end = b + 1;
            while end < self.target.blocks && end - b < per_read && self.record[end as usize] != 0 {
                end += 1;
            }
            let offset = self.block_offset(b);
            let len = (end - b) as usize * bs;
            let read = self
                .target
                .file
                .read_exact_at(&mut self.scan.as_mut_slice()[..len], offset);
            for i in b..end {
                checked += 1;
                let seq = self.record[i as usize];
                let data = &self.scan.as_slice()[(i - b) as usize * bs..(i - b + 1) as usize * bs];
                let problem = match &read {
                    Err(e) => Some(format!(
                        "reading {len} bytes at offset {offset} failed: {e}"
                    )),
                    Ok(()) => {
                        fill(self.seed, self.first + i, seq, &mut self.expected);
                        (data != self.expected.as_slice())
                            .then(|| format!("block does not hold acknowledged write {seq}"))
                    }
                };
                if let Some(detail) = problem {
                    let data = if read.is_ok() { data } else { &[][..] };
                    found.add(mismatch(self.first + i, seq, data, "verify", detail));
                    self.forget(i as usize);
                }
            }
            b = end;
        }
        let mut slots_found = Findings::default();
        let mut slots_checked = 0u64;
        for slot in 0..self.slots.len() {
            if self.slots[slot].is_some() {
                slots_checked += 1;
                if let Some(m) = self.check_slot(slot, "verify") {
                    slots_found.add(m);
                }
            }
        }
        DiskReport {
            blocks_checked: checked,
            blocks: std::mem::take(&mut self.pending_blocks).then(found),
            slots_checked,
            slots: std::mem::take(&mut self.pending_slots).then(slots_found),
        }
    }

    /// Handles a command; false to stop.
    fn handle(&mut self, cmd: DiskCmd) -> bool {
        match cmd {
            DiskCmd::Verify(reply) => {
                let _ = reply.send(self.verify());
                true
            }
            DiskCmd::Stop => false,
        }
    }

    fn run(mut self, commands: Receiver<DiskCmd>) {
        loop {
            match commands.try_recv() {
                Ok(cmd) => {
                    if !self.handle(cmd) {
                        return;
                    }
                    continue;
                }
                Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => {}
            }
            if !self.step() {
                match commands.recv_timeout(ERROR_BACKOFF) {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The workload

/// A writer thread and how to reach it.
struct Worker<C> {
    name: &'static str,
    commands: Sender<C>,
    handle: Option<JoinHandle<()>>,
}

impl<C: Send + 'static> Worker<C> {
    fn spawn<F: FnOnce(Receiver<C>) + Send + 'static>(
        name: &'static str,
        body: F,
    ) -> Result<Self, WorkloadError> {
        let (commands, rx) = mpsc::channel();
        let handle = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || body(rx))
            .map_err(|e| WorkloadError::Spawn(name, e))?;
        Ok(Worker {
            name,
            commands,
            handle: Some(handle),
        })
    }

    fn send(&self, cmd: C) -> Result<(), WorkloadError> {
        self.commands
            .send(cmd)
            .map_err(|_| WorkloadError::Writer(format!("the {} thread has ended", self.name)))
    }

    /// Asks the thread to stop and joins it, waiting at most [`STOP_TIMEOUT`].
    fn stop(&mut self, stop: C) -> Result<(), WorkloadError> {
        let Some(handle) = self.handle.take() else {
            return Ok(());
        };
        let _ = self.commands.send(stop);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                return Err(WorkloadError::Writer(format!(
                    "the {} thread did not stop within {STOP_TIMEOUT:?} (stuck in I/O?); left running detached",
                    self.name
                )));
            }
            thread::sleep(Duration::from_millis(5));
        }
        handle
            .join()
            .map_err(|_| WorkloadError::Writer(format!("the {} thread panicked", self.name)))
    }
}

/// Waits for a writer's answer until `deadline`.
fn answer<T>(rx: Receiver<T>, name: &str, deadline: Instant) -> Result<T, WorkloadError> {
    let left = deadline.saturating_duration_since(Instant::now());
    rx.recv_timeout(left).map_err(|e| {
        WorkloadError::Writer(match e {
            RecvTimeoutError::Timeout => {
                format!("the {name} did not pause in time (stuck in I/O?)")
            }
            RecvTimeoutError::Disconnected => format!("the {name} thread has ended"),
        })
    })
}

struct MemPart {
    worker: Worker<MemCmd>,
    shared: Arc<MemShared>,
    bytes: u64,
    chunks: u64,
    mib_per_s: Option<u64>,
}

struct DiskPart {
    worker: Worker<DiskCmd>,
    shared: Arc<DiskShared>,
    status: DiskWorkloadStatus,
}

/// A running workload: its writer threads and their counters.
pub struct Workload {
    started: Instant,
    seed: u64,
    mem: Option<MemPart>,
    disk: Option<DiskPart>,
    running: bool,
}

impl Workload {
    /// Validates `req`, allocates and opens everything, then starts the writers.
    pub fn start(req: &WorkloadStartRequest) -> Result<Self, WorkloadError> {
        if req.mem_mib == 0 && req.disk.is_none() {
            return Err(WorkloadError::Invalid(
                "nothing to do: give mem_mib > 0, disk, or both".to_owned(),
            ));
        }
        // Everything that can fail is done before any thread starts.
        let mem = if req.mem_mib > 0 {
            let shared = Arc::new(MemShared::default());
            Some((MemWriter::new(req, shared.clone())?, shared))
        } else {
            None
        };
        let disk = match &req.disk {
            Some(d) => {
                let target = DiskTarget::open(d)?;
                let status = DiskWorkloadStatus {
                    path: target.path.clone(),
                    offset: target.offset,
                    block_size: target.block as u64,
                    blocks: target.blocks,
                    direct: target.direct,
                    readback: target.readback,
                    ..DiskWorkloadStatus::default()
                };
                let shared = Arc::new(DiskShared::default());
                Some((
                    DiskWriter::new(req.seed, target, shared.clone())?,
                    shared,
                    status,
                ))
            }
            None => None,
        };
        let mut workload = Workload {
            started: Instant::now(),
            seed: req.seed,
            mem: None,
            disk: None,
            running: true,
        };
        if let Some((writer, shared)) = mem {
            let (bytes, chunks) = (writer.data.len() as u64, writer.records.len() as u64);
            let mib_per_s = writer.bytes_per_s.map(|b| b >> 20);
            let worker = Worker::spawn("workload memory writer", move |rx| writer.run(rx))?;
            workload.mem = Some(MemPart {
                worker,
                shared,
                bytes,
                chunks,
                mib_per_s,
            });
        }
        if let Some((writer, shared, status)) = disk {
            // On failure, dropping `workload` stops the memory writer.
            let worker = Worker::spawn("workload disk writer", move |rx| writer.run(rx))?;
            workload.disk = Some(DiskPart {
                worker,
                shared,
                status,
            });
        }
        Ok(workload)
    }

    /// The counters now.
    pub fn status(&self) -> WorkloadStatus {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WorkloadStatus {
            running: self.running,
            elapsed_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            seed: self.seed,
            mem: self.mem.as_ref().map(|m| MemWorkloadStatus {
                bytes: m.bytes,
                chunk_size: CHUNK as u64,
                chunks: m.chunks,
                passes: load(&m.shared.passes),
                chunks_written: load(&m.shared.chunks_written),
                mismatches: load(&m.shared.mismatches),
                mib_per_s: m.mib_per_s,
            }),
            disk: self.disk.as_ref().map(|d| {
                let s = &d.shared;
                DiskWorkloadStatus {
                    writes: load(&s.writes),
                    acked: load(&s.acked),
                    errors: load(&s.errors),
                    last_error: s.last_error.lock().ok().and_then(|e| e.clone()),
                    recorded_blocks: load(&s.recorded),
                    readbacks: load(&s.readbacks),
                    block_mismatches: load(&s.block_mismatches),
                    readback_mismatches: load(&s.readback_mismatches),
                    ..d.status.clone()
                }
            }),
        }
    }

    /// Pauses both writers (they check in parallel), checks everything they recorded, and lets
    /// them continue.
    pub fn verify(
        &mut self,
        req: &WorkloadVerifyRequest,
    ) -> Result<WorkloadVerifyReply, WorkloadError> {
        let start = Instant::now();
        let timeout = req
            .timeout_ms
            .map_or(DEFAULT_VERIFY_TIMEOUT, Duration::from_millis);
        let deadline = start + timeout.min(Duration::from_secs(24 * 3600));
        let mem_rx = match &self.mem {
            Some(m) => {
                let (tx, rx) = mpsc::channel();
                m.worker.send(MemCmd::Verify(tx))?;
                Some(rx)
            }
            None => None,
        };
        let disk_rx = match &self.disk {
            Some(d) => {
                let (tx, rx) = mpsc::channel();
                d.worker.send(DiskCmd::Verify(tx))?;
                Some(rx)
            }
            None => None,
        };
        let mut reply = WorkloadVerifyReply::default();
        if let Some(rx) = mem_rx {
            let report = answer(rx, "memory writer", deadline)?;
            reply.mem_regions_checked = report.checked;
            reply.mem_mismatches = report.findings.count;
            reply.first_mem_mismatch = report.findings.first;
        }
        if let Some(rx) = disk_rx {
            let report = answer(rx, "disk writer", deadline)?;
            reply.blocks_checked = report.blocks_checked;
            reply.block_mismatches = report.blocks.count;
            reply.first_block_mismatch = report.blocks.first;
            reply.readback_slots_checked = report.slots_checked;
            reply.readback_mismatches = report.slots.count;
            reply.first_readback_mismatch = report.slots.first;
        }
        reply.elapsed_us = micros(start.elapsed());
        reply.status = self.status();
        Ok(reply)
    }

    /// Test-only: flips a byte of a memory chunk behind the checksum's back.
    pub fn corrupt_mem(
        &self,
        req: &WorkloadCorruptRequest,
    ) -> Result<WorkloadCorruptReply, WorkloadError> {
        let m = self.mem.as_ref().ok_or_else(|| {
            WorkloadError::Invalid("the workload has no memory writer".to_owned())
        })?;
        let (tx, rx) = mpsc::channel();
        m.worker.send(MemCmd::Corrupt {
            chunk: req.chunk,
            offset: req.offset.unwrap_or(DEFAULT_CORRUPT_OFFSET),
            reply: tx,
        })?;
        answer(rx, "memory writer", Instant::now() + DEFAULT_VERIFY_TIMEOUT)?
            .map_err(WorkloadError::Invalid)
    }

    /// Stops and joins the writers; the final counters.
    pub fn stop(mut self) -> Result<WorkloadStatus, WorkloadError> {
        let mem = self.mem.as_mut().map(|m| m.worker.stop(MemCmd::Stop));
        let disk = self.disk.as_mut().map(|d| d.worker.stop(DiskCmd::Stop));
        self.running = false;
        mem.transpose()?;
        disk.transpose()?;
        Ok(self.status())
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Some(m) = self.mem.as_mut() {
            let _ = m.worker.stop(MemCmd::Stop);
        }
        if let Some(d) = self.disk.as_mut() {
            let _ = d.worker.stop(DiskCmd::Stop);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-agent-workload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        path
    }

    fn disk(path: &std::path::Path, blocks: u64) -> WorkloadDisk {
        WorkloadDisk {
            path: path.to_string_lossy().into_owned(),
            offset: 8192,
            block_size: 4096,
            blocks,
            direct: Some(false),
            readback: None,
        }
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn fill_and_header() {
        let mut a = vec![0u8; 512];
        fill(7, 3, 9, &mut a);
        assert_eq!(header(&a), (7, 3, 9));
        let mut b = vec![0u8; 512];
        fill(7, 3, 10, &mut b);
        assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..], "the body depends on seq");
        fill(7, 4, 9, &mut b);
        assert_ne!(
            a[HEADER_LEN..],
            b[HEADER_LEN..],
            "the body depends on the index"
        );
        let mut short = [0u8; 10];
        fill(7, 3, 9, &mut short);
        assert_eq!(header(&short), (7, 0, 0));
    }

    #[test]
    fn memory_check_is_exact() {
        let shared = Arc::new(MemShared::default());
        let req = WorkloadStartRequest {
            mem_mib: 1,
            seed: 5,
            ..Default::default()
        };
        let mut w = MemWriter::new(&req, shared.clone()).unwrap();
        // Zeros before the first pass match; so do chunks partway through passes.
        assert_eq!(w.verify().findings.count, 0);
        for _ in 0..(256 + 100) {
            w.step();
        }
        assert_eq!((w.pass, w.next), (2, 100));
        assert_eq!(shared.passes.load(Ordering::Relaxed), 1);
        let r = w.verify();
        assert_eq!((r.checked, r.findings.count), (256, 0));

        // A stale page: chunk 50 goes back to its pass-1 content (record says pass 2).
        let old = {
            let mut c = vec![0u8; CHUNK];
            fill(5, 50, 1, &mut c);
            c
        };
        w.data[50 * CHUNK..51 * CHUNK].copy_from_slice(&old);
        // A stale record: chunk 200's record says it was never written, while the writer's
        // position says it holds pass 1.
        w.records[200].seq = 0;
        let r = w.verify();
        assert_eq!(r.findings.count, 2);
        let first = r.findings.first.unwrap();
        assert_eq!(
            (first.index, first.expected_seq, first.found_seq),
            (50, 2, 1)
        );
        assert_eq!(first.found_by, "verify");
        assert!(first.detail.contains("checksum"), "{}", first.detail);
        // Reported once only, and rewriting repairs them.
        assert_eq!(w.verify().findings.count, 0);
        for _ in 0..256 {
            w.step();
        }
        assert_eq!(w.verify().findings.count, 0);

        // The writer finds damage itself before overwriting it.
        let k = w.next;
        w.corrupt(k as u64, 4000).unwrap();
        w.step();
        let r = w.verify();
        assert_eq!(r.findings.count, 1);
        let m = r.findings.first.unwrap();
        assert_eq!((m.index, m.found_by.as_str()), (k as u64, "writer"));
        assert_eq!(shared.mismatches.load(Ordering::Relaxed), 3);
        assert!(w.corrupt(256, 0).is_err());
        assert!(w.corrupt(0, 4096).is_err());
    }

    #[test]
    fn disk_records_and_checks_acknowledged_writes() {
        let path = temp_path("disk");
        let shared = Arc::new(DiskShared::default());
        let target = DiskTarget::open(&disk(&path, 8)).unwrap();
        assert!(!target.direct);
        let mut w = DiskWriter::new(3, target, shared.clone()).unwrap();
        for _ in 0..20 {
            assert!(w.step());
        }
        // 20 writes over 8 blocks: blocks 0-3 hold writes 17-20, blocks 4-7 writes 13-16.
        assert_eq!(w.record, vec![17, 18, 19, 20, 13, 14, 15, 16]);
        assert_eq!(shared.readbacks.load(Ordering::Relaxed), 12);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(header(&data[8192 + 4096..]), (3, 3, 18));
        let r = w.verify();
        assert_eq!((r.blocks_checked, r.blocks.count), (8, 0));
        assert_eq!((r.slots_checked, r.slots.count), (12, 0));

        // An acknowledged write lost by the disk (block 5 back to write 6's content).
        let mut stale = vec![0u8; 4096];
        fill(3, 2 + 5, 6, &mut stale);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&stale, 8192 + 5 * 4096).unwrap();
        // A read-back buffer changed behind the writer's back.
        w.ring.as_mut_slice()[4096 + 7] ^= 1;
        let r = w.verify();
        assert_eq!((r.blocks_checked, r.blocks.count), (8, 1));
        let m = r.blocks.first.unwrap();
        assert_eq!((m.index, m.expected_seq, m.found_seq), (7, 14, 6));
        assert_eq!(r.slots.count, 1);
        assert_eq!(r.slots.first.unwrap().index, 1);
        // Reported once: the block is forgotten until rewritten.
        let r = w.verify();
        assert_eq!((r.blocks_checked, r.blocks.count, r.slots.count), (7, 0, 0));

        // Damage the writer read back before an overwrite (block 4, absolute 6, is next): the
        // read-back buffer is checked later, here by verify (the writer does not touch a
        // buffer the device just wrote).
        f.write_all_at(&[0xee], 8192 + 4 * 4096 + 100).unwrap();
        assert!(w.step());
        let r = w.verify();
        assert_eq!((r.blocks.count, r.slots.count), (0, 1));
        let m = r.slots.first.unwrap();
        assert_eq!((m.index, m.found_by.as_str()), (12, "verify"));
        assert_eq!(shared.block_mismatches.load(Ordering::Relaxed), 1);
        assert_eq!(shared.readback_mismatches.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn rejects_bad_requests() {
        let path = temp_path("bad");
        let bad = |f: &dyn Fn(&mut WorkloadDisk)| {
            let mut d = disk(&path, 4);
            f(&mut d);
            match DiskTarget::open(&d) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("accepted {d:?}"),
            }
        };
        assert!(bad(&|d| d.block_size = 1000).contains("multiple of 512"));
        assert!(bad(&|d| d.block_size = 2 << 20).contains("block_size"));
        assert!(bad(&|d| d.offset = 512).contains("offset"));
        assert!(bad(&|d| d.blocks = 0).contains("blocks"));
        assert!(bad(&|d| d.offset = u64::MAX - 4095).contains("overflow"));
        assert!(bad(&|d| d.path = "/nonexistent/dir/x".into()).contains("/nonexistent/dir/x"));
        let e = Workload::start(&WorkloadStartRequest::default())
            .err()
            .unwrap();
        assert!(e.to_string().contains("nothing to do"), "{e}");
        let e = Workload::start(&WorkloadStartRequest {
            mem_mib: 1 << 30,
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("mem_mib"), "{e}");
        let e = Workload::start(&WorkloadStartRequest {
            mem_mib: 60 << 10,
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("available"), "{e}");
    }

    #[test]
    fn threads_run_verify_and_stop() {
        let path = temp_path("threads");
        let mut w = Workload::start(&WorkloadStartRequest {
            mem_mib: 2,
            mem_mib_per_s: None,
            disk: Some(disk(&path, 16)),
            seed: 9,
        })
        .unwrap();
        wait_for("a memory pass and 40 disk writes", || {
            let s = w.status();
            s.mem.unwrap().passes >= 1 && s.disk.unwrap().acked >= 40
        });
        let v = w.verify(&WorkloadVerifyRequest::default()).unwrap();
        assert_eq!(v.mem_regions_checked, 512);
        assert_eq!(v.blocks_checked, 16);
        assert_eq!(
            (v.mem_mismatches, v.block_mismatches, v.readback_mismatches),
            (0, 0, 0),
            "{v:?}"
        );
        assert!(v.status.running);
        let before = w.status().mem.unwrap().chunks_written;
        wait_for("the writers to continue", || {
            w.status().mem.unwrap().chunks_written > before
        });
        let end = w.stop().unwrap();
        assert!(!end.running);
        let d = end.disk.unwrap();
        assert_eq!(d.errors, 0, "{:?}", d.last_error);
        assert!(d.acked >= 40 && d.acked <= d.writes);
    }
}
