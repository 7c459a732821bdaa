//! `refresh`: what a guest restored from a shared snapshot must not keep from the moment the
//! snapshot was taken. Every restore of one snapshot starts with the same wall clock (the
//! time it was taken), the same kernel random state and the same boot id; the harness sends
//! this request first thing after each restore (see `harness::golden`).
//!
//! - The wall clock is set to the host's time (`clock_settime(CLOCK_REALTIME)`); the
//!   monotonic and boot clocks keep running from where the snapshot left them, as on any
//!   restored or migrated guest.
//! - The host's random bytes are credited to the kernel's pool (`RNDADDENTROPY`) and the
//!   kernel's CRNG is reseeded from it at once (`RNDRESEEDCRNG`), so two restores of one
//!   snapshot draw different random numbers from then on.
//! - The boot id (`/proc/sys/kernel/random/boot_id`) is made by the kernel from its random
//!   generator at its first read; nothing reads it before a golden snapshot is taken, so each
//!   restore makes its own after the reseed. It is reported so a test can check that.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;

use thiserror::Error;

use super::protocol::{RefreshReply, RefreshRequest, MAX_REFRESH_ENTROPY};

/// `_IOW('R', 0x03, int[2])`: add bytes to the input pool and credit their entropy.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now (Linux 4.17 and later).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Why a refresh failed.
#[derive(Debug, Error)]
pub enum RefreshError {
    /// More entropy bytes than the request may carry.
    #[error("entropy: {0} bytes given, at most {MAX_REFRESH_ENTROPY} accepted")]
    TooMuchEntropy(usize),
    /// Setting the wall clock failed.
    #[error("clock_settime(CLOCK_REALTIME, {0} ns): {1}")]
    SetClock(u64, #[source] io::Error),
    /// /dev/urandom could not be opened.
    #[error("opening /dev/urandom: {0}")]
    Open(#[source] io::Error),
    /// RNDADDENTROPY failed.
    #[error("RNDADDENTROPY on /dev/urandom: {0}")]
    AddEntropy(#[source] io::Error),
    /// RNDRESEEDCRNG failed.
    #[error("RNDRESEEDCRNG on /dev/urandom: {0}")]
    Reseed(#[source] io::Error),
    /// getrandom failed.
    #[error("getrandom: {0}")]
    GetRandom(#[source] io::Error),
}

/// Sets the clock, reseeds the kernel's random generator and reports what it did.
pub fn refresh(req: &RefreshRequest) -> Result<RefreshReply, RefreshError> {
    if req.entropy.len() > MAX_REFRESH_ENTROPY {
        return Err(RefreshError::TooMuchEntropy(req.entropy.len()));
    }
    let before = realtime_ns();
    set_realtime(req.unix_time_ns)?;
    let urandom = File::open("/dev/urandom").map_err(RefreshError::Open)?;
    add_entropy(&urandom, &req.entropy)?;
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is an open /dev/urandom.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(RefreshError::Reseed(io::Error::last_os_error()));
    }
    let mut random = [0u8; 16];
    // SAFETY: getrandom writes at most `random.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    if n != random.len() as isize {
        return Err(RefreshError::GetRandom(io::Error::last_os_error()));
    }
    Ok(RefreshReply {
        clock_step_ms: (i128::from(req.unix_time_ns) - i128::from(before)) as i64 / 1_000_000,
        random: random.iter().map(|b| format!("{b:02x}")).collect(),
        boot_id: fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
    })
}

fn realtime_ns() -> u64 {
    // SAFETY: timespec is plain old data; all-zero bytes are a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes into the struct we own and pass by valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

fn set_realtime(ns: u64) -> Result<(), RefreshError> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec we pass by valid pointer.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(RefreshError::SetClock(ns, io::Error::last_os_error()));
    }
    Ok(())
}

/// `struct rand_pool_info` with room for [`MAX_REFRESH_ENTROPY`] bytes.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_REFRESH_ENTROPY],
}

fn add_entropy(urandom: &File, bytes: &[u8]) -> Result<(), RefreshError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let mut info = RandPoolInfo {
        entropy_count: (bytes.len() * 8) as libc::c_int,
        buf_size: bytes.len() as libc::c_int,
        buf: [0; MAX_REFRESH_ENTROPY],
    };
    info.buf[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf holds buf_size bytes; ours is
    // laid out as the kernel's (two ints, then the bytes) and buf_size <= the array's length.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, &info) } != 0 {
        return Err(RefreshError::AddEntropy(io::Error::last_os_error()));
    }
    Ok(())
}
