//! Legacy PC devices: 16550 serial ports and the i8042 controller.

pub mod i8042;
pub mod serial;

pub use i8042::{I8042PersistError, I8042State, I8042};
pub use serial::{SerialPersistError, SerialPort, SerialPortState};
