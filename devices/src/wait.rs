//! Blocking waits that a stop eventfd can end: a thread waiting on a descriptor also
//! watches its owner's stop signal, so stopping it never waits for the peer.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vmm_sys_util::eventfd::EventFd;

/// What a wait ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Woken {
    /// The descriptor is readable (or closed, or in error: a read tells which).
    Readable,
    /// `stop` was signalled.
    Stopped,
}

/// Waits until `fd` is readable (or closed) or `stop` is signalled; a signal interrupting
/// the wait restarts it.
pub fn readable_or_stopped(fd: BorrowedFd, stop: &EventFd) -> io::Result<Woken> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is an array of two initialised pollfds over descriptors that stay
        // open for the call (borrowed); poll only writes their `revents`.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(if fds[1].revents != 0 {
            Woken::Stopped
        } else {
            Woken::Readable
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_and_stopped_are_told_apart() {
        let data = EventFd::new(0).unwrap();
        let stop = EventFd::new(0).unwrap();
        // SAFETY: the eventfd outlives the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(data.as_raw_fd()) };
        data.write(1).unwrap();
        assert_eq!(readable_or_stopped(fd, &stop).unwrap(), Woken::Readable);
        stop.write(1).unwrap();
        assert_eq!(readable_or_stopped(fd, &stop).unwrap(), Woken::Stopped);
    }
}
