//! The disk image and virtio-blk request execution (virtio 1.x section 5.2): a request
//! is a 16-byte header in device-readable buffers, data, and a status byte in the last
//! device-writable byte.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use pf_protocol::proto::VfState;

use crate::common_cfg::VIRTIO_F_VERSION_1;
use crate::guest_mem::GuestMemory;
use crate::layout::{Identity, BLK_IDENTITY};
use crate::personality::{DeviceConfig, Personality, Ring};
use crate::virtqueue::{addr_at, gather, total_len as total, Chain, QueueError, Segment};

/// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// `VIRTIO_BLK_F_FLUSH`: the flush command is supported.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Features the virtio-blk function offers.
pub const BLK_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
/// Sector size of virtio-blk addressing.
pub const SECTOR_SIZE: u64 = 512;
/// `VIRTIO_BLK_T_IN`: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the id string returned by `GET_ID`.
pub const ID_LEN: usize = 20;
/// Largest copy between the disk and guest memory at once.
const CHUNK: usize = 64 * 1024;

/// Why opening the disk or executing a request failed.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The image could not be opened.
    #[error("opening the disk image {path} failed: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
    /// The image's size could not be read.
    #[error("reading the size of the disk image {path} failed: {source}")]
    Size {
        /// The image path.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
    /// The image is not a regular file or block device of at least one sector.
    #[error("the disk image {path} is smaller than one {SECTOR_SIZE}-byte sector")]
    Empty {
        /// The image path.
        path: PathBuf,
    },
    /// The request had no device-writable byte for the status.
    #[error("the request at descriptor {head} has no device-writable byte for its status")]
    NoStatus {
        /// Head descriptor index.
        head: u16,
    },
}

/// A disk image, addressed in sectors.
#[derive(Debug)]
pub struct Disk {
    file: File,
    sectors: u64,
    id: [u8; ID_LEN],
}

impl Disk {
    /// Opens `path` for reading and writing.
    pub fn open(path: &Path) -> Result<Self, BlkError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| BlkError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| BlkError::Size {
            path: path.to_path_buf(),
            source,
        })?;
        let sectors = meta.len() / SECTOR_SIZE;
        if sectors == 0 {
            return Err(BlkError::Empty {
                path: path.to_path_buf(),
            });
        }
        let mut id = [0u8; ID_LEN];
        let name = format!("vfsim-{:x}", meta_ino(&meta));
        let n = name.len().min(ID_LEN);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Disk { file, sectors, id })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The id string `GET_ID` returns (NUL-padded).
    pub fn id(&self) -> [u8; ID_LEN] {
        self.id
    }

    /// Replaces the id string (a restored device keeps the one the driver saw).
    pub fn set_id(&mut self, id: [u8; ID_LEN]) {
        self.id = id;
    }

    /// A second handle on the image file (for a final flush on exit).
    pub fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Executes the request `chain`: writes its status byte and returns the number of
    /// bytes written into its device-writable buffers (for the used ring).
    pub fn execute(&self, mem: &GuestMemory, chain: &Chain) -> Result<u32, BlkError> {
        let (data_out, status_addr) =
            split_status(&chain.writable).ok_or(BlkError::NoStatus { head: chain.head })?;
        let (status, written) = match self.request(mem, chain, &data_out) {
            Ok(r) => r,
            Err(why) => {
                tracing::debug!(head = chain.head, "virtio-blk request failed: {why}");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        if let Err(e) = mem.write(status_addr, &[status]) {
            tracing::warn!(head = chain.head, "writing the request status failed: {e}");
            return Ok(written);
        }
        Ok(written.saturating_add(1))
    }

    /// Runs the request; returns the status and data bytes written, or why it failed.
    fn request(
        &self,
        mem: &GuestMemory,
        chain: &Chain,
        data_out: &[Segment],
    ) -> Result<(u8, u32), String> {
        let mut header = [0u8; 16];
        gather(mem, &chain.readable, 0, &mut header)?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = total(data_out);
                let offset = self.check_range(sector, len)?;
                let mut done = 0u64;
                for seg in data_out {
                    self.copy_to_guest(mem, seg, offset + done)?;
                    done += u64::from(seg.len);
                }
                Ok((VIRTIO_BLK_S_OK, u32::try_from(len).unwrap_or(u32::MAX)))
            }
            VIRTIO_BLK_T_OUT => {
                let len = total(&chain.readable).saturating_sub(16);
                let offset = self.check_range(sector, len)?;
                self.copy_from_guest(mem, &chain.readable, offset)?;
                Ok((VIRTIO_BLK_S_OK, 0))
            }
            VIRTIO_BLK_T_FLUSH => {
                self.file
                    .sync_data()
                    .map_err(|e| format!("flushing the disk image failed: {e}"))?;
                Ok((VIRTIO_BLK_S_OK, 0))
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut left = ID_LEN;
                let mut written = 0u32;
                for seg in data_out {
                    let n = left.min(seg.len as usize);
                    mem.write(seg.addr, &self.id[ID_LEN - left..ID_LEN - left + n])
                        .map_err(|e| e.to_string())?;
                    left -= n;
                    written += n as u32;
                }
                Ok((VIRTIO_BLK_S_OK, written))
            }
            other => {
                tracing::debug!("unsupported virtio-blk request type {other}");
                Ok((VIRTIO_BLK_S_UNSUPP, 0))
            }
        }
    }

    /// Byte offset of `sector`, if `len` bytes from there fit the disk.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, String> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(format!(
                "data length {len} is not a multiple of {SECTOR_SIZE}"
            ));
        }
        let end = sector.checked_add(len / SECTOR_SIZE);
        match end {
            Some(end) if end <= self.sectors => Ok(sector * SECTOR_SIZE),
            _ => Err(format!(
                "sectors {sector}+{} are beyond the disk's {} sectors",
                len / SECTOR_SIZE,
                self.sectors
            )),
        }
    }

    fn copy_to_guest(&self, mem: &GuestMemory, seg: &Segment, offset: u64) -> Result<(), String> {
        let mut buf = vec![0u8; (seg.len as usize).min(CHUNK)];
        let mut done = 0usize;
        while done < seg.len as usize {
            let n = (seg.len as usize - done).min(CHUNK);
            let pos = offset + done as u64;
            self.file.read_exact_at(&mut buf[..n], pos).map_err(|e| {
                format!("reading {n} bytes at {pos:#x} of the disk image failed: {e}")
            })?;
            mem.write(addr_at(seg.addr, done as u64)?, &buf[..n])
                .map_err(|e| e.to_string())?;
            done += n;
        }
        Ok(())
    }

    /// Writes the readable buffers after the 16-byte header to the disk at `offset`.
    fn copy_from_guest(
        &self,
        mem: &GuestMemory,
        readable: &[Segment],
        offset: u64,
    ) -> Result<(), String> {
        let mut skip = 16u64;
        let mut pos = offset;
        let mut buf = vec![0u8; CHUNK];
        for seg in readable {
            let seg_len = u64::from(seg.len);
            let start = skip.min(seg_len);
            skip -= start;
            let mut at = start;
            while at < seg_len {
                let n = (seg_len - at).min(CHUNK as u64) as usize;
                mem.read(addr_at(seg.addr, at)?, &mut buf[..n])
                    .map_err(|e| e.to_string())?;
                self.file.write_all_at(&buf[..n], pos).map_err(|e| {
                    format!("writing {n} bytes at {pos:#x} of the disk image failed: {e}")
                })?;
                at += n as u64;
                pos += n as u64;
            }
        }
        Ok(())
    }
}

