//! The agent's wire protocol: JSON lines both ways.
//!
//! A request is one JSON object on one `\n`-terminated line: `{"id": <u64>, "op": "<name>", ...}`
//! with the op's fields beside `id` and `op`. A reply is `{"id": <u64>, "ok": true, ...result}`,
//! or `{"id": <u64 or null>, "ok": false, "error": "<message>"}` (id null when the request's id
//! could not be read). These types are shared by the agent and the host-side client.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

/// Longest request line the agent accepts, newline excluded.
pub const MAX_LINE: usize = 1 << 20;
/// Timeout of a `run` request that gives none.
pub const DEFAULT_RUN_TIMEOUT_MS: u64 = 60_000;
/// Bytes of each of stdout and stderr a `run` reply keeps; the rest is replaced by a marker.
pub const OUTPUT_LIMIT: usize = 64 * 1024;

/// The names of all ops, for error messages.
pub const OP_NAMES: &[&str] = &[
    "ping",
    "run",
    "reboot",
    "poke",
    "blk_write",
    "blk_verify",
    "mem_fill",
    "mem_check",
    "checksum",
    "bar_time",
    "workload_start",
    "workload_status",
    "workload_verify",
    "workload_stop",
    "workload_corrupt_mem",
    "refresh",
    "net_ifaces",
    "net_config",
    "net_stream_start",
    "net_stream_status",
    "net_stream_finish",
    "net_stream_hold",
];

/// Why a request line could not be turned into a [`Request`].
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The line is not JSON.
    #[error("request is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// The line is JSON but not an object.
    #[error("request is not a JSON object")]
    NotAnObject,
    /// The object has no `id`.
    #[error("request has no \"id\" field")]
    MissingId,
    /// The `id` is not an unsigned integer.
    #[error("request \"id\" must be an unsigned 64-bit integer, got {0}")]
    BadId(String),
    /// The object has no string `op`.
    #[error("request {id} has no string \"op\" field")]
    MissingOp {
        /// The request's id.
        id: u64,
    },
    /// The `op` names no known op.
    #[error("request {id}: unknown op \"{op}\" (known: {known})", known = OP_NAMES.join(", "))]
    UnknownOp {
        /// The request's id.
        id: u64,
        /// The op that was asked for.
        op: String,
    },
    /// The op's fields are missing or have the wrong type.
    #[error("request {id}: bad \"{op}\" fields: {source}")]
    BadFields {
        /// The request's id.
        id: u64,
        /// The op that was asked for.
        op: String,
        /// What serde found wrong.
        #[source]
        source: serde_json::Error,
    },
    /// The line exceeded [`MAX_LINE`].
    #[error("request line longer than {MAX_LINE} bytes, discarded")]
    LineTooLong,
    /// A request to encode is not a JSON object.
    #[error("a request must be a JSON object with an \"op\" field, got {0}")]
    NotARequest(String),
}

impl ProtocolError {
    /// The id of the request, when it could be read.
    pub fn id(&self) -> Option<u64> {
        match self {
            ProtocolError::MissingOp { id }
            | ProtocolError::UnknownOp { id, .. }
            | ProtocolError::BadFields { id, .. } => Some(*id),
            _ => None,
        }
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Echoed in the reply.
    pub id: u64,
    /// What to do.
    pub op: Op,
}

/// An operation and its fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Liveness and basic facts; replies [`PingReply`].
    Ping,
    /// Run a program; replies [`RunOutput`].
    Run(RunRequest),
    /// Reply, then reboot the guest (PID 1 only); replies `{}`.
    Reboot,
    /// Poke I/O ports and MMIO (PID 1 only); replies [`PokeReply`].
    Poke(PokeRequest),
    /// Write pattern blocks; replies [`BlkWriteReply`].
    BlkWrite(BlkRequest),
    /// Read pattern blocks back and compare; replies [`BlkVerifyReply`].
    BlkVerify(BlkRequest),
    /// Allocate and fill a buffer kept by the agent; replies [`MemFillReply`].
    MemFill(MemFillRequest),
    /// Re-checksum the kept buffer; replies [`MemCheckReply`].
    MemCheck,
    /// Checksum a byte range of a file; replies [`ChecksumReply`].
    Checksum(ChecksumRequest),
    /// Time writes to a mapped file (a PCI BAR's sysfs `resourceN`) and to RAM (PID 1
    /// only); replies [`BarTimeReply`].
    BarTime(BarTimeRequest),
    /// Start the background memory and disk writers; replies [`WorkloadStatus`].
    WorkloadStart(WorkloadStartRequest),
    /// The writers' counters (cheap); replies [`WorkloadStatus`].
    WorkloadStatus,
    /// Pause the writers, check everything they recorded, resume; replies
    /// [`WorkloadVerifyReply`].
    WorkloadVerify(WorkloadVerifyRequest),
    /// Stop and join the writers; replies [`WorkloadStatus`] (final counters).
    WorkloadStop,
    /// Test-only: flip a byte of a memory chunk without updating its checksum; replies
    /// [`WorkloadCorruptReply`].
    WorkloadCorruptMem(WorkloadCorruptRequest),
    /// Set the wall clock and reseed the kernel's random generator (PID 1 only): the first
    /// request after a restore from a shared snapshot; replies [`RefreshReply`].
    Refresh(RefreshRequest),
    /// The network interfaces; replies [`NetIfacesReply`].
    NetIfaces,
    /// Set an interface's MAC (optional) and address and bring it up; replies [`NetIface`].
    NetConfig(NetConfigRequest),
    /// Connect to a traffic peer and stream both ways in the background (see
    /// [`crate::agent::netstream`]); replies [`NetStreamHandle`] at once.
    NetStreamStart(NetStreamStartRequest),
    /// Progress of a stream; replies [`NetStreamStatus`].
    NetStreamStatus(NetStreamHandle),
    /// Wait for a stream to end and forget it; replies [`NetStreamFinishReply`].
    NetStreamFinish(NetStreamFinishRequest),
    /// Stop reading a stream's incoming records for a while (the data waits in the guest
    /// kernel's receive queue); replies [`NetStreamStatus`].
    NetStreamHold(NetStreamHoldRequest),
}

