//! Round trips and every way a stream can be wrong.

mod common;

use common::{config, read_all, sample_stream, Rng};
use migration::{
    Control, DevicePhase, DeviceState, Error, RamPagesBuilder, Section, SectionType, StreamReader,
    StreamWriter, VmConfig, FLAG_LIVE, FLAG_REPLY, FORMAT_VERSION, HEADER_LEN, MAGIC,
    MAX_CONFIG_LEN, MAX_SECTION_LEN, PAGE_SIZE, SECTION_HEADER_LEN,
};

/// Builds a stream by hand: header (with the right CRC) and raw sections.
fn raw_stream(version: u32, flags: u32, sections: &[(u32, &[u8])]) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    let crc = migration::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    for (ty, payload) in sections {
        v.extend_from_slice(&raw_section(*ty, payload));
    }
    v
}

fn raw_section(ty: u32, payload: &[u8]) -> Vec<u8> {
    let mut s = ty.to_le_bytes().to_vec();
    s.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    s.extend_from_slice(payload);
    let crc = migration::crc32c(&s);
    s.extend_from_slice(&crc.to_le_bytes());
    s
}

#[test]
fn crc32c_test_vectors() {
    assert_eq!(migration::crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(migration::crc32c(b""), 0);
    // RFC 3720 B.4: 32 bytes of zeros.
    assert_eq!(migration::crc32c(&[0u8; 32]), 0x8A91_36AA);
    assert_eq!(migration::crc32c(&[0xffu8; 32]), 0x62A8_AB43);
}

#[test]
fn round_trip_every_section_type() {
    let bytes = sample_stream();
    let mut r = StreamReader::read_header(&bytes[..]).unwrap();
    assert_eq!(r.flags(), FLAG_LIVE);
    let mut seen = std::collections::HashSet::new();
    let mut sections = Vec::new();
    loop {
        let s = r.next_section().unwrap();
        seen.insert(s.section_type());
        let end = s == Section::End;
        sections.push(s);
        if end {
            break;
        }
    }
    assert!(r.is_finished());
    assert_eq!(r.bytes_read(), bytes.len() as u64);
    assert!(matches!(r.next_section(), Err(Error::PastEnd)));
    r.finish().unwrap();
    for t in SectionType::ALL {
        assert!(seen.contains(&t), "{t} not in the sample stream");
    }

    assert_eq!(sections[0], Section::VmConfig(config()));
    assert_eq!(
        sections[1],
        Section::Control(Control::IterationBegin { iteration: 0 })
    );
    let Section::RamPages(ram) = &sections[2] else {
        panic!("{:?}", sections[2])
    };
    let runs: Vec<_> = ram.runs().collect();
    assert_eq!(runs.len(), 2);
    assert_eq!((runs[0].gpa, runs[0].pages), (0x1000, 1));
    assert_eq!(&runs[0].data.unwrap()[..5], b"hello");
    assert_eq!(
        (runs[1].gpa, runs[1].pages, runs[1].data),
        (0x2000, 2, None)
    );
    assert_eq!(
        sections[3],
        Section::Device(DeviceState {
            id: "vf0".into(),
            phase: DevicePhase::PreCopy,
            data: b"precopy".to_vec()
        })
    );
    assert_eq!(sections[5], Section::Control(Control::StopAndCopy));
    assert_eq!(
        sections[6],
        Section::Vcpu {
            id: 0,
            state: b"cpu0".to_vec()
        }
    );
    assert_eq!(
        sections[7],
        Section::Vcpu {
            id: 1,
            state: b"cpu1".to_vec()
        }
    );
    assert_eq!(sections[8], Section::Irqchip(b"pic".to_vec()));
    assert_eq!(
        sections[11],
        Section::Device(DeviceState {
            id: "vf0".into(),
            phase: DevicePhase::Final,
            data: b"final".to_vec()
        })
    );
    assert_eq!(
        sections[12],
        Section::Control(Control::Abort {
            reason: "just testing".into()
        })
    );
    assert_eq!(sections[13], Section::Control(Control::Complete));

    // Re-writing the decoded sections gives the same bytes.
    let mut w = StreamWriter::write_header(Vec::new(), FLAG_LIVE).unwrap();
    for s in &sections[..sections.len() - 1] {
        w.write(s).unwrap();
    }
    assert_eq!(w.finish().unwrap(), bytes);
}

#[test]
fn every_control_message_round_trips() {
    let msgs = [
        Control::IterationBegin { iteration: 7 },
        Control::IterationEnd {
            iteration: u32::MAX,
        },
        Control::StopAndCopy,
        Control::Complete,
        Control::Ready,
        Control::Resumed,
        Control::Synced { iteration: 3 },
        Control::Abort {
            reason: "destination: device vf0 rejected its state".into(),
        },
        Control::Abort {
            reason: String::new(),
        },
    ];
    let mut w = StreamWriter::write_header(Vec::new(), FLAG_LIVE | FLAG_REPLY).unwrap();
    for m in &msgs {
        w.write_control(m).unwrap();
    }
    let bytes = w.finish().unwrap();
    let got = read_all(&bytes).unwrap();
    assert_eq!(got.len(), msgs.len() + 1);
    for (m, s) in msgs.iter().zip(&got) {
        assert_eq!(s, &Section::Control(m.clone()));
    }
}

#[test]
fn large_ram_section_round_trips_and_skips_zero_pages() {
    let mut rng = Rng(1);
    let mut b = RamPagesBuilder::new();
    let mut expect = Vec::new();
    // 256 pages, a third of them zero, with holes, as a dirty-page pass would send them.
    for i in 0..256u64 {
        if i % 7 == 3 {
            continue;
        }
        let page = if i % 3 == 0 {
            vec![0u8; PAGE_SIZE]
        } else {
            rng.bytes(PAGE_SIZE)
        };
        b.push_page(0x10_0000 + i * PAGE_SIZE as u64, &page)
            .unwrap();
        expect.push((0x10_0000 + i * PAGE_SIZE as u64, page));
    }
    let mut w = StreamWriter::write_header(Vec::new(), 0).unwrap();
    w.write_ram_pages(&b).unwrap();
    let bytes = w.finish().unwrap();
    let zero_pages = expect
        .iter()
        .filter(|(_, p)| p.iter().all(|&x| x == 0))
        .count();
    assert!(bytes.len() < (expect.len() - zero_pages + 1) * PAGE_SIZE);
    let secs = read_all(&bytes).unwrap();
    let Section::RamPages(ram) = &secs[0] else {
        panic!()
    };
    let mut got = Vec::new();
    for run in ram.runs() {
        for i in 0..run.pages as usize {
            let gpa = run.gpa + (i * PAGE_SIZE) as u64;
            let page = match run.data {
                Some(d) => d[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].to_vec(),
                None => vec![0u8; PAGE_SIZE],
            };
            got.push((gpa, page));
        }
    }
    assert_eq!(got, expect);
    assert_eq!(ram.page_count(), expect.len() as u64);
}

#[test]
fn bad_magic() {
    let mut bytes = sample_stream();
    bytes[0] = b'X';
    let e = StreamReader::read_header(&bytes[..]).unwrap_err();
    assert!(matches!(e, Error::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("bad magic"), "{e}");
    // A short non-stream input is "not a stream", not "truncated".
    let e = StreamReader::read_header(&b"#!/bin/sh\n"[..]).unwrap_err();
    assert!(matches!(e, Error::BadMagic { .. }), "{e}");
}

#[test]
fn version_mismatch_in_both_directions() {
    for v in [FORMAT_VERSION + 1, FORMAT_VERSION - 1, u32::MAX] {
        let bytes = raw_stream(v, 0, &[(1, &0u64.to_le_bytes())]);
        let e = StreamReader::read_header(&bytes[..]).unwrap_err();
        assert!(
            matches!(e, Error::Version { found, supported } if found == v && supported == FORMAT_VERSION),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&v.to_string()) && msg.contains(&FORMAT_VERSION.to_string()),
            "{msg}"
        );
        // Even if the rest of the header were in another layout (cut after the version).
        let e = StreamReader::read_header(&bytes[..12]).unwrap_err();
        assert!(matches!(e, Error::Version { .. }), "{e}");
    }
}

#[test]
fn unknown_flags_are_rejected() {
    let bytes = raw_stream(FORMAT_VERSION, 1 << 7, &[(1, &0u64.to_le_bytes())]);
    let e = StreamReader::read_header(&bytes[..]).unwrap_err();
    assert!(matches!(e, Error::UnknownFlags { flags: 0x80, .. }), "{e}");
    assert!(StreamWriter::write_header(Vec::new(), 1 << 7).is_err());
}

#[test]
fn unknown_section_type_is_named() {
    let bytes = raw_stream(FORMAT_VERSION, 0, &[(42, b"x"), (1, &1u64.to_le_bytes())]);
    let mut r = StreamReader::read_header(&bytes[..]).unwrap();
    let e = r.next_section().unwrap_err();
    assert!(
        matches!(e, Error::UnknownSectionType { section: 0, ty: 42 }),
        "{e}"
    );
    assert!(e.to_string().contains("42"), "{e}");
    let bytes = raw_stream(FORMAT_VERSION, 0, &[(0, b"")]);
    let mut r = StreamReader::read_header(&bytes[..]).unwrap();
    assert!(matches!(
        r.next_section(),
        Err(Error::UnknownSectionType { ty: 0, .. })
    ));
}

#[test]
fn end_section_count_detects_a_dropped_section() {
    let bytes = raw_stream(FORMAT_VERSION, 0, &[(5, b"pic"), (1, &2u64.to_le_bytes())]);
    let mut r = StreamReader::read_header(&bytes[..]).unwrap();
    r.next_section().unwrap();
    let e = r.next_section().unwrap_err();
    assert!(
        matches!(
            e,
            Error::SectionCount {
                expected: 2,
                found: 1
            }
        ),
        "{e}"
    );
}

#[test]
fn trailing_data_after_end_is_an_error_for_files() {
    let mut bytes = sample_stream();
    bytes.push(0);
    assert!(matches!(read_all(&bytes), Err(Error::TrailingData)));
}

#[test]
fn flipping_any_byte_is_detected() {
    let bytes = sample_stream();
    let good = read_all(&bytes).unwrap();
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= mask;
            match read_all(&b) {
                Ok(s) => panic!(
                    "flip {mask:#x} at byte {i} decoded ({} sections, same: {})",
                    s.len(),
                    s == good
                ),
                Err(e) => {
                    // A flip in the header or a section is reported as such: never a
                    // successful decode, never a panic.
                    let msg = e.to_string();
                    assert!(!msg.is_empty());
                    if i >= HEADER_LEN && is_payload_byte(&bytes, i) {
                        assert!(
                            matches!(e, Error::Checksum { .. }),
                            "payload flip at {i} gave {e}"
                        );
                    }
                }
            }
        }
    }
}

