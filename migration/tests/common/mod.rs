//! Helpers shared by the integration tests.
#![allow(dead_code)]

use migration::{
    Control, DevicePhase, RamPagesBuilder, Section, StreamReader, StreamWriter, VmConfig,
    FLAG_LIVE, PAGE_SIZE,
};

/// splitmix64: a seeded PRNG, so every failure reproduces.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

pub fn config() -> VmConfig {
    VmConfig {
        mem_size: 512 << 20,
        vcpus: 2,
        devices: vec!["serial0".into(), "i8042".into(), "vf0".into()],
    }
}

/// A small stream with every section type (End by finish()).
pub fn sample_stream() -> Vec<u8> {
    let mut w = StreamWriter::write_header(Vec::new(), FLAG_LIVE).unwrap();
    w.write_vm_config(&config()).unwrap();
    w.write_control(&Control::IterationBegin { iteration: 0 })
        .unwrap();
    let mut ram = RamPagesBuilder::new();
    let mut page = vec![0u8; PAGE_SIZE];
    page[..5].copy_from_slice(b"hello");
    ram.push_page(0x1000, &page).unwrap();
    ram.push_zero_pages(0x2000, 2).unwrap();
    w.write_ram_pages(&ram).unwrap();
    w.write_device("vf0", DevicePhase::PreCopy, b"precopy")
        .unwrap();
    w.write_control(&Control::IterationEnd { iteration: 0 })
        .unwrap();
    w.write_control(&Control::StopAndCopy).unwrap();
    w.write_vcpu(0, b"cpu0").unwrap();
    w.write_vcpu(1, b"cpu1").unwrap();
    w.write_irqchip(b"pic").unwrap();
    w.write_device("legacy/serial0", DevicePhase::Final, b"uart")
        .unwrap();
    w.write_device("legacy/i8042", DevicePhase::Final, b"")
        .unwrap();
    w.write_device("vf0", DevicePhase::Final, b"final").unwrap();
    w.write_control(&Control::Abort {
        reason: "just testing".into(),
    })
    .unwrap();
    w.write_control(&Control::Complete).unwrap();
    w.finish().unwrap()
}

/// Reads a whole stream as a file would be read: all sections, then nothing after the end.
pub fn read_all(bytes: &[u8]) -> migration::Result<Vec<Section>> {
    let mut r = StreamReader::read_header(bytes)?;
    let mut out = Vec::new();
    loop {
        let s = r.next_section()?;
        let end = s == Section::End;
        out.push(s);
        if end {
            break;
        }
    }
    r.finish()?;
    Ok(out)
}