impl Op {
    /// The op's wire name.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Ping => "ping",
            Op::Run(_) => "run",
            Op::Reboot => "reboot",
            Op::Poke(_) => "poke",
            Op::BlkWrite(_) => "blk_write",
            Op::BlkVerify(_) => "blk_verify",
            Op::MemFill(_) => "mem_fill",
            Op::MemCheck => "mem_check",
            Op::Checksum(_) => "checksum",
            Op::BarTime(_) => "bar_time",
            Op::WorkloadStart(_) => "workload_start",
            Op::WorkloadStatus => "workload_status",
            Op::WorkloadVerify(_) => "workload_verify",
            Op::WorkloadStop => "workload_stop",
            Op::WorkloadCorruptMem(_) => "workload_corrupt_mem",
            Op::Refresh(_) => "refresh",
            Op::NetIfaces => "net_ifaces",
            Op::NetConfig(_) => "net_config",
            Op::NetStreamStart(_) => "net_stream_start",
            Op::NetStreamStatus(_) => "net_stream_status",
            Op::NetStreamFinish(_) => "net_stream_finish",
            Op::NetStreamHold(_) => "net_stream_hold",
        }
    }
}

/// Fields of `run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequest {
    /// Program and arguments; no shell is involved unless argv names one.
    pub argv: Vec<String>,
    /// Kill the program after this long (default [`DEFAULT_RUN_TIMEOUT_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Written to the program's stdin, which is then closed (default: stdin is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

impl RunRequest {
    /// A request to run `argv` with the default timeout and no stdin.
    pub fn new<S: AsRef<str>>(argv: &[S]) -> Self {
        RunRequest {
            argv: argv.iter().map(|s| s.as_ref().to_owned()).collect(),
            timeout_ms: None,
            stdin: None,
        }
    }

    /// The timeout in effect.
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms.unwrap_or(DEFAULT_RUN_TIMEOUT_MS)
    }
}

/// Most entropy bytes a `refresh` request may carry.
pub const MAX_REFRESH_ENTROPY: usize = 256;

/// Fields of `refresh`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshRequest {
    /// The host's wall clock, nanoseconds since the UNIX epoch.
    pub unix_time_ns: u64,
    /// Random bytes from the host, credited to the guest kernel's pool (at most
    /// [`MAX_REFRESH_ENTROPY`]).
    pub entropy: Vec<u8>,
}

/// Reply to `refresh`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshReply {
    /// How far the wall clock was moved (positive: it was behind).
    pub clock_step_ms: i64,
    /// 16 bytes drawn from the reseeded kernel generator, hex.
    pub random: String,
    /// The kernel's boot id (shared by every restore of one snapshot).
    pub boot_id: String,
}

/// Reply to `net_ifaces`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetIfacesReply {
    /// Every interface, in index order.
    pub ifaces: Vec<NetIface>,
}