/// Whether byte `i` of a valid stream is inside a section payload.
fn is_payload_byte(bytes: &[u8], i: usize) -> bool {
    let mut at = HEADER_LEN;
    while at < bytes.len() {
        let mut l = [0u8; 8];
        l.copy_from_slice(&bytes[at + 4..at + 12]);
        let len = u64::from_le_bytes(l) as usize;
        let payload = at + SECTION_HEADER_LEN..at + SECTION_HEADER_LEN + len;
        if payload.contains(&i) {
            return true;
        }
        at = payload.end + 4;
    }
    false
}

#[test]
fn truncation_at_every_offset_is_a_clean_error() {
    let bytes = sample_stream();
    for cut in 0..bytes.len() {
        let e = read_all(&bytes[..cut]).unwrap_err();
        assert!(
            matches!(
                e,
                Error::TruncatedHeader { .. } | Error::Truncated { .. } | Error::MissingEnd { .. }
            ),
            "cut at {cut}: {e}"
        );
    }
    // The message names the section and how far it got.
    let e = read_all(&bytes[..HEADER_LEN + SECTION_HEADER_LEN + 3]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("section 0") && msg.contains("after 3 of"),
        "{msg}"
    );
}

#[test]
fn huge_lengths_are_rejected_before_allocating() {
    for len in [MAX_SECTION_LEN + 1, u64::MAX, 1 << 62] {
        let mut bytes = raw_stream(FORMAT_VERSION, 0, &[]);
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        let mut r = StreamReader::read_header(&bytes[..]).unwrap();
        let e = r.next_section().unwrap_err();
        assert!(
            matches!(e, Error::SectionTooLong { section: 0, ty: 3, len: l, .. } if l == len),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("ram-pages") && msg.contains(&len.to_string()),
            "{msg}"
        );
    }
    // A length under the maximum with little data behind it: truncated, not an allocation
    // of the length (the alloc test in fuzz.rs measures that).
    let mut bytes = raw_stream(FORMAT_VERSION, 0, &[]);
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&MAX_SECTION_LEN.to_le_bytes());
    bytes.extend_from_slice(b"short");
    let mut r = StreamReader::read_header(&bytes[..]).unwrap();
    let e = r.next_section().unwrap_err();
    assert!(
        matches!(e, Error::Truncated { part: "payload", got: 5, want, .. } if want == MAX_SECTION_LEN),
        "{e}"
    );
}

