//! The TLS files' errors, and handshakes over loopback: a peer whose certificate another
//! CA signed is refused by either side. Certificates are made with the openssl command.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use test_pki::Ca;

use super::*;

/// A directory of test certificates (made by `test_pki`), removed when dropped.
struct Pki {
    dir: PathBuf,
    /// The CAs made by `ca()`, by name.
    cas: HashMap<String, Ca>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("vmm-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Pki {
            dir,
            cas: HashMap::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn ca(&mut self, name: &str) {
        let ca = Ca::new(&self.dir, name).expect("test CA");
        self.cas.insert(name.to_string(), ca);
    }

    /// `name.pem`/`name.key` signed by `ca`, for 127.0.0.1 and localhost.
    fn issue(&self, name: &str, ca: &str) {
        self.cas[ca]
            .issue(name, &["IP:127.0.0.1", "DNS:localhost"])
            .expect("test certificate");
    }

    fn config(&self, name: &str, ca: &str) -> MigrationTlsConfig {
        MigrationTlsConfig {
            cert: self.path(&format!("{name}.pem")),
            key: self.path(&format!("{name}.key")),
            ca: self.path(&format!("{ca}.pem")),
            server_name: None,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn contains(e: &TlsError, parts: &[&str]) {
    let text = e.to_string();
    for p in parts {
        assert!(text.contains(p), "{text:?} should say {p:?}");
    }
}

#[test]
fn bad_tls_files_say_which_and_why() {
    let mut pki = Pki::new("files");
    pki.ca("ca1");
    pki.issue("a", "ca1");
    pki.issue("b", "ca1");
    let good = pki.config("a", "ca1");
    server_config(&good).unwrap();
    client_config(&good).unwrap();

    let missing = pki.path("missing.pem");
    let e = server_config(&MigrationTlsConfig {
        cert: missing.clone(),
        ..good.clone()
    })
    .unwrap_err();
    contains(
        &e,
        &["TLS cert file", missing.to_str().unwrap(), "No such file"],
    );

    let text = pki.path("notes.txt");
    std::fs::write(&text, "this is not a certificate\n").unwrap();
    let e = client_config(&MigrationTlsConfig {
        ca: text.clone(),
        ..good.clone()
    })
    .unwrap_err();
    contains(
        &e,
        &[
            "TLS ca file",
            text.to_str().unwrap(),
            "no CERTIFICATE",
            "PEM",
        ],
    );
    let e = server_config(&MigrationTlsConfig {
        key: text.clone(),
        ..good.clone()
    })
    .unwrap_err();
    contains(&e, &["TLS key file", "no PRIVATE KEY"]);
    // A certificate where the key should be is no key either.
    let e = server_config(&MigrationTlsConfig {
        key: good.cert.clone(),
        ..good.clone()
    })
    .unwrap_err();
    contains(&e, &["TLS key file", "no PRIVATE KEY"]);

    // b's key with a's certificate, on both sides.
    let mismatched = MigrationTlsConfig {
        key: pki.path("b.key"),
        ..good.clone()
    };
    for e in [
        server_config(&mismatched).unwrap_err(),
        client_config(&mismatched).unwrap_err(),
    ] {
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e:?}");
        contains(&e, &["b.key", "does not match the certificate in", "a.pem"]);
    }

    // A truncated PEM block.
    let cut = pki.path("cut.pem");
    let pem = std::fs::read_to_string(&good.cert).unwrap();
    std::fs::write(&cut, &pem[..pem.len() / 2]).unwrap();
    let e = server_config(&MigrationTlsConfig {
        cert: cut,
        ..good.clone()
    })
    .unwrap_err();
    contains(&e, &["TLS cert file", "not valid PEM"]);

    let e = server_name(&good, "not a host name!").unwrap_err();
    contains(&e, &["not a DNS name or IP address", "server-name"]);
    assert!(server_name(&good, "[::1]").is_ok());
}

/// Handshakes `client` against `server` over loopback; each side's result.
fn handshake(
    server: &MigrationTlsConfig,
    client: &MigrationTlsConfig,
    host: &str,
) -> (io::Result<Conn>, io::Result<Conn>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (s, c) = (
        server_config(server).unwrap(),
        client_config(client).unwrap(),
    );
    let name = server_name(client, host).unwrap();
    let t = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let conn = Conn::accept_tls(tcp, s, Instant::now() + Duration::from_secs(10));
        // TLS 1.3: the client may finish before the server has checked its certificate;
        // reading the first byte shows whether the server took it.
        conn.and_then(|mut conn| {
            let mut b = [0u8; 1];
            conn.read_exact(&mut b)?;
            conn.write_all(b"k")?;
            conn.flush()?;
            Ok(conn)
        })
    });
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let client = Conn::connect_tls(tcp, c, name).and_then(|mut conn| {
        conn.write_all(b"x")?;
        conn.flush()?;
        let mut b = [0u8; 1];
        conn.read_exact(&mut b)?;
        Ok(conn)
    });
    let server = t.join().unwrap();
    (server, client)
}

#[test]
fn peers_of_another_ca_are_refused_both_ways() {
    let mut pki = Pki::new("peers");
    pki.ca("ca1");
    pki.ca("ca2");
    pki.issue("dst", "ca1");
    pki.issue("src", "ca1");
    pki.issue("rogue", "ca2");
    let dst = pki.config("dst", "ca1");
    let src = pki.config("src", "ca1");

    let (s, c) = handshake(&dst, &src, "127.0.0.1");
    assert!(s.is_ok() && c.is_ok(), "{:?} / {:?}", s.err(), c.err());
    let (s, c) = handshake(&dst, &src, "localhost");
    assert!(s.is_ok() && c.is_ok(), "{:?} / {:?}", s.err(), c.err());

    // A source whose certificate CA2 signed: the destination refuses it.
    let (s, c) = handshake(&dst, &pki.config("rogue", "ca1"), "127.0.0.1");
    let e = s
        .err()
        .expect("the destination accepted a certificate of another CA");
    eprintln!("destination refusing the rogue source: {e}");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    assert!(c.is_err(), "the rogue source was answered");

    // A destination whose certificate CA2 signed: the source refuses it.
    let (s, c) = handshake(&pki.config("rogue", "ca2"), &src, "127.0.0.1");
    let e = c
        .err()
        .expect("the source accepted a destination of another CA");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    assert!(s.is_err());

    // The right CA, the wrong name.
    let named = MigrationTlsConfig {
        server_name: Some("other.example".into()),
        ..src.clone()
    };
    let (_, c) = handshake(&dst, &named, "127.0.0.1");
    let e = c
        .err()
        .expect("the source accepted a certificate for another name");
    assert!(e.to_string().contains("not valid for name"), "{e}");
}

#[test]
fn a_server_handshake_ends_at_its_deadline() {
    let mut pki = Pki::new("deadline");
    pki.ca("ca1");
    pki.issue("dst", "ca1");
    let config = server_config(&pki.config("dst", "ca1")).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let _silent = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (tcp, _) = listener.accept().unwrap();
    let t = Instant::now();
    let e = Conn::accept_tls(tcp, config, Instant::now() + Duration::from_millis(300))
        .err()
        .expect("a handshake with a silent client");
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

/// A TLS peer that stops reading (to the writer a cut link looks the same): the source's
/// writes over TLS fail within about one send timeout, as over TCP, and the first failure
/// is reported by the call that met it. Through `rustls::StreamOwned::write` each blocked
/// call also waited out the receive timeout (rustls reads when a write blocks) and the
/// first error was dropped: a migration source took over two minutes to give up after a
/// cut. The receive timeout here is long so that such a wait shows.
#[test]
fn a_tls_peer_that_stops_reading_fails_the_stream_within_about_one_timeout() {
    let mut pki = Pki::new("stall");
    pki.ca("ca1");
    pki.issue("dst", "ca1");
    pki.issue("src", "ca1");
    let (s, c) = handshake(
        &pki.config("dst", "ca1"),
        &pki.config("src", "ca1"),
        "127.0.0.1",
    );
    let (_server, mut client) = (s.unwrap(), c.unwrap());
    let timeout = Duration::from_millis(300);
    client.socket().set_write_timeout(Some(timeout)).unwrap();
    client
        .socket()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let chunk = vec![0u8; 64 << 10];
    let start = Instant::now();
    let mut longest = Duration::ZERO;
    let mut failed = None;
    while start.elapsed() < Duration::from_secs(60) {
        let t = Instant::now();
        let r = client.write_all(&chunk);
        longest = longest.max(t.elapsed());
        if let Err(e) = r {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("the writes never failed");
    eprintln!(
        "failed with {e} after {:?}; the longest call took {longest:?}",
        start.elapsed()
    );
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    assert!(
        longest < timeout * 3,
        "a call took {longest:?} (send timeout {timeout:?}): {e}"
    );
}