impl NetIfacesReply {
    /// The first interface bound to the `virtio_net` driver, else the first that is not a
    /// loopback.
    pub fn virtio_net(&self) -> Option<&NetIface> {
        self.ifaces
            .iter()
            .find(|i| i.driver.as_deref() == Some("virtio_net"))
            .or_else(|| self.ifaces.iter().find(|i| !i.loopback))
    }
}

/// One network interface; also the reply to `net_config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetIface {
    /// Its name, e.g. `eth0`.
    pub name: String,
    /// Its MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Operationally up (`IFF_RUNNING`: carrier and link).
    pub running: bool,
    /// A loopback interface (`IFF_LOOPBACK`).
    pub loopback: bool,
    /// The kernel driver of its device (`virtio_net`), if it has one.
    pub driver: Option<String>,
    /// Its IPv4 addresses, `a.b.c.d/len`.
    pub addrs: Vec<String>,
}

/// Fields of `net_config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfigRequest {
    /// The interface.
    pub iface: String,
    /// IPv4 address and prefix length to add, `a.b.c.d/len` (already present: fine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr_cidr: Option<String>,
    /// MAC address to set first, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Fields of `net_stream_start`. The guest sends records of `seed` and checks records of
/// [`crate::agent::netstream::reverse_seed`]`(seed)` from the peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStreamStartRequest {
    /// The peer, `ip:port`.
    pub peer: String,
    /// Send this many bytes (whole records: up to one more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_bytes: Option<u64>,
    /// Send for this long. With neither limit the guest sends nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Rate cap of the guest's sending, bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pace_bytes_per_s: Option<u64>,
    /// Seed of the guest's records.
    pub seed: u64,
    /// Read and check the peer's records (default true). With false the guest reads nothing:
    /// the peer must then send nothing (`net-peer` without `--send-bytes`/`--duration-ms`),
    /// or its writes stall until its I/O timeout.
    #[serde(default = "yes")]
    pub receive: bool,
    /// Rate cap of the guest's reading, bytes/s: an application slower than the network,
    /// whose data waits in the kernel's receive queue, in the buffers the NIC wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_pace_bytes_per_s: Option<u64>,
    /// A stall of reads or writes this long is an error (default 30 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_timeout_ms: Option<u64>,
    /// Connect timeout (default 30 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
}

impl NetStreamStartRequest {
    /// A stream with `peer` (`ip:port`) whose guest records have `seed`: receiving and
    /// checking the peer's, sending nothing, no pacing, default timeouts. Set the rest with
    /// struct update syntax (`NetStreamStartRequest { duration_ms: Some(..), ..new(..) }`).
    pub fn new(peer: impl Into<String>, seed: u64) -> Self {
        NetStreamStartRequest {
            peer: peer.into(),
            send_bytes: None,
            duration_ms: None,
            pace_bytes_per_s: None,
            seed,
            receive: true,
            receive_pace_bytes_per_s: None,
            io_timeout_ms: None,
            connect_timeout_ms: None,
        }
    }
}

fn yes() -> bool {
    true
}

/// A stream's handle: the reply to `net_stream_start`, the fields of `net_stream_status`.
/// (Not `id`: that is the request's.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStreamHandle {
    /// The handle.
    pub handle: u64,
}

/// Reply to `net_stream_status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStreamStatus {
    /// The handle.
    pub handle: u64,
    /// The connection is made.
    pub connected: bool,
    /// Both directions are still going.
    pub running: bool,
    /// Since `net_stream_start`.
    pub elapsed_ms: u64,
    /// Guest to peer, complete records.
    pub sent_records: u64,
    /// Guest to peer, bytes.
    pub sent_bytes: u64,
    /// Peer to guest, records checked.
    pub received_records: u64,
    /// Peer to guest, bytes of them.
    pub received_bytes: u64,
}

/// Fields of `net_stream_finish`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStreamHoldRequest {
    /// The stream.
    pub handle: u64,
    /// How long to read nothing.
    pub ms: u64,
}

/// Fields of `net_stream_finish`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStreamFinishRequest {
    /// The handle.
    pub handle: u64,
    /// How long to wait for the end (default 60 000); past it the reply is an error and the
    /// stream is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Reply to `net_stream_finish`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStreamFinishReply {
    /// The handle (now forgotten).
    pub handle: u64,
    /// From `net_stream_start` to the end.
    pub elapsed_ms: u64,
    /// Both directions as the guest saw them.
    pub report: crate::agent::netstream::DuplexReport,
}

