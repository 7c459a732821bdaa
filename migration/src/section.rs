//! Section types and the payload layouts this crate owns (config, device, control).

use std::collections::HashSet;
use std::fmt;

use crate::{Error, RamPages, Result, MAX_CONFIG_LEN, MAX_ID_LEN, MAX_REASON_LEN};

/// The type of a section. The numbers are the wire values: never reuse or renumber one,
/// add new types at the end (with a format version bump, since old readers reject them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum SectionType {
    /// The last section of a stream; payload: u64 count of sections before it.
    End = 1,
    /// The VM's shape ([`VmConfig`]), checked by the receiver before it restores anything.
    VmConfig = 2,
    /// Guest RAM pages ([`RamPages`]).
    RamPages = 3,
    /// One vCPU's state: u32 index, then opaque bytes (registers, special registers,
    /// FPU/XSAVE, MSRs, LAPIC, MP state, events, XCRs, debug registers).
    Vcpu = 4,
    /// The VM-wide KVM state (PIC, IOAPIC, PIT, clock): opaque bytes.
    Irqchip = 5,
    // 6 and 7 (PIT and clock sections, format 3) are retired: nothing wrote them.
    /// A device's state or a chunk of it ([`DeviceState`]).
    Device = 8,
    /// A live-migration protocol message ([`Control`]).
    Control = 9,
}

impl SectionType {
    /// Every section type, in wire order.
    pub const ALL: [SectionType; 7] = [
        SectionType::End,
        SectionType::VmConfig,
        SectionType::RamPages,
        SectionType::Vcpu,
        SectionType::Irqchip,
        SectionType::Device,
        SectionType::Control,
    ];

    /// The type with wire value `v`, if this version knows it.
    pub fn from_u32(v: u32) -> Option<SectionType> {
        SectionType::ALL.into_iter().find(|t| *t as u32 == v)
    }
}

impl fmt::Display for SectionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            SectionType::End => "end-of-stream",
            SectionType::VmConfig => "vm-config",
            SectionType::RamPages => "ram-pages",
            SectionType::Vcpu => "vcpu",
            SectionType::Irqchip => "irqchip",
            SectionType::Device => "device",
            SectionType::Control => "control",
        };
        f.write_str(name)
    }
}

/// A decoded section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Section {
    /// End of stream (already checked against the number of sections read).
    End,
    /// The VM's shape.
    VmConfig(VmConfig),
    /// Guest RAM pages.
    RamPages(RamPages),
    /// One vCPU's state.
    Vcpu {
        /// vCPU index.
        id: u32,
        /// Opaque state, as the vmm serialised it.
        state: Vec<u8>,
    },
    /// Irqchip state (opaque).
    Irqchip(Vec<u8>),
    /// A device's state.
    Device(DeviceState),
    /// A live-migration protocol message.
    Control(Control),
}

impl Section {
    /// The section's type.
    pub fn section_type(&self) -> SectionType {
        match self {
            Section::End => SectionType::End,
            Section::VmConfig(_) => SectionType::VmConfig,
            Section::RamPages(_) => SectionType::RamPages,
            Section::Vcpu { .. } => SectionType::Vcpu,
            Section::Irqchip(_) => SectionType::Irqchip,
            Section::Device(_) => SectionType::Device,
            Section::Control(_) => SectionType::Control,
        }
    }

    /// Decodes the payload of section number `index` of type `ty`. The end section is not
    /// decoded here (its count is the reader's business) and yields [`Section::End`] after
    /// a length check.
    pub fn decode(index: u64, ty: SectionType, payload: Vec<u8>) -> Result<Section> {
        let malformed = |what: String| Error::Malformed {
            section: index,
            ty,
            what,
        };
        Ok(match ty {
            SectionType::End => {
                if payload.len() != 8 {
                    return Err(malformed(format!(
                        "{} bytes, expected 8 (the section count)",
                        payload.len()
                    )));
                }
                Section::End
            }
            SectionType::VmConfig => {
                Section::VmConfig(VmConfig::decode(&payload).map_err(malformed)?)
            }
            SectionType::RamPages => {
                Section::RamPages(RamPages::parse(payload).map_err(malformed)?)
            }
            SectionType::Vcpu => {
                if payload.len() < 4 {
                    return Err(malformed(format!(
                        "{} bytes, too short for the vCPU index",
                        payload.len()
                    )));
                }
                let id = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
                let mut state = payload;
                // Reuse the payload allocation: the state is all of it but the index.
                state.drain(..4);
                Section::Vcpu { id, state }
            }
            SectionType::Irqchip => Section::Irqchip(payload),
            SectionType::Device => {
                Section::Device(DeviceState::decode(payload).map_err(malformed)?)
            }
            SectionType::Control => Section::Control(Control::decode(&payload).map_err(malformed)?),
        })
    }
}