/// The config is read before anything vouches for the sender (an unauthenticated `tcp:`
/// peer), so its type and size are judged from the section header: the payload behind a
/// refused header is never read.
#[test]
fn the_config_must_come_first_and_small_judged_from_its_header() {
    // A RAM section first, its megabyte of data behind it.
    let payload = vec![0u8; 1 << 20];
    let bytes = raw_stream(
        FORMAT_VERSION,
        FLAG_LIVE,
        &[(SectionType::RamPages as u32, &payload)],
    );
    let mut r = StreamReader::read_header(&bytes[..]).unwrap();
    let e = r.read_config().unwrap_err();
    assert!(
        matches!(
            e,
            Error::UnexpectedSection {
                section: 0,
                ty: 3,
                expected: SectionType::VmConfig
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("ram-pages") && e.to_string().contains("vm-config"),
        "{e}"
    );
    assert_eq!(
        r.into_inner().len(),
        payload.len() + 4,
        "payload left unread"
    );

    // A config one byte over its maximum.
    let big = vec![0u8; MAX_CONFIG_LEN as usize + 1];
    let bytes = raw_stream(
        FORMAT_VERSION,
        FLAG_LIVE,
        &[(SectionType::VmConfig as u32, &big)],
    );
    let mut r = StreamReader::read_header(&bytes[..]).unwrap();
    let e = r.read_config().unwrap_err();
    assert!(
        matches!(e, Error::SectionTooLong { section: 0, ty: 2, len, max }
            if len == MAX_CONFIG_LEN + 1 && max == MAX_CONFIG_LEN),
        "{e}"
    );
    assert_eq!(r.into_inner().len(), big.len() + 4, "payload left unread");

    // next_section keeps the general bound: the same section is read (and its layout
    // judged) there.
    let mut r = StreamReader::read_header(&bytes[..]).unwrap();
    let e = r.next_section().unwrap_err();
    assert!(matches!(e, Error::Malformed { section: 0, .. }), "{e}");

    // A real stream's config.
    let bytes = sample_stream();
    let mut r = StreamReader::read_header(&bytes[..]).unwrap();
    assert_eq!(r.read_config().unwrap(), config());
    assert_eq!(r.sections_read(), 1);
}

#[test]
fn a_config_over_its_maximum_is_not_written() {
    let config = |n: usize| VmConfig {
        mem_size: 1 << 30,
        vcpus: 1,
        devices: (0..n).map(|i| format!("{i:0>256}")).collect(),
    };
    // 250 devices of the longest ids fit.
    let fits = config(250);
    let mut w = StreamWriter::write_header(Vec::new(), 0).unwrap();
    w.write_vm_config(&fits).unwrap();
    let bytes = w.finish().unwrap();
    let mut r = StreamReader::read_header(&bytes[..]).unwrap();
    assert_eq!(r.read_config().unwrap(), fits);
    // 300 do not, and the writer says so rather than write what no reader takes.
    let mut w = StreamWriter::write_header(Vec::new(), 0).unwrap();
    let e = w.write_vm_config(&config(300)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::TooLarge {
                ty: SectionType::VmConfig,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("300 devices"), "{e}");
}

#[test]
fn malformed_payloads_behind_a_good_crc_name_the_problem() {
    let cases: &[(u32, &[u8], &str)] = &[
        (SectionType::Vcpu as u32, b"ab", "too short"),
        (
            SectionType::Device as u32,
            &[3, 0, b'v', b'f', b'0', 9],
            "unknown phase 9",
        ),
        (SectionType::Device as u32, &[200, 0, b'v'], "device id"),
        (
            SectionType::Control as u32,
            &99u32.to_le_bytes(),
            "unknown control kind 99",
        ),
        (SectionType::Control as u32, &[3, 0, 0, 0, 0], "left over"),
        (SectionType::VmConfig as u32, &[0; 15], "needs"),
        (SectionType::RamPages as u32, &[1; 13], "not page aligned"),
        (SectionType::End as u32, &[0; 4], "expected 8"),
    ];
    for (ty, payload, want) in cases {
        let bytes = raw_stream(FORMAT_VERSION, 0, &[(*ty, payload)]);
        let mut r = StreamReader::read_header(&bytes[..]).unwrap();
        let e = r.next_section().unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, Error::Malformed { section: 0, .. }) && msg.contains(want),
            "type {ty}: {msg}"
        );
    }
}

#[test]
fn vm_config_checks() {
    let stream = config();
    stream.check_compatible(&config()).unwrap();
    let mut reordered = config();
    reordered.devices.reverse();
    stream.check_compatible(&reordered).unwrap();

    let mut local = config();
    local.mem_size = 1 << 30;
    assert!(matches!(
        stream.check_compatible(&local),
        Err(Error::MemorySizeMismatch { .. })
    ));
    let mut local = config();
    local.vcpus = 1;
    assert!(matches!(
        stream.check_compatible(&local),
        Err(Error::VcpuCountMismatch {
            stream: 2,
            local: 1
        })
    ));
    let mut local = config();
    local.devices.pop();
    let e = stream.check_compatible(&local).unwrap_err();
    assert!(matches!(&e, Error::UnknownDevice(d) if d == "vf0"), "{e}");
    let mut local = config();
    local.devices.push("vf1".into());
    let e = stream.check_compatible(&local).unwrap_err();
    assert!(matches!(&e, Error::MissingDevice(d) if d == "vf1"), "{e}");

    let dup = VmConfig {
        devices: vec!["a".into(), "a".into()],
        ..config()
    };
    assert!(dup.encode().is_err());
}

#[test]
fn writer_refuses_what_a_reader_would_reject() {
    let mut w = StreamWriter::write_header(Vec::new(), 0).unwrap();
    let long_id = "x".repeat(migration::MAX_ID_LEN + 1);
    assert!(matches!(
        w.write_device(&long_id, DevicePhase::Final, b""),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        w.write_section(SectionType::End, &[0; 8]),
        Err(Error::Misuse(_))
    ));
    // Nothing was written by the failed calls: the stream is still valid.
    let bytes = w.finish().unwrap();
    assert_eq!(read_all(&bytes).unwrap(), vec![Section::End]);
}

/// A writer that fails after `left` bytes, as a socket does when the peer goes away.
struct FailAfter {
    left: usize,
}

impl std::io::Write for FailAfter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "peer gone",
            ));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn writer_is_poisoned_after_an_io_error() {
    let mut w = StreamWriter::write_header(FailAfter { left: 30 }, 0).unwrap();
    let e = w.write_irqchip(&[1; 100]).unwrap_err();
    assert!(e.to_string().contains("peer gone"), "{e}");
    assert!(matches!(w.write_irqchip(b"x"), Err(Error::Poisoned)));
    assert!(matches!(w.finish(), Err(Error::Poisoned)));
}

