//! A 16550A serial port (vm-superio's model) on the port-I/O bus.
//!
//! Its interrupt is an eventfd registered as a KVM irqfd. Guest output goes to any
//! `Write`; host input is queued here and fed into the UART's 64-byte FIFO as the guest
//! drains it, so nothing the host sends is dropped when the guest reads slowly.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::trigger::EventFdTrigger;

mod persist;
pub use persist::{SerialPersistError, SerialPortState};

/// How many bytes of host input may wait for the guest before more input is refused.
pub const MAX_PENDING_INPUT: usize = 64 * 1024;

/// Signals the event loop when the guest has emptied the receive FIFO, so it can push more.
struct Events {
    in_buffer_empty: Arc<EventFd>,
}

impl SerialEvents for Events {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // A failed write only delays input until the next host byte arrives.
        let _ = self.in_buffer_empty.write(1);
    }
}

/// The guest-output writer, shared so that a restore can build a new UART around it and
/// keep it if that fails.
#[derive(Clone)]
struct Output(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

struct Inner {
    uart: Serial<EventFdTrigger, Events, Output>,
    pending: VecDeque<u8>,
}

/// One serial port.
pub struct SerialPort {
    inner: Mutex<Inner>,
    in_buffer_empty: Arc<EventFd>,
}

impl SerialPort {
    /// A port raising `irq` and writing guest output to `out`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let in_buffer_empty = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let events = Events {
            in_buffer_empty: in_buffer_empty.clone(),
        };
        Ok(SerialPort {
            inner: Mutex::new(Inner {
                uart: Serial::with_events(irq, events, Output(Arc::new(Mutex::new(out)))),
                pending: VecDeque::new(),
            }),
            in_buffer_empty,
        })
    }

    /// Becomes readable when the guest emptied the receive FIFO (see [`Self::flush_input`]).
    pub fn in_buffer_empty_event(&self) -> &EventFd {
        &self.in_buffer_empty
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues host input for the guest. Returns how many bytes were accepted: fewer than
    /// `bytes.len()` only when [`MAX_PENDING_INPUT`] bytes already wait for the guest.
    pub fn queue_input(&self, bytes: &[u8]) -> usize {
        let mut inner = self.lock();
        let room = MAX_PENDING_INPUT.saturating_sub(inner.pending.len());
        let n = room.min(bytes.len());
        inner.pending.extend(&bytes[..n]);
        Self::feed(&mut inner);
        n
    }

    /// Moves queued input into the UART FIFO as far as it has room (call when
    /// [`Self::in_buffer_empty_event`] fires). Returns how many bytes still wait.
    pub fn flush_input(&self) -> usize {
        let _ = self.in_buffer_empty.read();
        let mut inner = self.lock();
        Self::feed(&mut inner);
        inner.pending.len()
    }

    fn feed(inner: &mut Inner) {
        let room = inner.uart.fifo_capacity().min(inner.pending.len());
        if room == 0 {
            return;
        }
        let chunk: Vec<u8> = inner.pending.iter().take(room).copied().collect();
        match inner.uart.enqueue_raw_bytes(&chunk) {
            Ok(n) => {
                inner.pending.drain(..n);
            }
            Err(e) => tracing::warn!("serial: cannot pass input to the guest: {e:?}"),
        }
    }

    /// Bytes of host input waiting for room in the guest's FIFO.
    pub fn pending_input(&self) -> usize {
        self.lock().pending.len()
    }
}

impl DevicePio for SerialPort {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let mut inner = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            *b = inner.uart.read((offset as usize + i) as u8);
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let mut inner = self.lock();
        for (i, b) in data.iter().enumerate() {
            // An output error (console file on a full disk, a closed socket) loses that
            // byte; the guest must not notice and the VMM must not stop.
            if let Err(e) = inner.uart.write((offset as usize + i) as u8, *b) {
                tracing::trace!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn port() -> (SerialPort, Sink, EventFdTrigger) {
        let irq = EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let sink = Sink::default();
        (
            SerialPort::new(irq.clone(), Box::new(sink.clone())).unwrap(),
            sink,
            irq,
        )
    }

    #[test]
    fn guest_output_reaches_the_writer_and_raises_thre() {
        let (p, sink, irq) = port();
        p.pio_write(PioAddress(0x3f8), 1, &[0x02]); // IER: THR empty interrupt
        let _ = irq.eventfd().read();
        let mut iir = [0u8];
        p.pio_read(PioAddress(0x3f8), 2, &mut iir); // the driver acknowledges by reading IIR
        assert_eq!(iir[0] & 0x0f, 0x02, "THR-empty interrupt pending");
        p.pio_write(PioAddress(0x3f8), 0, b"h");
        p.pio_write(PioAddress(0x3f8), 0, b"i");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        assert!(irq.eventfd().read().unwrap() >= 1);
    }

    #[test]
    fn input_larger_than_the_fifo_is_kept_until_the_guest_reads() {
        let (p, _sink, _irq) = port();
        let input: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        assert_eq!(p.queue_input(&input), 200);
        assert_eq!(p.pending_input(), 200 - 64);
        let mut got = Vec::new();
        while got.len() < 200 {
            let mut lsr = [0u8];
            p.pio_read(PioAddress(0x3f8), 5, &mut lsr);
            if lsr[0] & 1 == 0 {
                assert!(
                    p.in_buffer_empty_event().read().is_ok(),
                    "FIFO drained without an event"
                );
                p.flush_input();
                continue;
            }
            let mut b = [0u8];
            p.pio_read(PioAddress(0x3f8), 0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
        assert_eq!(p.pending_input(), 0);
    }

    #[test]
    fn pending_input_is_bounded() {
        let (p, _sink, _irq) = port();
        let big = vec![b'x'; MAX_PENDING_INPUT + 1000];
        assert_eq!(p.queue_input(&big), MAX_PENDING_INPUT);
        // 64 bytes moved on into the guest's FIFO; exactly that much room is left.
        assert_eq!(p.queue_input(&[b'y'; 100]), 64);
        assert_eq!(p.queue_input(b"more"), 0);
    }
}