fn meta_ino(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.ino()
}

/// The writable buffers without their last byte, and the address of that byte.
fn split_status(writable: &[Segment]) -> Option<(Vec<Segment>, u64)> {
    let mut segs: Vec<Segment> = writable.to_vec();
    while let Some(last) = segs.last_mut() {
        if last.len == 0 {
            segs.pop();
            continue;
        }
        last.len -= 1;
        let status = last.addr.checked_add(u64::from(last.len))?;
        if last.len == 0 {
            segs.pop();
        }
        return Some((segs, status));
    }
    None
}

/// The virtio-blk personality: one request queue over a [`Disk`].
#[derive(Debug)]
pub struct BlkFunction {
    disk: Disk,
}

impl BlkFunction {
    /// The function over `disk`.
    pub fn new(disk: Disk) -> Self {
        BlkFunction { disk }
    }

    /// The disk image.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }
}

impl Personality for BlkFunction {
    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn identity(&self) -> &'static Identity {
        &BLK_IDENTITY
    }

    fn features(&self) -> u64 {
        BLK_FEATURES
    }

    /// `struct virtio_blk_config`: capacity, `seg_max`, `blk_size`.
    fn device_config(&self, max_queue_size: u16) -> DeviceConfig {
        let mut c = [0u8; std::mem::size_of::<DeviceConfig>()];
        c[0..8].copy_from_slice(&self.disk.sectors().to_le_bytes());
        let seg_max = u32::from(max_queue_size).saturating_sub(2).max(1);
        c[12..16].copy_from_slice(&seg_max.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    fn serve(&mut self, _index: usize, ring: &mut Ring<'_>) -> Result<(), QueueError> {
        while let Some(chain) = ring.pop()? {
            let len = self.disk.execute(ring.mem(), &chain).unwrap_or_else(|e| {
                tracing::warn!("completing a request without status: {e}");
                0
            });
            ring.complete(chain.head, len)?;
        }
        Ok(())
    }

    fn save(&self, state: &mut VfState) {
        let id = self.disk.id();
        let id_len = id.iter().position(|b| *b == 0).unwrap_or(ID_LEN);
        state.capacity_sectors = self.disk.sectors();
        state.serial = String::from_utf8_lossy(&id[..id_len]).into_owned();
    }

    fn check(&self, state: &VfState) -> Result<(), String> {
        if let Some(net) = &state.net {
            return Err(format!(
                "the state is of a virtio-net function (MAC {}), this is a virtio-blk function",
                net.mac
            ));
        }
        if state.capacity_sectors != self.disk.sectors() {
            return Err(format!(
                "the state comes from a disk of {} sectors, this one has {}",
                state.capacity_sectors,
                self.disk.sectors()
            ));
        }
        if state.serial.len() > ID_LEN || state.serial.as_bytes().contains(&0) {
            return Err(format!(
                "serial {:?} is longer than {ID_LEN} bytes or contains NUL",
                state.serial
            ));
        }
        Ok(())
    }

    fn load(&mut self, state: &VfState) {
        let mut id = [0u8; ID_LEN];
        id[..state.serial.len()].copy_from_slice(state.serial.as_bytes());
        self.disk.set_id(id);
    }

    fn backing_file(&self) -> Option<io::Result<File>> {
        Some(self.disk.try_clone_file())
    }
}