/// Fields of `poke`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PokeRequest {
    /// I/O ports to read, write 0xA5 to, and read again.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Physical addresses (4-byte aligned) to read, write 0xA5A5A5A5 to, and read again.
    #[serde(default)]
    pub mmio: Vec<u64>,
}

/// Fields of `blk_write` and `blk_verify`.
///
/// Block `i` of the request lives at byte `offset + i * block_size` and holds
/// `pattern::block(seed, offset / block_size + i, block_size)`: the index is absolute, so a
/// range can be verified in parts. `offset` must be a multiple of `block_size`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkRequest {
    /// File or block device.
    pub path: String,
    /// Byte offset of the first block.
    pub offset: u64,
    /// Bytes per block.
    pub block_size: u64,
    /// Number of blocks.
    pub blocks: u64,
    /// Pattern seed.
    pub seed: u64,
    /// Use O_DIRECT (offset and block size must then be multiples of 512).
    #[serde(default)]
    pub direct: bool,
}

/// Fields of `mem_fill`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemFillRequest {
    /// Buffer size in MiB.
    pub mib: u64,
    /// Pattern seed.
    pub seed: u64,
}

/// Fields of `checksum`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksumRequest {
    /// File or block device.
    pub path: String,
    /// First byte.
    pub offset: u64,
    /// Number of bytes.
    pub len: u64,
}

/// Fields of `bar_time`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarTimeRequest {
    /// A file to map, e.g. `/sys/bus/pci/devices/0000:00:01.0/resource0`.
    pub path: String,
    /// Byte offsets (4-byte aligned) in it to time writes to, one measurement each.
    pub offsets: Vec<u64>,
    /// 32-bit writes per measurement.
    pub count: u64,
}

/// Reply to `bar_time`: nanoseconds per 32-bit write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BarTimeReply {
    /// Per offset of the request, in order.
    pub mapped_ns: Vec<f64>,
    /// To a page of ordinary RAM, the same number of times.
    pub ram_ns: f64,
}

/// Reply to `ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingReply {
    /// `uname -r` of the agent's kernel.
    pub kernel: String,
    /// Time since boot.
    pub uptime_ms: u64,
    /// Online CPUs.
    pub cpus: u32,
}

/// Reply to `run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOutput {
    /// Exit code, or `None` when the program was killed by a signal.
    pub status: Option<i32>,
    /// The signal that killed the program, if any.
    pub signal: Option<i32>,
    /// Captured stdout (lossy UTF-8, truncated at [`OUTPUT_LIMIT`] with a marker).
    pub stdout: String,
    /// Captured stderr (lossy UTF-8, truncated at [`OUTPUT_LIMIT`] with a marker).
    pub stderr: String,
}

impl RunOutput {
    /// Whether the program exited with status 0.
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }
}

/// Reply to `poke`: `[port, before, after]` and `[address, before, after]` triples.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PokeReply {
    /// Per port: the value read, then the value read after writing 0xA5.
    pub ports: Vec<(u16, u8, u8)>,
    /// Per address: the u32 read, then the u32 read after writing 0xA5A5A5A5.
    pub mmio: Vec<(u64, u32, u32)>,
}

/// Reply to `blk_write`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkWriteReply {
    /// Bytes written.
    pub bytes: u64,
    /// Time taken, fsync included.
    pub elapsed_us: u64,
}

/// Reply to `blk_verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkVerifyReply {
    /// Bytes read and compared.
    pub bytes: u64,
    /// Number of blocks that differ from the pattern.
    pub mismatches: u64,
    /// Absolute index (`offset / block_size + i`) of the first differing block.
    pub first_mismatch: Option<u64>,
    /// Time taken.
    pub elapsed_us: u64,
}

/// Reply to `mem_fill`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemFillReply {
    /// Buffer size.
    pub bytes: u64,
    /// FNV-1a 64 of the buffer.
    pub crc: u64,
    /// Time taken.
    pub elapsed_us: u64,
}

/// Reply to `mem_check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemCheckReply {
    /// FNV-1a 64 of the buffer now.
    pub crc: u64,
    /// FNV-1a 64 when it was filled.
    pub expected: u64,
    /// `crc == expected`.
    pub intact: bool,
    /// Time taken.
    pub elapsed_us: u64,
}

/// Reply to `checksum`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksumReply {
    /// Bytes checksummed.
    pub bytes: u64,
    /// FNV-1a 64 of them.
    pub crc: u64,
    /// Time taken.
    pub elapsed_us: u64,
}

