//! A guest memory for the ring and tracker unit tests: a flat buffer from address 0, with
//! helpers that lay out descriptors and ring entries.

use std::sync::Mutex;

use crate::attach::GuestMemory;

/// `len` bytes of guest RAM at 0.
pub struct Mem(Mutex<Vec<u8>>);

impl GuestMemory for Mem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let m = self.0.lock().unwrap();
        let s = usize::try_from(gpa).map_err(std::io::Error::other)?;
        let end = s
            .checked_add(buf.len())
            .ok_or_else(|| std::io::Error::other("outside"))?;
        let src = m
            .get(s..end)
            .ok_or_else(|| std::io::Error::other("outside"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl Mem {
    pub fn new(len: usize) -> Self {
        Mem(Mutex::new(vec![0; len]))
    }

    pub fn put(&self, gpa: u64, b: &[u8]) {
        self.0.lock().unwrap()[gpa as usize..gpa as usize + b.len()].copy_from_slice(b);
    }

    /// Descriptor `i` of the table at `table`.
    pub fn desc(&self, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = Vec::new();
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&next.to_le_bytes());
        self.put(table + 16 * i, &b);
    }
}
