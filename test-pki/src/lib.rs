//! Test certificates for migrations over TLS, made at test time with the `openssl` command
//! line tool: CAs, and certificates they sign for servers and clients. One crate serves the
//! vmm's TLS unit tests and the guest tests' harness (`vmm_tests::harness::tls`).
//!
//! ```no_run
//! let dir = std::env::temp_dir().join("pki-example");
//! std::fs::create_dir_all(&dir)?;
//! let ca = test_pki::Ca::new(&dir, "ca1")?;
//! let server = ca.issue("dst", &["IP:127.0.0.1", "DNS:localhost"])?;
//! let option = server.option(&ca); // cert=...,key=...,ca=...
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// openssl could not run.
    #[error("cannot run openssl ({0}): the TLS tests need the openssl command (apt-get install openssl)")]
    Spawn(#[source] std::io::Error),
    /// openssl failed.
    #[error("`openssl {args}` failed: {stderr}")]
    Failed {
        /// Its arguments.
        args: String,
        /// What it said.
        stderr: String,
    },
    /// A file could not be written.
    #[error("writing {}: {source}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn openssl(args: &[&str]) -> Result<(), PkiError> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .map_err(PkiError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(PkiError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// A certificate and its private key (PEM files).
#[derive(Clone, Debug)]
pub struct Identity {
    /// The certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

impl Identity {
    /// `cert=...,key=...,ca=...`: this identity trusting `ca` (the value of
    /// `--migration-tls` and `vmm ctl migrate --tls`).
    pub fn option(&self, ca: &Ca) -> String {
        format!(
            "cert={},key={},ca={}",
            self.cert.display(),
            self.key.display(),
            ca.id.cert.display()
        )
    }
}

/// A self-signed CA.
#[derive(Clone, Debug)]
pub struct Ca {
    /// Its certificate and key.
    pub id: Identity,
    dir: PathBuf,
}

impl Ca {
    /// Makes the CA `name` (P-256, valid for two days) in `dir`; the certificates it issues
    /// go there too.
    pub fn new(dir: impl AsRef<Path>, name: &str) -> Result<Ca, PkiError> {
        let dir = dir.as_ref();
        let id = Identity {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            s(&id.key),
            "-out",
            s(&id.cert),
        ])?;
        Ok(Ca {
            id,
            dir: dir.to_path_buf(),
        })
    }

    /// A certificate `name` signed by this CA, for TLS servers and clients, with these
    /// subject alternative names (`IP:10.0.0.2`, `DNS:host`).
    pub fn issue(&self, name: &str, sans: &[&str]) -> Result<Identity, PkiError> {
        let id = Identity {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        };
        let csr = self.dir.join(format!("{name}.csr"));
        let ext = self.dir.join(format!("{name}.ext"));
        let mut text = String::from(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n",
        );
        if !sans.is_empty() {
            text.push_str(&format!("subjectAltName={}\n", sans.join(",")));
        }
        std::fs::write(&ext, text).map_err(|source| PkiError::Write {
            path: ext.clone(),
            source,
        })?;
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            s(&id.key),
            "-out",
            s(&csr),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            s(&csr),
            "-CA",
            s(&self.id.cert),
            "-CAkey",
            s(&self.id.key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            s(&ext),
            "-out",
            s(&id.cert),
        ])?;
        Ok(id)
    }
}
