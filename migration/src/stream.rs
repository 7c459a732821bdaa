//! Writing and reading a stream over any `Write` / `Read`, front to back.

use std::io::{self, Read, Write};

use crate::{
    Control, DevicePhase, DeviceState, Error, RamPagesBuilder, Result, Section, SectionType,
    VmConfig, FORMAT_VERSION, HEADER_LEN, KNOWN_FLAGS, MAGIC, MAX_CONFIG_LEN, MAX_SECTION_LEN,
    SECTION_CRC_LEN, SECTION_HEADER_LEN,
};

/// Writes a stream. Wrap a file or socket in a `BufWriter`: each section is written as a few
/// small writes (header, payload pieces, CRC).
///
/// After any failed write the writer is poisoned (the stream on the other side is cut in a
/// section) and every later call fails with [`Error::Poisoned`].
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    w: W,
    sections: u64,
    bytes: u64,
    poisoned: bool,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the stream header with `flags` (see [`crate::FLAG_LIVE`]) and returns the
    /// writer for the sections.
    pub fn write_header(w: W, flags: u32) -> Result<Self> {
        if flags & !KNOWN_FLAGS != 0 {
            return Err(Error::UnknownFlags {
                flags,
                known: KNOWN_FLAGS,
            });
        }
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&flags.to_le_bytes());
        let crc = crc32c::crc32c(&h[0..16]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        let mut s = StreamWriter {
            w,
            sections: 0,
            bytes: 0,
            poisoned: false,
        };
        s.put(&h)?;
        Ok(s)
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        if let Err(e) = self.w.write_all(b) {
            self.poisoned = true;
            return Err(Error::io("writing the stream", e));
        }
        self.bytes += b.len() as u64;
        Ok(())
    }

    /// Writes one section whose payload is the concatenation of `parts`, so that callers
    /// can frame a large opaque blob without copying it.
    fn write_parts(&mut self, ty: SectionType, parts: &[&[u8]]) -> Result<()> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if len > MAX_SECTION_LEN {
            return Err(Error::TooLarge {
                ty,
                what: format!("payload of {len} bytes exceeds the maximum {MAX_SECTION_LEN}"),
            });
        }
        let mut head = [0u8; SECTION_HEADER_LEN];
        head[0..4].copy_from_slice(&(ty as u32).to_le_bytes());
        head[4..12].copy_from_slice(&len.to_le_bytes());
        let mut crc = crc32c::crc32c(&head);
        self.put(&head)?;
        for p in parts {
            crc = crc32c::crc32c_append(crc, p);
            self.put(p)?;
        }
        self.put(&crc.to_le_bytes())?;
        self.sections += 1;
        Ok(())
    }

    /// Writes a section of type `ty` with `payload` as is. The payload must follow the
    /// type's layout (see the crate docs); the typed methods below build it for you. The
    /// end section is written by [`StreamWriter::finish`] only, since it carries the
    /// section count.
    pub fn write_section(&mut self, ty: SectionType, payload: &[u8]) -> Result<()> {
        if ty == SectionType::End {
            return Err(Error::Misuse(
                "the end-of-stream section is written by finish()",
            ));
        }
        self.write_parts(ty, &[payload])
    }

    /// Writes the VM config.
    pub fn write_vm_config(&mut self, config: &VmConfig) -> Result<()> {
        let p = config.encode()?;
        self.write_parts(SectionType::VmConfig, &[&p])
    }

    /// Writes the pages collected in `pages` (the builder is left as is: clear it to reuse).
    pub fn write_ram_pages(&mut self, pages: &RamPagesBuilder) -> Result<()> {
        self.write_parts(SectionType::RamPages, &[pages.payload()])
    }

    /// Writes vCPU `id`'s opaque state.
    pub fn write_vcpu(&mut self, id: u32, state: &[u8]) -> Result<()> {
        self.write_parts(SectionType::Vcpu, &[&id.to_le_bytes(), state])
    }

    /// Writes the irqchip's opaque state.
    pub fn write_irqchip(&mut self, state: &[u8]) -> Result<()> {
        self.write_parts(SectionType::Irqchip, &[state])
    }

    /// Writes device `id`'s state (or a chunk of it) taken in `phase`.
    pub fn write_device(&mut self, id: &str, phase: DevicePhase, data: &[u8]) -> Result<()> {
        let head = DeviceState::encode_header(id, phase)?;
        self.write_parts(SectionType::Device, &[&head, data])
    }

    /// Writes a live-migration protocol message.
    pub fn write_control(&mut self, msg: &Control) -> Result<()> {
        let p = msg.encode()?;
        self.write_parts(SectionType::Control, &[&p])
    }

    /// Writes a decoded section back out (e.g. to relay or re-record a stream).
    pub fn write(&mut self, section: &Section) -> Result<()> {
        match section {
            Section::End => Err(Error::Misuse(
                "the end-of-stream section is written by finish()",
            )),
            Section::VmConfig(c) => self.write_vm_config(c),
            Section::RamPages(p) => self.write_parts(SectionType::RamPages, &[p.payload()]),
            Section::Vcpu { id, state } => self.write_vcpu(*id, state),
            Section::Irqchip(s) => self.write_irqchip(s),
            Section::Device(d) => self.write_device(&d.id, d.phase, &d.data),
            Section::Control(c) => self.write_control(c),
        }
    }

    /// Flushes the underlying writer (e.g. after a control message the peer waits for).
    pub fn flush(&mut self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        self.w.flush().map_err(|e| {
            self.poisoned = true;
            Error::io("flushing the stream", e)
        })
    }

    /// Writes the end-of-stream section, flushes, and returns the underlying writer.
    pub fn finish(mut self) -> Result<W> {
        let count = self.sections;
        self.write_parts(SectionType::End, &[&count.to_le_bytes()])?;
        self.flush()?;
        Ok(self.w)
    }

    /// Bytes written so far, header included (for progress and bandwidth).
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Sections written so far.
    pub fn sections_written(&self) -> u64 {
        self.sections
    }

    /// The underlying writer (e.g. to set socket options).
    pub fn get_ref(&self) -> &W {
        &self.w
    }
}

