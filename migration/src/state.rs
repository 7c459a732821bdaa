//! One encoding for the opaque state payloads (vCPU, irqchip, PIT, clock, devices that
//! have serde state).
//!
//! postcard, not bincode: bincode's maintainers ended it (its 3.0.0 on crates.io is a
//! `compile_error!` tombstone and 2.x gets no more work), while postcard 1.x is maintained,
//! has a documented, stable wire format, and is compact (varint integers). kvm-bindings'
//! `serde` feature gives the KVM structs serde impls, so the vmm can encode them directly.

use serde::{de::DeserializeOwned, Serialize};

use crate::{Error, Result};

/// Encodes `value` for an opaque section payload.
pub fn encode_state<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|source| Error::State {
        op: "encoding",
        what: std::any::type_name::<T>(),
        source,
    })
}

/// Decodes an opaque section payload written by [`encode_state`]. Leftover bytes are an
/// error: they mean the payload was written as another type (or another layout of it).
pub fn decode_state<T: DeserializeOwned>(payload: &[u8]) -> Result<T> {
    let what = std::any::type_name::<T>();
    let (value, rest) = postcard::take_from_bytes(payload).map_err(|source| Error::State {
        op: "decoding",
        what,
        source,
    })?;
    if !rest.is_empty() {
        return Err(Error::StateTrailing {
            what,
            left: rest.len(),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Regs {
        rip: u64,
        rflags: u64,
        msrs: Vec<(u32, u64)>,
        name: String,
    }

    #[test]
    fn round_trip_and_errors() {
        let r = Regs {
            rip: 0xffff_ffff_8100_0000,
            rflags: 2,
            msrs: vec![(0x10, 12345), (0xc000_0080, 0xd01)],
            name: "cpu0".into(),
        };
        let b = encode_state(&r).unwrap();
        assert_eq!(decode_state::<Regs>(&b).unwrap(), r);
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(
            decode_state::<Regs>(&long),
            Err(Error::StateTrailing { left: 1, .. })
        ));
        for cut in 0..b.len() {
            assert!(decode_state::<Regs>(&b[..cut]).is_err(), "cut at {cut}");
        }
        let e = decode_state::<Regs>(&b[..3]).unwrap_err().to_string();
        assert!(e.contains("Regs"), "{e}");
    }
}
