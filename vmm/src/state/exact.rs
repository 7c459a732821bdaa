//! Exact-length decoding of KVM structs in a saved state.
//!
//! kvm-bindings' serde accepts a blob shorter or longer than the struct, zero-padding or
//! truncating it (meant for live update across kernel versions whose structs grew). A state
//! read from a snapshot or a migration stream is written by this VMM for these very
//! structs, so any other length is a corrupt or forged stream: a `regs` blob of 10 bytes
//! would otherwise load as registers that are mostly zero. Fields of KVM struct types use
//! `#[serde(deserialize_with = "exact::de")]` (or `exact::de_opt` for an `Option`).

use serde::de::{DeserializeOwned, Deserializer, Error, SeqAccess, Visitor};
use serde::Deserialize;

struct Bytes;

impl<'de> Visitor<'de> for Bytes {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a byte array")
    }

    fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        // Bounded: a sequence may not claim more than a KVM struct can hold.
        let mut v = Vec::new();
        while let Some(b) = seq.next_element::<u8>()? {
            if v.len() >= 1 << 20 {
                return Err(A::Error::custom("a KVM state blob longer than 1 MiB"));
            }
            v.push(b);
        }
        Ok(v)
    }
}

/// Decodes a KVM struct from exactly `size_of::<T>()` bytes.
pub fn de<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<T, D::Error> {
    let bytes = d.deserialize_bytes(Bytes)?;
    exact::<T, D::Error>(&bytes)
}

/// [`de`] for an optional field.
pub fn de_opt<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Option<T>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "Wrap::de")] Vec<u8>);
    impl Wrap {
        fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            d.deserialize_bytes(Bytes)
        }
    }
    match Option::<Wrap>::deserialize(d)? {
        None => Ok(None),
        Some(Wrap(bytes)) => exact::<T, D::Error>(&bytes).map(Some),
    }
}

fn exact<T: DeserializeOwned, E: Error>(bytes: &[u8]) -> Result<T, E> {
    let want = std::mem::size_of::<T>();
    if bytes.len() != want {
        return Err(E::custom(format!(
            "a {} of {} bytes, but it has {want}",
            std::any::type_name::<T>()
                .rsplit("::")
                .next()
                .unwrap_or("KVM struct"),
            bytes.len()
        )));
    }
    T::deserialize(serde::de::value::BytesDeserializer::<E>::new(bytes))
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_regs, kvm_xcrs};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct S {
        #[serde(deserialize_with = "super::de")]
        regs: kvm_regs,
        #[serde(deserialize_with = "super::de_opt")]
        xcrs: Option<kvm_xcrs>,
    }

    /// `S` without the check.
    #[derive(Deserialize)]
    struct Lenient {
        #[allow(dead_code)]
        regs: kvm_regs,
        #[allow(dead_code)]
        xcrs: Option<kvm_xcrs>,
    }

    /// The same shape with the blobs as plain bytes, to forge lengths.
    #[derive(Serialize)]
    struct Forged {
        #[serde(with = "serde_bytes_shim")]
        regs: Vec<u8>,
        xcrs: Option<kvm_xcrs>,
    }

    mod serde_bytes_shim {
        pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }
    }

    #[test]
    fn exact_blobs_round_trip_and_other_lengths_are_refused() {
        let s = S {
            regs: kvm_regs {
                rip: 0x1234,
                rax: 7,
                ..Default::default()
            },
            xcrs: Some(kvm_xcrs::default()),
        };
        let bytes = migration::encode_state(&s).unwrap();
        assert_eq!(migration::decode_state::<S>(&bytes).unwrap(), s);
        let none = S { xcrs: None, ..s };
        let bytes = migration::encode_state(&none).unwrap();
        assert_eq!(migration::decode_state::<S>(&bytes).unwrap(), none);
        for len in [
            0,
            10,
            std::mem::size_of::<kvm_regs>() - 1,
            std::mem::size_of::<kvm_regs>() + 8,
        ] {
            let forged = Forged {
                regs: vec![1; len],
                xcrs: None,
            };
            let bytes = migration::encode_state(&forged).unwrap();
            // postcard keeps no custom message: that it is refused is what counts.
            assert!(migration::decode_state::<S>(&bytes).is_err(), "{len} bytes");
            // What the check prevents: kvm-bindings alone pads or cuts the blob.
            assert!(
                migration::decode_state::<Lenient>(&bytes).is_ok(),
                "{len} bytes"
            );
        }
    }
}