/// Fields of `workload_start`. At least one of the two writers must be asked for.
///
/// Every chunk of memory and every disk block the writers produce holds
/// [`crate::agent::workload::fill`]`(seed, index, seq)`: a 24-byte header (seed, index, seq,
/// little-endian `u64`s) and a pseudo-random body derived from all three, so that stale
/// content says which write it came from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WorkloadStartRequest {
    /// Size of the memory writer's buffer in MiB; 0 (the default): no memory writer.
    #[serde(default)]
    pub mem_mib: u64,
    /// Caps the memory writer's rewrite rate (MiB/s); absent or 0: as fast as it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_mib_per_s: Option<u64>,
    /// The disk writer; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<WorkloadDisk>,
    /// Seed of all the data written.
    #[serde(default)]
    pub seed: u64,
}

/// The disk writer's target: `blocks` blocks of `block_size` bytes from byte `offset` of `path`,
/// rewritten in order, round and round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadDisk {
    /// Block device or file (created if missing).
    pub path: String,
    /// Byte offset of block 0; a multiple of `block_size`.
    pub offset: u64,
    /// Bytes per block: a multiple of 512, at least 512, at most 1 MiB.
    pub block_size: u64,
    /// Number of blocks.
    pub blocks: u64,
    /// O_DIRECT: absent = try it and fall back to buffered writes + fdatasync when the file
    /// refuses it; true = required; false = buffered writes + fdatasync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct: Option<bool>,
    /// Before overwriting a block, read it back (into a ring of buffers: with O_DIRECT the
    /// device writes them by DMA) and check it still holds the last acknowledged write; the
    /// ring is checked again by `workload_verify`. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readback: Option<bool>,
}

/// Fields of `workload_verify`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WorkloadVerifyRequest {
    /// How long to wait for each writer to pause (it may be stuck in I/O); default 60 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Fields of `workload_corrupt_mem`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadCorruptRequest {
    /// The chunk (4 KiB) of the memory writer's buffer.
    pub chunk: u64,
    /// Byte within the chunk (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// Reply to `workload_start`, `workload_status` and `workload_stop`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WorkloadStatus {
    /// Whether a workload is running (`workload_status` without one: false, nothing else set).
    pub running: bool,
    /// Since `workload_start`.
    pub elapsed_ms: u64,
    /// The request's seed.
    pub seed: u64,
    /// The memory writer, if any.
    pub mem: Option<MemWorkloadStatus>,
    /// The disk writer, if any.
    pub disk: Option<DiskWorkloadStatus>,
}

/// Counters of the memory writer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemWorkloadStatus {
    /// Buffer size.
    pub bytes: u64,
    /// Bytes per chunk (one checksum each).
    pub chunk_size: u64,
    /// Number of chunks.
    pub chunks: u64,
    /// Complete passes over the buffer.
    pub passes: u64,
    /// Chunks written in all.
    pub chunks_written: u64,
    /// Chunks found not to match their record, by the writer (each chunk is checked before it
    /// is rewritten) or by `workload_verify`, since the start.
    pub mismatches: u64,
    /// The rate cap, if any.
    pub mib_per_s: Option<u64>,
}

/// Counters of the disk writer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DiskWorkloadStatus {
    /// The target.
    pub path: String,
    /// Byte offset of block 0.
    pub offset: u64,
    /// Bytes per block.
    pub block_size: u64,
    /// Blocks in the range.
    pub blocks: u64,
    /// Whether O_DIRECT is in use.
    pub direct: bool,
    /// Whether blocks are read back before being overwritten.
    pub readback: bool,
    /// Writes issued.
    pub writes: u64,
    /// Writes acknowledged (the write, and fdatasync without O_DIRECT, returned success).
    pub acked: u64,
    /// Failed reads, writes and syncs.
    pub errors: u64,
    /// The last of them.
    pub last_error: Option<String>,
    /// Blocks whose last acknowledged content is recorded (a failed write forgets its block).
    pub recorded_blocks: u64,
    /// Blocks read back before being overwritten.
    pub readbacks: u64,
    /// Blocks found not to hold their last acknowledged write (by the writer or by
    /// `workload_verify`), since the start.
    pub block_mismatches: u64,
    /// Read-back buffers found changed since the device filled them, since the start.
    pub readback_mismatches: u64,
}

/// One piece of data that did not match its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadMismatch {
    /// Memory chunk, absolute disk block index (`offset / block_size + i`), or read-back slot.
    pub index: u64,
    /// The write (sequence number) the data should come from.
    pub expected_seq: u64,
    /// The header found in the data: seed, index, seq.
    pub found_seed: u64,
    /// See `found_seed`.
    pub found_index: u64,
    /// See `found_seed`.
    pub found_seq: u64,
    /// `"writer"` (found before an overwrite) or `"verify"`.
    pub found_by: String,
    /// What differs.
    pub detail: String,
}

