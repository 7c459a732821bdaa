//! Robustness of the parsers: a few hundred thousand pseudo-random and mutated inputs
//! through the header parser and every payload parser; none may panic. Successful parses
//! of fixed-layout types must re-encode to the same bytes.
//!
//! This stands in for a cargo-fuzz target, which needs a nightly toolchain (this project
//! builds on stable only). The generator is a fixed-seed xorshift, so failures replay.

use vfio_user::proto::*;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Valid encodings to mutate, so that inputs get past the first checks.
fn seeds() -> Vec<Vec<u8>> {
    vec![
        Header::command(1, Command::RegionRead, 16)
            .unwrap()
            .to_bytes()
            .to_vec(),
        Version {
            major: 0,
            minor: 0,
            capabilities: Some(Capabilities {
                max_msg_fds: Some(8),
                max_data_xfer_size: Some(1 << 20),
                max_dma_maps: Some(10),
                pgsizes: Some(4096),
                migration: Some(MigrationCapability {
                    pgsize: Some(4096),
                    max_bitmap_size: Some(1 << 20),
                }),
                twin_socket: None,
            }),
        }
        .to_bytes(),
        DeviceInfo {
            argsz: 16,
            flags: 3,
            num_regions: 9,
            num_irqs: 5,
        }
        .to_bytes(),
        IrqInfo {
            argsz: 16,
            flags: 1,
            index: 2,
            count: 4,
        }
        .to_bytes(),
        IrqSet {
            flags: 0x22,
            index: 2,
            start: 0,
            count: 2,
            data: vec![1, 0],
        }
        .to_bytes()
        .unwrap(),
        DmaMap {
            readable: true,
            writable: true,
            offset: 0,
            iova: 0x1000,
            size: 0x1000,
        }
        .to_bytes(),
        DmaUnmap {
            argsz: 24,
            flags: 0,
            iova: 0x1000,
            size: 0x1000,
        }
        .to_bytes(),
        DmaAccess {
            address: 8,
            count: 8,
        }
        .to_bytes(),
        DmaAccessData {
            address: 8,
            data: vec![1; 8],
        }
        .to_bytes(),
        RegionInfoRequest {
            argsz: 304,
            index: 2,
        }
        .to_bytes(),
        RegionInfoReply {
            argsz: 0,
            flags: 7,
            index: 2,
            size: 0x4000,
            offset: 0,
            sparse_areas: vec![
                SparseArea {
                    offset: 0,
                    size: 0x1000,
                },
                SparseArea {
                    offset: 0x2000,
                    size: 0x1000,
                },
            ],
            region_type: Some(RegionType {
                type_: 3,
                subtype: 1,
            }),
        }
        .to_bytes()
        .unwrap(),
        RegionAccess {
            offset: 4,
            region: 0,
            count: 4,
        }
        .to_bytes(),
        RegionAccessData {
            offset: 4,
            region: 0,
            data: vec![1, 2, 3, 4],
        }
        .to_bytes()
        .unwrap(),
        RegionIoFdsRequest {
            argsz: 16,
            index: 0,
        }
        .to_bytes(),
        DeviceFeature {
            argsz: 16,
            flags: 0x10001,
            data: vec![1; 8],
        }
        .to_bytes()
        .unwrap(),
        FeatureMigration { flags: 1 }.to_bytes(),
        FeatureMigDeviceState {
            device_state: 2,
            data_fd: 0,
        }
        .to_bytes(),
        DmaLoggingStart {
            page_size: 4096,
            ranges: vec![DmaLoggingRange {
                iova: 0,
                length: 0x10000,
            }],
        }
        .to_bytes()
        .unwrap(),
        DmaLoggingReport {
            iova: 0,
            length: 64 * 4096,
            page_size: 4096,
            bitmap: vec![5],
        }
        .to_bytes(),
        MigDataReadRequest { size: 16 }.to_bytes(),
        MigData { data: vec![9; 16] }.to_bytes().unwrap(),
    ]
}

