//! Opening a serial port as the agent's channel: raw mode, no echo, no modem control.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

/// Why the channel could not be set up.
#[derive(Debug, Error)]
pub enum TtyError {
    /// open(2) failed.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The device.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A termios or fcntl call failed.
    #[error("cannot configure {path}: {call} failed: {source}")]
    Configure {
        /// The device.
        path: String,
        /// The failing call.
        call: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Opens `path` read-write in raw mode, discarding input that arrived before (possibly echoed
/// or cooked by the default line discipline). A path that is not a tty (a FIFO, for instance)
/// is used as it is.
pub fn open_raw(path: &str) -> Result<File, TtyError> {
    // O_NONBLOCK so that the open does not wait for a carrier; O_NOCTTY so that the port never
    // becomes our controlling terminal (no SIGHUP on hangup).
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| TtyError::Open {
            path: path.to_owned(),
            source,
        })?;
    let fd = file.as_raw_fd();
    let fail = |call: &'static str| TtyError::Configure {
        path: path.to_owned(),
        call,
        source: io::Error::last_os_error(),
    };

    // SAFETY: termios is plain old data; all-zero bytes are a valid value.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open for the lifetime of `file`; tio is a valid, writable termios.
    if unsafe { libc::tcgetattr(fd, &mut tio) } == 0 {
        // SAFETY: tio is a valid termios obtained from tcgetattr.
        unsafe { libc::cfmakeraw(&mut tio) };
        tio.c_cflag |= libc::CLOCAL | libc::CREAD;
        tio.c_cflag &= !libc::HUPCL;
        tio.c_cc[libc::VMIN] = 1;
        tio.c_cc[libc::VTIME] = 0;
        // SAFETY: fd is open; tio is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &tio) } != 0 {
            return Err(fail("tcsetattr"));
        }
        // SAFETY: fd is open; tcflush has no memory-safety preconditions.
        if unsafe { libc::tcflush(fd, libc::TCIOFLUSH) } != 0 {
            return Err(fail("tcflush"));
        }
    } else if io::Error::last_os_error().raw_os_error() != Some(libc::ENOTTY) {
        return Err(fail("tcgetattr"));
    }

    // Back to blocking reads.
    // SAFETY: fd is open; F_GETFL/F_SETFL only read and set the file status flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(fail("fcntl(O_NONBLOCK)"));
        }
    }
    Ok(file)
}

/// Waits until everything written to `file` has been transmitted (no-op for a non-tty).
pub fn drain(file: &File) -> io::Result<()> {
    // SAFETY: the fd is open for the lifetime of `file`; tcdrain has no memory-safety
    // preconditions.
    if unsafe { libc::tcdrain(file.as_raw_fd()) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOTTY) {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;

    /// A pseudo-terminal: the master and the slave's path.
    fn pty() -> (File, String) {
        // SAFETY: posix_openpt returns a new fd or -1, checked below.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
        assert!(fd >= 0, "posix_openpt: {}", io::Error::last_os_error());
        // SAFETY: fd is a fresh, owned descriptor.
        let master = unsafe { File::from_raw_fd(fd) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: fd is a pty master; name is a writable buffer of the given length.
        unsafe {
            assert_eq!(libc::grantpt(fd), 0);
            assert_eq!(libc::unlockpt(fd), 0);
            assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0);
        }
        // SAFETY: ptsname_r NUL-terminated the name inside the buffer.
        let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
        (master, name.to_string_lossy().into_owned())
    }

    #[test]
    fn pty_is_raw_both_ways() {
        let (mut master, slave_path) = pty();
        let mut slave = open_raw(&slave_path).unwrap();
        // SAFETY: termios is plain old data; tcgetattr fills it from an open tty.
        let tio = unsafe {
            let mut tio: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(slave.as_raw_fd(), &mut tio), 0);
            tio
        };
        assert_eq!(tio.c_lflag & (libc::ECHO | libc::ICANON | libc::ISIG), 0);
        assert_eq!(tio.c_oflag & libc::OPOST, 0);
        assert_eq!(tio.c_iflag & libc::ICRNL, 0);

        master.write_all(b"in\r\n").unwrap();
        let mut buf = [0u8; 16];
        let mut got = Vec::new();
        while got.len() < 4 {
            let n = slave.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"in\r\n");
        slave.write_all(b"out\n").unwrap();
        drain(&slave).unwrap();
        let mut got = Vec::new();
        while got.len() < 4 {
            let n = master.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        // No echo of the input, no \n -> \r\n translation.
        assert_eq!(got, b"out\n");
    }

    #[test]
    fn non_tty_is_accepted_and_missing_path_named() {
        let dir = std::env::temp_dir().join(format!("vmm-agent-tty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plain");
        std::fs::write(&path, b"").unwrap();
        let file = open_raw(path.to_str().unwrap()).unwrap();
        drain(&file).unwrap();
        let e = open_raw("/nonexistent/ttyS9").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ttyS9"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
