//! Test certificates for migrations over TLS: the `test-pki` crate, which the vmm's TLS
//! unit tests share.
//!
//! ```no_run
//! use vmm_tests::harness::{tls, TestDir};
//!
//! let dir = TestDir::new("pki")?;
//! let ca = tls::Ca::new(&dir, "ca1")?;
//! let server = ca.issue("dst", &["IP:127.0.0.1", "DNS:localhost"])?;
//! let option = server.option(&ca); // cert=...,key=...,ca=...
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub use test_pki::{Ca, Identity, PkiError};