/// Runs every parser on `b`; checks that fixed-layout successes re-encode identically.
fn parse_all(b: &[u8]) -> usize {
    let mut ok = 0;
    if let Ok(h) = Header::parse(b) {
        assert_eq!(h.to_bytes().as_slice(), b);
        ok += 1;
    }
    if let Ok(v) = Version::parse(b) {
        assert_eq!(Version::parse(&v.to_bytes()).unwrap(), v);
        ok += 1;
    }
    if let Ok(v) = DeviceInfo::parse(b) {
        assert_eq!(v.to_bytes(), b);
        ok += 1;
    }
    if let Ok(v) = IrqInfo::parse(b) {
        assert_eq!(v.to_bytes(), b);
        ok += 1;
    }
    if let Ok(v) = IrqSet::parse(b) {
        assert_eq!(v.to_bytes().unwrap(), b);
        ok += 1;
    }
    if let Ok(v) = DmaMap::parse(b) {
        assert_eq!(v.to_bytes(), b);
        ok += 1;
    }
    if let Ok(v) = DmaUnmap::parse(b) {
        assert_eq!(v.to_bytes(), b);
        ok += 1;
    }
    if let Ok(v) = DmaAccess::parse(b) {
        assert_eq!(v.to_bytes(), b);
        ok += 1;
    }
    if let Ok(v) = DmaAccessData::parse(b) {
        assert_eq!(v.to_bytes(), b);
        ok += 1;
    }
    if let Ok(v) = RegionInfoRequest::parse(b) {
        assert_eq!(v.to_bytes(), b);
        ok += 1;
    }
    if let Ok(v) = RegionInfoReply::parse(b) {
        // Re-encoding normalises unknown capabilities away; it must still parse back.
        let again = RegionInfoReply::parse(&v.to_bytes().unwrap()).unwrap();
        assert_eq!(again.sparse_areas, v.sparse_areas);
        ok += 1;
    }
    if let Ok(v) = RegionAccess::parse(b) {
        assert_eq!(v.to_bytes(), b);
        ok += 1;
    }
    if let Ok(v) = RegionAccessData::parse(b) {
        assert_eq!(v.to_bytes().unwrap(), b);
        ok += 1;
    }
    if let Ok(v) = RegionIoFdsRequest::parse(b) {
        assert_eq!(v.to_bytes(), b);
        ok += 1;
    }
    if let Ok(v) = DeviceFeature::parse(b) {
        assert_eq!(v.to_bytes().unwrap(), b);
        ok += 1;
    }
    if let Ok(v) = FeatureMigration::parse(b) {
        assert_eq!(v.to_bytes(), b);
        ok += 1;
    }
    if let Ok(v) = FeatureMigDeviceState::parse(b) {
        assert_eq!(v.to_bytes(), b);
        ok += 1;
    }
    if let Ok(v) = DmaLoggingStart::parse(b) {
        assert_eq!(DmaLoggingStart::parse(&v.to_bytes().unwrap()).unwrap(), v);
        ok += 1;
    }
    if let Ok(v) = DmaLoggingReport::parse(b) {
        assert_eq!(v.to_bytes(), b);
        ok += 1;
    }
    if MigDataReadRequest::parse(b).is_ok() {
        ok += 1;
    }
    if let Ok(v) = MigData::parse(b) {
        assert_eq!(MigData::parse(&v.to_bytes().unwrap()).unwrap(), v);
        ok += 1;
    }
    if NoPayload::parse(b).is_ok() {
        ok += 1;
    }
    ok
}

#[test]
fn parsers_never_panic_on_random_input() {
    const ROUNDS: usize = 300_000;
    let mut rng = XorShift(0x5eed_1234_abcd_9876);
    let seeds = seeds();
    let mut accepted = 0;
    for round in 0..ROUNDS {
        let input = match round % 3 {
            // Short random strings: the sizes every fixed structure has.
            0 => {
                let len = rng.below(72) as usize;
                rng.bytes(len)
            }
            // Longer random strings, sometimes JSON-looking.
            1 => {
                let len = rng.below(600) as usize;
                let mut b = rng.bytes(len);
                if round % 2 == 0 && b.len() > 4 {
                    for byte in &mut b[4..] {
                        *byte = b"{}[]\":,0123456789 capabilitiesmax_msg_fdspgsizes\0"
                            [(*byte as usize) % 49];
                    }
                }
                b
            }
            // Mutated valid encodings: flip bytes, cut or extend.
            _ => {
                let mut b = seeds[rng.below(seeds.len() as u64) as usize].clone();
                for _ in 0..=rng.below(4) {
                    if b.is_empty() {
                        break;
                    }
                    let at = rng.below(b.len() as u64) as usize;
                    match rng.below(4) {
                        0 => b[at] = rng.next() as u8,
                        1 => b[at] ^= 1 << rng.below(8),
                        2 => b.truncate(at),
                        _ => {
                            let n = rng.below(24) as usize;
                            b.extend(rng.bytes(n))
                        }
                    }
                }
                b
            }
        };
        accepted += parse_all(&input);
    }
    // The mutated seeds must exercise the success paths too.
    assert!(accepted > 1000, "only {accepted} inputs parsed");
    // The seeds themselves parse.
    for s in &seeds {
        assert!(parse_all(s) > 0);
    }
}
