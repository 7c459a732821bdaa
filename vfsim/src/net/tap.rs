//! A Linux TAP interface: `/dev/net/tun` with `TUNSETIFF` `IFF_TAP | IFF_NO_PI` (no
//! packet information and no vnet header: the device adds and strips the virtio-net
//! header itself), set up and nonblocking. One `read` is one frame, one `write` sends one.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Longest interface name (`IFNAMSIZ` - 1).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;
/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Why the tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("tap name {name:?} is invalid: it must be 1 to {MAX_NAME_LEN} bytes without '/', ':', NUL or whitespace")]
    Name {
        /// The name given.
        name: String,
    },
    /// `/dev/net/tun` could not be opened.
    #[error("opening /dev/net/tun for tap {name} failed: {source} (the tun module must be loaded and /dev/net/tun present, and vfsim needs read-write access to it)")]
    Open {
        /// The tap name.
        name: String,
        /// The system error.
        source: io::Error,
    },
    /// `TUNSETIFF` failed.
    #[error("creating or attaching tap {name} (TUNSETIFF IFF_TAP|IFF_NO_PI) failed: {source} (creating a tap needs CAP_NET_ADMIN; to run without it, create a persistent tap owned by this user first: ip tuntap add dev {name} mode tap user $USER)")]
    SetIff {
        /// The tap name.
        name: String,
        /// The system error.
        source: io::Error,
    },
    /// Bringing the interface up failed.
    #[error("setting tap {name} up (SIOCSIFFLAGS IFF_UP) failed: {source} (needs CAP_NET_ADMIN, or bring it up beforehand: ip link set {name} up)")]
    Up {
        /// The tap name.
        name: String,
        /// The system error.
        source: io::Error,
    },
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates the tap `name`, or attaches to it if it exists (a persistent tap), and
    /// sets it up; the descriptor is nonblocking.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let bad_name = name.is_empty()
            || name.len() > MAX_NAME_LEN
            || name
                .bytes()
                .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
        if bad_name {
            return Err(TapError::Name { name: name.into() });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::Open {
                name: name.into(),
                source,
            })?;
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads (and may update the name of) the ifreq passed, which is
        // a valid, initialised struct ifreq owned here; the fd is open.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if rc < 0 {
            return Err(TapError::SetIff {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        set_up(name).map_err(|source| TapError::Up {
            name: name.into(),
            source,
        })?;
        Ok(Tap {
            file,
            name: name.into(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor (readable when a frame waits).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Reads one frame into `buf`; `Ok(None)` if none waits.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match (&self.file).read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends one frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            match (&self.file).write(frame) {
                Ok(n) if n == frame.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "the tap took {n} of {} bytes",
                        frame.len()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// A second handle on the same tap queue (for the announcement thread).
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }
}

/// A zeroed `struct ifreq` with `ifr_name` = `name` (checked to fit by the caller).
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data (a name array and a union of plain data); all zeroes
    // is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

/// Sets `IFF_UP` on interface `name` through an `AF_INET` datagram socket.
fn set_up(name: &str) -> io::Result<()> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFFLAGS fills ifr_flags of the valid ifreq passed.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS just set the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the valid ifreq passed.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
