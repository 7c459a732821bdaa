//! Saving and restoring the i8042 controller: status, command byte, output port, the byte
//! in the output buffer and a command still waiting for its data byte.

use serde::{Deserialize, Serialize};

use crate::persist::Persist;

use super::{
    State, CMD_WRITE_AUX_OUTBUF, CMD_WRITE_CTR, CMD_WRITE_KBD_OUTBUF, CMD_WRITE_OUTPORT, I8042,
    STATUS_OUTPUT_FULL,
};

/// The saved state of an [`I8042`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct I8042State {
    /// Status register (port 0x64).
    pub status: u8,
    /// Controller command byte.
    pub command_byte: u8,
    /// Output port.
    pub output_port: u8,
    /// The byte in the output buffer, waiting for the guest to read port 0x60.
    pub output_buffer: Option<u8>,
    /// The command whose data byte the next write to port 0x60 is.
    pub awaiting_data_for: Option<u8>,
}

/// Why an i8042 state could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum I8042PersistError {
    /// The pending command is not one that takes a data byte.
    #[error("the saved state waits for the data byte of command {0:#04x}, which takes none")]
    BadPendingCommand(u8),
    /// The status register and the output buffer disagree.
    #[error("the saved status {status:#04x} says the output buffer is {}, but it {}", if *status & STATUS_OUTPUT_FULL != 0 { "full" } else { "empty" }, if *has_byte { "holds a byte" } else { "holds none" })]
    Inconsistent {
        /// The status register.
        status: u8,
        /// Whether an output byte was saved.
        has_byte: bool,
    },
}

impl Persist for I8042 {
    type State = I8042State;
    type Error = I8042PersistError;

    /// The controller's registers.
    fn save(&self) -> I8042State {
        let s = self.lock();
        I8042State {
            status: s.status,
            command_byte: s.ctr,
            output_port: s.outport,
            output_buffer: s.output,
            awaiting_data_for: s.awaiting,
        }
    }

    /// Replaces the registers with `state`. No interrupt is raised: one raised before the
    /// save is part of the interrupt controller's state. On an error nothing is changed.
    fn restore(&self, state: &I8042State) -> Result<(), I8042PersistError> {
        if let Some(cmd) = state.awaiting_data_for {
            if ![
                CMD_WRITE_CTR,
                CMD_WRITE_OUTPORT,
                CMD_WRITE_KBD_OUTBUF,
                CMD_WRITE_AUX_OUTBUF,
            ]
            .contains(&cmd)
            {
                return Err(I8042PersistError::BadPendingCommand(cmd));
            }
        }
        let full = state.status & STATUS_OUTPUT_FULL != 0;
        if full != state.output_buffer.is_some() {
            return Err(I8042PersistError::Inconsistent {
                status: state.status,
                has_byte: state.output_buffer.is_some(),
            });
        }
        *self.lock() = State {
            status: state.status,
            ctr: state.command_byte,
            outport: state.output_port,
            output: state.output_buffer,
            awaiting: state.awaiting_data_for,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EventFd;

    use super::super::{COMMAND_PORT, DATA_PORT, STATUS_AUX_DATA};
    use super::*;
    use crate::trigger::EventFdTrigger;

    fn dev() -> I8042 {
        let t = || EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        I8042::new(t()).with_irqs(t(), t())
    }

    #[test]
    fn registers_and_output_byte_survive() {
        let a = dev();
        a.write(COMMAND_PORT, CMD_WRITE_CTR);
        a.write(DATA_PORT, 0x47);
        a.write(COMMAND_PORT, CMD_WRITE_AUX_OUTBUF);
        a.write(DATA_PORT, 0x5a); // an AUX byte waits in the output buffer
        a.write(COMMAND_PORT, CMD_WRITE_OUTPORT); // and a command waits for its data
        let s = a.save();
        assert_eq!(s.output_buffer, Some(0x5a));
        assert_eq!(s.awaiting_data_for, Some(CMD_WRITE_OUTPORT));
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<I8042State>(&text).unwrap(), s);

        let b = dev();
        b.restore(&s).unwrap();
        assert_eq!(b.save(), s);
        assert_eq!(
            b.read(COMMAND_PORT) & (STATUS_OUTPUT_FULL | STATUS_AUX_DATA),
            STATUS_OUTPUT_FULL | STATUS_AUX_DATA
        );
        assert_eq!(b.read(DATA_PORT), 0x5a);
        b.write(DATA_PORT, 0x03); // the pending output-port write completes
        b.write(COMMAND_PORT, 0x20);
        assert_eq!(b.read(DATA_PORT), 0x47);
        assert_eq!(b.save().output_port, 0x03);
    }

    #[test]
    fn bad_states_are_refused_and_change_nothing() {
        let a = dev();
        let before = a.save();
        let mut s = before.clone();
        s.awaiting_data_for = Some(0xaa);
        let e = a.restore(&s).unwrap_err().to_string();
        assert!(e.contains("0xaa"), "{e}");
        let mut s = before.clone();
        s.output_buffer = Some(1);
        let e = a.restore(&s).unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains("holds a byte"), "{e}");
        assert_eq!(a.save(), before);
    }
}
