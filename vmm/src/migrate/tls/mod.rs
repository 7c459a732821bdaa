//! Mutual TLS for migration streams (rustls, TLS 1.3 only, the `ring` provider).
//!
//! Both sides present a certificate and verify the peer's against their own `ca=`: the
//! destination refuses a source whose certificate is not signed by its CA during the
//! handshake, before it reads a byte of the stream; the source refuses a destination
//! whose certificate is not signed by its CA or not issued for the expected name
//! (`server-name=`, default the URL's host: a DNS name or an IP address in the
//! certificate's subject alternative names).
//!
//! [`Conn`] is one migration connection, plain TCP or TLS over it, with the handles each
//! side needs (a reader, a writer, the socket for its timeouts).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::config::tls::MigrationTlsConfig;
use crate::migrate::stall::StallGuard;

/// Why a TLS configuration cannot be used. Each message names the file and the option.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("TLS {what} file {}: {source}", .path.display())]
    Read {
        /// `cert=`, `key=` or `ca=`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file holds no PEM item of the kind needed.
    #[error("TLS {what} file {}: no {expected} in it; give a PEM file (-----BEGIN ...-----)", .path.display())]
    NoPem {
        /// `cert=`, `key=` or `ca=`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What was looked for.
        expected: &'static str,
    },
    /// A file's PEM does not parse.
    #[error("TLS {what} file {}: not valid PEM: {reason}", .path.display())]
    BadPem {
        /// `cert=`, `key=` or `ca=`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The parser's reason.
        reason: String,
    },
    /// A CA certificate is not usable as a trust anchor.
    #[error("TLS ca file {}: certificate {index} cannot be trusted as a CA: {reason}", .path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Which certificate (from 1).
        index: usize,
        /// Why.
        reason: String,
    },
    /// The key does not belong to the certificate.
    #[error("TLS key file {} does not match the certificate in {}: give the private key the certificate was issued for", .key.display(), .cert.display())]
    KeyMismatch {
        /// `cert=`.
        cert: PathBuf,
        /// `key=`.
        key: PathBuf,
    },
    /// The certificate or key cannot be used otherwise (e.g. an unsupported key type).
    #[error("TLS cert {} / key {}: {reason}", .cert.display(), .key.display())]
    Identity {
        /// `cert=`.
        cert: PathBuf,
        /// `key=`.
        key: PathBuf,
        /// rustls's reason.
        reason: String,
    },
    /// The client-certificate verifier cannot be built from the CA.
    #[error("TLS ca file {}: {reason}", .path.display())]
    Verifier {
        /// `ca=`.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `server-name` (or the URL's host) is not a DNS name or IP address.
    #[error("{name:?} is not a DNS name or IP address to check the destination's certificate against; give server-name=NAME")]
    ServerName {
        /// The name.
        name: String,
    },
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn pem_error(what: &'static str, path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::BadPem {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// The certificates in a PEM file (`what` is the option, for errors).
fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoPem {
            what,
            path: path.to_owned(),
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read("key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPem {
            what: "key",
            path: path.to_owned(),
            expected: "PRIVATE KEY",
        },
        e => pem_error("key", path, e),
    })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for (n, c) in certs("ca", path)?.into_iter().enumerate() {
        store.add(c).map_err(|e| TlsError::BadCa {
            path: path.to_owned(),
            index: n + 1,
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(store))
}

/// ring's provider: X25519 / P-256 / P-384 key exchange, AES-GCM and ChaCha20-Poly1305.
/// rustls 0.23.48 deprecated it for having no post-quantum key exchange (only aws-lc-rs has
/// one, and it needs cmake to build here); a recorded migration stream could be decrypted
/// by a future quantum computer, which is the accepted trade-off until ring gains ML-KEM.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

fn identity_error(cfg: &MigrationTlsConfig, e: rustls::Error) -> TlsError {
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::KeyMismatch {
                cert: cfg.cert.clone(),
                key: cfg.key.clone(),
            }
        }
        e => TlsError::Identity {
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            reason: e.to_string(),
        },
    }
}

/// The destination's TLS: its certificate and key, and client certificates required and
/// checked against `ca`.
pub fn server_config(cfg: &MigrationTlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let (chain, key, roots) = (certs("cert", &cfg.cert)?, key(&cfg.key)?, roots(&cfg.ca)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Verifier {
            path: cfg.ca.clone(),
            reason: e.to_string(),
        })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| identity_error(cfg, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| identity_error(cfg, e))?;
    Ok(Arc::new(config))
}

/// The source's TLS: its certificate and key (sent when the destination asks, which it
/// always does), and the destination's certificate checked against `ca`.
pub fn client_config(cfg: &MigrationTlsConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let (chain, key, roots) = (certs("cert", &cfg.cert)?, key(&cfg.key)?, roots(&cfg.ca)?);
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| identity_error(cfg, e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| identity_error(cfg, e))?;
    Ok(Arc::new(config))
}

/// The name the destination's certificate is checked against: `server-name=` or the
/// URL's host.
pub fn server_name(cfg: &MigrationTlsConfig, host: &str) -> Result<ServerName<'static>, TlsError> {
    let name = cfg.server_name.as_deref().unwrap_or(host);
    // An IPv6 host comes bracketed in the URL.
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_owned()).map_err(|_| TlsError::ServerName {
        name: name.to_owned(),
    })
}

