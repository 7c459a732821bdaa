//! An i8042 keyboard controller with no keyboard behind it.
//!
//! It exists for two reasons: Linux resets the machine through it (`reboot=k`: command 0xFE
//! on port 0x64, or clearing bit 0 of the output port), which becomes a clean VMM exit; and a
//! guest that probes it must get sensible answers quickly. The status register reads 0 when
//! nothing is pending (input buffer empty, so `kb_wait()` returns at once; an answer of 0xff
//! would make the guest poll ~65,000 times, each poll a VM exit), and the usual controller
//! commands (read/write the command byte, self-test, interface test) are answered.

use std::sync::Mutex;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

use crate::trigger::EventFdTrigger;
use vm_superio::Trigger;

mod persist;
pub use persist::{I8042PersistError, I8042State};

/// Port 0x60: data.
pub const DATA_PORT: u16 = 0x60;
/// Port 0x64: status (read) and command (write).
pub const COMMAND_PORT: u16 = 0x64;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// Keyboard not inhibited (no key lock).
const STATUS_UNLOCKED: u8 = 0x10;
/// The output buffer holds a byte from the auxiliary (mouse) port.
const STATUS_AUX_DATA: u8 = 0x20;

/// Command-byte bits: interrupt on keyboard / auxiliary output.
const CTR_KBD_INT: u8 = 0x01;
const CTR_AUX_INT: u8 = 0x02;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xA7;
const CMD_ENABLE_AUX: u8 = 0xA8;
const CMD_TEST_AUX: u8 = 0xA9;
const CMD_SELF_TEST: u8 = 0xAA;
const CMD_TEST_KBD: u8 = 0xAB;
const CMD_DISABLE_KBD: u8 = 0xAD;
const CMD_ENABLE_KBD: u8 = 0xAE;
const CMD_READ_OUTPORT: u8 = 0xD0;
const CMD_WRITE_OUTPORT: u8 = 0xD1;
const CMD_WRITE_KBD_OUTBUF: u8 = 0xD2;
const CMD_WRITE_AUX_OUTBUF: u8 = 0xD3;
const CMD_RESET_CPU: u8 = 0xFE;

#[derive(Debug)]
struct State {
    status: u8,
    ctr: u8,
    outport: u8,
    output: Option<u8>,
    /// The command whose data byte the next write to port 0x60 is.
    awaiting: Option<u8>,
}

/// The controller; `reset` fires when the guest resets the machine through it, `kbd_irq`
/// and `aux_irq` (IRQ 1 and 12) when a byte arrives in the output buffer with the matching
/// interrupt enabled in the command byte (Linux's AUX probe waits for that interrupt).
pub struct I8042 {
    state: Mutex<State>,
    reset: EventFdTrigger,
    kbd_irq: Option<EventFdTrigger>,
    aux_irq: Option<EventFdTrigger>,
}

impl I8042 {
    /// A controller that triggers `reset` on a guest-requested CPU reset, with no
    /// interrupt lines.
    pub fn new(reset: EventFdTrigger) -> Self {
        I8042 {
            state: Mutex::new(State {
                status: STATUS_SYSTEM_FLAG | STATUS_UNLOCKED,
                ctr: 0x30,
                outport: 0x01,
                output: None,
                awaiting: None,
            }),
            reset,
            kbd_irq: None,
            aux_irq: None,
        }
    }

    /// Connects IRQ 1 (keyboard) and IRQ 12 (auxiliary port).
    pub fn with_irqs(mut self, kbd: EventFdTrigger, aux: EventFdTrigger) -> Self {
        self.kbd_irq = Some(kbd);
        self.aux_irq = Some(aux);
        self
    }

