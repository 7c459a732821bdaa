//! `--migration-tls` (destination) and the `tls` of the API's `migrate` request (source):
//! the certificate, key and CA a migration over `tls:HOST:PORT` uses.
//!
//! ```text
//! --migration-tls cert=PATH,key=PATH,ca=PATH[,server-name=NAME]
//! ```
//!
//! Parsing checks the keys only; the files are read (and their errors reported, naming
//! the file) by [`crate::migrate::tls`] when a migration starts or a destination listens.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::keyvalue::{from_key_values, KeyValueError};

/// One side's TLS identity and trust, in PEM files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MigrationTlsConfig {
    /// This side's certificate chain (PEM, the end-entity certificate first).
    pub cert: PathBuf,
    /// The private key of `cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates (PEM) a peer's certificate must be signed by.
    pub ca: PathBuf,
    /// Source only: the name the destination's certificate must be issued for (a DNS
    /// name or an IP address among its subject alternative names). Default: the host of
    /// the `tls:HOST:PORT` URL.
    pub server_name: Option<String>,
}

/// A `--migration-tls` value that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{0}; use cert=PATH,key=PATH,ca=PATH[,server-name=NAME]")]
pub struct TlsParseError(KeyValueError);

impl FromStr for MigrationTlsConfig {
    type Err = TlsParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        from_key_values(s).map_err(TlsParseError)
    }
}

impl MigrationTlsConfig {
    /// The same configuration with its paths made absolute against the current directory
    /// (a client sends them to a VMM that may run elsewhere in the file system).
    pub fn absolute(&self) -> std::io::Result<Self> {
        Ok(MigrationTlsConfig {
            cert: std::path::absolute(&self.cert)?,
            key: std::path::absolute(&self.key)?,
            ca: std::path::absolute(&self.ca)?,
            server_name: self.server_name.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_parse() {
        let c: MigrationTlsConfig = "cert=/a.pem,key=/a.key,ca=/ca.pem".parse().unwrap();
        assert_eq!(c.cert, PathBuf::from("/a.pem"));
        assert_eq!(c.key, PathBuf::from("/a.key"));
        assert_eq!(c.ca, PathBuf::from("/ca.pem"));
        assert_eq!(c.server_name, None);
        let c: MigrationTlsConfig = "ca=/ca.pem,cert=c,key=k,server-name=dst.example"
            .parse()
            .unwrap();
        assert_eq!(c.server_name.as_deref(), Some("dst.example"));
        // The API's JSON takes the same struct.
        let j: MigrationTlsConfig = serde_json::from_str(
            r#"{"cert":"/a.pem","key":"/a.key","ca":"/ca.pem","server-name":"10.0.0.2"}"#,
        )
        .unwrap();
        assert_eq!(j.server_name.as_deref(), Some("10.0.0.2"));
    }

    #[test]
    fn bad_tls_options_say_why() {
        for (bad, says) in [
            ("", "empty"),
            ("cert=/a.pem,key=/a.key", "ca"),
            ("cert=/a.pem,ca=/ca.pem", "key"),
            ("key=/a.key,ca=/ca.pem", "cert"),
            ("cert=/a,key=/b,ca=/c,cert=/d", "cert"),
            ("cert=/a,key=/b,ca=/c,verify=off", "verify"),
        ] {
            let e = bad.parse::<MigrationTlsConfig>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
            assert!(e.contains("cert=PATH,key=PATH,ca=PATH"), "{bad:?}: {e}");
        }
    }
}