/// Reply to `workload_verify`. Each mismatch is reported once: those the writers found since
/// the previous verify plus those this verify found.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WorkloadVerifyReply {
    /// Memory chunks checked (all of them).
    pub mem_regions_checked: u64,
    /// Memory chunks that did not match.
    pub mem_mismatches: u64,
    /// The first of them.
    pub first_mem_mismatch: Option<WorkloadMismatch>,
    /// Disk blocks with a recorded acknowledged write, read back and checked.
    pub blocks_checked: u64,
    /// Blocks that did not hold their last acknowledged write (or could not be read).
    pub block_mismatches: u64,
    /// The first of them.
    pub first_block_mismatch: Option<WorkloadMismatch>,
    /// Read-back buffers checked.
    pub readback_slots_checked: u64,
    /// Read-back buffers that changed since the device filled them.
    pub readback_mismatches: u64,
    /// The first of them.
    pub first_readback_mismatch: Option<WorkloadMismatch>,
    /// Time taken, waiting for the writers to pause included.
    pub elapsed_us: u64,
    /// Counters at the end of the check.
    pub status: WorkloadStatus,
}

impl WorkloadVerifyReply {
    /// Whether nothing mismatched.
    pub fn is_clean(&self) -> bool {
        self.mem_mismatches == 0 && self.block_mismatches == 0 && self.readback_mismatches == 0
    }
}

/// Reply to `workload_corrupt_mem`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadCorruptReply {
    /// The chunk.
    pub chunk: u64,
    /// The byte within it.
    pub offset: u64,
    /// Its value before.
    pub before: u8,
    /// Its value now.
    pub after: u8,
}

/// A reply as read by the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The request's id, or `None` when the agent could not read it.
    pub id: Option<u64>,
    /// `Ok(result fields)` or `Err(error message)`.
    pub result: Result<Value, String>,
}

/// Parses a request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, ProtocolError> {
    let value: Value = serde_json::from_slice(line).map_err(ProtocolError::Json)?;
    let Value::Object(mut map) = value else {
        return Err(ProtocolError::NotAnObject);
    };
    let id = match map.remove("id") {
        None => return Err(ProtocolError::MissingId),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| ProtocolError::BadId(v.to_string()))?,
    };
    let op_name = match map.get("op") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(ProtocolError::MissingOp { id }),
    };
    if !OP_NAMES.contains(&op_name.as_str()) {
        return Err(ProtocolError::UnknownOp { id, op: op_name });
    }
    let op =
        serde_json::from_value(Value::Object(map)).map_err(|source| ProtocolError::BadFields {
            id,
            op: op_name,
            source,
        })?;
    Ok(Request { id, op })
}

/// Encodes a request line (newline included) from a JSON object holding `op` and its fields.
pub fn encode_request(id: u64, request: &Value) -> Result<String, ProtocolError> {
    let Value::Object(fields) = request else {
        return Err(ProtocolError::NotARequest(request.to_string()));
    };
    if !matches!(fields.get("op"), Some(Value::String(_))) {
        return Err(ProtocolError::NotARequest(request.to_string()));
    }
    let mut map = Map::with_capacity(fields.len() + 1);
    map.insert("id".into(), Value::from(id));
    for (k, v) in fields {
        if k != "id" {
            map.insert(k.clone(), v.clone());
        }
    }
    Ok(line_of(map))
}

/// Encodes a successful reply line (newline included); `result` must serialize to an object
/// (or to null/unit for a reply with no fields).
pub fn ok_reply(id: u64, result: Value) -> String {
    let mut map = match result {
        Value::Object(map) => map,
        Value::Null => Map::new(),
        other => {
            let mut map = Map::new();
            map.insert("value".into(), other);
            map
        }
    };
    map.insert("id".into(), Value::from(id));
    map.insert("ok".into(), Value::Bool(true));
    line_of(map)
}

/// Encodes an error reply line (newline included).
pub fn error_reply(id: Option<u64>, message: &str) -> String {
    let mut map = Map::with_capacity(3);
    map.insert("id".into(), id.map_or(Value::Null, Value::from));
    map.insert("ok".into(), Value::Bool(false));
    map.insert("error".into(), Value::from(message));
    line_of(map)
}