/// Reads a stream, one section at a time as it arrives.
#[derive(Debug)]
pub struct StreamReader<R: Read> {
    r: R,
    flags: u32,
    sections: u64,
    bytes: u64,
    ended: bool,
}

/// Reads into `buf` until it is full or the input ends; returns the bytes read. Retries
/// interrupted reads, since a signal (e.g. the vCPU kick) must not look like a cut stream.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// First size of a payload buffer; it then doubles as data arrives, up to the section's
/// length, so memory follows the bytes received rather than the length field.
const INITIAL_PAYLOAD_BUF: usize = 64 * 1024;

impl<R: Read> StreamReader<R> {
    /// Reads and checks the stream header: magic, then version, then CRC, then flags.
    pub fn read_header(mut r: R) -> Result<Self> {
        let mut h = [0u8; HEADER_LEN];
        let got =
            read_full(&mut r, &mut h).map_err(|e| Error::io("reading the stream header", e))?;
        // Report a wrong magic or version even on a short input: "not a stream" or "another
        // version" says more than "truncated".
        if got >= 8 && h[0..8] != MAGIC {
            let mut found = [0u8; 8];
            found.copy_from_slice(&h[0..8]);
            return Err(Error::BadMagic {
                found,
                expected: MAGIC,
            });
        }
        let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if got >= 12 && version != FORMAT_VERSION {
            return Err(Error::Version {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if got < HEADER_LEN {
            return Err(Error::TruncatedHeader {
                got,
                want: HEADER_LEN,
            });
        }
        let expected = crc32c::crc32c(&h[0..16]);
        let found = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
        if expected != found {
            return Err(Error::HeaderChecksum { expected, found });
        }
        let flags = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(Error::UnknownFlags {
                flags,
                known: KNOWN_FLAGS,
            });
        }
        Ok(StreamReader {
            r,
            flags,
            sections: 0,
            bytes: HEADER_LEN as u64,
            ended: false,
        })
    }

    /// The header's flags.
    pub fn flags(&self) -> u32 {
        self.flags
    }

    /// Reads `len` payload bytes; returns them and whether all arrived.
    fn read_payload(&mut self, len: usize) -> io::Result<(Vec<u8>, bool)> {
        let mut buf = Vec::new();
        let mut filled = 0;
        while filled < len {
            if filled == buf.len() {
                let grow = buf.len().max(INITIAL_PAYLOAD_BUF).min(len - buf.len());
                // Exact, so the buffer never exceeds the (checked) length.
                buf.reserve_exact(grow);
                buf.resize(buf.len() + grow, 0);
            }
            match self.r.read(&mut buf[filled..]) {
                Ok(0) => {
                    buf.truncate(filled);
                    return Ok((buf, false));
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((buf, true))
    }

    /// Reads, checks and decodes the next section. After the end section has been returned
    /// (as [`Section::End`]) every call fails with [`Error::PastEnd`].
    pub fn next_section(&mut self) -> Result<Section> {
        self.section_within(None, MAX_SECTION_LEN)
    }

    /// Reads the stream's first section, which must be the VM's config: its type and a
    /// length of at most [`MAX_CONFIG_LEN`] are checked from the section's header, before
    /// any payload is read. Until this section is read nothing has vouched for the sender
    /// (an unauthenticated `tcp:` connection), so it may not make the reader take in more
    /// than a config's worth of bytes.
    pub fn read_config(&mut self) -> Result<VmConfig> {
        match self.section_within(Some(SectionType::VmConfig), MAX_CONFIG_LEN)? {
            Section::VmConfig(c) => Ok(c),
            // section_within checked the type.
            other => Err(Error::UnexpectedSection {
                section: self.sections - 1,
                ty: other.section_type() as u32,
                expected: SectionType::VmConfig,
            }),
        }
    }

    /// The next section, whose length must be at most `max` and, if `expect` is given, whose
    /// type must be that one: both judged from the section's header.
    fn section_within(&mut self, expect: Option<SectionType>, max: u64) -> Result<Section> {
        if self.ended {
            return Err(Error::PastEnd);
        }
        let index = self.sections;
        let io = |e| Error::io("reading a section", e);

        let mut head = [0u8; SECTION_HEADER_LEN];
        let got = read_full(&mut self.r, &mut head).map_err(io)?;
        self.bytes += got as u64;
        if got == 0 {
            return Err(Error::MissingEnd { sections: index });
        }
        if got < SECTION_HEADER_LEN {
            return Err(Error::Truncated {
                section: index,
                part: "header",
                got: got as u64,
                want: SECTION_HEADER_LEN as u64,
            });
        }
        let raw_ty = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let mut l = [0u8; 8];
        l.copy_from_slice(&head[4..12]);
        let len = u64::from_le_bytes(l);
        if let Some(expected) = expect {
            if raw_ty != expected as u32 {
                return Err(Error::UnexpectedSection {
                    section: index,
                    ty: raw_ty,
                    expected,
                });
            }
        }
        // Checked before anything is allocated or read.
        if len > max {
            return Err(Error::SectionTooLong {
                section: index,
                ty: raw_ty,
                len,
                max,
            });
        }
        // len <= 1 GiB fits usize on every target this VMM runs on (64-bit).
        let ulen = usize::try_from(len).map_err(|_| Error::SectionTooLong {
            section: index,
            ty: raw_ty,
            len,
            max,
        })?;
        let (payload, complete) = self.read_payload(ulen).map_err(io)?;
        self.bytes += payload.len() as u64;
        if !complete {
            return Err(Error::Truncated {
                section: index,
                part: "payload",
                got: payload.len() as u64,
                want: len,
            });
        }
        let mut c = [0u8; SECTION_CRC_LEN];
        let got = read_full(&mut self.r, &mut c).map_err(io)?;
        self.bytes += got as u64;
        if got < SECTION_CRC_LEN {
            return Err(Error::Truncated {
                section: index,
                part: "checksum",
                got: got as u64,
                want: SECTION_CRC_LEN as u64,
            });
        }
        let found = u32::from_le_bytes(c);
        let expected = crc32c::crc32c_append(crc32c::crc32c(&head), &payload);
        if expected != found {
            return Err(Error::Checksum {
                section: index,
                ty: raw_ty,
                expected,
                found,
            });
        }
        // The type is judged after the CRC, so that a corrupted type field reads as
        // corruption and "unknown type" means a writer with types this version lacks.
        let ty = SectionType::from_u32(raw_ty).ok_or(Error::UnknownSectionType {
            section: index,
            ty: raw_ty,
        })?;
        if ty == SectionType::End {
            if payload.len() != 8 {
                return Err(Error::Malformed {
                    section: index,
                    ty,
                    what: format!("{} bytes, expected 8 (the section count)", payload.len()),
                });
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&payload);
            let expected = u64::from_le_bytes(n);
            if expected != index {
                return Err(Error::SectionCount {
                    expected,
                    found: index,
                });
            }
            self.ended = true;
            self.sections += 1;
            return Ok(Section::End);
        }
        let section = Section::decode(index, ty, payload)?;
        self.sections += 1;
        Ok(section)
    }

    /// Whether the end section has been read.
    pub fn is_finished(&self) -> bool {
        self.ended
    }

    /// Sections read so far (the end section included once read).
    pub fn sections_read(&self) -> u64 {
        self.sections
    }

    /// Bytes read so far, header included.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// For a stream that must end with its end section (a snapshot file): checks that the
    /// end section was read and nothing follows it, and returns the reader. Do not call it on
    /// a socket that stays open for the reply.
    pub fn finish(mut self) -> Result<R> {
        if !self.ended {
            return Err(Error::MissingEnd {
                sections: self.sections,
            });
        }
        let mut b = [0u8; 1];
        let got = read_full(&mut self.r, &mut b)
            .map_err(|e| Error::io("checking the end of the stream", e))?;
        if got != 0 {
            return Err(Error::TrailingData);
        }
        Ok(self.r)
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.r
    }
}