    /// Puts `v` in the output buffer, raising the port's interrupt if the guest enabled it.
    fn output(&self, s: &mut State, v: u8, aux: bool) {
        s.output = Some(v);
        s.status |= STATUS_OUTPUT_FULL;
        if aux {
            s.status |= STATUS_AUX_DATA;
        } else {
            s.status &= !STATUS_AUX_DATA;
        }
        let (enabled, irq) = if aux {
            (CTR_AUX_INT, &self.aux_irq)
        } else {
            (CTR_KBD_INT, &self.kbd_irq)
        };
        if s.ctr & enabled != 0 {
            if let Some(irq) = irq {
                if let Err(e) = irq.trigger() {
                    tracing::warn!("i8042: cannot raise interrupt: {e}");
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn do_reset(&self) {
        tracing::info!("guest reset the machine through the i8042");
        if let Err(e) = self.reset.trigger() {
            tracing::error!("i8042: cannot signal the reset: {e}");
        }
    }

    /// Reads register `port` (0x60 or 0x64).
    pub fn read(&self, port: u16) -> u8 {
        let mut s = self.lock();
        match port {
            DATA_PORT => {
                s.status &= !(STATUS_OUTPUT_FULL | STATUS_AUX_DATA);
                s.output.take().unwrap_or(0)
            }
            COMMAND_PORT => s.status,
            _ => 0xff,
        }
    }

    /// Writes register `port` (0x60 or 0x64).
    pub fn write(&self, port: u16, value: u8) {
        let mut s = self.lock();
        let respond = |s: &mut State, v: u8| self.output(s, v, false);
        match port {
            COMMAND_PORT => {
                s.status |= STATUS_LAST_WAS_COMMAND;
                s.awaiting = None;
                match value {
                    CMD_READ_CTR => {
                        let ctr = s.ctr;
                        respond(&mut s, ctr)
                    }
                    CMD_WRITE_CTR | CMD_WRITE_OUTPORT | CMD_WRITE_KBD_OUTBUF
                    | CMD_WRITE_AUX_OUTBUF => s.awaiting = Some(value),
                    CMD_SELF_TEST => respond(&mut s, 0x55),
                    CMD_TEST_KBD | CMD_TEST_AUX => respond(&mut s, 0x00),
                    CMD_READ_OUTPORT => {
                        let o = s.outport;
                        respond(&mut s, o)
                    }
                    CMD_DISABLE_KBD => s.ctr |= 0x10,
                    CMD_ENABLE_KBD => s.ctr &= !0x10,
                    CMD_DISABLE_AUX => s.ctr |= 0x20,
                    CMD_ENABLE_AUX => s.ctr &= !0x20,
                    CMD_RESET_CPU => {
                        drop(s);
                        self.do_reset();
                    }
                    // 0xF0-0xFF pulse output-port lines low for a moment; bit 0 is the reset line.
                    v if v >= 0xF0 && v & 1 == 0 => {
                        drop(s);
                        self.do_reset();
                    }
                    _ => {}
                }
            }
            DATA_PORT => {
                s.status &= !STATUS_LAST_WAS_COMMAND;
                match s.awaiting.take() {
                    Some(CMD_WRITE_CTR) => s.ctr = value,
                    // Loopback: the byte comes back as if the device had sent it.
                    Some(CMD_WRITE_KBD_OUTBUF) => self.output(&mut s, value, false),
                    Some(CMD_WRITE_AUX_OUTBUF) => self.output(&mut s, value, true),
                    Some(CMD_WRITE_OUTPORT) => {
                        s.outport = value;
                        if value & 1 == 0 {
                            drop(s);
                            self.do_reset();
                        }
                    }
                    // A byte for the (absent) keyboard: it does not answer.
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

impl DevicePio for I8042 {
    fn pio_read(&self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read(base.0.wrapping_add(offset).wrapping_add(i as u16));
        }
    }

    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            self.write(base.0.wrapping_add(offset).wrapping_add(i as u16), *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn dev() -> (I8042, EventFdTrigger) {
        let t = EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        (I8042::new(t.clone()), t)
    }

    #[test]
    fn idle_status_lets_kb_wait_return_at_once() {
        let (d, _) = dev();
        assert_eq!(
            d.read(COMMAND_PORT) & 0x03,
            0,
            "input and output buffers must read empty"
        );
    }

    #[test]
    fn reset_command_fires_the_reset_event() {
        let (d, t) = dev();
        assert!(t.eventfd().read().is_err(), "no reset before the command");
        d.write(COMMAND_PORT, 0xFE);
        assert_eq!(t.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn pulsing_the_reset_line_or_writing_the_output_port_resets() {
        let (d, t) = dev();
        d.write(COMMAND_PORT, 0xF1); // pulse lines 1-3 only: no reset
        assert!(t.eventfd().read().is_err());
        d.write(COMMAND_PORT, 0xF0);
        assert_eq!(t.eventfd().read().unwrap(), 1);
        d.write(COMMAND_PORT, CMD_WRITE_OUTPORT);
        d.write(DATA_PORT, 0x02);
        assert_eq!(t.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn aux_loopback_echoes_and_interrupts_when_enabled() {
        let (d, _) = dev();
        let aux = EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let kbd = EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let d = I8042 {
            kbd_irq: Some(kbd.clone()),
            aux_irq: Some(aux.clone()),
            ..d
        };
        d.write(COMMAND_PORT, CMD_WRITE_AUX_OUTBUF);
        d.write(DATA_PORT, 0x5a);
        assert_eq!(
            d.read(COMMAND_PORT) & (STATUS_OUTPUT_FULL | STATUS_AUX_DATA),
            STATUS_OUTPUT_FULL | STATUS_AUX_DATA
        );
        assert_eq!(d.read(DATA_PORT), 0x5a);
        assert!(
            aux.eventfd().read().is_err(),
            "AUX interrupt disabled in the command byte"
        );
        d.write(COMMAND_PORT, CMD_WRITE_CTR);
        d.write(DATA_PORT, CTR_AUX_INT);
        d.write(COMMAND_PORT, CMD_WRITE_AUX_OUTBUF);
        d.write(DATA_PORT, 0xa5);
        assert_eq!(aux.eventfd().read().unwrap(), 1);
        assert!(kbd.eventfd().read().is_err());
        assert_eq!(d.read(DATA_PORT), 0xa5);
        assert_eq!(
            d.read(COMMAND_PORT) & STATUS_UNLOCKED,
            STATUS_UNLOCKED,
            "no key lock"
        );
    }

    #[test]
    fn command_byte_round_trips_and_self_test_passes() {
        let (d, t) = dev();
        d.write(COMMAND_PORT, CMD_WRITE_CTR);
        d.write(DATA_PORT, 0x47);
        d.write(COMMAND_PORT, CMD_READ_CTR);
        assert_eq!(
            d.read(COMMAND_PORT) & STATUS_OUTPUT_FULL,
            STATUS_OUTPUT_FULL
        );
        assert_eq!(d.read(DATA_PORT), 0x47);
        assert_eq!(d.read(COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        d.write(COMMAND_PORT, CMD_SELF_TEST);
        assert_eq!(d.read(DATA_PORT), 0x55);
        assert!(
            t.eventfd().read().is_err(),
            "no reset from ordinary commands"
        );
    }
}