/// Reads fields off a payload; every method fails (with what was missing) rather than
/// panics on short input.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        if self.remaining() < n {
            return Err(format!(
                "{what} needs {n} bytes at offset {} but {} remain",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, what: &str) -> std::result::Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &str) -> std::result::Result<u16, String> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A u16-length-prefixed UTF-8 string of at most `max` bytes.
    pub(crate) fn string(&mut self, max: usize, what: &str) -> std::result::Result<String, String> {
        let len = usize::from(self.u16(what)?);
        if len > max {
            return Err(format!(
                "{what} is {len} bytes, more than the maximum {max}"
            ));
        }
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    pub(crate) fn finish(&self, what: &str) -> std::result::Result<(), String> {
        if self.remaining() != 0 {
            return Err(format!(
                "{} bytes left over after the {what}",
                self.remaining()
            ));
        }
        Ok(())
    }
}

/// Appends a u16-length-prefixed string, checking `max` so a writer never produces what a
/// reader rejects.
fn put_string(out: &mut Vec<u8>, s: &str, max: usize, ty: SectionType, what: &str) -> Result<()> {
    if s.len() > max {
        return Err(Error::TooLarge {
            ty,
            what: format!("{what} is {} bytes, more than the maximum {max}", s.len()),
        });
    }
    // max <= u16::MAX is a compile-time fact of MAX_ID_LEN / MAX_REASON_LEN.
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// The shape of the VM a stream carries, sent first so that the receiver can refuse a
/// stream it cannot restore before any state arrives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The id of every device whose state the stream carries.
    pub devices: Vec<String>,
}

impl VmConfig {
    /// The payload bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let ty = SectionType::VmConfig;
        let mut out =
            Vec::with_capacity(16 + self.devices.iter().map(|d| 2 + d.len()).sum::<usize>());
        out.extend_from_slice(&self.mem_size.to_le_bytes());
        out.extend_from_slice(&self.vcpus.to_le_bytes());
        let n = u32::try_from(self.devices.len()).map_err(|_| Error::TooLarge {
            ty,
            what: format!("{} devices", self.devices.len()),
        })?;
        out.extend_from_slice(&n.to_le_bytes());
        let mut seen = HashSet::new();
        for d in &self.devices {
            if !seen.insert(d.as_str()) {
                // The receiver rejects duplicates (they make restore ambiguous); refuse early.
                return Err(Error::TooLarge {
                    ty,
                    what: format!("device id {d:?} appears twice"),
                });
            }
            put_string(&mut out, d, MAX_ID_LEN, ty, "device id")?;
        }
        if out.len() as u64 > MAX_CONFIG_LEN {
            // The reader refuses it from the section header (StreamReader::read_config).
            return Err(Error::TooLarge {
                ty,
                what: format!(
                    "{} bytes for {} devices exceed the maximum {MAX_CONFIG_LEN}",
                    out.len(),
                    self.devices.len()
                ),
            });
        }
        Ok(out)
    }

    /// Parses a payload.
    pub fn decode(payload: &[u8]) -> std::result::Result<VmConfig, String> {
        let mut c = Cursor::new(payload);
        let mem_size = c.u64("memory size")?;
        let vcpus = c.u32("vCPU count")?;
        let n = c.u32("device count")?;
        // Each id takes at least its 2-byte length, so the payload bounds the allocation
        // whatever the count says.
        let mut devices = Vec::with_capacity((n as usize).min(c.remaining() / 2));
        let mut seen = HashSet::new();
        for i in 0..n {
            let id = c.string(MAX_ID_LEN, &format!("device id {i}"))?;
            if !seen.insert(id.clone()) {
                return Err(format!("device id {id:?} appears twice"));
            }
            devices.push(id);
        }
        c.finish("device list")?;
        Ok(VmConfig {
            mem_size,
            vcpus,
            devices,
        })
    }

    /// Checks that a VM configured as `local` can take the state of the VM described by
    /// `self` (the stream's config): same memory, same vCPUs, the same set of device ids.
    pub fn check_compatible(&self, local: &VmConfig) -> Result<()> {
        if self.mem_size != local.mem_size {
            return Err(Error::MemorySizeMismatch {
                stream: self.mem_size,
                local: local.mem_size,
            });
        }
        if self.vcpus != local.vcpus {
            return Err(Error::VcpuCountMismatch {
                stream: self.vcpus,
                local: local.vcpus,
            });
        }
        if let Some(d) = self.devices.iter().find(|d| !local.devices.contains(d)) {
            return Err(Error::UnknownDevice(d.clone()));
        }
        if let Some(d) = local.devices.iter().find(|d| !self.devices.contains(d)) {
            return Err(Error::MissingDevice(d.clone()));
        }
        Ok(())
    }
}

