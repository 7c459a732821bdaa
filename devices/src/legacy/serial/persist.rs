//! Saving and restoring a serial port: the 16550A's registers and receive FIFO (vm-superio's
//! `SerialState`, mirrored here because it has no serde support) and the host input still
//! waiting for room in the FIFO.
//!
//! A restore replaces the register state only: the port keeps its output writer, its
//! interrupt eventfd and its FIFO-drained event.

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::Serial;

use crate::persist::Persist;

use super::{Events, SerialPort, MAX_PENDING_INPUT};

/// The 16550A's receive FIFO size.
const FIFO_SIZE: usize = 64;

/// The saved state of a [`SerialPort`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SerialPortState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes in the receive FIFO, oldest first (at most 64).
    pub rx_fifo: Vec<u8>,
    /// Host input queued behind the FIFO, oldest first (at most [`MAX_PENDING_INPUT`]).
    pub pending_input: Vec<u8>,
}

/// Why a serial state could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum SerialPersistError {
    /// More bytes in the saved FIFO than a 16550A holds.
    #[error("the saved receive FIFO holds {len} bytes, more than the 16550A's {FIFO_SIZE}")]
    FifoOverflow {
        /// Bytes in the state.
        len: usize,
    },
    /// More queued input than a port keeps.
    #[error("the saved state queues {len} bytes of input, more than the {MAX_PENDING_INPUT} a port keeps")]
    PendingOverflow {
        /// Bytes in the state.
        len: usize,
    },
    /// The restored registers have an interrupt pending and raising it failed.
    #[error("cannot raise the restored port's pending interrupt: {0}")]
    Interrupt(String),
}

impl SerialPortState {
    fn to_superio(&self) -> SerialState {
        SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.rx_fifo.clone(),
        }
    }
}

impl Persist for SerialPort {
    type State = SerialPortState;
    type Error = SerialPersistError;

    /// The registers, receive FIFO and queued input.
    fn save(&self) -> SerialPortState {
        let inner = self.lock();
        let s = inner.uart.state();
        SerialPortState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            rx_fifo: s.in_buffer,
            pending_input: inner.pending.iter().copied().collect(),
        }
    }

    /// Replaces the port's registers, FIFO and queued input with `state`, keeping its
    /// output, interrupt and events. Raises the interrupt if the restored registers have one
    /// pending and enabled (vm-superio's rule), and signals
    /// [`in_buffer_empty_event`](Self::in_buffer_empty_event) if the FIFO is empty while
    /// input is queued. On an error nothing is changed.
    fn restore(&self, state: &SerialPortState) -> Result<(), SerialPersistError> {
        if state.rx_fifo.len() > FIFO_SIZE {
            return Err(SerialPersistError::FifoOverflow {
                len: state.rx_fifo.len(),
            });
        }
        if state.pending_input.len() > MAX_PENDING_INPUT {
            return Err(SerialPersistError::PendingOverflow {
                len: state.pending_input.len(),
            });
        }
        let mut inner = self.lock();
        let events = Events {
            in_buffer_empty: self.in_buffer_empty.clone(),
        };
        let uart = Serial::from_state(
            &state.to_superio(),
            inner.uart.interrupt_evt().clone(),
            events,
            inner.uart.writer().clone(),
        )
        .map_err(|e| SerialPersistError::Interrupt(e.to_string()))?;
        inner.uart = uart;
        inner.pending = state.pending_input.iter().copied().collect();
        if state.rx_fifo.is_empty() && !state.pending_input.is_empty() {
            // The source's FIFO-drained event may not have been handled yet: raise it again
            // so the event loop moves the queued input on, as it would have there.
            let _ = self.in_buffer_empty.write(1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use vm_device::bus::PioAddress;
    use vm_device::DevicePio;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::trigger::EventFdTrigger;

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
        let p = SerialPort::new(irq.clone(), Box::new(sink.clone())).unwrap();
        (p, sink, irq)
    }

    fn read(p: &SerialPort, reg: u16) -> u8 {
        let mut b = [0u8];
        p.pio_read(PioAddress(0x3f8), reg, &mut b);
        b[0]
    }

    #[test]
    fn registers_fifo_and_queued_input_survive() {
        let (a, _, _) = port();
        // 8N1 -> 7E2 with divisor 0x0003, scratch, modem control, RX interrupt enabled.
        a.pio_write(PioAddress(0x3f8), 3, &[0x80]);
        a.pio_write(PioAddress(0x3f8), 0, &[0x03]);
        a.pio_write(PioAddress(0x3f8), 1, &[0x00]);
        a.pio_write(PioAddress(0x3f8), 3, &[0x1e]);
        a.pio_write(PioAddress(0x3f8), 7, &[0x5a]);
        a.pio_write(PioAddress(0x3f8), 4, &[0x0b]);
        a.pio_write(PioAddress(0x3f8), 1, &[0x01]);
        let input: Vec<u8> = (0..100u8).collect();
        assert_eq!(a.queue_input(&input), 100);
        assert_eq!(read(&a, 0), 0, "the guest read one byte");
        let s = a.save();
        assert_eq!(s.rx_fifo, (1..64u8).collect::<Vec<_>>());
        assert_eq!(s.pending_input, (64..100u8).collect::<Vec<_>>());
        let text = serde_json::to_string(&s).unwrap();
        let s2: SerialPortState = serde_json::from_str(&text).unwrap();
        assert_eq!(s2, s);

        let (b, sink, irq) = port();
        b.restore(&s2).unwrap();
        assert_eq!(b.save(), s);
        // The source had acknowledged its interrupt (IIR reads "none"): none is raised.
        assert!(irq.eventfd().read().is_err());
        for (reg, want) in [(3, 0x1e), (7, 0x5a), (4, 0x0b), (1, 0x01)] {
            assert_eq!(read(&b, reg), want, "register {reg}");
        }
        // The rest of the input arrives in order, through the same flow control.
        let mut got = Vec::new();
        while got.len() < 99 {
            if read(&b, 5) & 1 == 0 {
                b.in_buffer_empty_event().read().unwrap();
                b.flush_input();
                continue;
            }
            got.push(read(&b, 0));
        }
        assert_eq!(got, (1..100u8).collect::<Vec<_>>());
        // Output still reaches the port's own writer.
        b.pio_write(PioAddress(0x3f8), 0, b"o");
        b.pio_write(PioAddress(0x3f8), 0, b"k");
        assert_eq!(&*sink.0.lock().unwrap(), b"ok");
    }

    #[test]
    fn oversized_state_is_refused_and_changes_nothing() {
        let (a, _, _) = port();
        a.queue_input(b"abc");
        let before = a.save();
        let mut s = before.clone();
        s.rx_fifo = vec![0; 65];
        let e = a.restore(&s).unwrap_err().to_string();
        assert!(e.contains("65 bytes") && e.contains("64"), "{e}");
        let mut s = before.clone();
        s.pending_input = vec![0; MAX_PENDING_INPUT + 1];
        assert!(matches!(
            a.restore(&s),
            Err(SerialPersistError::PendingOverflow { .. })
        ));
        assert_eq!(a.save(), before);
    }

    #[test]
    fn queued_input_behind_an_empty_fifo_raises_the_drained_event() {
        let (a, _, _) = port();
        let mut s = a.save();
        s.pending_input = b"xyz".to_vec();
        let (b, _, _) = port();
        b.restore(&s).unwrap();
        assert_eq!(b.in_buffer_empty_event().read().unwrap(), 1);
        assert_eq!(b.flush_input(), 0);
        assert_eq!(read(&b, 0), b'x');
    }
}
