//! Live migration between two VMM processes over TCP.
//!
//! - [`source`]: `vmm ctl migrate tcp:HOST:PORT`: pre-copy of guest RAM (KVM's dirty log)
//!   together with the devices' dirty pages and pre-copy data, iterated until the rest fits
//!   the downtime budget at the measured bandwidth, then stop-and-copy; any failure before
//!   the destination says it runs the guest leaves the source running;
//! - [`incoming`]: `vmm --incoming tcp:ADDR:PORT`: accepts one migration, checks it,
//!   builds the VM, loads the stream and resumes the guest;
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

/// Parses `tcp:HOST:PORT`.
pub fn parse_tcp(url: &str) -> Result<std::net::SocketAddr, error::UrlError> {
    use std::net::ToSocketAddrs;
    let rest = url
        .strip_prefix("tcp:")
        .ok_or_else(|| error::UrlError::Scheme(url.to_owned()))?;
    rest.to_socket_addrs()
        .map_err(|source| error::UrlError::Resolve {
            url: url.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| error::UrlError::NoAddress(url.to_owned()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tcp_urls_parse_and_bad_ones_say_why() {
        assert_eq!(super::parse_tcp("tcp:127.0.0.1:4444").unwrap().port(), 4444);
        assert!(super::parse_tcp("udp:1.2.3.4:5")
            .unwrap_err()
            .to_string()
            .contains("only tcp:HOST:PORT"));
        assert!(super::parse_tcp("tcp:1.2.3.4")
            .unwrap_err()
            .to_string()
            .contains("tcp:HOST:PORT"));
    }
}
