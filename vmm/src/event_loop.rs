//! The VMM's event loop (event-manager): serial input from stdin or socket clients, the
//! guest's reset line, and SIGTERM/SIGINT.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use devices::legacy::serial::MAX_PENDING_INPUT;
use devices::legacy::SerialPort;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

use crate::console::InputSource;
use crate::exit::{ExitReason, VmExit};

/// Feeds one serial port's host input into the guest, with flow control: when the port's
/// queue is full the source is taken out of the loop until the guest drains the FIFO.
pub struct SerialInput {
    name: &'static str,
    port: Arc<SerialPort>,
    source: InputSource,
    /// The fd currently read (stdin or the socket client), if any.
    reading: Option<RawFd>,
    /// True while `reading` is out of the loop because the queue is full.
    paused: bool,
}

impl SerialInput {
    /// Input for `port` from `source`.
    pub fn new(name: &'static str, port: Arc<SerialPort>, source: InputSource) -> Self {
        SerialInput {
            name,
            port,
            source,
            reading: None,
            paused: false,
        }
    }

    fn read_some(&mut self, fd: RawFd, ops: &mut EventOps) {
        let room = MAX_PENDING_INPUT.saturating_sub(self.port.pending_input());
        if room == 0 {
            let _ = ops.remove(Events::empty_raw(fd));
            self.paused = true;
            return;
        }
        let mut buf = vec![0u8; room.min(4096)];
        let res = match &self.source {
            InputSource::Stdin => std::io::stdin().read(&mut buf),
            InputSource::Socket { client, .. } => {
                match client.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    Some(s) => s.read(&mut buf),
                    None => Ok(0),
                }
            }
            InputSource::None => Ok(0),
        };
        match res {
            Ok(0) => self.close_reader(fd, ops),
            Ok(n) => {
                self.port.queue_input(&buf[..n]);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::info!("{}: input closed: {e}", self.name);
                self.close_reader(fd, ops);
            }
        }
    }

    fn close_reader(&mut self, fd: RawFd, ops: &mut EventOps) {
        if !self.paused {
            let _ = ops.remove(Events::empty_raw(fd));
        }
        self.paused = false;
        self.reading = None;
        if let InputSource::Socket { client, .. } = &self.source {
            *client.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        let InputSource::Socket {
            listener,
            client,
            path,
        } = &self.source
        else {
            return;
        };
        let stream: UnixStream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    tracing::warn!("{}: accept on {} failed: {e}", self.name, path.display());
                }
                return;
            }
        };
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::warn!("{}: {e}", self.name);
            return;
        }
        let fd = stream.as_raw_fd();
        // A new client replaces the old one.
        if let Some(old) = self.reading.take() {
            if !self.paused {
                let _ = ops.remove(Events::empty_raw(old));
            }
        }
        *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
        self.paused = false;
        match ops.add(Events::new_raw(fd, EventSet::IN)) {
            Ok(()) => self.reading = Some(fd),
            Err(e) => tracing::warn!("{}: cannot watch socket client: {e}", self.name),
        }
        tracing::debug!("{}: client connected on {}", self.name, path.display());
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.port.in_buffer_empty_event(), EventSet::IN)) {
            tracing::warn!("{}: {e}", self.name);
        }
        match &self.source {
            InputSource::None => {}
            InputSource::Stdin => {
                let fd = std::io::stdin().as_raw_fd();
                match ops.add(Events::new_raw(fd, EventSet::IN)) {
                    Ok(()) => self.reading = Some(fd),
                    // e.g. stdin is a regular file (epoll refuses those) or closed
                    Err(e) => tracing::debug!("{}: stdin not watched: {e}", self.name),
                }
            }
            InputSource::Socket { listener, .. } => {
                if let Err(e) = ops.add(Events::new(listener, EventSet::IN)) {
                    tracing::warn!("{}: {e}", self.name);
                }
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.port.in_buffer_empty_event().as_raw_fd() {
            let pending = self.port.flush_input();
            if self.paused && pending < MAX_PENDING_INPUT {
                if let Some(r) = self.reading {
                    if ops.add(Events::new_raw(r, EventSet::IN)).is_ok() {
                        self.paused = false;
                    }
                }
            }
        } else if matches!(&self.source, InputSource::Socket { listener, .. } if listener.as_raw_fd() == fd)
        {
            self.accept(ops);
        } else if Some(fd) == self.reading {
            if events.event_set().intersects(EventSet::IN) {
                self.read_some(fd, ops);
            } else {
                self.close_reader(fd, ops);
            }
        }
    }
}

/// The last SIGTERM/SIGINT received, and the eventfd its handler writes.
static SIGNAL_NUMBER: AtomicI32 = AtomicI32::new(0);
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn stop_signal_handler(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNAL_NUMBER.store(num, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) on an eventfd with an 8-byte buffer that lives for the call; it is
        // async-signal-safe and its result does not matter here.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

/// Stops the VM on the guest's reset line or on SIGTERM/SIGINT.
pub struct ExitWatcher {
    exit: Arc<VmExit>,
    reset: EventFd,
    signal: EventFd,
}

impl ExitWatcher {
    /// Watches `reset` (the i8042's reset line) and installs the SIGTERM/SIGINT handlers.
    pub fn new(exit: Arc<VmExit>, reset: EventFd) -> std::io::Result<Self> {
        let signal = EventFd::new(libc::EFD_NONBLOCK)?;
        SIGNAL_FD.store(signal.as_raw_fd(), Ordering::SeqCst);
        for s in [libc::SIGTERM, libc::SIGINT] {
            register_signal_handler(s, stop_signal_handler)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        }
        Ok(ExitWatcher {
            exit,
            reset,
            signal,
        })
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.reset, &self.signal, self.exit.eventfd()] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                tracing::error!("cannot watch exit events: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.reset.as_raw_fd() {
            let _ = self.reset.read();
            self.exit.trigger(ExitReason::GuestReset);
        } else if fd == self.signal.as_raw_fd() {
            let _ = self.signal.read();
            self.exit
                .trigger(ExitReason::Signal(SIGNAL_NUMBER.load(Ordering::SeqCst)));
        } else {
            // The exit eventfd stays readable; the run loop checks the reason.
            let _ = self.exit.eventfd().read();
        }
    }
}
