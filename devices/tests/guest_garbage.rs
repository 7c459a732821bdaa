//! A guest writing garbage to every device register: no panic, and what must not change does
//! not change. Deterministic pseudo-random accesses (a fixed-seed xorshift), so a failure
//! reproduces.

use std::sync::{Arc, Mutex};

use devices::legacy::{SerialPort, I8042};
use devices::pci::{HostBridge, PciRoot};
use devices::trigger::EventFdTrigger;
use devices::Bus;
use vmm_sys_util::eventfd::EventFd;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn trigger() -> EventFdTrigger {
    EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
}

#[test]
fn random_port_io_over_all_devices() {
    let bus = Bus::new();
    let pci = Arc::new(PciRoot::new());
    pci.add(0, 0, Arc::new(Mutex::new(HostBridge::new())))
        .unwrap();
    bus.register_pio("pci", 0xcf8, 8, pci).unwrap();
    bus.register_pio(
        "serial",
        0x3f8,
        8,
        Arc::new(SerialPort::new(trigger(), Box::new(std::io::sink())).unwrap()),
    )
    .unwrap();
    let reset = trigger();
    let i8042 = Arc::new(I8042::new(reset.clone()).with_irqs(trigger(), trigger()));
    bus.register_pio("i8042-data", 0x60, 1, i8042.clone())
        .unwrap();
    bus.register_pio("i8042-cmd", 0x64, 1, i8042).unwrap();

    let ports: Vec<u16> = (0x3f8..0x400)
        .chain(0xcf8..0xd00)
        .chain([0x60, 0x64, 0x80, 0xffff])
        .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..200_000 {
        let r = rng.next();
        let port = ports[(r % ports.len() as u64) as usize];
        let len = [1usize, 2, 4][((r >> 16) % 3) as usize];
        let value = (r >> 32).to_le_bytes();
        if r & (1 << 20) != 0 {
            bus.pio_write(port, &value[..len]);
        } else {
            let mut buf = [0u8; 4];
            bus.pio_read(port, &mut buf[..len]);
        }
    }

    // The host bridge's identity survived every write.
    bus.pio_write(0xcf8, &0x8000_0000u32.to_le_bytes());
    let mut id = [0u8; 4];
    bus.pio_read(0xcfc, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x0d57_8086);
}
