//! Live migration between two VMM processes over TCP, in clear (`tcp:`) or over mutual
//! TLS (`tls:`).
//!
//! - [`source`]: `vmm ctl migrate tcp:HOST:PORT` (or `tls:HOST:PORT --tls ...`): pre-copy of guest RAM (KVM's dirty log)
//!   together with the devices' dirty pages and pre-copy data, iterated until the rest fits
//!   the downtime budget at the measured bandwidth, then stop-and-copy; any failure before
//!   the destination says it runs the guest leaves the source running;
//! - [`incoming`]: `vmm --incoming tcp:ADDR:PORT` (or `tls:ADDR:PORT --migration-tls
//!   ...`): waits for a source whose stream starts well (refused or broken connections
//!   are logged and the next one is taken), checks it, builds the VM, loads the stream and
//!   resumes the guest;
//! - [`tls`]: certificates, keys and CAs, and [`tls::Conn`], a connection either way;
//! - [`progress`]: what the source reports while it migrates;
//! - [`throttle`]: pre-copy's bandwidth cap;
//! - [`stall`]: a cut link fails the stream after one I/O timeout;
//! - [`error`]: why a migration could not start or failed.
//!
//! The protocol (sections of the `migration` stream):
//! ```text
//! source                                   destination
//! header(LIVE), VmConfig        ------>
//!                               <------    header(LIVE|REPLY), Ready   (or Abort)
//! IterationBegin(0), RAM..., device pre-copy chunks, IterationEnd(0)
//!                               <------    Synced(0)  (pass applied; the source waits)
//! IterationBegin(n), dirty RAM..., IterationEnd(n)      (n = 1, 2, ...)
//!                               <------    Synced(n)
//! StopAndCopy, dirty RAM, device final state, vCPUs, irqchip/PIT/clock, Complete
//!                               <------    Resumed                     (or Abort)
//! source exits 0                           guest runs here
//! ```

pub mod error;
pub mod incoming;
pub mod progress;
pub mod source;
pub mod stall;
pub mod throttle;
pub mod tls;

/// How a migration's stream travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `tcp:`: clear text and unauthenticated, for trusted networks and tests.
    Tcp,
    /// `tls:`: mutual TLS (see [`tls`]).
    Tls,
}

/// A parsed `tcp:HOST:PORT` or `tls:HOST:PORT`.
#[derive(Clone, Debug)]
pub struct Target {
    /// The scheme.
    pub transport: Transport,
    /// HOST as written (the default name a `tls:` destination's certificate must carry).
    pub host: String,
    /// What it resolves to (the first address).
    pub addr: std::net::SocketAddr,
}

/// Parses `tcp:HOST:PORT` or `tls:HOST:PORT`.
pub fn parse_url(url: &str) -> Result<Target, error::UrlError> {
    use std::net::ToSocketAddrs;
    let (transport, rest) = if let Some(rest) = url.strip_prefix("tcp:") {
        (Transport::Tcp, rest)
    } else if let Some(rest) = url.strip_prefix("tls:") {
        (Transport::Tls, rest)
    } else {
        return Err(error::UrlError::Scheme(url.to_owned()));
    };
    let addr = rest
        .to_socket_addrs()
        .map_err(|source| error::UrlError::Resolve {
            url: url.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| error::UrlError::NoAddress(url.to_owned()))?;
    let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h).to_owned();
    Ok(Target {
        transport,
        host,
        addr,
    })
}

#[cfg(test)]
mod tests {
    use super::{parse_url, Transport};

    #[test]
    fn urls_parse_and_bad_ones_say_why() {
        let t = parse_url("tcp:127.0.0.1:4444").unwrap();
        assert_eq!((t.transport, t.addr.port()), (Transport::Tcp, 4444));
        let t = parse_url("tls:127.0.0.1:4445").unwrap();
        assert_eq!(
            (t.transport, t.host.as_str()),
            (Transport::Tls, "127.0.0.1")
        );
        let t = parse_url("tls:localhost:4445").unwrap();
        assert_eq!(t.host, "localhost");
        let t = parse_url("tls:[::1]:4445").unwrap();
        assert_eq!(t.host, "[::1]");
        assert!(parse_url("udp:1.2.3.4:5")
            .unwrap_err()
            .to_string()
            .contains("only tcp:HOST:PORT and tls:HOST:PORT"));
        assert!(parse_url("tcp:1.2.3.4")
            .unwrap_err()
            .to_string()
            .contains("tcp:HOST:PORT"));
    }
}