/// Sets `tcp`'s timeouts to what is left until `until`, so a trickle of bytes cannot
/// stretch a phase that must end by then; fails once it passed.
pub fn arm(tcp: &TcpStream, until: Instant) -> io::Result<()> {
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the deadline passed",
        ));
    }
    tcp.set_read_timeout(Some(left))?;
    tcp.set_write_timeout(Some(left))
}

/// The TLS session of a connection, either side.
enum Session {
    Server(rustls::StreamOwned<ServerConnection, TcpStream>),
    Client(rustls::StreamOwned<ClientConnection, TcpStream>),
}

/// One migration connection: plain TCP, or TLS over it. Clones share the connection (a
/// reader and a writer on it); each side of a migration uses it from one thread at a time
/// (it sends, then waits for the answer), so the TLS session's lock is never contended.
pub struct Conn {
    tcp: TcpStream,
    tls: Option<Arc<Mutex<Session>>>,
}

impl Conn {
    /// A plain TCP connection.
    pub fn plain(tcp: TcpStream) -> Conn {
        Conn { tcp, tls: None }
    }

    /// Runs the server side of the handshake on `tcp`, done by `until`. Fails if the
    /// client presents no certificate or one not signed by the CA.
    pub fn accept_tls(
        tcp: TcpStream,
        config: Arc<ServerConfig>,
        until: Instant,
    ) -> io::Result<Conn> {
        let conn = ServerConnection::new(config).map_err(io::Error::other)?;
        let mut s = rustls::StreamOwned::new(conn, tcp.try_clone()?);
        while s.conn.is_handshaking() {
            arm(&tcp, until)?;
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(Conn {
            tcp,
            tls: Some(Arc::new(Mutex::new(Session::Server(s)))),
        })
    }

    /// Runs the client side of the handshake on `tcp` (within the socket's timeouts).
    /// Fails if the server's certificate is not signed by the CA or not issued for `name`.
    pub fn connect_tls(
        tcp: TcpStream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<Conn> {
        let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        let mut s = rustls::StreamOwned::new(conn, tcp.try_clone()?);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(Conn {
            tcp,
            tls: Some(Arc::new(Mutex::new(Session::Client(s)))),
        })
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(Conn {
            tcp: self.tcp.try_clone()?,
            tls: self.tls.clone(),
        })
    }

    /// The TCP socket under it (for its timeouts).
    pub fn socket(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether it is encrypted and authenticated.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

fn lock(s: &Mutex<Session>) -> io::Result<MutexGuard<'_, Session>> {
    s.lock()
        .map_err(|_| io::Error::other("the TLS session was poisoned by a panic"))
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.tls {
            None => (&self.tcp).read(buf),
            Some(s) => match &mut *lock(s)? {
                Session::Server(s) => s.read(buf),
                Session::Client(s) => s.read(buf),
            },
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.tls {
            None => (&self.tcp).write(buf),
            Some(s) => match &mut *lock(s)? {
                Session::Server(s) => write_plain(&mut s.conn, &s.sock, buf),
                Session::Client(s) => write_plain(&mut s.conn, &s.sock, buf),
            },
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &self.tls {
            None => (&self.tcp).flush(),
            Some(s) => match &mut *lock(s)? {
                Session::Server(s) => flush_plain(&mut s.conn, &s.sock),
                Session::Client(s) => flush_plain(&mut s.conn, &s.sock),
            },
        }
    }
}

// Writes go to rustls's connection and the socket directly, not through
// `rustls::StreamOwned::write`: that one drops the error of pushing the records out (the
// caller learns of it on its next call), and rustls's `complete_io`, when a socket write
// blocks, goes on to *read* (a connection always wants to read), so each call costs a send
// timeout plus a receive timeout. With the link cut a source then took over two minutes to
// give up (the migration faults test, over TLS). Here a write pushes its records out at
// once, writing only, and the first failure is the call's.

/// Takes `buf` into the session and pushes its records out.
fn write_plain<D>(
    conn: &mut rustls::ConnectionCommon<D>,
    sock: &TcpStream,
    buf: &[u8],
) -> io::Result<usize> {
    push(conn, sock)?;
    let n = conn.writer().write(buf)?;
    push(conn, sock)?;
    Ok(n)
}

fn flush_plain<D>(conn: &mut rustls::ConnectionCommon<D>, sock: &TcpStream) -> io::Result<()> {
    conn.writer().flush()?;
    push(conn, sock)?;
    let mut s = sock;
    s.flush()
}

/// Writes the TLS records the session holds to `sock`, writing only. A socket write that
/// comes back short only after the socket's send timeout is a stall, as over TCP
/// ([`StallGuard`]).
fn push<D>(conn: &mut rustls::ConnectionCommon<D>, sock: &TcpStream) -> io::Result<()> {
    let timeout = sock.write_timeout()?;
    while conn.wants_write() {
        let mut s = sock;
        let n = match timeout {
            Some(t) => conn.write_tls(&mut StallGuard::new(s, t)),
            None => conn.write_tls(&mut s),
        }?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the socket took no bytes of a TLS record",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