/// When a device's state was taken, which tells the receiver how to apply it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DevicePhase {
    /// Taken while the VM ran (pre-copy, e.g. VFIO PRE_COPY data); more follows.
    PreCopy = 0,
    /// Taken with the VM stopped (a snapshot, or stop-and-copy).
    Final = 1,
}

/// A device's state, or one chunk of it. A device may send several chunks (pre-copy
/// iterations, or a state too large for one section); the receiver hands them to the device
/// in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// The device's id (as on the command line, `--device ...,id=NAME`).
    pub id: String,
    /// When the state was taken.
    pub phase: DevicePhase,
    /// The device's own bytes, from its save.
    pub data: Vec<u8>,
}

impl DeviceState {
    /// The payload bytes for a device section (header fields, then `data`).
    pub(crate) fn encode_header(id: &str, phase: DevicePhase) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(3 + id.len());
        put_string(&mut out, id, MAX_ID_LEN, SectionType::Device, "device id")?;
        out.push(phase as u8);
        Ok(out)
    }

    /// Parses a payload.
    pub fn decode(payload: Vec<u8>) -> std::result::Result<DeviceState, String> {
        let mut c = Cursor::new(&payload);
        let id = c.string(MAX_ID_LEN, "device id")?;
        let phase = match c.u8("phase")? {
            0 => DevicePhase::PreCopy,
            1 => DevicePhase::Final,
            p => return Err(format!("unknown phase {p} for device {id:?}")),
        };
        let start = c.pos();
        let mut data = payload;
        // Reuse the payload allocation: the device data is most of it.
        data.drain(..start);
        Ok(DeviceState { id, phase, data })
    }
}

/// A live-migration protocol message. Wire values of the kind field are in parentheses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// (1) Source: pre-copy iteration `iteration` (from 0) begins.
    IterationBegin {
        /// Iteration number.
        iteration: u32,
    },
    /// (2) Source: pre-copy iteration `iteration` is complete.
    IterationEnd {
        /// Iteration number.
        iteration: u32,
    },
    /// (3) Source: vCPUs and devices are stopped; what follows is the final state.
    StopAndCopy,
    /// (4) Source: the whole state has been sent; restore and resume the VM.
    Complete,
    /// (5) Destination: the stream's config matches this VM; send the state.
    Ready,
    /// (6) Destination: the VM runs here now; the source may exit.
    Resumed,
    /// (7) Either side: the migration is off; the source keeps (or resumes) the guest.
    Abort {
        /// Why, for the other side's log and exit message.
        reason: String,
    },
    /// (8) Destination: everything up to [`Control::IterationEnd`] `iteration` is applied.
    /// The source waits for it before the next pass, so the guest is never stopped while
    /// the destination still works through a backlog of earlier passes.
    Synced {
        /// Iteration number.
        iteration: u32,
    },
}

impl Control {
    /// The payload bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(8);
        let (kind, iteration) = match self {
            Control::IterationBegin { iteration } => (1u32, Some(*iteration)),
            Control::IterationEnd { iteration } => (2, Some(*iteration)),
            Control::StopAndCopy => (3, None),
            Control::Complete => (4, None),
            Control::Ready => (5, None),
            Control::Resumed => (6, None),
            Control::Abort { .. } => (7, None),
            Control::Synced { iteration } => (8, Some(*iteration)),
        };
        out.extend_from_slice(&kind.to_le_bytes());
        if let Some(i) = iteration {
            out.extend_from_slice(&i.to_le_bytes());
        }
        if let Control::Abort { reason } = self {
            put_string(
                &mut out,
                reason,
                MAX_REASON_LEN,
                SectionType::Control,
                "abort reason",
            )?;
        }
        Ok(out)
    }

    /// Parses a payload.
    pub fn decode(payload: &[u8]) -> std::result::Result<Control, String> {
        let mut c = Cursor::new(payload);
        let msg = match c.u32("control kind")? {
            1 => Control::IterationBegin {
                iteration: c.u32("iteration")?,
            },
            2 => Control::IterationEnd {
                iteration: c.u32("iteration")?,
            },
            3 => Control::StopAndCopy,
            4 => Control::Complete,
            5 => Control::Ready,
            6 => Control::Resumed,
            7 => Control::Abort {
                reason: c.string(MAX_REASON_LEN, "abort reason")?,
            },
            8 => Control::Synced {
                iteration: c.u32("iteration")?,
            },
            k => return Err(format!("unknown control kind {k}")),
        };
        c.finish("control message")?;
        Ok(msg)
    }
}