/// Parses a reply line; `None` if the line is not a reply (not JSON, no boolean `ok`: for
/// instance a request echoed by a tty that is not yet in raw mode).
pub fn parse_reply(line: &[u8]) -> Option<Reply> {
    let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(line) else {
        return None;
    };
    let ok = map.remove("ok")?.as_bool()?;
    let id = match map.remove("id")? {
        Value::Null => None,
        v => Some(v.as_u64()?),
    };
    let result = if ok {
        Ok(Value::Object(map))
    } else {
        Err(match map.remove("error") {
            Some(Value::String(s)) => s,
            Some(other) => other.to_string(),
            None => "error reply without a message".to_owned(),
        })
    };
    Some(Reply { id, result })
}

fn line_of(map: Map<String, Value>) -> String {
    let mut line = Value::Object(map).to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_ops() {
        let r = parse_request(br#"{"id":7,"op":"ping"}"#).unwrap();
        assert_eq!(
            r,
            Request {
                id: 7,
                op: Op::Ping
            }
        );
        let r = parse_request(br#"{"op":"mem_check","id":8}"#).unwrap();
        assert_eq!(r.op, Op::MemCheck);
        let r = parse_request(br#"{"id":1,"op":"run","argv":["ls","-l"],"timeout_ms":5}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Run(RunRequest {
                argv: vec!["ls".into(), "-l".into()],
                timeout_ms: Some(5),
                stdin: None
            })
        );
        let r = parse_request(br#"{"id":2,"op":"poke","ports":[128]}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Poke(PokeRequest {
                ports: vec![128],
                mmio: vec![]
            })
        );
        let r = parse_request(
            br#"{"id":3,"op":"blk_write","path":"/dev/vda","offset":0,"block_size":4096,"blocks":2,"seed":1}"#,
        )
        .unwrap();
        assert!(matches!(
            r.op,
            Op::BlkWrite(BlkRequest { direct: false, .. })
        ));
    }

    #[test]
    fn parses_workload_ops() {
        let r = parse_request(br#"{"id":1,"op":"workload_verify"}"#).unwrap();
        assert_eq!(r.op, Op::WorkloadVerify(WorkloadVerifyRequest::default()));
        let r = parse_request(
            br#"{"id":2,"op":"workload_start","mem_mib":64,"seed":3,"disk":{"path":"/dev/vda","offset":0,"block_size":4096,"blocks":10}}"#,
        )
        .unwrap();
        let Op::WorkloadStart(start) = r.op else {
            panic!("{:?}", r.op)
        };
        assert_eq!(
            (start.mem_mib, start.seed, start.mem_mib_per_s),
            (64, 3, None)
        );
        let disk = start.disk.unwrap();
        assert_eq!((disk.direct, disk.readback), (None, None));
        // Round trip of the typed form, and the short form of a verify.
        let typed =
            serde_json::to_value(Op::WorkloadVerify(WorkloadVerifyRequest::default())).unwrap();
        assert_eq!(typed, json!({"op": "workload_verify"}));
        let e = parse_request(br#"{"id":3,"op":"workload_corrupt_mem"}"#).unwrap_err();
        assert!(e.to_string().contains("chunk"), "{e}");
        let e =
            parse_request(br#"{"id":4,"op":"workload_start","disk":{"path":"x"}}"#).unwrap_err();
        assert!(matches!(e, ProtocolError::BadFields { .. }), "{e}");
    }

    #[test]
    fn parses_net_ops() {
        let r = parse_request(br#"{"id":1,"op":"net_ifaces"}"#).unwrap();
        assert_eq!(r.op, Op::NetIfaces);
        let r = parse_request(
            br#"{"id":2,"op":"net_config","iface":"eth0","addr_cidr":"10.78.0.2/24"}"#,
        )
        .unwrap();
        assert_eq!(
            r.op,
            Op::NetConfig(NetConfigRequest {
                iface: "eth0".into(),
                addr_cidr: Some("10.78.0.2/24".into()),
                mac: None
            })
        );
        let r = parse_request(
            br#"{"id":3,"op":"net_stream_start","peer":"10.78.0.100:7100","duration_ms":5000,"seed":4}"#,
        )
        .unwrap();
        let Op::NetStreamStart(start) = r.op else {
            panic!("{:?}", r.op)
        };
        assert!(start.receive, "receive defaults to true");
        assert_eq!((start.duration_ms, start.send_bytes), (Some(5000), None));
        let r = parse_request(br#"{"id":4,"op":"net_stream_status","handle":2}"#).unwrap();
        assert_eq!(r.op, Op::NetStreamStatus(NetStreamHandle { handle: 2 }));
        let r = parse_request(br#"{"id":5,"op":"net_stream_finish","handle":2}"#).unwrap();
        assert_eq!(
            r.op,
            Op::NetStreamFinish(NetStreamFinishRequest {
                handle: 2,
                timeout_ms: None
            })
        );
        // The handle is not the request id.
        let e = parse_request(br#"{"id":6,"op":"net_stream_status"}"#).unwrap_err();
        assert!(e.to_string().contains("handle"), "{e}");
        for name in OP_NAMES {
            assert!(OP_NAMES.iter().filter(|n| *n == name).count() == 1);
        }
    }

    #[test]
    fn unit_ops_ignore_extra_fields() {
        let r = parse_request(br#"{"id":7,"op":"ping","junk":1}"#).unwrap();
        assert_eq!(r.op, Op::Ping);
    }

    #[test]
    fn errors_carry_id_when_known() {
        let e = parse_request(b"garbage").unwrap_err();
        assert!(matches!(e, ProtocolError::Json(_)));
        assert_eq!(e.id(), None);
        let e = parse_request(b"[1,2]").unwrap_err();
        assert!(matches!(e, ProtocolError::NotAnObject));
        let e = parse_request(br#"{"op":"ping"}"#).unwrap_err();
        assert!(matches!(e, ProtocolError::MissingId));
        let e = parse_request(br#"{"id":-1,"op":"ping"}"#).unwrap_err();
        assert!(matches!(e, ProtocolError::BadId(_)));
        let e = parse_request(br#"{"id":4}"#).unwrap_err();
        assert_eq!(e.id(), Some(4));
        let e = parse_request(br#"{"id":5,"op":"fly"}"#).unwrap_err();
        assert_eq!(e.id(), Some(5));
        assert!(e.to_string().contains("unknown op \"fly\""), "{e}");
        let e = parse_request(br#"{"id":6,"op":"run"}"#).unwrap_err();
        assert_eq!(e.id(), Some(6));
        assert!(e.to_string().contains("argv"), "{e}");
        let e = parse_request(br#"{"id":6,"op":"mem_fill","mib":"x","seed":1}"#).unwrap_err();
        assert!(matches!(e, ProtocolError::BadFields { .. }));
    }

    #[test]
    fn replies_round_trip() {
        let line = ok_reply(
            3,
            serde_json::to_value(PingReply {
                kernel: "6.1".into(),
                uptime_ms: 5,
                cpus: 2,
            })
            .unwrap(),
        );
        assert!(line.ends_with('\n'));
        let reply = parse_reply(line.trim_end().as_bytes()).unwrap();
        assert_eq!(reply.id, Some(3));
        let ping: PingReply = serde_json::from_value(reply.result.unwrap()).unwrap();
        assert_eq!(ping.cpus, 2);

        let reply = parse_reply(error_reply(None, "bad").as_bytes()).unwrap();
        assert_eq!(reply.id, None);
        assert_eq!(reply.result, Err("bad".to_owned()));

        let reply = parse_reply(ok_reply(9, Value::Null).as_bytes()).unwrap();
        assert_eq!(reply.result, Ok(json!({})));
    }

    #[test]
    fn non_replies_are_recognised() {
        assert_eq!(parse_reply(b"hello"), None);
        assert_eq!(parse_reply(br#"{"id":1,"op":"ping"}"#), None);
        assert_eq!(parse_reply(br#"{"id":"x","ok":true}"#), None);
    }

    #[test]
    fn encodes_requests() {
        let line = encode_request(4, &json!({"op": "run", "argv": ["true"], "id": 99})).unwrap();
        let r = parse_request(line.trim_end().as_bytes()).unwrap();
        assert_eq!(r.id, 4);
        assert_eq!(r.op, Op::Run(RunRequest::new(&["true"])));
        assert!(encode_request(1, &json!([1])).is_err());
        assert!(encode_request(1, &json!({"argv": []})).is_err());
        let typed = serde_json::to_value(Op::MemCheck).unwrap();
        assert_eq!(typed, json!({"op": "mem_check"}));
    }

    #[test]
    fn run_output_serializes_nulls() {
        let v = serde_json::to_value(RunOutput {
            status: Some(0),
            signal: None,
            stdout: String::new(),
            stderr: String::new(),
        })
        .unwrap();
        assert_eq!(v["signal"], Value::Null);
        let v = serde_json::to_value(PokeReply {
            ports: vec![(0x80, 0xff, 0xff)],
            mmio: vec![],
        })
        .unwrap();
        assert_eq!(v, json!({"ports": [[128, 255, 255]], "mmio": []}));
    }
}