#[test]
fn reader_copes_with_one_byte_reads_and_interrupts() {
    /// Hands out one byte per read, with an EINTR before each, like a slow socket.
    struct Trickle<'a> {
        data: &'a [u8],
        interrupt: bool,
    }
    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(1).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }
    let bytes = sample_stream();
    let mut r = StreamReader::read_header(Trickle {
        data: &bytes,
        interrupt: false,
    })
    .unwrap();
    let mut n = 0;
    while r.next_section().unwrap() != Section::End {
        n += 1;
    }
    assert_eq!(Ok(n + 1), usize::try_from(r.sections_read()));
    assert_eq!(read_all(&bytes).unwrap().len(), n + 1);
}

#[test]
fn snapshot_file_round_trip_and_no_partial_file() {
    let dir = std::env::temp_dir().join(format!("migration-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vm.snap");

    let mut s = migration::snapshot::create(&path, 0).unwrap();
    s.stream().write_vm_config(&config()).unwrap();
    s.stream().write_irqchip(b"irqchip").unwrap();
    s.commit().unwrap();
    let mut r = migration::snapshot::open(&path).unwrap();
    assert_eq!(r.next_section().unwrap(), Section::VmConfig(config()));
    assert_eq!(
        r.next_section().unwrap(),
        Section::Irqchip(b"irqchip".to_vec())
    );
    assert_eq!(r.next_section().unwrap(), Section::End);
    r.finish().unwrap();

    // An abandoned snapshot leaves neither the final file nor the temporary one.
    let path2 = dir.join("abandoned.snap");
    let mut s = migration::snapshot::create(&path2, 0).unwrap();
    s.stream().write_irqchip(b"irqchip").unwrap();
    drop(s);
    assert!(!path2.exists());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
